"""The multilevel engine: functional learners, virtual (= real) SGD steps, hypergradient
backends (exact jvp / finite differences) and the LFM-DR trilevel iteration.

    from lfm.engine import Learner, VirtualSGD, IterOptions, iteration, commit
"""

from lfm.engine.functional import buffers_of, forward, losses, params_of
from lfm.engine.hypergrad import BACKENDS, loss_fd, loss_jvp
from lfm.engine.trilevel import (
    B_PATHS,
    IterOptions,
    IterResult,
    Learner,
    check_finite,
    commit,
    iteration,
    learn,
    relearn,
    validate,
)
from lfm.engine.virtual import EntryOptimizer, VirtualSGD

__all__ = [
    "BACKENDS",
    "B_PATHS",
    "EntryOptimizer",
    "IterOptions",
    "IterResult",
    "Learner",
    "VirtualSGD",
    "buffers_of",
    "check_finite",
    "commit",
    "forward",
    "iteration",
    "learn",
    "loss_fd",
    "loss_jvp",
    "losses",
    "params_of",
    "relearn",
    "validate",
]
