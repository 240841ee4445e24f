"""One-step meta-reweighting baselines: Learning to Reweight (L2RW) and Meta-Weight-Net.

Both methods look one optimizer step ahead: a *virtual* step of the classifier on a weighted
training loss, the loss of a clean (validation) batch at the virtual parameters, and the gradient
of that clean loss with respect to the weights. They run in the same trainer as every other
method (same data, model, schedule, evaluation).

- ``l2rw``: Ren, Zeng, Yang, Urtasun, "Learning to Reweight Examples for Robust Deep Learning",
  ICML 2018. Per batch: eps = 0, grad_eps of L_val(W - xi * grad sum_i eps_i l_i(W)), weights
  w = max(-grad_eps, 0) / sum (all zero stays zero), then a real step on sum_i w_i l_i.
- ``mwnet``: Shu et al., "Meta-Weight-Net: Learning an Explicit Mapping For Sample Weighting",
  NeurIPS 2019. An MLP 1 -> 100 -> 1 (ReLU, sigmoid) maps each example's loss to its weight;
  the MLP is trained (Adam 1e-3, weight decay 1e-4, as published) on the clean loss after a
  virtual step, then the classifier takes a real step with the updated MLP's (detached) weights.

Exact and cheap meta-gradients
------------------------------
The virtual step is p' = step(p, g) with g = sum_i w_i grad l_i(p), and d p' / d w_i = -xi * grad
l_i(p) for every SGD variant here (momentum and weight decay only move the point p'; see
`lfm.engine.virtual`). So, with v = grad L_val(p'),

    d L_val / d w_i = -xi * <v, grad l_i(p)> = -xi * (J_l(p) v)_i,

one forward-mode Jacobian-vector product of the per-example loss vector along v, instead of a
double backward through ``autograd.grad(create_graph=True)``. The tests check both forms against
autograd through the explicitly unrolled graph (float64, 1e-6 relative). The clip coefficient
(when ``grad_clip`` is set) is held constant, as DARTS does.

What the published code does (and what we do)
---------------------------------------------
- Virtual step: MW-Net's release (``MW-Net.py``, ``meta_model.update_params(lr_inner=...)``) and
  the common L2RW PyTorch ports take a plain SGD step p - lr * g, although the real optimizer is
  SGD with momentum 0.9 and weight decay 5e-4; the later "Code-Optimization" port of MW-Net
  (``MetaSGD.meta_step``) includes momentum, weight decay and nesterov. By default
  (``virtual=optimizer``) our virtual step *is* the real optimizer's update (same momentum
  buffers, weight decay, nesterov); ``virtual=sgd`` reproduces the plain step of the releases.
- Weight normalisation in MW-Net: the original 2019 code divides the MLP's weights by their sum
  when the sum is nonzero (``norm_c = torch.sum(v_lambda); if norm_c != 0: v_lambda / norm_c``),
  in both the virtual and the real step; the current ``MW-Net.py`` instead averages
  (``sum(cost * w) / len(cost)``). ``normalize=true`` (default) is the former, ``false`` the latter.
- The clean batch is drawn with training augmentation (as MW-Net's meta loader does).
- The classifier's optimizer must be SGD (the published protocols all use it): the real update is
  `VirtualSGD`, the same function the virtual step uses, so the two cannot disagree.

Data parallel (torchrun): each rank holds its part of the global batch and the same clean batch;
gradients of sums over training examples are summed over ranks, and the weights are normalised
over the GLOBAL batch (L2RW's sum, MW-Net's sum or batch size), so N processes step as one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lfm.data.types import Batch
from lfm.engine.functional import Params, buffers_of, leaves, losses, params_of
from lfm.engine.hypergrad import loss_jvp
from lfm.engine.virtual import VirtualSGD
from lfm.errors import LFMError
from lfm.methods.base import METHODS, Context, Method
from lfm.models.base import batchnorm_batch_stats
from lfm.train import distributed
from lfm.train.distributed import Part

VIRTUAL_STEPS = ("optimizer", "sgd")


# -- shared pieces ------------------------------------------------------------------------------
def method_options(name: str, given: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """`defaults` overridden by `given`; an unknown key is an LFMError listing the valid ones.

    Parameters
    ----------
    name : str
        The method's registry name (for the message).
    given : dict
        Options from ``RunConfig.method_options`` (``--opt KEY=VALUE``).
    defaults : dict
        Every valid key with its default.

    Returns
    -------
    dict
        The merged options.

    Example
    -------
    >>> method_options("mwnet", {"hidden": 50}, {"hidden": 100, "normalize": True})
    {'hidden': 50, 'normalize': True}
    """
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        valid = ", ".join(f"{k}={v}" for k, v in defaults.items()) or "none"
        raise LFMError(
            f"method {name!r} got unknown option(s) {', '.join(unknown)}",
            f"its options (with defaults) are: {valid}",
        )
    return {**defaults, **given}


def _virtual_opt(real: VirtualSGD, kind: str, name: str) -> VirtualSGD:
    """The optimizer the virtual step uses: the real one, or plain SGD as the releases do."""
    if kind not in VIRTUAL_STEPS:
        raise LFMError(
            f"method {name!r}: option virtual={kind!r} is unknown",
            f"use one of {', '.join(VIRTUAL_STEPS)}",
        )
    return real if kind == "optimizer" else VirtualSGD()


def _grads(
    output: Tensor, wrt: Params, grad_output: Tensor | None = None, part: Part | None = None
) -> Params:
    """d output / d wrt as a dict; parameters the output does not use get zeros.

    part: when the output is this rank's share of a sum over a split global batch, the
    gradients are summed over ranks (one all-reduce).
    """
    got = torch.autograd.grad(
        output, list(wrt.values()), grad_outputs=grad_output, allow_unused=True
    )
    out = [torch.zeros_like(t) if g is None else g for t, g in zip(wrt.values(), got, strict=True)]
    if part is not None and part.split:
        out = distributed.all_reduce_sum(out)
    return dict(zip(wrt, out, strict=True))


def clean_loss_grad(
    model: nn.Module, params: Params, buffers: Params, xv: Tensor, yv: Tensor
) -> tuple[Params, Tensor]:
    """v = grad of the mean clean-batch loss at `params`, and that loss.

    Parameters
    ----------
    model : nn.Module
        The classifier (its own parameters are not used: `params` are swapped in).
    params : dict[str, Tensor]
        The point to differentiate at (typically the virtual parameters p').
    buffers : dict[str, Tensor]
        BatchNorm buffers; left untouched.
    xv, yv : Tensor
        A clean (validation) batch, already prepared as model input.

    Returns
    -------
    (dict[str, Tensor], Tensor)
        The gradient, keyed like `params`, and the (detached) loss.

    Example
    -------
    >>> v, loss = clean_loss_grad(model, params_of(model), buffers_of(model), xv, yv)
    """
    q = leaves(params)
    with batchnorm_batch_stats(model):
        loss = losses(model, q, buffers, xv, yv).mean()
    return _grads(loss, q), loss.detach()


def loss_alignment(
    model: nn.Module, params: Params, buffers: Params, x: Tensor, y: Tensor, direction: Params
) -> Tensor:
    """(B,) directional derivatives <direction, grad l_i(params)>: one Jacobian-vector product.

    Parameters
    ----------
    model, params, buffers :
        The classifier as a function of `params` (BatchNorm buffers untouched).
    x, y : Tensor
        The training batch (model input) and its labels.
    direction : dict[str, Tensor]
        A vector in parameter space, keyed like `params` (e.g. the clean-loss gradient at p').

    Returns
    -------
    Tensor
        (B,) d/dt l_i(params + t * direction) at t = 0.

    Example
    -------
    >>> dots = loss_alignment(model, p, buffers_of(model), x, y, v)  # > 0: i agrees with clean set
    """
    # the engine's exact backend: one jvp of the per-example losses (buffers cloned inside)
    return loss_jvp(model, params, buffers, x, y, direction)


def l2rw_eps_grad(
    model: nn.Module,
    params: Params,
    buffers: Params,
    x: Tensor,
    y: Tensor,
    xv: Tensor,
    yv: Tensor,
    opt: VirtualSGD,
    lr: float,
) -> Tensor:
    """L2RW's per-example meta-gradient d L_val(p'(eps)) / d eps at eps = 0.

    p'(eps) = opt.step(p, grad_p sum_i eps_i l_i(p), lr). At eps = 0 the gradient term vanishes,
    so p' is the momentum / weight-decay part of the step alone, and the answer is
    -xi * <grad L_val(p'), grad l_i(p)> (module docstring).

    Parameters
    ----------
    model : nn.Module
        The classifier (used functionally).
    params, buffers : dict[str, Tensor]
        Current parameters p and BatchNorm buffers.
    x, y : Tensor
        Training batch (model input) and its given labels.
    xv, yv : Tensor
        Clean batch (model input) and labels.
    opt : VirtualSGD
        The virtual optimizer (its momentum buffers are read, never changed).
    lr : float
        The learning rate of the step.

    Returns
    -------
    Tensor
        (B,) gradient w.r.t. eps; L2RW's weights are ``clamp(-grad, min=0)`` normalised.

    Example
    -------
    >>> p, buf = params_of(model), buffers_of(model)
    >>> g = l2rw_eps_grad(model, p, buf, x, y, xv, yv, VirtualSGD(), lr=0.1)
    """
    zeros = {k: torch.zeros_like(v) for k, v in params.items()}
    p_virtual, _ = opt.step(params, zeros, lr)
    v, _ = clean_loss_grad(model, p_virtual, buffers, xv, yv)
    return -opt.xi(lr) * loss_alignment(model, params, buffers, x, y, v)


def l2rw_weights(eps_grad: Tensor, part: Part | None = None) -> Tensor:
    """Ren et al.'s rule: w = max(-grad_eps, 0), normalised to sum 1 (all zero stays zero).

    part: the sum is over the GLOBAL batch when `eps_grad` is one rank's part of it.

    Example
    -------
    >>> l2rw_weights(torch.tensor([-1.0, 1.0, -3.0]))
    tensor([0.2500, 0.0000, 0.7500])
    """
    w = torch.clamp(-eps_grad, min=0)
    total = w.sum()
    if part is not None and part.split:
        total = distributed.all_reduce_sum([total])[0]
    return w / total if total > 0 else w


class WeightNet(nn.Module):
    """Meta-Weight-Net's weighting function: loss (B, 1) -> weight in (0, 1), MLP 1 -> h -> 1."""

    def __init__(self, hidden: int = 100):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, loss: Tensor) -> Tensor:
        """(B,) weights for (B,) losses; the losses are inputs only (detached, as published)."""
        return torch.sigmoid(self.net(loss.detach().reshape(-1, 1))).squeeze(1)


def mwnet_reduce(weights: Tensor, normalize: bool, part: Part | None = None) -> Tensor:
    """The coefficients the training loss uses: w / sum(w) when the sum is nonzero, or w / B.

    part: sum and B are the GLOBAL batch's when `weights` are one rank's part of it (the
    sum is an all-reduce with gradient, so the MLP's meta-gradient stays exact).

    Example
    -------
    >>> mwnet_reduce(torch.tensor([1.0, 3.0]), normalize=True)
    tensor([0.2500, 0.7500])
    """
    split = part is not None and part.split
    if not normalize:
        return weights / (part.total if split else len(weights))  # type: ignore[union-attr]
    total = weights.sum()
    if split:
        total = distributed.differentiable_sum(total)
    return weights / total if total.detach() != 0 else weights


def mwnet_meta_grad(
    model: nn.Module,
    wnet: nn.Module,
    params: Params,
    buffers: Params,
    x: Tensor,
    y: Tensor,
    xv: Tensor,
    yv: Tensor,
    opt: VirtualSGD,
    lr: float,
    normalize: bool = True,
    part: Part | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """Meta-Weight-Net's meta-gradient d L_val(p'(theta)) / d theta for the weighting MLP.

    p' = opt.step(p, grad_p sum_i c_i(theta) l_i(p), lr) with c = `mwnet_reduce`(wnet(l)). The
    gradient reaches theta through c only: d L_val / d c_i = -xi * <grad L_val(p'), grad l_i(p)>,
    then one backward through the MLP.

    Parameters
    ----------
    model, wnet : nn.Module
        The classifier (used functionally) and the weighting MLP (its own parameters).
    params, buffers : dict[str, Tensor]
        Classifier parameters p and BatchNorm buffers (left untouched).
    x, y, xv, yv : Tensor
        Training batch and clean batch (model inputs and labels).
    opt : VirtualSGD
        The virtual optimizer (momentum buffers read, never changed).
    lr : float
        Learning rate of the virtual step.
    normalize : bool
        Divide the weights by their sum (original MW-Net code) or average them.
    part : Part, optional
        Which rows of a global batch x, y are (data parallel); sums are then over ranks.

    Returns
    -------
    (dict[str, Tensor], Tensor)
        Gradients keyed by ``wnet.named_parameters()`` names, and the clean loss at p'.

    Example
    -------
    >>> grads, meta_loss = mwnet_meta_grad(model, WeightNet(), params_of(model),
    ...                                    buffers_of(model), x, y, xv, yv, VirtualSGD(), 0.1)
    """
    q = leaves(params)
    with batchnorm_batch_stats(model):
        l = losses(model, q, buffers, x, y)
    coef = mwnet_reduce(wnet(l), normalize, part)
    g = _grads((coef.detach() * l).sum(), q, part=part)
    clip = opt.clip_coef(g)
    p_virtual, _ = opt.step(params, g, lr, clip)
    v, meta_loss = clean_loss_grad(model, p_virtual, buffers, xv, yv)
    d_coef = -opt.xi(lr, clip) * loss_alignment(model, params, buffers, x, y, v)
    theta = {k: t for k, t in wnet.named_parameters() if t.requires_grad}
    return _grads(coef, theta, d_coef.to(coef.dtype), part), meta_loss


# -- the methods --------------------------------------------------------------------------------
class _OneLearnerMeta(Method):
    """What L2RW and MW-Net share: one classifier stepped by `VirtualSGD`, per-example weights."""

    defaults: dict[str, Any] = {"virtual": "optimizer"}

    def setup(self, ctx: Context) -> None:
        """The classifier, its optimizer (as a pure function) and the per-example records."""
        self.opts = method_options(self.name, dict(ctx.options), self.defaults)
        self.model = ctx.new_model()
        if ctx.optim.optimizer != "sgd":
            # The virtual step must be the real update, and only SGD is written as a function.
            raise LFMError(
                f"{self.name} unrolls the classifier's optimizer step, which is implemented for "
                f"SGD (momentum, weight decay, nesterov) only, but optim.optimizer is "
                f"{ctx.optim.optimizer!r}",
                "use --optimizer sgd (e.g. --preset cpu-sgd or dr-paper)",
            )
        self.real = VirtualSGD.from_config(ctx.optim, who=f"{self.name} classifier")
        self.virtual = _virtual_opt(self.real, str(self.opts["virtual"]), self.name)
        n = len(ctx.bundle.train)
        # NaN = never weighted yet, so a report can tell "unseen" from "weighted 0".
        self.last_weight = torch.full((n,), float("nan"))
        self.history: list[Tensor] = []

    def _real_step(
        self,
        x: Tensor,
        y: Tensor,
        coef_fn: Callable[[Tensor], Tensor],
        lr: float,
        part: Part | None = None,
    ) -> tuple[Tensor, Tensor]:
        """One real step on sum_i c_i l_i with c = coef_fn(l) (detached); returns (l, c).

        This is the only forward pass of an iteration that updates BatchNorm running stats.
        part: the gradient is summed over the ranks holding the global batch.
        """
        p = params_of(self.model)
        q = leaves(p)
        l = losses(self.model, q, buffers_of(self.model), x, y, update_stats=True)
        coef = coef_fn(l.detach()).detach()
        loss = (coef * l).sum()
        if not torch.isfinite(loss):
            raise LFMError(
                f"the {self.name} training loss became {loss.item()}",
                "lower --lr, or check the data for NaN values",
            )
        g = _grads(loss, q, part=part)
        new_p, new_m = self.real.step(p, g, lr, self.real.clip_coef(g))
        self.real.commit(self.model, new_p, new_m)
        return l.detach(), coef

    def models(self) -> dict[str, nn.Module]:
        """The single learner, named `model`."""
        return {"model": self.model}

    def on_epoch_end(self, ctx: Context) -> None:
        """Snapshot the weights, so `lfm suspects` can see how each one moved."""
        self.history.append(self.last_weight.clone())

    def per_example(self) -> dict[str, np.ndarray]:
        """`weight`: the last weight of each example; `weight_history`: one row per epoch."""
        out = {"weight": self.last_weight.numpy()}
        if self.history:
            out["weight_history"] = torch.stack(self.history).numpy()
        return out

    def state_dict(self) -> dict[str, Any]:
        """Classifier, momentum buffers, per-example weights and their history."""
        return {
            "model": self.model.state_dict(),
            "opt": self.real.state_dict(),
            "last_weight": self.last_weight,
            "history": torch.stack(self.history) if self.history else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.model.load_state_dict(state["model"])
        self.real.load_state_dict(state["opt"])
        self.last_weight = state["last_weight"]
        hist = state.get("history")
        self.history = [] if hist is None else list(hist.unbind(0))


class L2RW(_OneLearnerMeta):
    """Learning to Reweight: weights from the sign of the one-step clean-loss gradient.

    Options: ``virtual`` = optimizer (default; the virtual step is the real SGD update with its
    momentum and weight decay) or sgd (plain p - lr * g, as the published ports).
    ``per_example()['weight']`` is the last weight times the batch size (1 = uniform).
    """

    name = "l2rw"

    def step(self, batch: Batch, ctx: Context) -> dict[str, float]:
        """Weights from the virtual step, then a real step on the weighted loss."""
        lr = ctx.lr_at(ctx.optim.lr)
        x = ctx.bundle.inputs(batch.x, train=True)
        clean = next(ctx.val_stream)
        xv = ctx.bundle.inputs(clean.x, train=True)
        eps_grad = l2rw_eps_grad(
            self.model,
            params_of(self.model),
            buffers_of(self.model),
            x,
            batch.y,
            xv,
            clean.y,
            self.virtual,
            lr,
        )
        part = distributed.part_of(batch)
        w = l2rw_weights(eps_grad, part)
        l, _ = self._real_step(x, batch.y, lambda _l: w, lr, part)
        whole = batch.idx if batch.whole is None else batch.whole
        self.last_weight[whole.cpu()] = (part.gather(w) * part.total).float().cpu()
        # under torchrun: the loss is this rank's share of the global weighted sum, and the
        # fraction this part's: both logged as the global batch's (one all_reduce)
        return distributed.global_logs(
            {"loss": (w * l).sum(), "zero_weight_frac": (w == 0).float().mean()},
            part,
            {"loss": distributed.LOG_SUM, "zero_weight_frac": distributed.LOG_MEAN},
        )


class MetaWeightNet(_OneLearnerMeta):
    """Meta-Weight-Net: an MLP from loss to weight, trained on the one-step clean loss.

    Options: ``hidden`` (100), ``meta_lr`` (1e-3), ``meta_wd`` (1e-4), ``normalize`` (true: divide
    by the batch sum as the original code), ``virtual`` (optimizer | sgd).
    ``per_example()['weight']`` is the MLP's output in (0, 1) for the example's last visit.
    """

    name = "mwnet"
    defaults = {
        "virtual": "optimizer",
        "hidden": 100,
        "meta_lr": 1e-3,
        "meta_wd": 1e-4,
        "normalize": True,
    }

    def setup(self, ctx: Context) -> None:
        """Classifier as in L2RW, plus the weighting MLP and its Adam optimizer."""
        super().setup(ctx)
        self.wnet = WeightNet(int(self.opts["hidden"])).to(ctx.device)
        self.wopt = torch.optim.Adam(
            self.wnet.parameters(),
            lr=float(self.opts["meta_lr"]),
            weight_decay=float(self.opts["meta_wd"]),
        )
        self.normalize = bool(self.opts["normalize"])

    def step(self, batch: Batch, ctx: Context) -> dict[str, float]:
        """Update the MLP on the virtual step's clean loss, then a real step with its weights."""
        lr = ctx.lr_at(ctx.optim.lr)
        part = distributed.part_of(batch)
        x = ctx.bundle.inputs(batch.x, train=True)
        clean = next(ctx.val_stream)
        xv = ctx.bundle.inputs(clean.x, train=True)
        grads, meta_loss = mwnet_meta_grad(
            self.model,
            self.wnet,
            params_of(self.model),
            buffers_of(self.model),
            x,
            batch.y,
            xv,
            clean.y,
            self.virtual,
            lr,
            self.normalize,
            part,
        )
        self.wopt.zero_grad(set_to_none=True)
        for k, p in self.wnet.named_parameters():
            p.grad = grads[k].to(p.dtype)
        self.wopt.step()
        raw: list[Tensor] = []

        def coef_fn(l_now: Tensor) -> Tensor:  # the updated MLP's weights at the current params
            with torch.no_grad():
                raw.append(self.wnet(l_now))
            return mwnet_reduce(raw[0], self.normalize, part)

        l, _ = self._real_step(x, batch.y, coef_fn, lr, part)
        w = raw[0]
        whole = batch.idx if batch.whole is None else batch.whole
        self.last_weight[whole.cpu()] = part.gather(w).float().cpu()
        # loss and weights are this rank's part under torchrun; meta_loss is the clean batch's,
        # the same on every rank: the global batch's values in one all_reduce
        return distributed.global_logs(
            {"loss": l.mean(), "meta_loss": meta_loss, "mean_weight": w.mean()},
            part,
            {"loss": distributed.LOG_MEAN, "mean_weight": distributed.LOG_MEAN},
        )

    def state_dict(self) -> dict[str, Any]:
        """Classifier state plus the weighting MLP and its optimizer."""
        state = super().state_dict()
        return {**state, "wnet": self.wnet.state_dict(), "wopt": self.wopt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        super().load_state_dict(state)
        self.wnet.load_state_dict(state["wnet"])
        self.wopt.load_state_dict(state["wopt"])


METHODS.register("l2rw", "Learning to Reweight (Ren et al. 2018): one-step meta-gradient weights")(
    L2RW
)
METHODS.register("mwnet", "Meta-Weight-Net (Shu et al. 2019): an MLP maps loss to weight")(
    MetaWeightNet
)
