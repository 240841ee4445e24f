"""Ground truth for the 1-D cell space: every architecture of `lfm.nas.space1d` trained with a
fixed protocol on MNIST-1D, several seeds each, in one table shipped with the package.

NAS methods are judged by how good the architecture they find is when trained on its own
(NAS-Bench-201's lesson); with this table a search on the CPU is scored by looking its cell up:
test accuracy, regret against the best cell, rank, and how well the supernet ranks all cells.

    lfm nasbench build              # train every (cell, seed) missing from the table; resumable
    lfm nasbench query '|skip_connect~0|+|sep_conv_3x3~0|none~1|'

    from lfm.nas.bench1d import lookup
    lookup("|skip_connect~0|+|sep_conv_3x3~0|none~1|")["val"]    # mean validation accuracy

Protocol (`PROTOCOL`): MNIST-1D from `mnist1d.make_dataset` (5,000 samples, the package's seed
42: 4,000 train / 1,000 test), the last 1,000 training examples as the validation set; Adam 1e-2,
batch 100, 8 epochs; `CellNet1d` with 16 channels, 3 stages of one cell. The seed sets the
initial weights and the batch order. Accuracies are those of the last epoch; a search must choose
by `val`, never by `test`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lfm.errors import LFMError
from lfm.nas.space1d import EDGES, NODES, OPS_1D, CellNet1d, all_archs, parse_arch

VERSION = 1
TABLE = "bench1d.json"  # in lfm/nas/data/


@dataclass(frozen=True)
class Protocol:
    """How every cell is trained; part of the table, so a table built otherwise is refused."""

    samples: int = 5000  # mnist1d's own default: 4000 train / 1000 test
    val: int = 1000  # the last training examples, held out for choosing
    epochs: int = 8  # enough to separate the cells (measured: 0.10 to 0.96 test accuracy)
    batch_size: int = 100
    lr: float = 1e-2  # Adam, the MNIST-1D reference optimizer
    channels: int = 16
    stages: int = 3
    cells: int = 1


PROTOCOL = Protocol()


def _data(p: Protocol) -> tuple[torch.Tensor, ...]:
    from lfm.data.builtin import mnist1d_arrays

    x, y, xt, yt = (torch.tensor(a) for a in mnist1d_arrays(p.samples))  # copies (read-only)
    x, xt = x.float(), xt.float()
    n = len(y) - p.val
    return x[:n], y[:n].long(), x[n:], y[n:].long(), xt, yt.long()


def _accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((net(x).argmax(1) == y).float().mean())


def train_cell(
    arch: str, seed: int, protocol: Protocol = PROTOCOL, train_labels: torch.Tensor | None = None
) -> dict[str, float]:
    """Train `arch` once under `protocol`; its last-epoch accuracies, size and time.

    `train_labels` replaces the training split's labels (e.g. noisy ones, for random sampling
    in a noisy search setting); validation and test labels stay clean. `train` accuracy is then
    measured against the labels trained on.

    Example
    -------
    >>> train_cell("|skip_connect~0|+|sep_conv_3x3~0|none~1|", seed=0)["val"]
    """
    parse_arch(arch)
    x, y, xv, yv, xt, yt = _data(protocol)
    if train_labels is not None:
        if train_labels.shape != y.shape:
            raise ValueError(f"train_labels must be shaped {tuple(y.shape)}")
        y = train_labels.long()
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = CellNet1d(arch, 10, protocol.channels, protocol.stages, protocol.cells)
    opt = torch.optim.Adam(net.parameters(), lr=protocol.lr)
    t0 = time.perf_counter()
    for _ in range(protocol.epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), protocol.batch_size):
            idx = order[i : i + protocol.batch_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    net.eval()
    return {
        "train": _accuracy(net, x, y),
        "val": _accuracy(net, xv, yv),
        "test": _accuracy(net, xt, yt),
        "params": sum(p.numel() for p in net.parameters()),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _header(protocol: Protocol) -> dict[str, Any]:
    return {
        "version": VERSION,
        "protocol": asdict(protocol),
        "space": {"ops": list(OPS_1D), "nodes": NODES, "edges": [list(e) for e in EDGES]},
    }


def default_path() -> Path:
    """Where the shipped table lives (inside the package)."""
    return Path(str(resources.files("lfm.nas") / "data" / TABLE))


def _read(path: Path, protocol: Protocol) -> dict[str, Any]:
    if not path.is_file():
        return {**_header(protocol), "entries": {}}
    table = json.loads(path.read_text())
    mine = _header(protocol)
    for key in ("version", "protocol", "space"):
        if table.get(key) != mine[key]:
            raise LFMError(
                f"the table {path} was built with another {key}",
                "pass --table a new file, or build with the table's own settings",
            )
    return table


def _work(job: tuple[str, int, Protocol]) -> tuple[str, int, dict[str, float]]:
    torch.set_num_threads(1)  # one process per core
    arch, seed, protocol = job
    return arch, seed, train_cell(arch, seed, protocol)


def build(
    path: Path | str | None = None,
    seeds: tuple[int, ...] = (0, 1),
    workers: int = 2,
    protocol: Protocol = PROTOCOL,
    archs: list[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train every (cell, seed) the table at `path` lacks and add it; returns the table.

    Resumable: the table is rewritten atomically after every entry, so a killed build loses at
    most the entries in flight and a second call continues. `workers` processes train at once
    (one torch thread each); the folder is locked, so two builds never write one table.
    """
    from multiprocessing import get_context

    from lfm.train.atomic import write_json
    from lfm.train.progress import progress_bar
    from lfm.train.runlock import run_folder_lock

    path = Path(path) if path is not None else default_path()
    archs = all_archs() if archs is None else archs
    with run_folder_lock(path.parent, flag="--table"):
        table = _read(path, protocol)
        entries = table["entries"]
        todo = [
            (a, s, protocol)
            for a in archs
            for s in seeds
            if str(s) not in entries.get(a, {}).get("seeds", {})
        ]
        bar = progress_bar(progress, len(todo), 0, "nasbench build")
        results = map(_work, todo) if workers <= 1 else None
        pool = None
        if results is None:
            pool = get_context("spawn").Pool(workers)
            results = pool.imap_unordered(_work, todo)
        try:
            for arch, seed, res in results:
                e = entries.setdefault(arch, {"params": res["params"], "seeds": {}})
                e["seeds"][str(seed)] = {k: res[k] for k in ("train", "val", "test", "seconds")}
                write_json(path, table, sort_keys=True)
                if bar is not None:
                    bar.update(1)
        finally:
            if pool is not None:
                pool.terminate()
            if bar is not None:
                bar.close()
    return table


