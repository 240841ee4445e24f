"""LFM with one weight per *class* as the upper variable B (registered as `lfm-class`).

Stage 1 learns on mean_i w_i l_i(W1) with w_i = b_weights(B[y_i]) (B (C,), every b_mode of
`lfm`): under imbalance a natural form, one learned loss weight per class instead of one per
example. Everything else is `lfm`'s (W2 relearns on W1's mistakes; V, r, B answer to the
validation loss at W2'), and so is the hypergradient: the engine returns dL/dw for the batch,
and dL/dB is its sum over the examples of each class, taken by autograd through w = weigh(B).
This file is the whole method: it changes what the upper variable is, not the engine or loop.

Example
-------
>>> lfm train --method lfm-class --dataset mnist1d --imbalance 50
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lfm.engine.trilevel import Upper
from lfm.engine.virtual import EntryOptimizer
from lfm.methods.base import METHODS, Context
from lfm.methods.lfm_dr import LFMDR, LFMConfig
from lfm.methods.options import METHOD_CHECKS
from lfm.reweight.function import b_weights


class LFMClass(LFMDR):
    """LFM-DR whose upper variable is one weight per class, B (C,)."""

    name = "lfm-class"

    def setup(self, ctx: Context) -> None:
        """`lfm`'s learners, V and r; B = b_init for every class, stepped by `b_optim`."""
        super().setup(ctx)
        self.labels = ctx.bundle.train.y.to(ctx.device)  # whole-batch indices -> classes
        c = ctx.bundle.num_classes
        self.b = torch.full((c,), float(self.cfg.initial_b), device=ctx.device)
        kind = "adam" if self.cfg.b_optim == "authors-sgd" else self.cfg.b_optim
        self.b_opt = EntryOptimizer(c, kind, self.cfg.b_lr, device=ctx.device)

    def _slots(self, whole: Tensor, ctx: Context) -> Tensor:
        return whole  # B is indexed by class, through the batch's labels

    def _upper(self, slots: Tensor, whole: Tensor) -> Upper:
        y = self.labels[whole]  # the global batch's labels
        mode = self.cfg.b_mode
        return Upper(self.b, lambda v: b_weights(v[y], mode))

    def _step_upper(
        self, slots: Tensor, whole: Tensor, grad: Tensor, ctx: Context
    ) -> dict[str, Tensor]:
        """B on dL/dB (clipped at b_clip): every class moves, seen in the batch or not only
        through its gradient (zero for a class the batch lacks, which lazy Adam skips)."""
        seen = torch.unique(self.labels[whole])
        g = grad[seen]
        if self.cfg.b_clip:
            g = g * min(1.0, self.cfg.b_clip / (float(g.norm()) + 1e-6))
        before = self.b.clone()
        # mutant class-b-step-sign: `seen, g)` -> `seen, -g)` | lfm_class
        self.b_opt.step(self.b, seen, g)
        if self.cfg.b_mode != "sigmoid":
            self.b.clamp_(min=0.0)
        return {"b_fell": (self.b[seen] < before[seen]).float().mean()}

    def per_example(self) -> dict[str, np.ndarray]:
        """b: each training example's class weight B[y_i]; a: its last stage-2 weight; and
        class_weight: B itself."""
        b = self.b.detach()
        return {
            "b": b[self.labels].cpu().numpy(),
            "a": self.a_last.detach().cpu().numpy(),
            "class_weight": b.cpu().numpy(),
        }


METHODS.register("lfm-class", "LFM with one learned loss weight per class (upper variable B)")(
    LFMClass
)
METHOD_CHECKS["lfm-class"] = LFMConfig.from_options
