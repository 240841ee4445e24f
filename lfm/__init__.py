"""lfm: Learning From Mistakes (Zhang, Garg, Sridhara, Hosseini, Xie; IEEE Trans. AI, 2025).

A multilevel optimization library: learner W1 learns, learner W2 relearns on training
examples reweighted by W1's validation mistakes, and the hyperparameters B, the encoder V
and the coefficients r learn from W2's validation loss.
"""

from typing import Any

from lfm.errors import LFMError

__version__ = "0.1.0"
__all__ = ["LFMError", "Reweighter", "__version__"]


def __getattr__(name: str) -> Any:
    # `import lfm` stays light (the CLI's error path imports it); the API loads on first use
    if name == "Reweighter":
        from lfm.reweighter import Reweighter

        return Reweighter
    raise AttributeError(f"module 'lfm' has no attribute {name!r}")
