"""Load a local torchvision ResNet state dict into our ImageNet ResNets (no downloads, ever).

torchvision names the parts `conv1, bn1, layer1..layer4, fc`; ours are the same names under
`body.` and with `fc` renamed `head`. The file is read with `torch.load(weights_only=True)`,
which only rebuilds tensors and plain containers and refuses any pickle that would run code.

Differences the loader resolves rather than refuses (each is listed in the returned report):
- `fc.*` is skipped when the number of classes differs (the head keeps its fresh init);
- `conv1.weight` is skipped when the model has the small-input 3x3 stem instead of 7x7;
- `conv1.weight` is adapted when the input channels differ: summed over RGB for 1 channel
  (so a grey image gives the same activations as that image copied to R, G and B), and
  for C > 3 channels the RGB filters are repeated and scaled by 3 / C (as timm does).
Anything else (a missing or unexpected key, another shape mismatch) is an LFMError.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lfm.errors import LFMError

log = logging.getLogger(__name__)


@dataclass
class LoadReport:
    """What `load_torchvision_resnet` did, key by key (torchvision key names)."""

    loaded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # key -> why it was not loaded
    adapted: dict[str, str] = field(default_factory=dict)  # key -> how it was changed


def _names(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown if len(keys) <= limit else f"{shown}, ... ({len(keys)} in all)"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a tensor-only state dict from `path` with weights_only=True; LFMError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise LFMError(
            f"weights file {str(path)!r} does not exist",
            "give the path of a local torchvision state dict (.pth), e.g. one downloaded "
            "once on a machine with internet and copied here",
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for code in the pickle, RuntimeError for junk
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LFMError(
            f"weights file {str(path)!r} is not a plain tensor state dict; "
            f"torch.load(weights_only=True) refused it ({reason})",
            "save only tensors, e.g. torch.save(model.state_dict(), path); "
            "files that need code to unpickle are never loaded",
        ) from None
    # Training checkpoints often wrap the state dict; accept the two usual wrappers.
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not (
        isinstance(obj, Mapping)
        and obj
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        raise LFMError(
            f"weights file {str(path)!r} holds a {type(obj).__name__}, not a state dict "
            "(a non-empty dict of parameter name -> tensor)",
            "save the file with torch.save(model.state_dict(), path)",
        )
    sd = dict(obj)
    # nn.DataParallel / DistributedDataParallel prefix every key with "module."
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _to_ours(key: str) -> str:
    """torchvision key -> our key: `fc.*` -> `head.*`, everything else under `body.`."""
    return "head." + key[len("fc.") :] if key.startswith("fc.") else "body." + key


def adapt_conv_channels(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """Turn a (O, 3, k, k) RGB conv filter into (O, channels, k, k) (see module docstring)."""
    if channels == 1:
        return weight.sum(dim=1, keepdim=True)  # (O, 3, k, k) -> (O, 1, k, k)
    reps = -(-channels // weight.shape[1])  # ceil
    tiled = weight.repeat(1, reps, 1, 1)[:, :channels]  # (O, 3, k, k) -> (O, C, k, k)
    return tiled * (weight.shape[1] / channels)  # keep the response to a constant image


def load_torchvision_resnet(model: nn.Module, path: str | Path) -> LoadReport:
    """Load a local torchvision ResNet state dict from `path` into our ResNet `model` in place."""
    theirs = read_state_dict(path)
    ours = model.state_dict()
    report = LoadReport()

    unexpected = [k for k in theirs if _to_ours(k) not in ours]
    covered = {_to_ours(k) for k in theirs}
    # Old torchvision files predate BatchNorm's num_batches_tracked; BatchNorm fills it in.
    missing = [k for k in ours if k not in covered and not k.endswith("num_batches_tracked")]
    if unexpected or missing:
        parts = []
        if missing:
            back = [k[len("body.") :] if k.startswith("body.") else "fc." + k[5:] for k in missing]
            parts.append(f"missing keys: {_names(back)}")
        if unexpected:
            parts.append(f"unexpected keys: {_names(unexpected)}")
        raise LFMError(
            f"weights file {str(path)!r} does not fit this model ({'; '.join(parts)})",
            "use the torchvision file of the same depth (e.g. resnet18 weights for 'resnet18')",
        )

    new: dict[str, torch.Tensor] = {}
    bad: list[str] = []
    for k, v in theirs.items():
        target = ours[_to_ours(k)]
        if v.shape == target.shape:
            new[_to_ours(k)] = v
            report.loaded.append(k)
        elif k.startswith("fc.") and v.shape[1:] == target.shape[1:]:
            # Only the number of classes differs: keep the fresh head.
            report.skipped[k] = f"{v.shape[0]} classes in the file, {target.shape[0]} in the model"
        elif k == "conv1.weight" and v.shape[2:] != target.shape[2:]:
            report.skipped[k] = (
                f"the file's stem is {v.shape[2]}x{v.shape[3]}, the model's (small_input) "
                f"stem is {target.shape[2]}x{target.shape[3]}"
            )
        elif k == "conv1.weight" and v.shape[0] == target.shape[0]:
            new[_to_ours(k)] = adapt_conv_channels(v, target.shape[1])
            report.adapted[k] = f"input channels {v.shape[1]} -> {target.shape[1]}"
            report.loaded.append(k)
        else:
            bad.append(f"{k} {tuple(v.shape)} vs {tuple(target.shape)}")
    if bad:
        raise LFMError(
            f"weights file {str(path)!r} has tensors of the wrong shape: {_names(bad)}",
            "use the torchvision file of the same depth (e.g. resnet18 weights for 'resnet18')",
        )

    result = model.load_state_dict(new, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    if report.skipped or report.adapted:
        log.warning(
            "loaded %s: skipped %s; adapted %s",
            path,
            report.skipped or "nothing",
            report.adapted or "nothing",
        )
    return report
