"""Training methods behind one registry: plain baselines, meta-reweighting, LFM-DR."""

from lfm.methods import lfm_class, lfm_dr, meta, plain, small_loss  # noqa: F401 - each registers itself
from lfm.methods.base import METHODS, Context, Method

__all__ = ["METHODS", "Context", "Method"]
