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
  the MLP is trained on the clean loss after a virtual step, then the classifier takes a real
  step with the updated MLP's (detached) weights. The MLP's optimizer is an option: Adam 1e-3,
  weight decay 1e-4 by default (``MW-Net.py``'s), or SGD with momentum / Nesterov (the 2019
  script's); ``preset=official-2019`` and ``preset=official-mwnet-py`` reproduce each official
  script's meta-net optimizer, normalisation and virtual step (`MWNET_PRESETS`).

Exact and cheap meta-gradients
------------------------------
The virtual step is p' = step(p, g) with g = sum_i w_i grad l_i(p), so d p' / d w_i =
J grad l_i(p) with J = d step / d g (-xi * I for every SGD variant, where momentum and weight
decay only move the point p'; diagonal for Adam; see `lfm.engine.virtual`). With v = grad
L_val(p'),

    d L_val / d w_i = <J^T v, grad l_i(p)> = (J_l(p) J^T v)_i       (SGD: -xi * (J_l(p) v)_i),

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
- Meta-net optimizer: the 2019 script (``train_WRN-28-10_Meta_PGC.py``) trains the MLP with
  SGD (lr 1e-3, momentum 0.9, Nesterov, weight decay 5e-4), ``MW-Net.py`` with Adam (lr 1e-3,
  weight decay 1e-4). Our default pairs the 2019 normalisation with ``MW-Net.py``'s Adam and the
  real optimizer's virtual step, which matches neither script; the two ``preset`` names do.
- The clean batch is drawn with training augmentation (as MW-Net's meta loader does).
- The classifier's optimizer is SGD in the published protocols; Adam works too. The real update
  is the virtual optimizer's own step (`VirtualSGD` / `VirtualAdam`), the same function the
  virtual step uses, so the two cannot disagree.

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
from lfm.engine.virtual import StepRule, VirtualOptimizer, VirtualSGD
from lfm.errors import LFMError
from lfm.methods.base import METHODS, Context, Method
from lfm.methods.options import (
    METHOD_CHECKS,
    Opt,
    check_method_options,
    check_options,
    register_options,
)
from lfm.models.base import batchnorm_batch_stats
from lfm.train import distributed
from lfm.train.distributed import Part

VIRTUAL_STEPS = ("optimizer", "sgd")


# -- shared pieces ------------------------------------------------------------------------------
def _virtual_opt(real: VirtualOptimizer, kind: str) -> VirtualOptimizer:
    """The optimizer the virtual step uses: the real one, or plain SGD as the releases do."""
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
    opt: VirtualOptimizer,
    lr: float,
) -> Tensor:
    """L2RW's per-example meta-gradient d L_val(p'(eps)) / d eps at eps = 0.

    p'(eps) = opt.step(p, grad_p sum_i eps_i l_i(p), lr). At eps = 0 the gradient term vanishes,
    so p' is the momentum / weight-decay part of the step alone, and the answer is
    <J^T grad L_val(p'), grad l_i(p)>, J = d step / d g (-xi * I for SGD; module docstring).

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
    opt : VirtualSGD or VirtualAdam
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
    # mutant l2rw-eps-sign: `return loss` -> `return -loss`
    #   | meta_methods:l2rw_eps_grad behaviour:mislabelled
    return loss_alignment(model, params, buffers, x, y, opt.pullback(params, zeros, lr, 1.0, v))


def l2rw_weights(eps_grad: Tensor, part: Part | None = None) -> Tensor:
    """Ren et al.'s rule: w = max(-grad_eps, 0), normalised to sum 1 (all zero stays zero).

    part: the sum is over the GLOBAL batch when `eps_grad` is one rank's part of it.

    Example
    -------
    >>> l2rw_weights(torch.tensor([-1.0, 1.0, -3.0]))
    tensor([0.2500, 0.0000, 0.7500])
    """
    # mutant l2rw-rule-sign: `-eps_grad` -> `eps_grad`
    #   | meta_methods:weights_rule behaviour:mislabelled
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
    # mutant mwnet-normalise-by-size: `weights / total` -> `weights / len(weights)` | meta_methods
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
    opt: VirtualOptimizer,
    lr: float,
    normalize: bool = True,
    part: Part | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """Meta-Weight-Net's meta-gradient d L_val(p'(theta)) / d theta for the weighting MLP.

    p' = opt.step(p, grad_p sum_i c_i(theta) l_i(p), lr) with c = `mwnet_reduce`(wnet(l)). The
    gradient reaches theta through c only: d L_val / d c_i = <J^T grad L_val(p'), grad l_i(p)>,
    then one backward through the MLP.

    Parameters
    ----------
    model, wnet : nn.Module
        The classifier (used functionally) and the weighting MLP (its own parameters).
    params, buffers : dict[str, Tensor]
        Classifier parameters p and BatchNorm buffers (left untouched).
    x, y, xv, yv : Tensor
        Training batch and clean batch (model inputs and labels).
    opt : VirtualSGD or VirtualAdam
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
    step = StepRule(opt, lr)(params, g)
    v, meta_loss = clean_loss_grad(model, step.params, buffers, xv, yv)
    d_coef = loss_alignment(model, params, buffers, x, y, step.pull(v))
    theta = {k: t for k, t in wnet.named_parameters() if t.requires_grad}
    return _grads(coef, theta, d_coef.to(coef.dtype), part), meta_loss


# -- the methods --------------------------------------------------------------------------------
class _OneLearnerMeta(Method):
    """What L2RW and MW-Net share: one classifier stepped by its virtual optimizer, weights."""

    def setup(self, ctx: Context) -> None:
        """The classifier, its optimizer (as a pure function) and the per-example records."""
        self.opts = check_method_options(self.name, ctx.options)
        self.model = ctx.learner("W1")
        self.real = ctx.virtual_optimizer("W1", self.model, who=f"{self.name} classifier")
        self.virtual = _virtual_opt(self.real, str(self.opts["virtual"]))
        n = len(ctx.bundle.train)
        # NaN = never weighted yet, so a report can tell "unseen" from "weighted 0". float32
        # whatever the default dtype: weights are records, and checkpoints keep one dtype.
        self.last_weight = torch.full((n,), float("nan"), dtype=torch.float32)
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
        step = StepRule(self.real, lr)(p, g)
        # mutant meta-real-step-skipped: drop | behaviour:resumed meta_methods
        self.real.commit(self.model, step.params, step.state)
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
        # mutant meta-resume-loses-momentum: drop | behaviour:resumed
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
        lr = ctx.learner_lr("W1")
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

    Options: ``preset`` (default | official-2019 | official-mwnet-py, see `MWNET_PRESETS`),
    ``hidden`` (100), ``meta_optim`` (adam | sgd), ``meta_lr`` (1e-3), ``meta_wd`` (1e-4),
    ``meta_momentum`` and ``meta_nesterov`` (sgd only), ``normalize`` (true: divide by the
    batch sum as the original code), ``virtual`` (optimizer | sgd); options given override the
    preset's. ``per_example()['weight']`` is the MLP's output in (0, 1) for the example's last
    visit.
    """

    name = "mwnet"

    def setup(self, ctx: Context) -> None:
        """Classifier as in L2RW, plus the weighting MLP and its optimizer (Adam or SGD)."""
        super().setup(ctx)
        self.wnet = WeightNet(int(self.opts["hidden"])).to(ctx.device)
        self.wopt = meta_optimizer(self.wnet.parameters(), self.opts)
        self.normalize = bool(self.opts["normalize"])

    def step(self, batch: Batch, ctx: Context) -> dict[str, float]:
        """Update the MLP on the virtual step's clean loss, then a real step with its weights."""
        lr = ctx.learner_lr("W1")
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
            # mutant mwnet-meta-grad-sign: `grads[k].to(p.dtype)` -> `-grads[k].to(p.dtype)`
            #   | behaviour:mwnet
            p.grad = grads[k].to(p.dtype)
        # mutant mwnet-meta-step-dropped: drop | behaviour:mwnet
        self.wopt.step()
        raw: list[Tensor] = []

        def coef_fn(l_now: Tensor) -> Tensor:  # the updated MLP's weights at the current params
            with torch.no_grad():
                raw.append(self.wnet(l_now))
            return mwnet_reduce(raw[0], self.normalize, part)

        l, _ = self._real_step(x, batch.y, coef_fn, lr, part)
        w = raw[0]
        whole = batch.idx if batch.whole is None else batch.whole
        self.last_weight[whole.cpu()] = part.gather(w).cpu().to(self.last_weight.dtype)
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


# -- options --------------------------------------------------------------------------------------
def meta_optimizer(params: Any, opts: dict[str, Any]) -> torch.optim.Optimizer:
    """MW-Net's weighting-MLP optimizer from its options: Adam, or SGD with momentum / Nesterov.

    Example
    -------
    >>> meta_optimizer(WeightNet().parameters(), MWNET_PRESETS["official-2019"] | {"hidden": 100})
    """
    lr, wd = float(opts["meta_lr"]), float(opts["meta_wd"])
    if opts["meta_optim"] == "sgd":
        momentum, nesterov = float(opts["meta_momentum"]), bool(opts["meta_nesterov"])
        if nesterov and momentum <= 0:
            raise LFMError(
                "mwnet: meta_nesterov=true needs meta_momentum > 0 (torch's SGD refuses it)",
                "pass --opt meta_momentum=0.9, or meta_nesterov=false",
            )
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    return torch.optim.Adam(params, lr=lr, weight_decay=wd)


_VIRTUAL = Opt("choice", "optimizer", choices=VIRTUAL_STEPS)
register_options("l2rw", {"virtual": _VIRTUAL})

# What a name reproduces (each with --optimizer sgd and the script's classifier settings, e.g.
# --preset dr-paper): the two official Meta-Weight-Net scripts differ in the meta-net's optimizer
# and in how the weights are normalised, and both take a plain SGD virtual step.
MWNET_PRESETS: dict[str, dict[str, Any]] = {
    # Our default: the 2019 script's sum normalisation, MW-Net.py's Adam, and a virtual step that
    # is the real optimizer's update. It matches neither official script exactly.
    "default": {
        "virtual": "optimizer",
        "normalize": True,
        "meta_optim": "adam",
        "meta_lr": 1e-3,
        "meta_wd": 1e-4,
        "meta_momentum": 0.0,
        "meta_nesterov": False,
    },
    # train_WRN-28-10_Meta_PGC.py (2019): SGD(vnet, 1e-3, momentum 0.9, nesterov, wd 5e-4),
    # v_lambda / sum(v_lambda) when the sum is nonzero, update_params = plain SGD.
    "official-2019": {
        "virtual": "sgd",
        "normalize": True,
        "meta_optim": "sgd",
        "meta_lr": 1e-3,
        "meta_wd": 5e-4,
        "meta_momentum": 0.9,
        "meta_nesterov": True,
    },
    # MW-Net.py (current release): Adam(vnet, 1e-3, weight_decay 1e-4), sum(cost * w) / len(cost),
    # update_params = plain SGD.
    "official-mwnet-py": {
        "virtual": "sgd",
        "normalize": False,
        "meta_optim": "adam",
        "meta_lr": 1e-3,
        "meta_wd": 1e-4,
        "meta_momentum": 0.0,
        "meta_nesterov": False,
    },
}
_MWNET_OPTIONS = {
    "preset": Opt("choice", "default", choices=tuple(MWNET_PRESETS)),
    "virtual": _VIRTUAL,
    "hidden": Opt("int", 100, lo=1),
    "meta_optim": Opt("choice", "adam", choices=("adam", "sgd")),
    "meta_lr": Opt("float", 1e-3, lo=0.0, lo_open=True),
    "meta_wd": Opt("float", 1e-4, lo=0.0),
    "meta_momentum": Opt("float", 0.0, lo=0.0, hi=1.0, hi_open=True),
    "meta_nesterov": Opt("bool", False),
    "normalize": Opt("bool", True),
}
register_options("mwnet", _MWNET_OPTIONS)


def mwnet_options(given: dict[str, Any]) -> dict[str, Any]:
    """MW-Net's options: the preset's values (default `default`), overridden by those given.

    Example
    -------
    >>> mwnet_options({"preset": "official-2019"})["meta_optim"]
    'sgd'
    """
    parsed = check_options("mwnet", given, _MWNET_OPTIONS, fill=False)
    preset = parsed.pop("preset", "default")
    defaults = {k: spec.default for k, spec in _MWNET_OPTIONS.items()}
    return {**defaults, **MWNET_PRESETS[preset], **parsed, "preset": preset}


METHOD_CHECKS["mwnet"] = mwnet_options
