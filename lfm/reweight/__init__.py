"""The stage-2 reweighting function a_i = sigmoid(sum_j x_ij z_ij u_j r_j), how b enters stage 1,
and the encoders V that x_ij is computed from."""

from lfm.reweight.function import (
    B_MODES,
    SIMILARITIES,
    attention,
    b_weights,
    label_match,
    reweight,
    similarity,
)

__all__ = [
    "B_MODES",
    "SIMILARITIES",
    "attention",
    "b_weights",
    "label_match",
    "reweight",
    "similarity",
]
