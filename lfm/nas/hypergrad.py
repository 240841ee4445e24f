"""Hypergradients of differentiable NAS: DARTS's unrolled alpha gradient and LFM-DARTS's.

References:
- Liu et al., "DARTS: Differentiable Architecture Search", ICLR 2019, eq. (7)-(8) and
  `architect.py`: the virtual step w' = w - xi * (momentum * buf + grad + wd * w) and the
  central finite difference with eps = 0.01 / ||v||.
- Zhang, Garg, Sridhara, Hosseini, Xie, "Learning From Mistakes" (IEEE TAI 2025), eq. (8) and
  Algorithm 1: W1' (stage 1, learns), W2' on a-weighted losses (stage 2, relearns on W1's
  mistakes), validation loss at W2' for alpha, V and r (stage 3, validates).

Everything is a function of parameter dicts (`Params`) and of `alphas`, with the supernet as
a pure function (`functional_call`; its BatchNorm uses batch statistics only). The mixed
second derivatives `grad_b <grad_w f(w, b), v>` and their backends (`exact`, `fd`) are the
engine's (`lfm.engine.hypergrad.mixed_grad`), shared with data reweighting; so is the unrolled
step (`lfm.engine.virtual.StepRule`): the learners' real torch optimizer update as a pure
function, clipping included, whose pull-back J^T v = (dw'/dg)^T v replaces DARTS's -xi v.

The DARTS second-order alpha gradient (eq. 7), with J the step's Jacobian in g:
    dL_val(w', alpha)/d alpha = grad_alpha L_val(w', alpha)
                                + grad_alpha <grad_w L_train(w, alpha), J^T v>,
    v = grad_w' L_val(w', alpha);   for SGD J^T v = -xi c v (c the clip coefficient).
The step's momentum buffer and weight decay do not depend on alpha, so they change w' but add
no term. LFM-DARTS's W1' and W2' are the learners' real steps (the search commits them).

LFM-DARTS with two learners (`lfm_nas_grad`) is the engine's trilevel iteration itself, with
alpha as the upper variable inside the networks (`lfm.engine.trilevel.Upper.arch`). What stays
here: DARTS's bilevel gradient, and the parameter-sharing form (`lfm_nas_grad_shared`), whose
stage 1 unrolls one head on a shared body and whose u term is back-propagated from a
recomputation one batch at a time to keep memory at one body pass.

Under torchrun (`part` split) every process holds the whole global training batch and the whole
validation batch and runs the supernet on its own rows of the training batch only: each
training loss is the process's share of the global mean (`Part.mean`, BatchNorm over the
global batch through `lfm.models.split.rows`), and the gradients and mixed derivatives that
come from it are summed over processes (`Part.summed`). Passes over the validation batch and the
encoder run whole on every process and agree without communication.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from lfm.engine.functional import Params, leaves
from lfm.engine.hypergrad import mixed_grad
from lfm.engine.trilevel import IterOptions, Learner, Upper, iteration
from lfm.engine.virtual import StepRule, Unrolled, merged
from lfm.errors import LFMError
from lfm.models.split import rows
from lfm.nas.supernet import Alphas, arch_of
from lfm.train.distributed import Part, differentiable_sum


class SameMasks:
    """One random stream per batch, so every pass over a batch draws the same dropout masks.

    The unrolled graph is a function of one dropout mask per batch (P-DARTS's skip dropout);
    passes that evaluate the batch again at other weights (the virtual step, finite
    differences, recomputation) must draw the masks the first pass drew, or a central
    difference divides the mask noise by eps.
    """

    _OFFSET = {"train": 0, "val": 1}

    def __init__(self, seed: int, device: torch.device | str = "cpu"):
        self.seed, self.device = int(seed), torch.device(device)

    @classmethod
    def draw(cls, device: torch.device | str = "cpu") -> SameMasks:
        """Masks seeded from the global random stream (which advances by one draw)."""
        return cls(int(torch.randint(0, 2**62, ())), device)

    @contextmanager
    def on(self, batch: str) -> Iterator[None]:
        """Run the block on batch `batch`'s stream ("train" or "val"); the global one is kept."""
        seed = self.seed + self._OFFSET[batch]
        cuda = self.device.type == "cuda"
        with torch.random.fork_rng(devices=[self.device] if cuda else [], device_type="cuda"):
            torch.default_generator.manual_seed(seed)
            if cuda:
                with torch.cuda.device(self.device):
                    torch.cuda.manual_seed(seed)
            yield


def _detached_leaves(w: Params) -> Params:
    return {k: v.detach().requires_grad_(True) for k, v in w.items()}


def _grads_or_zeros(out: Tensor, inputs: Sequence[Tensor], **kw) -> tuple[Tensor, ...]:
    """autograd.grad, with zeros for unused inputs (alpha_normal of a net with no normal cell)."""
    gs = torch.autograd.grad(out, list(inputs), allow_unused=True, **kw)
    return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(gs, inputs, strict=True))


