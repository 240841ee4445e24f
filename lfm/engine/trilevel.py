"""One iteration of Algorithm 1, as three stage functions, for both applications.

The upper variable B (`Upper`) is either per-example weights on stage 1's losses (LFM data
reweighting's b; `lfm-class`'s per-class weights) or tensors inside the networks (NAS's
architecture alpha, read by the learners' modules by name); the stages below are written for
the first, and the second differs where noted at the end.

    learn    (stage 1)  L1 = mean_i w(b_i) l_i(W1)          W1' = step1(W1, grad L1)
    relearn  (stage 2)  u_j = CE(f(d_j; W1'), y_j)
                        a_i = sigmoid(sum_j x_ij z_ij u_j r_j)
                        L2 = mean_i a_i l_i(W2)               W2' = step2(W2, grad L2)
    validate (stage 3)  L_val(W2') on the validation batch, and its hypergradients
                        for b (batch entries), r (validation entries) and V's parameters.

The same training batch is used in stages 1 and 2 (Algorithm 1 samples two; one batch halves
the data cost and makes a_i and w(b_i) weigh the same examples). step1 / step2 are the learners'
real optimizer updates (`VirtualSGD`, `VirtualAdam`), so W1' and W2' *are* the next W1 and W2.

Hypergradients (n = training batch size; J = d step / d grad, see `virtual.py`: for SGD
J^T v = -xi v, for Adam a diagonal pull-back):

    g2        = grad L_val(W2')
    dL/da_i   = 1/n * (J2^T g2) . grad l_i(W2)        one jvp (exact) or two forwards (fd)
    dL/dV, dL/dr, dL/dW1'  = backward through a(x(V), r, u(W1'))   (one backward)
    h         = dL/dW1'
    dL/dw_i   = 1/n * (J1^T h) . grad l_i(W1)         one jvp (exact) or two forwards (fd)
    dL/db     = (dw/db)^T dL/dw                        (tiny autograd through w(b))

Where h comes from is the *b path*, the one place the variants differ:
    `w2`       h = dL_val(W2')/dW1' through u (the paper);
    `w2+w1val` h as above + lam * grad L_val(W1'): b also answers to W1's own validation loss;
    `w1val`    h = lam * grad L_val(W1') alone: a control that keeps W2, V and r as in the paper
               but lets only W1's own validation loss drive b (a persistent, per-example L2RW);
    `own-grad` h = W1's own clipped training gradient grad L1, taken through the chain-rule
               factor J1^T like the other paths (dL/dw_i = -xi1/n h . grad l_i for SGD): b never
               sees validation data, and examples that agree with the batch gradient go *up*;
    `authors`  what the authors' code runs (`dr-lfm-imbalance.py`, train() lines 353-373 and
               `_hessian_vector_product1` lines 391-416): dL/dw_i = +1/n h . grad l_i(W1) with
               h = W1's own clipped training gradient, by a central difference at the old W1
               (eps = 0.01/||h||, always), no J1^T factor: descending it, examples that agree
               with the batch gradient go *down* (b descends 1/2 ||h(b)||^2);
    `frozen`   no b update.
The iteration does not touch the modules; `commit` applies the real updates afterwards.

Data parallel (`part`, see `lfm.train.distributed`): the training tensors are this rank's rows
of a global batch of n = part.total, the validation batch is the same on every rank, and `b` is
the GLOBAL batch's entries. L1 and L2 are each rank's share (sum / n) and grad L1, grad L2 are
summed over ranks before the virtual steps, so W1', W2' are identical everywhere; the sums over
training examples (dL/dr, dL/dV, h = dL/dW1') are summed over ranks; dL/dw is gathered into the
global batch, and dL/db (n,) is computed from it on every rank, identically. `a-normalised`
divides by the global batch mean of a (an all-reduce with gradient).

B inside the networks (`Upper.arch`, LFM-DARTS): every pass reads alpha; stage 1 is
unweighted (w = 1); u reads alpha with its graph (or a constant copy: the authors' form);
dL/da and the W2' term come from one mixed pass over (alpha, a), and

    dL/dalpha = grad_alpha L_val(W2')                              (direct)
              + grad_alpha <grad_W2 L2(W2, alpha, a), J2^T g2>      (through W2')
              + (dL/da)(da/du)(du/dalpha)                           (through u, one backward)
              + grad_alpha <grad_W1 L1(W1, alpha), J1^T h>          (through W1')

with the mixed derivatives by `lfm.engine.hypergrad.mixed_grad` (exact or fd). Learners may
carry weights of their own (two weight sets of one supernet) and a context for their passes
over each batch (the same dropout masks on every pass, `lfm.nas.hypergrad.SameMasks`).

Precision: under bf16 autocast the learners' passes run in bf16; a (the attention, z, u, r
product) is computed in fp32, and every loss, jvp output and hypergradient accumulates in fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lfm.engine.functional import Params, buffers_of, leaves, losses, norm, params_of
from lfm.engine.hypergrad import FD_SCALE, directional, mixed_grad
from lfm.engine.virtual import StepRule, VirtualOptimizer
from lfm.errors import LFMError
from lfm.models.split import rows
from lfm.reweight.function import attention, b_weights, label_match, reweight
from lfm.train import distributed
from lfm.train.distributed import Part


@dataclass(frozen=True)
class BPath:
    """Where h, the direction whose product with grad l_i(W1) is dL/dw_i, comes from.

    u_graph: h is dL/dW1' back through u (needs u's graph to W1');
    w1_val: how W1's own validation loss lam * L_val(W1') = lam * mean(u) enters h:
        "none", "added" (to W2's validation objective) or "alone" (V and r still answer to
        L_val(W2'), h to lam * L_val(W1') only);
    own_grad: h is W1's own clipped training gradient instead (b never sees validation data);
    chain_rule: dL/dw through the step's pull-back J1^T (False: the raw product, by central
        differences at the old W1, as the authors' code computes it);
    moves: False freezes b.
    """

    u_graph: bool = True
    w1_val: str = "none"
    own_grad: bool = False
    chain_rule: bool = True
    moves: bool = True


B_PATHS: dict[str, BPath] = {
    "w2": BPath(),
    "w2+w1val": BPath(w1_val="added"),
    "w1val": BPath(w1_val="alone"),
    "own-grad": BPath(u_graph=False, own_grad=True),
    "authors": BPath(u_graph=False, own_grad=True, chain_rule=False),
    "frozen": BPath(u_graph=False, moves=False),
}


@dataclass
class Upper:
    """The upper variable B of the iteration, in one of two places.

    Weights on stage 1's losses: w = weigh(value), the (n,) per-example weights of the global
    batch, differentiable in `value`. LFM-DR's is b's batch entries with w = b_weights(b,
    b_mode); any other (one weight per class, a small network of per-example signals) is
    another `weigh`, and gets its hypergradient dL/dvalue from the same dL/dw.

    Inside the networks: `arch`, tensors every learner's module reads by name as buffers (NAS's
    architecture weights alpha, `lfm.nas.supernet`); stage 1's loss is unweighted and the
    hypergradient dL/darch has four terms (direct, through W2', through u, through W1').
    `arch_in_u` False lets u read a constant copy of arch (the authors' LFM-DARTS code).
    """

    value: Tensor | None = None
    weigh: Callable[[Tensor], Tensor] | None = None
    arch: Params | None = None
    arch_in_u: bool = True

    def arch_tensors(self, leaf: bool = False) -> Params:
        """arch as detached tensors, or as fresh autograd leaves (empty without arch)."""
        if not self.arch:
            return {}
        return leaves(self.arch) if leaf else {k: v.detach() for k, v in self.arch.items()}


def per_example_upper(b: Tensor, b_mode: str = "raw") -> Upper:
    """LFM-DR's upper variable: one weight b_i per example, w = b_weights(b, b_mode)."""
    return Upper(b, lambda v: b_weights(v, b_mode))


@dataclass
class Learner:
    """A learner as the engine sees it: a module and its virtual (= real) optimizer step."""

    module: nn.Module
    opt: VirtualOptimizer
    # the weights to unroll from, when they are not the module's own (NAS: two weight sets of
    # one supernet architecture)
    weights: Params | None = None
    # batch -> a context every pass of this learner over the "train" / "val" batch runs in
    # (NAS: the same dropout masks on every pass over a batch, `lfm.nas.hypergrad.SameMasks`)
    on_batch: Callable[[str], AbstractContextManager] | None = None

    def params(self) -> Params:
        """Current trainable parameters (detached, shared storage)."""
        if self.weights is not None:
            return {k: v.detach() for k, v in self.weights.items()}
        return params_of(self.module)

    def buffers(self) -> Params:
        """Current buffers (BatchNorm running stats)."""
        return buffers_of(self.module)


@dataclass
class IterOptions:
    """How one iteration computes a and the hypergradients (see LFMConfig for the meaning)."""

    backend: str = "exact"  # exact | fd
    fd_scale: float = FD_SCALE  # fd's step on arch's mixed derivatives: eps = fd_scale / ||v||
    b_mode: str = "raw"  # raw | sigmoid | batch-normalised
    similarity: str = "dot"  # dot | cosine | l2
    temperature: float = 1.0  # softmax temperature of x
    use_x: bool = True
    use_u: bool = True
    use_z: bool = True
    a_norm: bool = False  # a_i / mean(a)
    b_path: str = "w2"  # a name in B_PATHS
    w1_val_weight: float = 1.0  # lam of the w2+w1val path
    own_grad_clip: float = 5.0  # norm clip of W1's own gradient (own-grad, authors paths)
    # False: u and a are recomputed with their graphs in stage 3 instead of being held through
    # stage 2's passes: one more pass over the validation batch at W1' (and the encoder's), for
    # a peak memory of one pass (LFM-DARTS's supernets, where that graph is a whole forward)
    hold_u_graph: bool = True


@dataclass
class Stage1:
    """What `learn` produces: W1' and what stage 3 needs about W1."""

    p1: Params  # W1 before the step (detached)
    p1_new: Params  # W1'
    m1_new: Params | None  # momentum buffers after the step
    g1: Params  # grad L1 at W1
    pull1: Callable[[Params], Params]  # v -> (dW1'/dg1)^T v
    l1: Tensor  # (n,) per-example losses at W1
    w: Tensor  # (n,) w(b)
    L1: Tensor


@dataclass
class Stage2:
    """What `relearn` produces: a, u and W2'."""

    p1_leaf: Params  # W1' as autograd leaves (u's graph hangs from them)
    arch_u: Params  # arch as the leaves u's graph hangs from (empty: u sees no arch graph)
    mistakes: Callable[[], tuple[Tensor, Tensor]] | None  # (u, a) again, with graphs, when the
    # iteration did not hold them (IterOptions.hold_u_graph False)
    u: Tensor  # (m,) with graph to W1'
    a: Tensor  # (n,) with graph to V, r, u
    p2: Params  # W2 before the step
    p2_new: Params  # W2'
    m2_new: Params | None
    pull2: Callable[[Params], Params]  # v -> (dW2'/dg2)^T v
    x2_tr: Tensor  # W2's input on the training batch (x, or shared-body features)
    x2_val: Tensor
    l2: Tensor  # (n,)
    L2: Tensor


@dataclass
class IterResult:
    """Everything one iteration computed; nothing has been applied yet."""

    s1: Stage1 | None
    s2: Stage2
    L_val: Tensor
    grad_b: Tensor | None  # dL/d(upper.value): (n,) for b's batch entries
    grad_r: Tensor  # (m,) dL/dr for the validation entries (batch, then bank)
    grad_v: list[Tensor | None]  # dL/dV for each encoder parameter
    logs: dict[str, Tensor] = field(default_factory=dict)
    grad_arch: tuple[Tensor, ...] | None = None  # dL/darch, one per arch tensor (Upper.arch)


@contextmanager
def _on(learner: Learner, batch: str, part: Part) -> Iterator[None]:
    """A pass of `learner` over the training ("train": this rank's rows, with BatchNorm over
    the global batch where the module asks for it, `lfm.models.split`) or validation batch."""
    with ExitStack() as stack:
        if batch == "train":
            stack.enter_context(rows(part))
        if learner.on_batch is not None:
            stack.enter_context(learner.on_batch(batch))
        yield


def _wide(t: Tensor) -> Tensor:
    """`t` in fp32 if it is half precision (fp64 stays fp64)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _summed(grads: tuple[Tensor, ...], loss: Tensor, part: Part) -> tuple[list[Tensor], Tensor]:
    """Gradients and loss of this rank's share, summed over ranks (the global batch mean's)."""
    *out, total = part.summed([*grads, loss.detach()])
    return out, total


def _upper(b: Tensor | Upper, opts: IterOptions) -> Upper:
    return b if isinstance(b, Upper) else per_example_upper(b, opts.b_mode)


def learn(
    w1: Learner,
    x: Tensor,
    y: Tensor,
    b: Tensor | Upper,
    opts: IterOptions,
    lr: float,
    part: Part | None = None,
) -> Stage1:
    """Stage 1: W1 learns on mean_i w_i l_i(W1), w = upper.weigh(value); W1' = the real step.

    b: the upper variable (a tensor: b's entries of the global batch, w = b_weights(b,
    opts.b_mode)); x, y: this rank's part (module docstring).
    """
    part = part or Part.whole(len(y))
    upper = _upper(b, opts)
    p1 = w1.params()
    leaf = leaves(p1)
    with _on(w1, "train", part):  # (n,), real pass
        l1 = losses(w1.module, leaf, w1.buffers() | upper.arch_tensors(), x, y, update_stats=True)
    if upper.weigh is None:  # B is inside the network: stage 1's loss is the plain mean
        w = torch.ones_like(l1)
    else:  # (n,), normalised over the global batch
        w = part.local(upper.weigh(upper.value.detach()))
    # mutant w1-ignores-b: `w * l1` -> `l1` | hypergradients:dr- behaviour:mislabelled
    L1 = part.mean(w * l1)
    grads, L1 = _summed(torch.autograd.grad(L1, list(leaf.values())), L1, part)
    g1 = dict(zip(leaf, grads, strict=True))
    u = StepRule(w1.opt, lr)(p1, g1)
    return Stage1(p1, u.params, u.state, g1, u.pull, l1.detach(), w, L1.detach())


def relearn(
    w1: Learner,
    w2: Learner,
    p1_new: Params,
    x_tr: Tensor,
    y_tr: Tensor,
    x_val: Tensor,
    y_val: Tensor,
    r: Tensor,
    embed: Callable[[Params], tuple[Tensor, Tensor]],
    opts: IterOptions,
    lr: float,
    *,
    w2_inputs: Callable[[Params], tuple[Tensor, Tensor]] | None = None,
    bank: tuple[Tensor, Tensor, Tensor] | None = None,
    u_grad: bool = True,
    part: Part | None = None,
    upper: Upper | None = None,
) -> Stage2:
    """Stage 2: W2 relearns on mean_i a_i l_i(W2), a from W1's validation mistakes u.

    embed(W1') -> (V(d_i) (n, K), V(d_j) (m0, K)) with graph to V's parameters.
    w2_inputs(W1') -> W2's inputs on the two batches (default: x_tr, x_val).
    bank: (embeddings (k, K), labels (k,), u (k,)) of earlier validation examples, constants,
    appended after the batch's m0 entries; r must hold m0 + k entries in that order.
    u_grad: build u's graph to W1' (needed by the w2 / w2+w1val b paths).
    part: which rows of the global batch x_tr, y_tr are (module docstring).
    upper: the upper variable when it is inside the networks (`Upper.arch`).
    """
    part = part or Part.whole(len(y_tr))
    upper = upper or Upper()
    p1_leaf = leaves(p1_new) if u_grad else {k: v.detach() for k, v in p1_new.items()}
    # mutant arch-authors-u-sees-arch: `u_grad and upper.arch_in_u` -> `u_grad`
    #   | hypergradients:authors-
    u_sees_arch = u_grad and upper.arch_in_u
    arch_u = upper.arch_tensors(leaf=u_sees_arch)

    def mistakes() -> tuple[Tensor, Tensor]:
        """u (m0,) on the validation batch at W1' and the weights a (n,), with their graphs."""
        with _on(w1, "val", part):  # (m0,), virtual pass
            u = losses(w1.module, p1_leaf, w1.buffers() | arch_u, x_val, y_val)
        e_tr, e_val = embed(p1_new)  # (n, K), (m0, K)
        yv, uu = y_val, u
        if bank is not None:
            e_val = torch.cat([e_val, bank[0]])  # (m, K)
            yv = torch.cat([y_val, bank[1]])
            uu = torch.cat([u, bank[2].to(u.dtype)])
        dev = e_tr.device.type if e_tr.device.type in ("cuda", "cpu") else "cpu"
        with torch.autocast(device_type=dev, enabled=False):  # a is small: always fp32
            e_tr, e_val, uu = _wide(e_tr), _wide(e_val), _wide(uu)
            x = attention(e_tr, e_val, opts.similarity, opts.temperature) if opts.use_x else None
            z = label_match(y_tr, yv) if opts.use_z else None
            local_norm = opts.a_norm and not part.split
            a = reweight(x, z, uu if opts.use_u else None, r, normalise=local_norm)  # (n,)
            if opts.a_norm and part.split:  # a / mean over the GLOBAL batch, with gradient
                a = a / (distributed.differentiable_sum(a.sum()) / part.total)
        return u, a

    if opts.hold_u_graph:
        u, a = mistakes()
    else:  # values now; stage 3 rebuilds the graph (`Stage2.mistakes`)
        with torch.no_grad():
            u, a = mistakes()

    x2_tr, x2_val = (x_tr, x_val) if w2_inputs is None else w2_inputs(p1_new)
    p2 = w2.params()
    leaf = leaves(p2)
    with _on(w2, "train", part):  # real pass
        l2 = losses(
            w2.module, leaf, w2.buffers() | upper.arch_tensors(), x2_tr, y_tr, update_stats=True
        )
    # mutant w2-ignores-a: `a.detach() * l2` -> `l2` | hypergradients:dr- behaviour:mislabelled
    L2 = part.mean(a.detach() * l2)
    grads, L2 = _summed(torch.autograd.grad(L2, list(leaf.values())), L2, part)
    g2 = dict(zip(leaf, grads, strict=True))
    step = StepRule(w2.opt, lr)(p2, g2)
    return Stage2(
        p1_leaf,
        arch_u if u_sees_arch else {},
        None if opts.hold_u_graph else mistakes,
        u,
        a,
        p2,
        step.params,
        step.state,
        step.pull,
        x2_tr,
        x2_val,
        l2.detach(),
        L2.detach(),
    )


def validate(
    w1: Learner,
    w2: Learner,
    s1: Stage1 | None,
    s2: Stage2,
    x_tr: Tensor,
    y_tr: Tensor,
    y_val: Tensor,
    b: Tensor | Upper | None,
    r: Tensor,
    v_params: list[Tensor],
    opts: IterOptions,
    part: Part | None = None,
) -> IterResult:
    """Stage 3: L_val(W2') and the hypergradients for b, r and V (module docstring).

    b: the global batch's entries; grad_b is (part.total,), the same on every rank.
    """
    hyper = directional(opts.backend)
    part = part or Part.whole(len(y_tr))
    n = part.total  # the 1/n of the global batch mean
    upper = _upper(b, opts) if b is not None else None
    arch = upper.arch_tensors() if upper is not None else {}
    if arch and opts.b_path != "w2":
        raise ValueError(f"an upper variable inside the networks takes b_path 'w2', not "
                         f"{opts.b_path!r}")  # fmt: skip
    p2n, arch_l = leaves(s2.p2_new), leaves(arch)
    with _on(w2, "val", part):  # virtual pass
        L_val = losses(w2.module, p2n, w2.buffers() | arch_l, s2.x2_val, y_val).mean()
    wrt = [*p2n.values(), *arch_l.values()]
    # allow_unused: a supernet may have no cell of one kind (its alpha never enters)
    gs = torch.autograd.grad(L_val, wrt, allow_unused=bool(arch))
    gs = tuple(torch.zeros_like(t) if g is None else g for g, t in zip(gs, wrt, strict=True))
    g_val = dict(zip(p2n, gs[: len(p2n)], strict=True))
    d_direct = gs[len(p2n) :]  # dL_val/darch at W2' (arch only)

    if arch:
        # through W2': grad_(arch, a) <grad_W2 L2(W2, arch, a), J2^T g_val>, one mixed pass
        names = list(arch)

        def f2(ww: Params, bb: tuple[Tensor, ...]) -> Tensor:
            with _on(w2, "train", part):
                bufs = w2.buffers() | dict(zip(names, bb[:-1], strict=True))
                return part.mean(bb[-1] * losses(w2.module, ww, bufs, s2.x2_tr, y_tr))

        m2 = mixed_grad(f2, s2.p2, (*arch.values(), s2.a), s2.pull2(g_val), opts.backend,
                        opts.fd_scale)  # fmt: skip
        dL_da, m2_arch = _wide(m2[-1]), m2[:-1]
    else:
        # dL/da_i = 1/n * (J2^T g_val) . grad l_i(W2)
        with _on(w2, "train", part):
            # mutant da-sign: `) / n` -> `) / -n` | hypergradients:dr- behaviour:b_r_and_v
            dL_da = hyper(w2.module, s2.p2, w2.buffers(), s2.x2_tr, y_tr, s2.pull2(g_val)) / n

    path = B_PATHS[opts.b_path]
    through_u = s1 is not None and b is not None and path.u_graph
    # u and a with their graphs (held by stage 2, or rebuilt now: IterOptions.hold_u_graph)
    u_g, a_g = (s2.u, s2.a) if s2.mistakes is None else s2.mistakes()
    objective = (_wide(a_g) * _wide(dL_da)).sum()
    # + lam * L_val(W1'): the same on every rank, so counted on one only
    own_val = through_u and path.w1_val != "none"
    own_val_here = own_val and (not part.split or distributed.is_main())
    if own_val_here and path.w1_val == "added":
        # mutant w1val-term-dropped: ` + opts.w1_val_weight * _wide(u_g).mean()` -> ``
        #   | hypergradients:dr- behaviour:b_r_and_v
        objective = objective + opts.w1_val_weight * _wide(u_g).mean()
    p1_leaves = list(s2.p1_leaf.values()) if through_u else []
    if path.w1_val == "alone" and through_u:
        # V and r answer to L_val(W2') as in the paper; h comes from L_val(W1') alone
        grads = list(
            torch.autograd.grad(objective, [*v_params, r], allow_unused=True, retain_graph=True)
        )
        if own_val_here:
            h_own = torch.autograd.grad(
                opts.w1_val_weight * _wide(u_g).mean(), p1_leaves, allow_unused=True
            )
            grads += [
                torch.zeros_like(p) if g is None else g
                for g, p in zip(h_own, p1_leaves, strict=True)
            ]
        else:  # other ranks add zeros, so every rank all-reduces the same tensors
            grads += [torch.zeros_like(p) for p in p1_leaves]
    else:
        arch_u = list(s2.arch_u.values()) if through_u else []
        wrt = [*v_params, r, *p1_leaves, *arch_u]
        grads = torch.autograd.grad(objective, wrt, allow_unused=True)
    if part.split:  # sums over training examples: add up the ranks' parts
        held = [i for i, g in enumerate(grads) if g is not None]
        summed = distributed.all_reduce_sum([grads[i] for i in held])
        grads = list(grads)
        for i, g in zip(held, summed, strict=True):
            grads[i] = g
    grad_v = list(grads[: len(v_params)])
    grad_r = grads[len(v_params)]
    grad_r = torch.zeros_like(r) if grad_r is None else grad_r
    logs: dict[str, Tensor] = {
        "L_val": L_val.detach(),
        "a_mean": s2.a.detach().mean(),
        "u_mean": s2.u.detach().mean(),
        "L2": s2.L2,
        "hg_a": dL_da.norm(),
        "hg_r": grad_r.norm(),
    }
    if v_params:
        logs["hg_v"] = torch.sqrt(
            sum(((g**2).sum() for g in grad_v if g is not None), torch.zeros((), device=r.device))
        )

    grad_b = grad_arch = None
    if arch and s1 is not None:
        grad_arch = _arch_grad(w1, s1, s2, x_tr, y_tr, arch, d_direct, m2_arch, grads,
                               len(v_params), opts, part)  # fmt: skip
        logs["hg_arch"] = norm(dict(enumerate(grad_arch)))
    elif s1 is not None and b is not None and path.moves:
        if path.own_grad:  # W1's own clipped training gradient
            gn = float(norm(s1.g1))
            c = min(1.0, opts.own_grad_clip / (gn + 1e-6))
            h = {k: v * c for k, v in s1.g1.items()}
        else:
            h = {
                k: (g if g is not None else torch.zeros_like(s2.p1_leaf[k]))
                for k, g in zip(s2.p1_leaf, grads[len(v_params) + 1 :], strict=True)
            }
        logs["hg_h"] = norm(h)
        if not path.chain_rule:
            # their _hessian_vector_product1: (l_i(W1 + eps h) - l_i(W1 - eps h)) / (2 eps n),
            # eps = 0.01 / ||h||, at the old W1, added to b's zeroed gradient: no J1^T, no sign
            # mutant authors-sign: `) / n` -> `) / -n` | lfm_dr_authors
            dL_dw = directional("fd")(w1.module, s1.p1, w1.buffers(), x_tr, y_tr, h) / n
        else:
            # dL/dw_i = 1/n * (J1^T h) . grad l_i(W1)
            # mutant dw-sign: `) / n` -> `) / -n` | hypergradients:dr- behaviour:b_r_and_v
            dL_dw = hyper(w1.module, s1.p1, w1.buffers(), x_tr, y_tr, s1.pull1(h)) / n  # (n,)
        dL_dw = part.gather(_wide(dL_dw))  # the global batch's, on every rank
        upper = _upper(b, opts)
        bl = upper.value.detach().requires_grad_(True)
        (grad_b,) = torch.autograd.grad(upper.weigh(bl), bl, dL_dw.to(bl.dtype))
        logs["hg_b"] = grad_b.norm()
    if s1 is not None:
        logs["L1"] = s1.L1
        logs["w_mean"] = s1.w.mean()
    return IterResult(s1, s2, L_val.detach(), grad_b, grad_r, grad_v, logs, grad_arch)


def _arch_grad(
    w1: Learner,
    s1: Stage1,
    s2: Stage2,
    x_tr: Tensor,
    y_tr: Tensor,
    arch: Params,
    d_direct: tuple[Tensor, ...],
    m2_arch: tuple[Tensor, ...],
    grads: list[Tensor | None],
    nv: int,
    opts: IterOptions,
    part: Part,
) -> tuple[Tensor, ...]:
    """dL/darch = direct + through W2' + through u + through W1' (`Upper.arch`).

    grads: the stage-3 backward's gradients (V's nv, r, W1' leaves, then arch's u leaves),
    already summed over ranks; h = dL/dW1' from them gives the W1' term by one mixed pass.
    """
    n1 = len(s2.p1_leaf)
    h = {
        k: torch.zeros_like(v) if g is None else g
        for (k, v), g in zip(s2.p1_leaf.items(), grads[nv + 1 : nv + 1 + n1], strict=True)
    }
    tail = grads[nv + 1 + n1 :] or [None] * len(arch)  # none: u saw a copy of arch
    d_u = [
        torch.zeros_like(v) if g is None else g for v, g in zip(arch.values(), tail, strict=True)
    ]
    names = list(arch)

    def f1(ww: Params, bb: tuple[Tensor, ...]) -> Tensor:
        with _on(w1, "train", part):
            bufs = w1.buffers() | dict(zip(names, bb, strict=True))
            return part.mean(s1.w * losses(w1.module, ww, bufs, x_tr, y_tr))

    m1 = mixed_grad(f1, s1.p1, tuple(arch.values()), s1.pull1(h), opts.backend, opts.fd_scale)
    shares = [*m2_arch, *m1]  # each rank's rows' share: summed over ranks
    shares = part.summed(shares)
    k = len(arch)
    return tuple(
        # mutant arch-w1-term-sign: `+ m1_` -> `- m1_` | hypergradients:lfm_darts-
        # mutant arch-u-term-dropped: ` + du` -> `` | hypergradients:lfm_darts-
        d0 + m2_ + du + m1_
        for d0, m2_, du, m1_ in zip(d_direct, shares[:k], d_u, shares[k:], strict=True)
    )


def iteration(
    w1: Learner,
    w2: Learner,
    x_tr: Tensor,
    y_tr: Tensor,
    x_val: Tensor,
    y_val: Tensor,
    b: Tensor | Upper,
    r: Tensor,
    embed: Callable[[Params], tuple[Tensor, Tensor]],
    v_params: list[Tensor],
    opts: IterOptions,
    lr1: float,
    lr2: float,
    *,
    w2_inputs: Callable[[Params], tuple[Tensor, Tensor]] | None = None,
    bank: tuple[Tensor, Tensor, Tensor] | None = None,
    part: Part | None = None,
) -> IterResult:
    """learn -> relearn -> validate on one training and one validation batch.

    b: (n,) the (global) batch's entries of b; r: (m,) leaf requiring grad, the validation
    entries; part: which rows of the global batch x_tr, y_tr are (None: all of them).
    Returns the hypergradients and W1', W2' (apply them with `commit`).
    """
    s1 = learn(w1, x_tr, y_tr, b, opts, lr1, part)
    s2 = relearn(
        w1,
        w2,
        s1.p1_new,
        x_tr,
        y_tr,
        x_val,
        y_val,
        r,
        embed,
        opts,
        lr2,
        w2_inputs=w2_inputs,
        bank=bank,
        u_grad=B_PATHS[opts.b_path].u_graph,
        part=part,
        upper=_upper(b, opts),
    )
    return validate(w1, w2, s1, s2, x_tr, y_tr, y_val, b, r, v_params, opts, part)


def check_finite(res: IterResult, step: int) -> None:
    """LFMError naming the level and step if any loss or hypergradient is NaN or inf."""
    checks: list[tuple[str, Tensor]] = [
        ("stage 1 (learn) loss", res.logs.get("L1", torch.zeros(()))),
        ("stage 2 (relearn) loss", res.s2.L2),
        ("stage 2 (relearn) weights a", res.s2.a.detach()),
        ("stage 3 (validate) loss", res.L_val),
        ("stage 3 hypergradient of r", res.grad_r),
    ]
    if res.grad_b is not None:
        checks.append(("stage 3 hypergradient of b", res.grad_b))
    checks += [("stage 3 hypergradient of the architecture", g) for g in res.grad_arch or ()]
    checks += [("stage 3 hypergradient of V", g) for g in res.grad_v if g is not None]
    dev = res.s2.a.device
    ok = torch.stack([torch.isfinite(t.detach()).all().to(dev) for _, t in checks]).cpu()
    if not bool(ok.all()):
        bad = checks[int((~ok).nonzero()[0, 0])][0]
        raise LFMError(
            f"{bad} became NaN or inf at step {step}",
            "lower the learners' lr, b_lr / r_lr / v_lr, or use backend 'exact'; "
            "check the data for NaN values",
        )


def commit(w1: Learner | None, w2: Learner, res: IterResult) -> None:
    """Make W1' and W2' the learners' weights (the real SGD updates), with momentum buffers."""
    if w1 is not None and res.s1 is not None:
        # mutant w1-real-step-skipped: drop | lfm_dr:short_runs behaviour:resumed
        w1.opt.commit(w1.module, res.s1.p1_new, res.s1.m1_new)
    # mutant w2-real-step-skipped: drop | lfm_dr:short_runs behaviour:resumed
    w2.opt.commit(w2.module, res.s2.p2_new, res.s2.m2_new)
