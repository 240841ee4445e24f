"""Training methods behind one registry: plain baselines, meta-reweighting, LFM-DR."""

# the architecture searches are methods of the same Trainer; they live with the NAS application
import lfm.nas.search  # noqa: E402, F401 - registers darts, pdarts, lfm-darts, lfm-pdarts
from lfm.methods import lfm_class, lfm_dr, meta, plain, small_loss  # noqa: F401 - each registers itself
from lfm.methods.base import METHODS, Context, Method

__all__ = ["METHODS", "Context", "Method"]
