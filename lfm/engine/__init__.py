"""The multilevel engine: functional learners, the unrolled (= real) optimizer step, the
hypergradient backends (exact jvp / finite differences) of both applications, and the
trilevel iteration over an upper variable (per-example weights b, per-class weights, ...).

    from lfm.engine import Learner, VirtualSGD, IterOptions, iteration, commit
"""

from lfm.engine.functional import buffers_of, forward, losses, params_of
from lfm.engine.hypergrad import BACKENDS, loss_fd, loss_jvp, mixed_grad
from lfm.engine.trilevel import (
    B_PATHS,
    BPath,
    IterOptions,
    IterResult,
    Learner,
    Upper,
    check_finite,
    commit,
    iteration,
    learn,
    per_example_upper,
    relearn,
    validate,
)
from lfm.engine.virtual import EntryOptimizer, StepRule, Unrolled, VirtualSGD

__all__ = [
    "BACKENDS",
    "B_PATHS",
    "BPath",
    "EntryOptimizer",
    "IterOptions",
    "IterResult",
    "Learner",
    "StepRule",
    "Unrolled",
    "Upper",
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
    "mixed_grad",
    "params_of",
    "per_example_upper",
    "relearn",
    "validate",
]
