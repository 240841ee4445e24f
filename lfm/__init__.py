"""lfm: Learning From Mistakes (Zhang, Garg, Sridhara, Hosseini, Xie; IEEE Trans. AI, 2025).

A multilevel optimization library: learner W1 learns, learner W2 relearns on training
examples reweighted by W1's validation mistakes, and the hyperparameters B, the encoder V
and the coefficients r learn from W2's validation loss.
"""

from lfm.errors import LFMError

__version__ = "0.1.0"
__all__ = ["LFMError", "__version__"]
