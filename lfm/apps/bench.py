"""The benchmark suite: methods x settings x seeds, each a normal `train(RunConfig)` run.

Layout of the output folder::

    OUT/bench.json                 the suite's configuration
    OUT/runs/<dataset>-<setting>-<label>-s<seed>/
        run.json                   what this run is (label, method, options, setting, seed)
        results.json, per_example.npz, checkpoints/   (the trainer's files)
        failed.json                when the run raised (error and traceback)
        suspects.json              with --suspects: AUROC / precision@k of the learned weights
    OUT/cleanlab/<dataset>-<setting>-s<seed>.json   with --suspects: cleanlab on the same data
    OUT/all_runs.csv               one row per (run, learner)
    OUT/table.md                   mean +- std over seeds per setting, cost per method

A run whose ``results.json`` says ``complete`` is skipped when the suite is run again; a failed
run is recorded and retried on the next invocation; an interrupted run resumes from its newest
checkpoint. Settings are imbalance x noise: the full product (``grid="product"``) or the paper's
one-axis sweeps (``grid="sweep"``: each imbalance without noise, each noise balanced).

Mean +- std: the standard deviation is the sample one (ddof = 1) over the completed seeds; a cell
with a single seed shows its value and "(1 seed)", no spread. Cost: seconds per iteration relative
to ``ce`` on the same setting and seed, averaged; peak memory is the trainer's (CUDA: peak
allocated, reset before each run; CPU: the process's resident high-water mark) and, on Linux, the
peak growth of resident memory during the run sampled every 20 ms (``peak_rss_mb``: the CPU number
that means something per run).
A run resumed from a checkpoint was trained by several processes: its ``timing.segments`` hold
each one's steps, seconds and peak memory, its peak memory is the highest of theirs, its RSS
growth is unknown, and the cost table marks it instead of passing one process off as the run.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import threading
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lfm.config import RunConfig
from lfm.errors import LFMError
from lfm.train.atomic import write_atomic, write_json
from lfm.train.runlock import fs_error, run_folder_lock

RUNS = "runs"
RUN_SPEC = "run.json"
FAILED = "failed.json"
SUSPECTS_JSON = "suspects.json"
GRIDS = ("product", "sweep")


# -- what a suite is ------------------------------------------------------------------------------
@dataclass
class MethodSpec:
    """One row of the tables: a registered method with options, under a label."""

    label: str  # what the tables show, e.g. "small-loss-0.2" or "lfm-no-u"
    method: str  # the METHODS registry name
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Setting:
    """One column of the tables: how the training set is corrupted."""

    imbalance: float = 1.0
    noise: str = "none"

    @property
    def name(self) -> str:
        """A file-name-safe label, e.g. ``imb10-flip0.4``."""
        imb = f"{self.imbalance:g}"
        return f"imb{imb}-{self.noise.replace(':', '').replace('/', '_')}"


@dataclass
class BenchConfig:
    """A suite: a base run configuration, and the methods, settings and seeds to sweep."""

    base: RunConfig
    methods: list[MethodSpec]
    settings: list[Setting]
    seeds: list[int]
    out: str
    suspects: bool = False  # score learned weights against the noisy mask; run cleanlab too
    cleanlab_folds: int = 5
    cleanlab_epochs: int = 10


def parse_method_specs(methods: Sequence[str], variants: Sequence[str] = ()) -> list[MethodSpec]:
    """``--methods`` names plus ``--variant LABEL=METHOD[:KEY=VALUE,...]`` -> specs, in order.

    A variant's label may be listed in ``methods`` (it takes that place) or not (it is appended).

    Example
    -------
    >>> [s.label for s in parse_method_specs(["ce", "sl2"], ["sl2=small-loss:rho=0.2"])]
    ['ce', 'sl2']
    """
    from lfm.cli.args import parse_options

    defined: dict[str, MethodSpec] = {}
    for text in variants:
        label, sep, rest = text.partition("=")
        method, _, opts = rest.partition(":")
        if not sep or not label or not method:
            raise LFMError(
                f"--variant {text!r} is not LABEL=METHOD[:KEY=VALUE,...]",
                "write e.g. --variant sl-0.2=small-loss:rho=0.2",
            )
        pairs = [p for p in opts.split(",") if p]
        defined[label.strip()] = MethodSpec(
            label.strip(), method.strip(), parse_options(pairs, "--variant")
        )
    specs = [defined.pop(m) if m in defined else MethodSpec(m, m) for m in methods if m]
    specs += list(defined.values())
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise LFMError(f"method labels repeat: {labels}", "give each --variant its own label")
    if not specs:
        raise LFMError("no methods to run", "pass --methods ce,small-loss,... ")
    return specs


def make_settings(
    imbalances: Sequence[float], noises: Sequence[str], grid: str = "product"
) -> list[Setting]:
    """The columns of the suite: the imbalance x noise product, or one-axis sweeps.

    Example
    -------
    >>> [s.name for s in make_settings([1, 10], ["none", "flip:0.4"], grid="sweep")]
    ['imb1-none', 'imb10-none', 'imb1-flip0.4']
    """
    if grid not in GRIDS:
        raise LFMError(f"unknown grid {grid!r}", f"use one of {', '.join(GRIDS)}")
    if grid == "product":
        out = [Setting(float(i), n) for i in imbalances for n in noises]
    else:
        out = [Setting(float(i), "none") for i in imbalances]
        out += [Setting(1.0, n) for n in noises if n != "none"]
    unique: dict[str, Setting] = {s.name: s for s in out}
    return list(unique.values())


def run_name(dataset: str, setting: Setting, label: str, seed: int) -> str:
    """``<dataset>-<setting>-<label>-s<seed>``, the run's folder name."""
    return f"{dataset}-{setting.name}-{label}-s{seed}"


