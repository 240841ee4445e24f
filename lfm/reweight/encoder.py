"""The encoder V that the visual similarity x_ij = softmax_j(V(d_i) . V(d_j)) is computed from.

Three modes (LFMConfig.encoder):

- `full`: a whole network trained in stage 3 (the paper: a ResNet; here by default a fresh body
  of the learner's architecture, or any registry model, optionally from a local weights file).
  Training and validation batches go through it in ONE forward pass (concatenated), so its
  BatchNorm running stats are updated once per iteration.
- `head`: a frozen backbone (eval mode) whose features are computed once per example and cached
  by (split, index), and a learnable linear projection on top (identity-initialised when the
  sizes agree, so training starts from the backbone's own similarity). Cheap: no backbone pass
  after the first epoch.
- `shared`: no encoder of its own: V is W1's feature extractor (paper Table X); built by the
  method, not here (see `lfm.methods.lfm_dr`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

ENCODER_MODES = ("full", "head", "shared")


class FullEncoder(nn.Module):
    """V = `net`, trained in stage 3; `net(x)` -> (B, K)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def embed(
        self,
        x_tr: Tensor,
        x_val: Tensor,
        tr_idx: Tensor | None = None,
        val_idx: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(V(d_i) (n, K), V(d_j) (m, K)) from one forward pass over both batches."""
        e = self.net(torch.cat([x_tr, x_val]))
        e = e.flatten(1)
        return e[: len(x_tr)], e[len(x_tr) :]


class HeadEncoder(nn.Module):
    """V = projection(backbone(d)) with the backbone frozen and its features cached per example.

    source(which, idx) -> model input for examples `idx` of split `which` ('train' | 'val');
    without it the features come from the inputs passed to `embed` (first view seen is kept).
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        n_train: int,
        n_val: int,
        out_dim: int | None = None,
        source: Callable[[str, Tensor], Tensor] | None = None,
    ):
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        out_dim = out_dim or feature_dim
        self.proj = nn.Linear(feature_dim, out_dim)
        if out_dim == feature_dim:
            with torch.no_grad():
                self.proj.weight.copy_(torch.eye(feature_dim))
                self.proj.bias.zero_()
        self.source = source
        self.n = {"train": n_train, "val": n_val}
        self._cache: dict[str, Tensor] = {}
        self._have: dict[str, Tensor] = {}

    def train(self, mode: bool = True) -> HeadEncoder:
        """The projection trains; the backbone stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    @torch.no_grad()
    def features(self, which: str, x: Tensor | None, idx: Tensor) -> Tensor:
        """Cached backbone features of examples `idx` of split `which`, (B, K)."""
        dev = self.proj.weight.device
        if which not in self._cache:
            k = self.proj.in_features
            self._cache[which] = torch.zeros(
                self.n[which], k, device=dev, dtype=self.proj.weight.dtype
            )
            self._have[which] = torch.zeros(self.n[which], dtype=torch.bool, device=dev)
        idx = idx.to(dev)
        missing = ~self._have[which][idx]
        if missing.any():
            new = idx[missing]
            inp = self.source(which, new) if self.source is not None else x[missing]  # type: ignore[index]
            self._cache[which][new] = self.backbone(inp).flatten(1).to(self._cache[which].dtype)
            self._have[which][new] = True
        return self._cache[which][idx].to(self.proj.weight.dtype)

    def embed(
        self, x_tr: Tensor | None, x_val: Tensor | None, tr_idx: Tensor, val_idx: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(V(d_i), V(d_j)): the projection of cached features."""
        return (
            self.proj(self.features("train", x_tr, tr_idx)),
            self.proj(self.features("val", x_val, val_idx)),
        )
