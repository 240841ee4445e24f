"""Equations (2)-(5) of the paper, and how the per-example weights b enter stage 1.

    x_ij = softmax_j( sim(V(d_i), V(d_j)) )      (2)  visual similarity, over validation examples j
    z_ij = 1[y_i == y_j]                          (3)  label similarity
    u_j  = CE(f(d_j; W1'), y_j)                   (4)  W1's mistake on validation example j
    a_i  = sigmoid( sum_j x_ij z_ij u_j r_j )     (5)  weight of training example i in stage 2

Ablations (paper Fig. 4) drop one factor: without x the attention is uniform (x_ij = 1/m, so
the sum keeps the scale of a softmax average), without z or u the factor is 1.
Similarities (Fig. 5): `dot` (the paper's dot-product attention), `cosine`, `l2` (negative
Euclidean distance).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SIMILARITIES = ("dot", "cosine", "l2")
B_MODES = ("raw", "sigmoid", "batch-normalised")


def similarity(e_tr: Tensor, e_val: Tensor, kind: str = "dot") -> Tensor:
    """Pairwise similarity of training and validation embeddings, (n, K) x (m, K) -> (n, m)."""
    if kind == "dot":
        return e_tr @ e_val.T
    if kind == "cosine":
        return F.normalize(e_tr, dim=1) @ F.normalize(e_val, dim=1).T
    if kind == "l2":  # -||e_i - e_j||, with a floor inside the sqrt so the gradient stays finite
        sq = (e_tr**2).sum(1, keepdim=True) + (e_val**2).sum(1)[None] - 2 * e_tr @ e_val.T
        return -sq.clamp_min(1e-12).sqrt()
    raise ValueError(f"unknown similarity {kind!r}; use one of {SIMILARITIES}")


def attention(e_tr: Tensor, e_val: Tensor, kind: str = "dot", temperature: float = 1.0) -> Tensor:
    """x = softmax over validation examples of similarity / temperature, (n, m); rows sum to 1."""
    # mutant attention-wrong-axis: `dim=1` -> `dim=0` | reweight hypergradients:dr-
    return torch.softmax(similarity(e_tr, e_val, kind) / temperature, dim=1)


def label_match(y_tr: Tensor, y_val: Tensor) -> Tensor:
    """z_ij = 1[y_i == y_j] as floats, (n, m)."""
    # mutant z-inverted: `==` -> `!=` | reweight hypergradients:dr-
    return (y_tr[:, None] == y_val[None, :]).float()


def reweight(
    x: Tensor | None,
    z: Tensor | None,
    u: Tensor | None,
    r: Tensor,
    *,
    normalise: bool = False,
) -> Tensor:
    """a_i = sigmoid(sum_j x_ij z_ij u_j r_j), (n,).

    Pass None for a factor to drop it (ablation): x -> 1/m, z -> 1, u -> 1.
    normalise: a_i / mean_batch(a), so that the weights change the *mix* of examples in W2's
    step and not its size (the `a-normalised` variant).
    """
    m = len(r)
    prod = r[None, :]  # (1, m)
    prod = prod * (x if x is not None else torch.full_like(r, 1.0 / m)[None, :])
    if z is not None:
        # mutant a-drops-z: ` * z.to(r.dtype)` -> `` | reweight hypergradients:dr-
        prod = prod * z.to(r.dtype)
    if u is not None:
        # mutant a-drops-u: ` * u[None, :]` -> `` | reweight hypergradients:dr-
        prod = prod * u[None, :]
    a = torch.sigmoid(prod.sum(1))  # (n,)
    # mutant a-norm-by-sum: `a / a.mean()` -> `a / a.sum()` | reweight hypergradients:dr-
    return a / a.mean() if normalise else a


def b_weights(b: Tensor, mode: str = "raw") -> Tensor:
    """w(b): how the per-example hyperparameters b enter the stage-1 loss mean_i w_i l_i(W1).

    raw: w = b (the paper's sum_i b_i l_i; b is clamped to >= 0 after each update);
    sigmoid: w = sigmoid(b); batch-normalised: w_i = b_i / mean_batch(b), which leaves
    W1's step size to the learning rate and lets b change only the mix.
    """
    if mode == "raw":
        return b
    if mode == "sigmoid":
        return torch.sigmoid(b)
    if mode == "batch-normalised":
        return b / b.mean().clamp_min(1e-12)
    raise ValueError(f"unknown b mode {mode!r}; use one of {B_MODES}")
