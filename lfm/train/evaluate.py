"""Accuracy, per-class accuracy and the confusion matrix of a classifier on a split."""

from __future__ import annotations

import torch
from torch import nn

from lfm.data.types import DataBundle, Split, iterate_batches


@torch.no_grad()
def predict(
    model: nn.Module, bundle: DataBundle, split: Split, device: torch.device, batch_size: int = 500
) -> torch.Tensor:
    """(N, C) logits of `model` on every example of `split`, in order, in eval mode.

    A streaming split is read through a DataLoader with its loader workers (`iterate_batches`).
    """
    was_training = model.training
    model.eval()
    out = [
        model(bundle.inputs(b.x, train=False)).float().cpu()
        for b in iterate_batches(split, batch_size, device=device, shuffle=False)
    ]
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, bundle.num_classes)


def confusion_matrix(y: torch.Tensor, pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) counts; row = true class, column = predicted class."""
    return torch.bincount(y * num_classes + pred, minlength=num_classes**2).view(
        num_classes, num_classes
    )


def metrics_from_logits(logits: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict:
    """acc, loss, per-class accuracy and confusion matrix, as plain python values."""
    pred = logits.argmax(1)
    cm = confusion_matrix(y, pred, num_classes)
    support = cm.sum(1)
    per_class = (cm.diag().float() / support.clamp(min=1).float()).tolist()
    return {
        "acc": (pred == y).float().mean().item() if len(y) else float("nan"),
        "loss": torch.nn.functional.cross_entropy(logits, y).item() if len(y) else float("nan"),
        "per_class_acc": [round(a, 5) for a in per_class],
        "confusion": cm.tolist(),
    }


def evaluate(model: nn.Module, bundle: DataBundle, split: Split, device: torch.device) -> dict:
    """Metrics of `model` on `split` (labels as stored; for test and validation these are clean)."""
    return metrics_from_logits(predict(model, bundle, split, device), split.y, bundle.num_classes)