# -- measuring memory -----------------------------------------------------------------------------
class _RSSPeak:
    """Peak growth of this process's resident memory while the block runs (Linux /proc)."""

    def __init__(self, every: float = 0.02):
        self.every, self.peak_mb = every, None
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int | None:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except (OSError, ValueError, IndexError):
            return None

    def _watch(self, base: int) -> None:
        peak = base
        while not self._stop.wait(self.every):
            now = self._rss()
            peak = max(peak, now or 0)
        self.peak_mb = round((max(peak, self._rss() or 0) - base) / 2**20, 1)

    def __enter__(self) -> _RSSPeak:
        base = self._rss()
        self._thread = None
        if base is not None:
            self._thread = threading.Thread(target=self._watch, args=(base,), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


# -- running ------------------------------------------------------------------------------------
def _status(run_dir: Path) -> str:
    """complete / failed / missing."""
    res = run_dir / "results.json"
    if res.is_file():
        try:
            if json.loads(res.read_text()).get("status") == "complete":
                return "complete"
        except (OSError, json.JSONDecodeError):
            pass
    return "failed" if (run_dir / FAILED).is_file() else "missing"


def _write_json(path: Path, obj: Any) -> None:
    from lfm.train import distributed

    if not distributed.is_main():  # under torchrun, rank 0 alone writes
        return
    write_json(path, obj, default=str)


def run_suite(cfg: BenchConfig, log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Run every (setting, seed, method) not yet complete; write the CSV and the tables.

    Parameters
    ----------
    cfg : BenchConfig
        What to run and where.
    log : callable, optional
        Receives one line per run (None: silent).

    Returns
    -------
    dict
        ``ran``, ``skipped``, ``failed`` (run names), ``rows`` (the CSV rows) and ``table``
        (the markdown text).

    Example
    -------
    >>> base = RunConfig(epochs=1, progress=False)
    >>> cfg = BenchConfig(base, parse_method_specs(["ce", "small-loss"]),
    ...                   make_settings([1], ["none", "flip:0.4"]), [0], "bench/")
    >>> summary = run_suite(cfg)
    >>> print(summary["table"])
    """
    import lfm.methods  # noqa: F401 - registers the plain methods (and lfm when present)
    import lfm.methods.meta  # noqa: F401 - registers l2rw, mwnet
    import lfm.methods.small_loss  # noqa: F401 - registers small-loss
    from lfm.train import distributed

    # Under torchrun every rank runs every training run (its part of each batch); rank 0 alone
    # logs and writes, and the suspects scoring (no collectives) runs on rank 0 only.
    check_suite(cfg)  # a typo in the last method must not wait for the first one's training
    main = distributed.is_main()
    log = log if log and main else (lambda _line: None)
    suspects = cfg.suspects and main
    out = Path(cfg.out)
    with run_folder_lock(out):  # one suite per folder; before anything in it is read
        (out / RUNS).mkdir(parents=True, exist_ok=True)
        _write_json(out / "bench.json", _describe(cfg))
        ran, skipped, failed = [], [], []
        dataset = cfg.base.data.dataset
        total = len(cfg.settings) * len(cfg.seeds) * len(cfg.methods)
        count = 0
        for setting in cfg.settings:
            for seed in cfg.seeds:
                bundle_cache: dict[str, Any] = {}
                for spec in cfg.methods:
                    count += 1
                    name = run_name(dataset, setting, spec.label, seed)
                    run_dir = out / RUNS / name
                    if _status(run_dir) == "complete":
                        skipped.append(name)
                        if suspects:
                            _suspects_for(cfg, run_dir, setting, seed, bundle_cache, log)
                        continue
                    log(f"[{count}/{total}] {name} ...")
                    ok = _one_run(cfg, spec, setting, seed, run_dir, bundle_cache, log)
                    (ran if ok else failed).append(name)
                    if ok and suspects:
                        _suspects_for(cfg, run_dir, setting, seed, bundle_cache, log)
        distributed.barrier()
        rows = collect_rows(out)
        table = markdown_tables(rows)
        if main:
            write_rows_csv(out / "all_runs.csv", rows)
            write_atomic(out / "table.md", table)
        log(
            f"{len(ran)} ran, {len(skipped)} already complete, {len(failed)} failed; "
            f"see {out}/table.md"
        )
        return {"ran": ran, "skipped": skipped, "failed": failed, "rows": rows, "table": table}


def check_suite(cfg: BenchConfig) -> None:
    """Check every method, variant, setting and option of a suite; raise LFMError on the first.

    Each (method, setting) cell's RunConfig is validated as its run would be, so an unknown
    method, a bad option value or an impossible noise spec stops the suite before any training.

    Example
    -------
    >>> check_suite(BenchConfig(RunConfig(), parse_method_specs(["ce", "mwn"]),
    ...                         make_settings([1], ["none"]), [0], "bench/"))
    Traceback (most recent call last):
    lfm.errors.LFMError: unknown method 'mwn'. Fix: choose one of: ...
    """
    from lfm.methods import METHODS

    if not cfg.seeds:
        raise LFMError("the suite has no seeds", "pass --seeds 1 or more")
    if not cfg.settings:
        raise LFMError("the suite has no settings", "pass --imbalance and --noise values")
    for spec in cfg.methods:
        try:
            METHODS.get(spec.method)
        except LFMError as e:
            where = f"--variant {spec.label}" if spec.label != spec.method else "--methods"
            raise LFMError(f"{where}: {e.problem}", e.fix) from None
    seed = cfg.seeds[0]
    for setting in cfg.settings:
        for spec in cfg.methods:
            cell = run_config_for(cfg.base, spec, setting, seed, Path(cfg.out))
            try:
                cell.validate()
            except LFMError as e:
                raise LFMError(f"{spec.label} on {setting.name}: {e.problem}", e.fix) from None


def _describe(cfg: BenchConfig) -> dict[str, Any]:
    return {
        "base": dataclasses.asdict(cfg.base),
        "methods": [dataclasses.asdict(m) for m in cfg.methods],
        "settings": [{**dataclasses.asdict(s), "name": s.name} for s in cfg.settings],
        "seeds": cfg.seeds,
        "suspects": cfg.suspects,
    }


def run_config_for(
    base: RunConfig, spec: MethodSpec, setting: Setting, seed: int, out: Path
) -> RunConfig:
    """The RunConfig of one cell of the suite: the seed drives data (noise draw) and training."""
    data = dataclasses.replace(
        base.data, imbalance=setting.imbalance, noise=setting.noise, seed=seed
    )
    return dataclasses.replace(
        base,
        method=spec.method,
        method_options={**base.method_options, **spec.options},
        data=data,
        seed=seed,
        out=str(out),
    )


def _bundle(cfg: RunConfig, cache: dict[str, Any]) -> Any:
    """Build the run's data once per (setting, seed): every method then sees the same bundle."""
    from lfm.data.build import build_data

    key = json.dumps(dataclasses.asdict(cfg.data), sort_keys=True)
    if key not in cache:
        cache.clear()
        cache[key] = build_data(cfg.data)
    return cache[key]


_WARM: set[str] = set()


def _warm_up(cfg: RunConfig, bundle: Any) -> None:
    """A few untimed CE steps once per process and device, before the first timed run.

    Measured here: the first run of a process paid ~5x per iteration (lazy initialisation,
    kernel selection), which made every method look cheaper than ``ce``, the first one run.
    """
    from lfm.train.trainer import Trainer

    if cfg.device in _WARM:
        return
    _WARM.add(cfg.device)
    warm = dataclasses.replace(cfg, method="ce", method_options={}, out=None, epochs=1, max_steps=5)
    Trainer(warm, bundle=bundle).run()


def _one_run(
    bench: BenchConfig,
    spec: MethodSpec,
    setting: Setting,
    seed: int,
    run_dir: Path,
    cache: dict[str, Any],
    log: Callable[[str], None],
) -> bool:
    """Train one run; on any exception write failed.json and return False."""
    import torch

    from lfm.train import distributed
    from lfm.train.trainer import Trainer

    with run_folder_lock(run_dir):  # also against a `lfm train --out` of this folder
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_json(
            run_dir / RUN_SPEC,
            {
                "label": spec.label,
                "method": spec.method,
                "options": spec.options,
                "setting": setting.name,
                "imbalance": setting.imbalance,
                "noise": setting.noise,
                "seed": seed,
                "dataset": bench.base.data.dataset,
            },
        )
        t0 = time.perf_counter()
        try:
            cfg = run_config_for(bench.base, spec, setting, seed, run_dir)
            _warm_up(cfg, _bundle(cfg, cache))
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            bundle = _bundle(cfg, cache)  # outside the memory watch: shared by the setting's runs
            with _RSSPeak() as mem:
                trainer = Trainer(cfg, bundle=bundle)
                results = trainer.run()
            timing = results["timing"]
            # The RSS watch saw this process only: the run's figure when one process trained it
            # all; a resumed run keeps it on its last segment and has no whole-run figure.
            timing["segments"][-1]["peak_rss_mb"] = mem.peak_mb
            timing["peak_rss_mb"] = None if len(timing["segments"]) > 1 else mem.peak_mb
            results["bench"] = {"label": spec.label, "setting": setting.name}
            if distributed.is_main():
                trainer.write(results)  # again, with the bench's extra fields
            (run_dir / FAILED).unlink(missing_ok=True)
            accs = ", ".join(f"{n} {v['test_acc']:.4f}" for n, v in results["last"].items())
            log(f"    done in {time.perf_counter() - t0:.1f}s: test acc {accs}")
            return True
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - a failing run is recorded and the suite goes on
            if isinstance(e, OSError) and fs_error(e) is not None:
                raise  # a full or read-only disk stops the suite: the CLI says it in one line
            _write_json(
                run_dir / FAILED,
                {
                    "status": "failed",
                    "error": f"{type(e).__name__}: {e}",
                    "traceback": traceback.format_exc(),
                },
            )
            log(f"    FAILED: {type(e).__name__}: {e}")
            return False


def _suspects_for(
    bench: BenchConfig,
    run_dir: Path,
    setting: Setting,
    seed: int,
    cache: dict[str, Any],
    log: Callable[[str], None],
) -> None:
    """Score the run's learned weights, and cleanlab once per (setting, seed), against the mask."""
    from lfm.apps.suspects import (
        cleanlab_ranking,
        detection_metrics,
        load_per_example,
        model_for,
        weight_key,
    )
    from lfm.device import resolve_device

    arrays = load_per_example(run_dir)
    if "noisy" not in arrays or not arrays["noisy"].any():
        return
    if not (run_dir / SUSPECTS_JSON).is_file():
        try:
            key = weight_key(arrays)
        except LFMError:
            key = None  # a plain method: no weights to score
        if key is not None:
            m = detection_metrics(arrays[key], arrays["noisy"])
            _write_json(run_dir / SUSPECTS_JSON, {**m, "key": key})
    cl_path = (
        Path(bench.out) / "cleanlab" / f"{bench.base.data.dataset}-{setting.name}-s{seed}.json"
    )
    if cl_path.is_file():
        return
    cl_path.parent.mkdir(parents=True, exist_ok=True)
    spec = json.loads((run_dir / RUN_SPEC).read_text())
    cfg = run_config_for(
        bench.base, MethodSpec(spec["label"], spec["method"]), setting, seed, run_dir
    )
    device = resolve_device(cfg.device)
    bundle = _bundle(cfg, cache)
    t0 = time.perf_counter()
    res = cleanlab_ranking(
        bundle,
        model_for(cfg, bundle, device),
        bench.cleanlab_folds,
        bench.cleanlab_epochs,
        batch_size=cfg.batch_size,
        device=device,
        seed=seed,
    )
    _write_json(cl_path, {**(res.metrics or {}), "seconds": round(time.perf_counter() - t0, 1)})
    log(f"    cleanlab on {setting.name} s{seed}: AUROC {res.metrics and res.metrics['auroc']}")


# -- collecting -----------------------------------------------------------------------------------
ROW_FIELDS = (
    "dataset",
    "setting",
    "imbalance",
    "noise",
    "label",
    "method",
    "options",
    "seed",
    "learner",
    "status",
    "test_last",
    "val_last",
    "test_sel",
    "val_sel",
    "sel_epoch",
    "epochs",
    "steps",
    "sec_per_iter",
    "train_seconds",
    "peak_mem_mb",
    "peak_rss_mb",
    "segments",
    "auroc",
    "precision_at_k",
    "cleanlab_auroc",
    "cleanlab_precision_at_k",
    "error",
    "run_dir",
)


def find_run_dirs(path: str | Path) -> list[Path]:
    """Run folders under `path`: `path` itself if it is one, else ``runs/*`` or any nested one."""
    p = Path(path)
    if not p.exists():
        raise LFMError(f"{p} does not exist", "pass a bench folder or a run folder")
    if (p / "results.json").is_file() or (p / FAILED).is_file() or (p / RUN_SPEC).is_file():
        return [p]
    found = {q.parent for pat in ("results.json", FAILED, RUN_SPEC) for q in p.rglob(pat)}
    # The suite's own order (methods as listed, then settings, seeds) where bench.json says it.
    order: dict[str, int] = {}
    desc = _read(p / "bench.json")
    if desc:
        dataset = desc["base"]["data"]["dataset"]
        names = [
            run_name(dataset, Setting(s["imbalance"], s["noise"]), m["label"], seed)
            for m in desc["methods"]
            for s in desc["settings"]
            for seed in desc["seeds"]
        ]
        order = {n: i for i, n in enumerate(names)}
    return sorted(found, key=lambda d: (order.get(d.name, len(order)), str(d)))


def _precision_at_k(m: dict[str, Any]) -> float | None:
    """precision@(number of noisy examples) from a metrics dict."""
    return m.get(f"precision@{m.get('n_noisy')}")


def collect_rows(path: str | Path) -> list[dict[str, Any]]:
    """One dict per (run, learner) for every run folder under `path` (failed runs: one row).

    Example
    -------
    >>> rows = collect_rows("bench/")
    >>> rows[0]["label"], rows[0]["test_last"]
    """
    root = Path(path)
    rows: list[dict[str, Any]] = []
    for run_dir in find_run_dirs(root):
        spec = _read(run_dir / RUN_SPEC) or {}
        res = _read(run_dir / "results.json")
        base = {
            "dataset": spec.get("dataset"),
            "setting": spec.get("setting"),
            "imbalance": spec.get("imbalance"),
            "noise": spec.get("noise"),
            "label": spec.get("label"),
            "method": spec.get("method"),
            "options": json.dumps(spec.get("options", {}), sort_keys=True),
            "seed": spec.get("seed"),
            "run_dir": str(run_dir),
        }
        if res is not None and res.get("status") == "complete":
            data = res["config"]["data"]
            setting = Setting(float(data["imbalance"]), data["noise"])
            base.update(
                {
                    "dataset": base["dataset"] or res.get("dataset"),
                    "setting": base["setting"] or setting.name,
                    "imbalance": base["imbalance"] or setting.imbalance,
                    "noise": base["noise"] or setting.noise,
                    # a plain method name shows what ran (lfm -> lfm[w1-val]); custom labels stay
                    "label": res["method"]
                    if base["label"] in (None, base["method"])
                    else base["label"],
                    "method": base["method"] or res["method"],
                    "seed": res["seed"] if base["seed"] is None else base["seed"],
                }
            )
            sus = _read(run_dir / SUSPECTS_JSON) or {}
            cl = (
                _read(
                    root / "cleanlab" / f"{base['dataset']}-{base['setting']}-s{base['seed']}.json"
                )
                or {}
            )
            t = res["timing"]
            for learner, last in res["last"].items():
                sel = res["selected"][learner]
                rows.append(
                    {
                        **base,
                        "learner": learner,
                        "status": "complete",
                        "test_last": last["test_acc"],
                        "val_last": last["val_acc"],
                        "test_sel": sel["test_acc"],
                        "val_sel": sel["val_acc"],
                        "sel_epoch": sel["epoch"],
                        "epochs": res["history"][-1]["epoch"],
                        "steps": t["steps"],
                        "sec_per_iter": t["sec_per_iter"],
                        "train_seconds": t["train_seconds"],
                        "peak_mem_mb": t["peak_mem_mb"],
                        "peak_rss_mb": t.get("peak_rss_mb"),
                        # processes that trained the run (>1: resumed; cost per segment)
                        "segments": len(t["segments"])
                        if t.get("segments")
                        else (None if t.get("resumed") else 1),  # None: resumed, unrecorded
                        "auroc": sus.get("auroc"),
                        "precision_at_k": _precision_at_k(sus),
                        "cleanlab_auroc": cl.get("auroc"),
                        "cleanlab_precision_at_k": _precision_at_k(cl),
                        "error": "",
                    }
                )
        else:
            fail = _read(run_dir / FAILED) or {}
            rows.append(
                {
                    **base,
                    "learner": "",
                    "status": "failed" if fail else "incomplete",
                    "error": fail.get("error", ""),
                }
            )
    return rows


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def write_rows_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """The rows as CSV with the `ROW_FIELDS` columns (missing values empty)."""
    f = io.StringIO(newline="")
    w = csv.DictWriter(f, fieldnames=ROW_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if r.get(k) is None else r.get(k) for k in ROW_FIELDS})
    write_atomic(path, f.getvalue())


# -- tables ---------------------------------------------------------------------------------------
def row_name(label: str, learner: str, multi: bool) -> str:
    """What a table row is called: the label, plus the learner for multi-learner methods."""
    return f"{label} {learner}" if multi else label


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value).

    Example
    -------
    >>> mean_std([1.0, 3.0])
    (2.0, 1.4142135623730951)
    """
    n = len(values)
    m = sum(values) / n
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return m, s


def accuracy_grid(
    rows: list[dict[str, Any]], metric: str
) -> tuple[list[str], list[str], dict[tuple[str, str], dict[str, Any]]]:
    """(row names, settings, cell per (row, setting)) of one metric aggregated over seeds.

    A cell holds ``mean``, ``std``, ``n`` (completed seeds), ``total`` (seeds tried).
    """
    labels = list(dict.fromkeys(r["label"] for r in rows))
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    learners: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        if r["status"] == "complete" and r["learner"] not in learners[r["label"]]:
            learners[r["label"]].append(r["learner"])
    names: list[str] = []
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    for label in labels:
        multi = len(learners[label]) > 1
        for learner in learners[label] or [""]:
            name = row_name(label, learner, multi)
            names.append(name)
            for s in settings:
                mine = [r for r in rows if r["label"] == label and r["setting"] == s]
                seeds_tried = {r["seed"] for r in mine}
                vals = [
                    r[metric]
                    for r in mine
                    if r["status"] == "complete"
                    and r["learner"] == learner
                    and r.get(metric) is not None
                ]
                if not seeds_tried:
                    continue
                n_failed = len({r["seed"] for r in mine if r["status"] != "complete"})
                cell: dict[str, Any] = {
                    "n": len(vals),
                    "total": len(seeds_tried),
                    "failed": n_failed,
                }
                if vals:
                    cell["mean"], cell["std"] = mean_std(vals)
                cells[(name, s)] = cell
    return names, settings, cells


def _md_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def metric_table(
    rows: list[dict[str, Any]], metric: str, digits: int = 4
) -> tuple[list[str], list[list[str]]]:
    """Header and body of one mean +- std table; the best mean of each column in bold."""
    names, settings, cells = accuracy_grid(rows, metric)
    best = {}
    for s in settings:
        means = [cells[(n, s)]["mean"] for n in names if "mean" in cells.get((n, s), {})]
        best[s] = max(means) if means else None
    body = []
    for n in names:
        line = [n]
        for s in settings:
            c = cells.get((n, s))
            if c is None:
                line.append("")
            elif "mean" not in c:
                line.append("failed" if c["failed"] else "–")  # – : not applicable
            else:
                text = f"{c['mean']:.{digits}f}"
                if c["n"] > 1:  # one seed has no spread: a "± 0.0000" would claim one
                    text += f" ± {c['std']:.{digits}f}"
                if c["n"] < c["total"]:
                    text += f" ({c['n']}/{c['total']} seeds)"
                elif c["n"] == 1:
                    text += " (1 seed)"
                line.append(f"**{text}**" if c["mean"] == best[s] else text)
        body.append(line)
    return ["method", *settings], body


def cost_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per label: mean s/iter, time per iteration relative to ce (same setting and seed), memory.

    Time is training seconds over steps, summed over a resumed run's processes, so every run
    counts. Memory is one process's figure: it comes from the runs that one process trained
    whole; a resumed run (``segments`` > 1) is counted in ``resumed`` and left out, and when
    every run of a label was resumed its peak memory is the highest of its segments', with
    ``mem_from`` "resumed" (the table says so), and its RSS growth is unknown.
    """
    runs = {}
    for r in rows:  # one entry per run (learners share the timing)
        if r["status"] == "complete":
            runs[(r["label"], r["setting"], r["seed"])] = r
    ce = {(s, seed): r["sec_per_iter"] for (lab, s, seed), r in runs.items() if lab == "ce"}
    out = []
    for label in dict.fromkeys(k[0] for k in runs):
        mine = [(k, r) for k, r in runs.items() if k[0] == label]
        ratios = [
            r["sec_per_iter"] / ce[(k[1], k[2])]
            for k, r in mine
            if (k[1], k[2]) in ce and ce[(k[1], k[2])] > 0
        ]
        whole = [r for _, r in mine if r.get("segments", 1) in (1, "1")]
        resumed = len(mine) - len(whole)
        mem_runs = whole or [r for _, r in mine]
        mem = [r["peak_mem_mb"] for r in mem_runs if r.get("peak_mem_mb") is not None]
        rss = [r["peak_rss_mb"] for r in whole if r.get("peak_rss_mb") is not None]
        out.append(
            {
                "label": label,
                "sec_per_iter": sum(r["sec_per_iter"] for _, r in mine) / len(mine),
                "x_ce": sum(ratios) / len(ratios) if ratios else None,
                "peak_mem_mb": max(mem) if mem else None,
                "peak_rss_mb": max(rss) if rss else None,
                "runs": len(mine),
                "resumed": resumed,
                "mem_from": "whole" if whole else "resumed",
            }
        )
    return out