def _rows_of(part: Part | None, train: tuple[Tensor, Tensor]) -> tuple[Part, Tensor, Tensor]:
    """The part (whole by default) and this process's rows (x, y) of the training batch."""
    part = part or Part.whole(len(train[1]))
    if part.total != len(train[1]):
        raise ValueError(f"part of {part.total} rows for a batch of {len(train[1])}")
    return part, part.local(train[0]), part.local(train[1])


def ce_loss(
    net: nn.Module,
    w: Params,
    alphas: Alphas,
    x: Tensor,
    y: Tensor,
    head: int = 0,
    reduction: str = "mean",
) -> Tensor:
    """Cross-entropy of the supernet with weights `w` and architecture `alphas`."""
    logits = functional_call(net, w, (x, alphas), {"head": head})
    return F.cross_entropy(logits, y, reduction=reduction)


@dataclass
class DartsGrad:
    """The alpha gradient of one DARTS architecture step and the validation loss it came from."""

    alphas: tuple[Tensor, Tensor]
    loss_val: float


def darts_alpha_grad(
    net: nn.Module,
    w: Params,
    alphas: Alphas,
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    step: StepRule | None = None,
    order: int = 2,
    backend: str = "exact",
    fd_scale: float = 0.01,
    masks: SameMasks | None = None,
    part: Part | None = None,
) -> DartsGrad:
    """DARTS's architecture gradient: first order (grad_alpha L_val(w)) or second order (eq. 7).

    `train` is the whole training batch; `part` the rows of it this process trains on (module
    docstring; default all of them).
    """
    a = tuple(t.detach().requires_grad_(True) for t in alphas)
    masks = masks or SameMasks.draw(val[0].device)
    if order == 1:
        with masks.on("val"):
            lv = ce_loss(net, {k: t.detach() for k, t in w.items()}, a, *val)
        return DartsGrad(_grads_or_zeros(lv, a), float(lv.detach()))
    if step is None:
        raise LFMError(
            "second-order DARTS needs the weight optimizer's step", "pass step=StepRule.of(...)"
        )
    part, xt, yt = _rows_of(part, train)
    # virtual step w' = step(w, grad_w L_train(w, alpha)), no graph kept
    w0 = _detached_leaves(w)

    def train_loss(ww: Params, bb: tuple[Tensor, ...]) -> Tensor:
        with masks.on("train"), rows(part):
            return part.mean(ce_loss(net, ww, bb, xt, yt, reduction="none"))

    g = torch.autograd.grad(train_loss(w0, tuple(t.detach() for t in a)), list(w0.values()))
    g = part.summed(g)
    u = step({k: t.detach() for k, t in w0.items()}, dict(zip(w0, g, strict=True)))
    w1 = _detached_leaves(u.params)
    with masks.on("val"):
        lv = ce_loss(net, w1, a, *val)
    grads = _grads_or_zeros(lv, list(a) + list(w1.values()))
    d_alpha, v = grads[:2], dict(zip(w1, grads[2:], strict=True))
    mixed = part.summed(mixed_grad(train_loss, w, a, u.pull(v), backend, fd_scale))
    # mutant darts-mixed-term-sign: `d + m` -> `d - m` | hypergradients:darts_second
    d = tuple(d + m for d, m in zip(d_alpha, mixed, strict=True))
    return DartsGrad(d, float(lv.detach()))


# ---------------------------------------------------------------------------------------------
# LFM-DARTS: B = alpha shared by the two learners W1 and W2.


@dataclass
class LFMGrad:
    """Everything one LFM-DARTS iteration produces: hypergradients and the learners' gradients."""

    alphas: tuple[Tensor, Tensor]  # d L_val(W2') / d alpha, all terms
    r: Tensor  # (m,) gradient w.r.t. r of the validation batch's examples
    encoder: Params | None  # gradient w.r.t. V's parameters (None in `shared` mode)
    step1: Unrolled | None  # W1' (None in `shared` mode, where step2 holds the whole net)
    step2: Unrolled  # W2': commit these to make the virtual steps the real ones
    a: Tensor  # (n,) stage-2 weights of the training batch
    u: Tensor  # (m,) W1's mistakes on the validation batch
    loss_train: float  # stage-1 loss L1(W1)
    loss_val: float  # stage-3 loss L_val(W2')


