"""Training methods behind one registry: plain baselines, meta-reweighting, LFM-DR."""

from lfm.methods import plain  # noqa: F401 - registers ce, focal, cb, ce-clean, ce-all
from lfm.methods.base import METHODS, Context, Method

try:  # LFM-DR registers itself once it exists
    from lfm.methods import lfm_dr  # noqa: F401
except ImportError:  # pragma: no cover
    pass

__all__ = ["METHODS", "Context", "Method"]
