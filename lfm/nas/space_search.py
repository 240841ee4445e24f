"""Every search method in the 1-D cell space, on one data set and budget, scored by the table.

Question answered: which search finds better cells? Each method sees the same data (the
ground-truth table's MNIST-1D: its 3,000 training examples for weights, optionally with label
noise, and its 1,000 clean validation examples for alpha and for any choosing), the same
supernet (`lfm.nas.supernet1d`) and the same number of weight steps; the cell it returns is
looked up in the table (`lfm.nas.bench1d`), which no method sees. Test accuracy chooses nothing.

Methods (`SPACE_METHODS`):
- the gradient searches of `lfm.nas.search` (DARTS first and second order, P-DARTS, LFM-DARTS
  with a separate encoder, with parameter sharing, in the authors' form, LFM-PDARTS): the cell
  is alpha's argmax per edge;
- random search with weight sharing (Li and Talwalkar, UAI 2019): the supernet is trained with
  one uniformly drawn path per step, then every cell of the space is ranked by its one-shot
  validation accuracy through the shared weights and the best is returned;
- random sampling (`random_sampling`): draw k cells, train each (its table entry in the clean
  setting; a fresh training on the noisy labels otherwise) and keep the best by validation
  accuracy, with k matched to a search's cost.

Scores (`score`): the cell's test accuracy (mean over the table's seeds), regret against the
best cell, rank and percentile, parameter-free ops (collapse), cost in seconds and in
table-cell trainings, and Kendall tau between the method's ranking of all 125 cells and the
table's (alpha: sum over edges of log softmax alpha of the cell's op; RSWS: one-shot accuracy).

References: Sciuto et al., "Evaluating the search phase of neural architecture search", 2019
(Kendall tau of supernet rankings; random sampling as a baseline); Zela et al., ICLR 2020
(collapse to parameter-free ops); Dong and Yang, NAS-Bench-201, ICLR 2020.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from lfm.data.noise import inject_noise
from lfm.data.types import DataBundle, Split, iterate_batches
from lfm.nas.bench1d import PROTOCOL, Protocol, _data, load, lookup, train_cell
from lfm.nas.search import SearchConfig, run_search
from lfm.nas.space1d import EDGES, OPS_1D, all_archs, parse_arch
from lfm.nas.supernet1d import Supernet1d, arch_log_prob
from lfm.registry import Registry

PARAMETER_FREE = ("none", "skip_connect", "avg_pool_3x3")  # Zela et al.'s collapse ops


def search_bundle(noise: str = "none", seed: int = 0, protocol: Protocol = PROTOCOL) -> DataBundle:
    """The table's data as a search sees it: its training split (labels with `noise`, drawn with
    `seed`), its clean validation split, and an empty test split (a search never sees test).

    Example
    -------
    >>> b = search_bundle("flip:0.4", seed=0)
    >>> len(b.train), len(b.val), len(b.test)
    (3000, 1000, 0)
    """
    x, y, xv, yv, _, _ = _data(protocol)
    y_seen = inject_noise(y, 10, noise, seed=seed)
    train = Split(x, y_seen, torch.arange(len(y)), y.clone())
    val = Split(xv, yv, torch.arange(len(yv)))
    test = Split(torch.zeros(0, x.shape[1]), torch.zeros(0, dtype=torch.long), torch.arange(0))
    info = {"noise": noise, "noise_seed": seed}
    return DataBundle("mnist1d-bench", 10, (x.shape[1],), train, val, test, info=info)


def base_config(**overrides) -> SearchConfig:
    """The one budget every method gets (the benchmark's settings; fields may be overridden).

    Scaled to a CPU: 3 epochs of 47 steps (batch 64 over 3,000 examples), so the learning rates
    are the papers' times 4 (weights, SGD 0.1) and 10 (alpha, V and r, Adam 3e-3): at DARTS's
    3e-4, Adam moves alpha by at most ~0.04 in 141 steps and the argmax is mostly init noise.
    """
    cfg = SearchConfig(
        "darts",
        space="cell1d",
        layers=3,  # the table's network: 3 stages of one cell
        C=8,  # half the table's width: the supernet holds 5 ops per edge
        epochs=3,
        batch_size=64,
        order=2,
        backend="exact",
        w_lr=0.1,
        arch_lr=3e-3,
        vr_lr=3e-3,
        stage_layers=(3, 3),  # no depth gap to bridge: the table's networks have 3 cells
        stage_ops=(5, 3),  # P-DARTS: all 5 ops, then the best 3 per edge
        skip_dropout=(0.0, 0.4),
        warmup_epochs=0,
        encoder_model="cnn1d",
    )
    return replace(cfg, **overrides)


@dataclass
class Found:
    """What one search returned: its cell, what it cost, and its scores of every cell."""

    method: str
    seed: int
    arch: str
    seconds: float
    scores: dict[str, float] = field(default_factory=dict)  # arch -> the method's score
    extra: dict = field(default_factory=dict)  # e.g. k for random sampling, supernet val acc


SPACE_METHODS: Registry[Found] = Registry("space search method")


# ------------------------------------------------------------------------- gradient searches


def _gradient_method(name: str, help: str, **overrides) -> None:
    def run(bundle: DataBundle, cfg: SearchConfig) -> Found:
        c = replace(cfg, **overrides)
        if c.method.endswith("pdarts"):
            # the same number of weight steps: each stage runs the epochs on its share of batches
            n_batches = -(-len(bundle.train) // c.batch_size)
            if c.steps_per_epoch is not None:
                n_batches = min(n_batches, c.steps_per_epoch)
            c = replace(c, steps_per_epoch=max(1, -(-n_batches // len(c.stage_layers))))
        t0 = time.perf_counter()
        res = run_search(bundle, c)
        seconds = time.perf_counter() - t0
        alpha, ops = res.alphas[0], res.normal_ops
        scores = {a: arch_log_prob(alpha, ops, parse_arch(a)) for a in all_archs()}
        extra = {"supernet_val_acc": res.history[-1]["val_acc"]}
        return Found(name, c.seed, res.genotype, seconds, scores, extra)

    SPACE_METHODS.register(name, help)(run)


for _n, _h, _o in (
    ("darts-1", "DARTS, first order", dict(method="darts", order=1)),
    ("darts-2", "DARTS, second order", dict(method="darts", order=2)),
    ("pdarts", "P-DARTS (first order, as its paper)", dict(method="pdarts", order=1)),
    ("lfm-darts", "LFM-DARTS, separate encoder V", dict(method="lfm-darts", encoder="full")),
    (
        "lfm-darts-shared",
        "LFM-DARTS, parameter sharing",
        dict(method="lfm-darts", encoder="shared"),
    ),
    (
        "lfm-darts-authors",
        "LFM-DARTS as the authors' code (no du/dalpha term), separate encoder",
        dict(method="lfm-darts", encoder="full", lfm_form="authors"),
    ),
    ("lfm-pdarts", "LFM-PDARTS, separate encoder", dict(method="lfm-pdarts", encoder="full")),
):
    _gradient_method(_n, _h, **_o)


# -------------------------------------------------------------- random search, weight sharing


def _path(arch: str) -> list[int]:
    return [OPS_1D.index(op) for op in parse_arch(arch)]


@torch.no_grad()
def one_shot_accuracy(net: Supernet1d, split: Split, arch: str, batch_size: int = 250) -> float:
    """Validation accuracy of `arch` through the supernet's shared weights (BN: batch stats)."""
    net.eval()
    path, correct = _path(arch), 0
    for b in iterate_batches(split, batch_size, shuffle=False):
        correct += int((net(b.x, path=path).argmax(1) == b.y).sum())
    return correct / len(split)


@SPACE_METHODS.register("rsws", "random search with weight sharing (Li and Talwalkar 2019)")
def rsws(bundle: DataBundle, cfg: SearchConfig) -> Found:
    """Train the supernet on uniformly drawn paths (one per step, with the searches' SGD and
    step count), then rank every cell by one-shot validation accuracy and return the best."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    net = Supernet1d(cfg.C, bundle.num_classes, cfg.layers)
    opt = torch.optim.SGD(
        net.parameters(), lr=cfg.w_lr, momentum=cfg.w_momentum, weight_decay=cfg.w_wd
    )
    n_batches = -(-len(bundle.train) // cfg.batch_size)
    if cfg.steps_per_epoch is not None:
        n_batches = min(n_batches, cfg.steps_per_epoch)
    for epoch in range(cfg.epochs):
        lr = cfg.w_lr_min + (cfg.w_lr - cfg.w_lr_min) * 0.5 * (
            1 + math.cos(math.pi * epoch / cfg.epochs)
        )
        for g in opt.param_groups:
            g["lr"] = lr  # DARTS's cosine schedule, stepped per epoch, as the searches
        net.train()
        batches = iterate_batches(bundle.train, cfg.batch_size, seed=cfg.seed, epoch=epoch)
        for i, b in enumerate(batches):
            if i >= n_batches:
                break
            path = torch.randint(0, len(OPS_1D), (len(EDGES),), generator=gen).tolist()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(bundle.inputs(b.x, True), path=path), b.y).backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            opt.step()
    scores = {a: one_shot_accuracy(net, bundle.val, a) for a in all_archs()}
    # mutant rsws-worst-cell: `max(scores` -> `min(scores` | nas_space_search:rsws
    best = max(scores, key=lambda a: (scores[a], a))  # ties broken by name, not by chance
    return Found("rsws", cfg.seed, best, time.perf_counter() - t0, scores)


# ---------------------------------------------------------------------------- random sampling


def random_sampling(
    k: int,
    seed: int,
    noise: str = "none",
    table: dict | None = None,
    protocol: Protocol = PROTOCOL,
    trained: dict[str, tuple[float, float]] | None = None,
) -> Found:
    """Draw k distinct cells (seeded), keep the best by validation accuracy.

    Clean labels: each cell's validation accuracy is its table entry (mean over the table's
    seeds; the table's training is what "training a cell" costs). With label noise, each drawn
    cell is trained once on the noisy labels (`search_bundle`'s, same seed) under the table's
    protocol and judged on the clean validation split, so the method sees what a user would;
    the cost is then the measured training time. `seconds` in the clean case is k times the
    table's mean training time. `trained` (arch -> (val, seconds)) caches the noisy trainings
    of one (noise, seed) across calls, so k = 5 after k = 20 trains nothing new (same draws).
    """
    table = load() if table is None else table
    archs = all_archs()
    order = torch.randperm(len(archs), generator=torch.Generator().manual_seed(seed)).tolist()
    drawn = [archs[i] for i in order[: max(1, min(k, len(archs)))]]
    if noise == "none":
        val = {a: lookup(a, table)["val"] for a in drawn}
        seconds = len(drawn) * mean_cell_seconds(table)
    else:
        trained = {} if trained is None else trained
        y_noisy = search_bundle(noise, seed, protocol).train.y
        for a in drawn:
            if a not in trained:
                res = train_cell(a, seed, protocol, train_labels=y_noisy)
                trained[a] = (res["val"], res["seconds"])
        val = {a: trained[a][0] for a in drawn}
        seconds = sum(trained[a][1] for a in drawn)
    # mutant random-sampling-by-test: `(val[a], a)` -> `(lookup(a, table)["test"], a)`
    #   | nas_space_search:random_sampling
    best = max(drawn, key=lambda a: (val[a], a))
    return Found(f"random-{k}", seed, best, seconds, {}, {"k": len(drawn)})


# ----------------------------------------------------------------------------------- scoring


def mean_cell_seconds(table: dict | None = None) -> float:
    """The table's mean training time of one (cell, seed): the unit of search cost."""
    table = load() if table is None else table
    secs = [r["seconds"] for e in table["entries"].values() for r in e["seeds"].values()]
    return sum(secs) / len(secs)


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b between two score lists (ties in either count as neither; -inf allowed).

    Example
    -------
    >>> kendall_tau([1, 2, 3], [1, 2, 3]), kendall_tau([1, 2, 3], [3, 2, 1])
    (1.0, -1.0)
    """
    if len(a) != len(b):
        raise ValueError("kendall_tau needs two lists of one length")
    conc = disc = ties_a = ties_b = 0
    n = len(a)
    for i in range(n):
        for j in range(i + 1, n):
            da = (a[i] > a[j]) - (a[i] < a[j])
            db = (b[i] > b[j]) - (b[i] < b[j])
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            # mutant kendall-tau-sign: `da == db` -> `da != db` | nas_space_search:kendall
            elif da == db:
                conc += 1
            else:
                disc += 1
    denom = math.sqrt((conc + disc + ties_a) * (conc + disc + ties_b))
    return (conc - disc) / denom if denom else float("nan")


def score(found: Found, table: dict | None = None) -> dict:
    """The table's verdict on one search (module docstring); `tau` is NaN without scores."""
    table = load() if table is None else table
    test = {a: lookup(a, table)["test"] for a in table["entries"]}
    mine = test[found.arch]
    best = max(test.values())
    rank = 1 + sum(t > mine for t in test.values())  # 1 = best; ties share the better rank
    n = len(test)
    tau = float("nan")
    if found.scores:
        archs = sorted(test)
        tau = kendall_tau([found.scores[a] for a in archs], [test[a] for a in archs])
    return {
        "method": found.method,
        "seed": found.seed,
        "arch": found.arch,
        "test": mine,
        "val": lookup(found.arch, table)["val"],
        # mutant regret-vs-worst: `best - mine` -> `mine - min(test.values())`
        #   | nas_space_search:hand_made
        "regret": best - mine,
        "rank": rank,
        "percentile": 100.0 * (n - rank) / (n - 1),  # 100: the best cell, 0: the worst
        "tau": tau,
        "param_free": sum(op in PARAMETER_FREE for op in parse_arch(found.arch)),
        "seconds": found.seconds,
        "cell_trainings": found.seconds / mean_cell_seconds(table),
        **found.extra,
    }


def run_method(name: str, bundle: DataBundle, cfg: SearchConfig) -> Found:
    """One search by `name` (a key of SPACE_METHODS) on `bundle` with budget `cfg`."""
    run: Callable[[DataBundle, SearchConfig], Found] = SPACE_METHODS.get(name)
    return run(bundle, cfg)