def _encode(encoder: nn.Module, enc: Params, xt: Tensor, xv: Tensor) -> tuple[Tensor, Tensor]:
    """V(d_i), V(d_j) from one pass over both batches (so BatchNorm sees them together)."""
    e = functional_call(encoder, enc, (torch.cat([xt, xv]),)).flatten(1)  # (n + m, K)
    return e[: len(xt)], e[len(xt) :]


def _stage2_weights(e_tr, e_val, yt, yv, u, r, similarity) -> Tensor:
    """a_i = sigmoid(sum_j x_ij z_ij u_j r_j) via lfm.reweight (paper eqs. 2-5)."""
    from lfm.reweight import attention, label_match, reweight

    x = attention(e_tr, e_val, similarity)  # (n, m), rows sum to 1
    z = label_match(yt, yv)  # (n, m)
    return reweight(x, z, u, r)  # (n,)


def lfm_nas_grad(
    net: nn.Module,
    w1: Params,
    w2: Params,
    alphas: Alphas,
    r: Tensor,
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    step1: StepRule,
    step2: StepRule,
    encoder: nn.Module | None = None,
    enc: Params | None = None,
    backend: str = "exact",
    similarity: str = "dot",
    fd_scale: float = 0.01,
    masks: SameMasks | None = None,
    u_alpha: bool = True,
    part: Part | None = None,
) -> LFMGrad:
    """One LFM-DARTS hypergradient with separate learners W1, W2 (`full` encoder mode).

    Stage 1 (learns):     W1' = step1(W1, grad_W1 L_train(W1, alpha))
    Stage 2 (relearns):   u_j = CE(f(d_j; W1', alpha)), a = sigmoid(sum_j x_ij z_ij u_j r_j),
                          W2' = step2(W2, grad_W2 mean_i a_i l_i(W2, alpha))
    Stage 3 (validates):  L = L_val(W2', alpha);
      dL/dalpha = d_alpha L (direct)
                + grad_alpha <grad_W2 L2(W2, alpha, a), J2^T v2>           (through W2')
                + (dL/da)(da/du)(du/dalpha) (direct, u's forward pass)
                + grad_alpha <grad_W1 L1(W1, alpha), J1^T h>               (through W1'),
      with v2 = dL/dW2', dL/da_i = grad_a <grad_W2 L2, J2^T v2>, h = (dL/da)(da/du) du/dW1',
      J^T the steps' pull-backs (-xi v for SGD).
    `net` is the supernet architecture; w1, w2 are its two weight sets; r is (m,) for the batch.
    u_alpha=False is the authors' code (NAS/darts-lfm/architect_lfm.py): u's forward pass sees
    a copy of alpha, so the (dL/da)(da/du)(du/dalpha) term is left out and the rest kept.
    `train` is the whole training batch, `part` this process's rows of it (module docstring):
    the encoder sees the whole batch, the supernet passes this process's rows.

    It is the engine's trilevel iteration (`lfm.engine.trilevel`, the one LFM-DR runs) with
    B = alpha inside the networks (`Upper.arch`): this function only binds the pieces.
    """
    part, _, yt = _rows_of(part, train)
    xv, yv = val
    masks = masks or SameMasks.draw(xv.device)
    encl = leaves(enc or {})

    def embed(_: Params) -> tuple[Tensor, Tensor]:
        e_tr, e_val = _encode(encoder, encl, train[0], xv)  # the whole training batch
        return part.local(e_tr), e_val  # (rows, K), (m, K)

    def learner(w: Params, step: StepRule) -> Learner:
        return Learner(net, step.opt, weights=w, on_batch=masks.on)

    res = iteration(
        learner(w1, step1),
        learner(w2, step2),
        part.local(train[0]),
        yt,
        xv,
        yv,
        Upper(arch=arch_of(alphas), arch_in_u=u_alpha),
        r.detach().requires_grad_(True),
        embed,
        list(encl.values()),
        # u's graph rebuilt in stage 3: a supernet forward held through stage 2 would double
        # the step's peak memory (measured, benchmarks/bench_nas_step.py)
        IterOptions(backend=backend, similarity=similarity, fd_scale=fd_scale, hold_u_graph=False),
        step1.lr,
        step2.lr,
        part=part,
    )
    assert res.s1 is not None and res.grad_arch is not None
    return LFMGrad(
        (res.grad_arch[0], res.grad_arch[1]),
        res.grad_r,
        dict(zip(encl, res.grad_v, strict=True)),
        Unrolled(res.s1.p1_new, res.s1.m1_new, res.s1.pull1),
        Unrolled(res.s2.p2_new, res.s2.m2_new, res.s2.pull2),
        part.gather(res.s2.a.detach()),
        res.s2.u.detach(),
        float(res.s1.L1),
        float(res.L_val),
    )