def load(path: Path | str | None = None) -> dict[str, Any]:
    """The table (the shipped one by default)."""
    path = Path(path) if path is not None else default_path()
    if not path.is_file():
        raise LFMError(f"no table at {path}", "build it with `lfm nasbench build`")
    return json.loads(path.read_text())


def lookup(arch: str, table: dict[str, Any] | None = None) -> dict[str, Any]:
    """One cell's entry: `params`, per-seed accuracies (`seeds`) and their means (`train`,
    `val`, `test`) and spreads (`val_range`, `test_range`).

    Example
    -------
    >>> lookup("|skip_connect~0|+|sep_conv_3x3~0|none~1|")["test"]
    """
    table = load() if table is None else table
    try:
        parse_arch(arch)
    except ValueError as e:
        raise LFMError(
            str(e), "write a cell as |op~0|+|op~0|op~1| with ops from " + ", ".join(OPS_1D)
        ) from None
    if arch not in table["entries"]:
        raise LFMError(f"cell {arch} is not in the table yet", "run `lfm nasbench build`")
    e = table["entries"][arch]
    runs = list(e["seeds"].values())
    out: dict[str, Any] = {"arch": arch, "params": e["params"], "seeds": e["seeds"]}
    for k in ("train", "val", "test"):
        vals = [r[k] for r in runs]
        out[k] = sum(vals) / len(vals)
        if k != "train":
            out[f"{k}_range"] = (min(vals), max(vals))
    return out