def markdown_tables(rows: list[dict[str, Any]]) -> str:
    """``table.md``: accuracy (last epoch, validation-selected), cost, detection, failures."""
    if not rows:
        return "# Benchmark\n\nNo runs found.\n"
    parts = ["# Benchmark", ""]
    datasets = sorted({str(r["dataset"]) for r in rows})
    seeds = sorted({r["seed"] for r in rows if r["seed"] is not None})
    parts.append(
        f"Data: {', '.join(datasets)}; seeds: {', '.join(map(str, seeds))}. "
        "Mean ± sample std over seeds (one seed: its value, no spread); "
        "best mean per column in bold."
    )
    for metric, title in (
        ("test_last", "Test accuracy at the last epoch"),
        ("test_sel", "Test accuracy at the epoch chosen on validation accuracy"),
    ):
        header, body = metric_table(rows, metric)
        parts += ["", f"## {title}", "", _md_table(header, body)]
    if any(r.get("auroc") is not None or r.get("cleanlab_auroc") is not None for r in rows):
        with_weights = {r["label"] for r in rows if r.get("auroc") is not None}
        header, body = metric_table([r for r in rows if r["label"] in with_weights], "auroc")
        cl = [r for r in rows if r.get("cleanlab_auroc") is not None]
        parts += [
            "",
            "## Noisy-label detection: AUROC of the learned weights",
            "",
            _md_table(header, body),
        ]
        if cl:
            seen, cl_rows = set(), []
            for r in cl:
                if (r["setting"], r["seed"]) not in seen:
                    seen.add((r["setting"], r["seed"]))
                    cl_rows.append(
                        {
                            **r,
                            "label": "cleanlab (K-fold CE)",
                            "learner": "",
                            "auroc": r["cleanlab_auroc"],
                        }
                    )
            header, body = metric_table(cl_rows, "auroc")
            parts += [
                "",
                "cleanlab on the same data (self-confidence ranking):",
                "",
                _md_table(header, body),
            ]
    cost = cost_rows(rows)
    if cost:
        fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
        body = [
            [
                c["label"],
                fmt(c["sec_per_iter"], ".4f"),
                fmt(c["x_ce"], ".2f"),
                fmt(c["peak_mem_mb"], ".0f")
                + (" (resumed)" if c["mem_from"] == "resumed" and c["peak_mem_mb"] else ""),
                "resumed" if c["mem_from"] == "resumed" else fmt(c["peak_rss_mb"], ".0f"),
                str(c["runs"]) + (f" ({c['resumed']} resumed)" if c["resumed"] else ""),
            ]
            for c in cost
        ]
        parts += [
            "",
            "## Cost",
            "",
            "Time per iteration relative to ce on the same setting and seed; peak memory "
            "as the trainer reports it, and the peak growth of resident memory per run. "
            "Memory is one process's: a resumed run (trained by several processes) is left "
            "out of it, or, where every run was resumed, marked (resumed) with the highest "
            "of its processes' peaks; each process's cost is in the run's results.json "
            "(timing.segments).",
            "",
            _md_table(
                ["method", "s/iter", "× ce", "peak mem (MB)", "peak RSS growth (MB)", "runs"], body
            ),
        ]
    failed = [r for r in rows if r["status"] != "complete"]
    if failed:
        parts += ["", "## Failed runs", ""]
        parts += [f"- `{Path(r['run_dir']).name}`: {r['status']}: {r['error']}" for r in failed]
    return "\n".join(parts) + "\n"
