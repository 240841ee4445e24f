"""`MODELS`, the name -> factory table, and `create_model`, the one way to build a model."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

from lfm.errors import LFMError, shown
from lfm.models.base import Classifier
from lfm.registry import Registry

# Every factory has the signature (num_classes: int, input_shape: tuple[int, ...], **kwargs).
MODELS: Registry[Classifier] = Registry("model")


def create_model(name: str, num_classes: int, input_shape: Sequence[int], **kwargs) -> Classifier:
    """Build the registered model `name` for `num_classes` classes and per-example `input_shape`."""
    factory = MODELS.get(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise LFMError(f"num_classes must be a positive integer, got {shown(num_classes)}")
    shape = tuple(input_shape)
    if not shape or not all(isinstance(d, int) and d > 0 for d in shape):
        raise LFMError(
            f"input_shape must be a non-empty tuple of positive integers, got {shown(input_shape)}",
            "pass the shape of one example without the batch dimension, e.g. (3, 32, 32)",
        )
    # Check the keyword arguments here, so a typo is an LFMError and not a TypeError deep inside.
    params = inspect.signature(factory).parameters
    accepted = [p for p in list(params)[2:] if params[p].kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        options = ", ".join(accepted) if accepted else "none"
        raise LFMError(
            f"model {name!r} got unknown option(s) {', '.join(unknown)}",
            f"its options are: {options}",
        )
    return factory(num_classes, shape, **kwargs)