def head_keys(w: Params, head: int) -> list[str]:
    """Names of the parameters of classifier head `head` of a Supernet."""
    return [k for k in w if k.startswith(f"heads.{head}.")]


def lfm_nas_grad_shared(
    net: nn.Module,
    w: Params,
    alphas: Alphas,
    r: Tensor,
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    step: StepRule,
    backend: str = "exact",
    similarity: str = "dot",
    fd_scale: float = 0.01,
    masks: SameMasks | None = None,
    u_alpha: bool = True,
    part: Part | None = None,
) -> LFMGrad:
    """LFM-DARTS with parameter sharing (paper Table X): one body S, heads H1 (W1) and H2 (W2).

    W1 = (S, H1), W2 = (S, H2); V(d) = the body's pooled features at (S, alpha), detached
    (V is W1's feature extractor, trained through W1, with no gradient from stage 3).
    Stage 1 unrolls only W1's head: H1' = step(H1, grad_H1 L1) (the body is shared, so its
    update is part of stage 2); u_j = CE(H1'(S(d_j))). Stage 2 unrolls the shared body and H2
    on the body's loss L1 + mean_i a_i l_i(S, H2): W2' = step((S, H2), grad). The two steps are
    the real update of the network (`step2` of the result holds both), each clipped by its own
    gradient's norm: one joint clip would make H1' depend on a, which depends on H1'. The alpha
    gradient is the direct term, the W2' term (mixed derivative, fd or exact) and the u term
    (exact autograd: u depends on alpha through S's features on the validation batch, and
    through H1', a head step on the training batch's features). `net` needs heads=2; `w` holds
    S, H1 (heads.0), H2 (heads.1).

    Memory: the u term is back-propagated after the W2' passes, from a recomputation, one batch
    at a time (validation body, then training body, with the features as the seam), so no two
    body graphs are ever alive together and peak memory stays at one body pass, as in DARTS.

    u_alpha=False: the authors' form carried over (their code has no sharing variant): the
    validation features in u see a copy of alpha; the path through H1' (training features) stays.

    `train` is the whole training batch, `part` this process's rows (module docstring). The body
    runs on the rows; a is computed for the rows (a_i needs only its own training features), and
    H1's step sums its gradient over processes with `differentiable_sum`, whose backward sums
    the processes' cotangents: each differentiates its own rows' share of the objective.
    """
    part, xt, yt = _rows_of(part, train)
    xv, yv = val
    k1, k2 = head_keys(w, 0), head_keys(w, 1)
    ks = [k for k in w if k not in k1 and k not in k2]
    k_w2 = ks + k2
    a_ = tuple(t.detach().requires_grad_(True) for t in alphas)
    a_d = tuple(t.detach() for t in alphas)
    rl = r.detach().requires_grad_(True)
    wd = {k: t.detach() for k, t in w.items()}  # passes that differentiate alpha only
    h1 = {k: wd[k] for k in k1}
    masks = masks or SameMasks.draw(xt.device)

    def body(ww: Params, x: Tensor, a: tuple[Tensor, ...], batch: str, **kw):
        with masks.on(batch), rows(part if batch == "train" else Part.whole(len(x))):
            return functional_call(net, ww, (x, a), kw or {"all_heads": True})

    def u_and_a(f_tr: Tensor, f_val: Tensor, r_: Tensor) -> tuple[Tensor, Tensor, Unrolled]:
        """Stage 1 on the heads and the weights a; differentiable in f_tr, f_val and r_."""
        h1l = _detached_leaves(h1)
        logits1 = F.linear(f_tr, h1l["heads.0.weight"], h1l["heads.0.bias"])
        l1 = part.mean(F.cross_entropy(logits1, yt, reduction="none"))
        need = f_tr.requires_grad  # H1' carries a graph to the features only when asked
        gh1 = torch.autograd.grad(l1, list(h1l.values()), create_graph=need)
        # mutant shared-h1-step-not-summed: `if part.split:` -> `if False:`
        #   | distributed_search:pieces
        if part.split:
            gh1 = tuple(differentiable_sum(g) for g in gh1)
        s_h1 = step(h1, dict(zip(k1, gh1, strict=True)))
        h1p = s_h1.params
        logits = F.linear(f_val, h1p["heads.0.weight"], h1p["heads.0.bias"])
        u = F.cross_entropy(logits, yv, reduction="none")  # (m,)
        a_w = _stage2_weights(f_tr.detach(), f_val.detach(), yt, yv, u, r_, similarity)  # (n,)
        return a_w, u, s_h1

    # pass 1 (values for stage 1 and 2, gradients for the weights): the weights a, and W2's
    # step from the same body pass on the training batch
    wl = _detached_leaves(w)
    f_tr, (o1, o2) = body(wl, xt, a_d, "train")
    l1 = part.mean(F.cross_entropy(o1, yt, reduction="none"))
    with torch.no_grad():
        f_val = body(wd, xv, a_d, "val")[0]
    with torch.enable_grad():
        a, u, s_h1 = u_and_a(f_tr.detach(), f_val, rl.detach())
    l2 = part.mean(a.detach() * F.cross_entropy(o2, yt, reduction="none"))
    grads = torch.autograd.grad(l1 + l2, [wl[k] for k in k_w2])  # H1's step came from u_and_a
    *grads, l1 = part.summed([*grads, l1.detach()])
    g2 = {k: t.detach() for k, t in zip(k_w2, grads, strict=True)}
    f_tr, l1, a, u = f_tr.detach(), l1.detach(), a.detach(), u.detach()
    del o1, o2, l2, grads, wl  # let pass 1's graph go before the W2' passes
    w_w2 = {k: wd[k] for k in k_w2}
    s2 = step(w_w2, g2)
    w2p = _detached_leaves(s2.params)
    lv = F.cross_entropy(body(w2p | h1, xv, a_, "val", head=1), yv)
    gr = _grads_or_zeros(lv, list(a_) + list(w2p.values()))
    d_direct, v2 = gr[:2], dict(zip(w2p, gr[2:], strict=True))
    loss_val = float(lv.detach())
    del lv, gr

    def f2(ww: Params, bb: tuple[Tensor, ...]) -> Tensor:
        _, (p1, p2) = body(ww | h1, xt, (bb[0], bb[1]), "train")
        l_1 = F.cross_entropy(p1, yt, reduction="none")
        return part.mean(l_1 + bb[2] * F.cross_entropy(p2, yt, reduction="none"))

    m2 = mixed_grad(f2, w_w2, (*a_d, a), s2.pull(v2), backend, fd_scale)
    d_a = m2[2]
    # the u term, pass 2a: validation body with a graph to alpha; the training features enter
    # as a leaf, so this backward also returns the seam gradient dL/df_tr (through H1')
    f_trl = f_tr.requires_grad_(True)
    # mutant lfm-authors-shared-u-sees-alpha: `a_ if u_alpha else a_d` -> `a_`
    #   | hypergradients:authors-
    f_val2 = body(wd, xv, a_ if u_alpha else a_d, "val")[0]
    a2 = u_and_a(f_trl, f_val2, rl)[0]
    back = _grads_or_zeros(a2, [*a_, rl, f_trl], grad_outputs=d_a)
    del f_val2, a2
    # pass 2b: training body with a graph to alpha, back-propagated from the seam
    f_tr2 = body(wd, xt, a_, "train")[0]
    d_tr = _grads_or_zeros(f_tr2, a_, grad_outputs=back[3])
    # every process holds its rows' share of these (the seam back[3] is its rows' own)
    shares = part.summed([*m2[:2], *back[:2], back[2], *d_tr])
    m_2, d_v, d_r, d_t = shares[:2], shares[2:4], shares[4], shares[5:]
    d_alpha = tuple(
        # mutant lfm-darts-shared-u-term-dropped: ` + dv + dt` -> ``
        #   | hypergradients:lfm_darts_shared
        d0 + m + dv + dt
        for d0, m, dv, dt in zip(d_direct, m_2, d_v, d_t, strict=True)
    )
    both = merged(s_h1, s2)  # one real update of the shared network
    return LFMGrad(d_alpha, d_r, None, None, both, part.gather(a), u, float(l1), loss_val)
