"""Batched image augmentation and normalisation on the training device (no torchvision, no PIL).

The CIFAR recipe every compared method uses: zero-pad 4 pixels, crop a random 32 x 32 window,
flip horizontally with probability 1/2; then normalise per channel. Crops are gathered with
index arithmetic over the whole batch, so there is no per-image python loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def random_crop_flip(
    x: torch.Tensor,
    pad: int = 4,
    generator: torch.Generator | None = None,
    flip_prob: float = 0.5,
) -> torch.Tensor:
    """Random pad-`pad` crop and horizontal flip of every image of a (N, C, H, W) batch.

    `generator` (on x's device) makes the draw reproducible; by default the global RNG is used.
    """
    n, _, h, w = x.shape
    dev = x.device
    if pad > 0:
        # Zero padding of [0, 1] pixels = black borders, as torchvision's RandomCrop(padding=4).
        xp = F.pad(x, (pad, pad, pad, pad))  # (N, C, H + 2p, W + 2p)
        dy = torch.randint(0, 2 * pad + 1, (n,), device=dev, generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n,), device=dev, generator=generator)
        rows = (dy[:, None] + torch.arange(h, device=dev))[:, :, None]  # (N, H, 1)
        cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, :]  # (N, 1, W)
        batch = torch.arange(n, device=dev)[:, None, None]  # (N, 1, 1)
        x = xp.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # (N, C, H, W)
    if flip_prob > 0:
        flip = torch.rand(n, device=dev, generator=generator) < flip_prob
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x.contiguous()


def normalize(
    x: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """(x - mean) / std per channel of a (N, C, ...) batch."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(shape)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(shape)
    return (x - m) / s


class ImagePrepare:
    """uint8 images -> normalised float model input, augmented when training.

    A class rather than a closure so that a DataBundle's `prepare` can be pickled (e.g. sent to
    worker processes or saved beside a checkpoint).
    """

    def __init__(
        self, mean: Sequence[float], std: Sequence[float], augment: bool = True, pad: int = 4
    ):
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.augment, self.pad = augment, pad
        # Per-device copies of mean/std, so a CUDA step does not copy them from the host each time.
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        """Convert a raw (N, C, H, W) batch on its device; `train=True` adds random crop + flip."""
        dtype = torch.get_default_dtype()  # the model's: float32, or float64 when set so
        x = x.to(dtype) / 255.0 if x.dtype == torch.uint8 else x.to(dtype)
        if train and self.augment:
            x = random_crop_flip(x, self.pad)  # before normalising: pads are black, not mean-grey
        if x.device not in self._stats:
            self._stats[x.device] = (
                torch.tensor(self.mean, device=x.device).reshape(1, -1, 1, 1),
                torch.tensor(self.std, device=x.device).reshape(1, -1, 1, 1),
            )
        mean, std = self._stats[x.device]
        return (x - mean) / std

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_stats": {}}  # device tensors are a cache, not state

    def __repr__(self) -> str:
        return f"ImagePrepare(mean={self.mean}, std={self.std}, augment={self.augment})"
