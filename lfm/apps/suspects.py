"""Suspect training examples: rank by learned weight, score the ranking, compare with cleanlab.

A reweighting method gives each training example a weight; a low weight says "this example
hurts the clean validation loss", i.e. a suspect (a wrong label, an outlier). This module turns a
run folder's ``per_example.npz`` into a ranked list (``suspects.csv``), and, when the noisy-label
mask is known (label noise injected by ``--noise``), scores the ranking: AUROC against the mask
and precision at k (k = number of noisy examples, and k = 100).

The comparison everyone asks for is cleanlab (confident learning): out-of-sample predicted
probabilities by K-fold cross-validation of a plain cross-entropy classifier, then
``cleanlab.filter.find_label_issues(..., return_indices_ranked_by='self_confidence')``; its
AUROC uses the self-confidence score p(given label | x) of every example.

Predicted labels in ``suspects.csv`` come from the run's final model, rebuilt from the newest
checkpoint in ``RUN_DIR/checkpoints`` (the trainer writes one at the last epoch end). A run kept
without checkpoints (or with ``--no-predict``) gets an empty ``predicted_label`` column.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lfm.data.types import DataBundle, Split, iterate_batches
from lfm.errors import LFMError
from lfm.train.atomic import write_atomic
from lfm.train.optim import OptimConfig, make_optimizer

# The per-example arrays that hold a weight, in order of preference: `weight` (l2rw, mwnet,
# small-loss), then LFM-DR's training-example weights `b` and stage-2 weights `a`.
WEIGHT_KEYS = ("weight", "b", "a")
SUSPECTS_CSV = "suspects.csv"


# -- reading a run --------------------------------------------------------------------------------
def load_per_example(run_dir: str | Path) -> dict[str, np.ndarray]:
    """The arrays of ``RUN_DIR/per_example.npz`` as a dict.

    Example
    -------
    >>> arrays = load_per_example("runs/digits-imb1-flip0.4-l2rw-s0")
    >>> sorted(arrays)[:3]
    ['index', 'label', 'noisy']
    """
    path = Path(run_dir) / "per_example.npz"
    if not path.is_file():
        # `lfm dr --out X` and `lfm bench --out X` keep one run per sub-folder: point at them
        runs = sorted(p.parent for p in Path(run_dir).glob("*/per_example.npz"))
        runs = runs or sorted(p.parent for p in Path(run_dir).glob("runs/*/per_example.npz"))
        if runs:
            pick = next((r for r in runs if r.name == "lfm"), runs[-1])
            others = ", ".join(str(r) for r in runs[:5]) + (", ..." if len(runs) > 5 else "")
            raise LFMError(
                f"{Path(run_dir)} holds several runs, one per sub-folder ({others})",
                f"pass one of them, e.g. `lfm suspects {pick}`",
            )
        raise LFMError(f"{path} does not exist", "pass a run folder written by `lfm train --out`")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def weight_key(arrays: dict[str, np.ndarray], key: str | None = None) -> str:
    """The array to rank by: `key` if given, else the first of `WEIGHT_KEYS` present.

    Example
    -------
    >>> weight_key({"weight": np.ones(3), "label": np.zeros(3)})
    'weight'
    """
    n = len(arrays.get("index", []))
    candidates = [key] if key else list(WEIGHT_KEYS)
    for k in candidates:
        if k in arrays and arrays[k].ndim == 1 and len(arrays[k]) == n:
            return k
    per_example = sorted(k for k, v in arrays.items() if v.ndim == 1 and len(v) == n)
    raise LFMError(
        f"no per-example weight {'named ' + repr(key) if key else 'array'} in this run",
        f"pick one with --key from: {', '.join(per_example)} (plain methods learn no weights)",
    )


def signal_key(run_dir: str | Path) -> str | None:
    """The array the run's method documents as its noisy-label signal, or None to use the default.

    An LFM-DR run ranks by its variant's `SIGNAL_KEY` (`a` for `paper`, whose `b` ranks noisy
    examples up; `b` for `w1-val`); `lfm-sn` learns no `b`. Other methods: None (`weight`).

    Example
    -------
    >>> signal_key("runs/x/lfm")  # an `lfm dr --variant paper` run
    'a'
    """
    results = Path(run_dir) / "results.json"
    try:
        cfg = json.loads(results.read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    method = cfg.get("method")
    if method == "lfm-sn":
        return "a"
    if method != "lfm":
        return None
    from lfm.methods.lfm_dr import SIGNAL_KEY, LFMConfig

    try:
        variant = LFMConfig.from_options(cfg.get("method_options") or {}).variant
    except LFMError:
        return None
    return SIGNAL_KEY.get(variant)


def worse_than_chance(metrics: dict[str, Any], others: dict[str, float | None]) -> str | None:
    """One line when the ranking's AUROC is below 0.5, naming the other key(s) to try.

    Example
    -------
    >>> worse_than_chance({"auroc": 0.377, "key": "b"}, {"a": 0.84})
    'AUROC of b is 0.377, below 0.5: ... try --key a (AUROC 0.840)'
    """
    auroc = metrics.get("auroc")
    if auroc is None or auroc >= 0.5:
        return None
    tries = ", ".join(
        f"--key {k}" + (f" (AUROC {v:.3f})" if v is not None else "") for k, v in others.items()
    )
    return (
        f"AUROC of {metrics['key']} is {auroc:.3f}, below 0.5: low {metrics['key']} marks clean "
        f"examples more than noisy ones, so this ranking is worse than chance"
        + (f"; try {tries}" if tries else "")
    )


# -- scoring a ranking ----------------------------------------------------------------------------
def suspicion_order(scores: np.ndarray) -> np.ndarray:
    """Indices from most to least suspect: ascending score, NaN (never seen) last, stable.

    Example
    -------
    >>> suspicion_order(np.array([0.5, np.nan, 0.1, 0.5])).tolist()
    [2, 0, 3, 1]
    """
    s = np.where(np.isnan(scores), np.inf, scores.astype(np.float64))
    return np.argsort(s, kind="stable")


def detection_metrics(
    scores: np.ndarray, noisy: np.ndarray, ks: Sequence[int | None] = (None, 100)
) -> dict[str, Any]:
    """How well low `scores` pick out the `noisy` examples.

    Parameters
    ----------
    scores : np.ndarray
        (N,) per-example score, low = suspect (a learned weight, a self-confidence). NaN counts
        as not suspect at all.
    noisy : np.ndarray
        (N,) bool, the true mask of wrong labels.
    ks : sequence
        The k of precision at k; None means k = number of noisy examples.

    Returns
    -------
    dict
        ``auroc`` (sklearn ``roc_auc_score`` of -score against the mask; None when the mask has
        a single class), ``n_noisy``, ``n``, and ``precision@K`` for each k.

    Example
    -------
    >>> detection_metrics(np.array([0.1, 0.9, 0.2, 0.8]), np.array([1, 0, 1, 0], bool), ks=[None])
    {'n': 4, 'n_noisy': 2, 'auroc': 1.0, 'precision@2': 1.0}
    """
    from sklearn.metrics import roc_auc_score

    noisy = np.asarray(noisy).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    finite_max = np.nanmax(s) if np.isfinite(s).any() else 0.0
    s = np.where(np.isnan(s), finite_max + 1.0, s)
    out: dict[str, Any] = {"n": int(len(s)), "n_noisy": int(noisy.sum())}
    out["auroc"] = float(roc_auc_score(noisy, -s)) if 0 < noisy.sum() < len(s) else None
    order = suspicion_order(s)
    for k in ks:
        kk = int(noisy.sum()) if k is None else int(k)
        kk = min(kk, len(s))
        if kk > 0:
            out[f"precision@{kk}"] = float(noisy[order[:kk]].mean())
    return out


# -- the suspects table ---------------------------------------------------------------------------
def weight_change(history: np.ndarray) -> np.ndarray:
    """(N,) last minus first observed weight over the epoch snapshots (NaN if never seen).

    Example
    -------
    >>> weight_change(np.array([[np.nan, 1.0], [0.5, 0.2]])).tolist()
    [0.0, -0.8]
    """
    seen = ~np.isnan(history)
    first_idx = np.where(seen.any(0), seen.argmax(0), 0)
    first = history[first_idx, np.arange(history.shape[1])]
    last = history[-1]
    return np.where(seen.any(0), last - first, np.nan)


def predicted_labels(run_dir: str | Path, learner: str | None = None) -> np.ndarray | None:
    """The final model's predictions on the training split, or None without a checkpoint.

    Rebuilds the run's data and method from ``results.json``, loads the newest checkpoint and
    predicts every training example (eval mode, no augmentation).

    Parameters
    ----------
    run_dir : str or Path
        A run folder written by the trainer.
    learner : str, optional
        Which learner predicts (e.g. "W2"); default: the last one the method lists.

    Returns
    -------
    np.ndarray or None
        (N,) predicted class per training example.

    Example
    -------
    >>> pred = predicted_labels("runs/digits-imb1-flip0.4-l2rw-s0")
    """
    from lfm.config import RunConfig, from_dict
    from lfm.train.checkpoint import CheckpointDir
    from lfm.train.evaluate import predict
    from lfm.train.trainer import Trainer

    run_dir = Path(run_dir)
    state = CheckpointDir(run_dir / "checkpoints").latest(read_only=True)
    results_path = run_dir / "results.json"
    if state is None or not results_path.is_file():
        return None
    _register_methods()
    cfg_dict = json.loads(results_path.read_text())["config"]
    cfg = from_dict(RunConfig, {**cfg_dict, "out": None, "progress": False})
    trainer = Trainer(cfg)
    trainer.method.load_state_dict(state["method"])
    models = trainer.method.models()
    name = learner or list(models)[-1]
    if name not in models:
        raise LFMError(f"learner {name!r} is not in this run", f"choose one of {', '.join(models)}")
    logits = predict(models[name], trainer.bundle, trainer.bundle.train, trainer.device)
    return logits.argmax(1).numpy()


def suspects_table(
    run_dir: str | Path, key: str | None = None, predict: bool = True, learner: str | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Rank a run's training examples by learned weight; write ``suspects.csv`` into the run.

    Parameters
    ----------
    run_dir : str or Path
        The run folder (``per_example.npz``, and checkpoints for predicted labels).
    key : str, optional
        The per-example array to rank by (default: the first of `WEIGHT_KEYS` present).
    predict : bool
        Fill ``predicted_label`` from the final model (needs a checkpoint; else left empty).
    learner : str, optional
        The learner whose predictions are used (default: the last listed).

    Returns
    -------
    (list of dict, dict or None)
        The rows, most suspect first (``rank`` 1 = lowest weight), and the detection metrics
        (`detection_metrics`) when the noisy mask is known.

    Example
    -------
    >>> rows, metrics = suspects_table("bench/runs/digits-imb1-flip0.4-l2rw-s0")
    >>> rows[0]["rank"], metrics["auroc"]
    """
    arrays = load_per_example(run_dir)
    if key is None:
        default = signal_key(run_dir)
        key = default if default in arrays else None
    k = weight_key(arrays, key)
    w = arrays[k].astype(np.float64)
    order = suspicion_order(w)
    rank = np.empty(len(w), dtype=np.int64)
    rank[order] = np.arange(1, len(w) + 1)
    hist_key = f"{k}_history"
    change = weight_change(arrays[hist_key]) if hist_key in arrays else None
    change_rank = None
    if change is not None:
        change_rank = np.empty(len(w), dtype=np.int64)
        change_rank[suspicion_order(change)] = np.arange(1, len(w) + 1)
    pred = predicted_labels(run_dir, learner) if predict else None
    has_truth = "noisy" in arrays
    rows = []
    for i in order:
        row: dict[str, Any] = {
            "rank": int(rank[i]),
            "index": int(arrays["index"][i]),
            "origin": int(arrays["origin"][i]),
            "given_label": int(arrays["label"][i]),
            "predicted_label": "" if pred is None else int(pred[i]),
            "weight": float(w[i]),
        }
        if change is not None:
            row["weight_change"] = float(change[i])
            row["change_rank"] = int(change_rank[i])  # type: ignore[index]
        if has_truth:
            row["true_label"] = int(arrays["true_label"][i])
            row["noisy"] = int(arrays["noisy"][i])
        rows.append(row)
    write_csv(Path(run_dir) / SUSPECTS_CSV, rows)
    metrics = None
    if has_truth:
        metrics = detection_metrics(w, arrays["noisy"])
        metrics["key"] = k
        n = len(w)
        others = {
            o: detection_metrics(arrays[o], arrays["noisy"], ks=())["auroc"]
            for o in WEIGHT_KEYS
            if o != k and o in arrays and arrays[o].ndim == 1 and len(arrays[o]) == n
        }
        warning = worse_than_chance(metrics, others)
        if warning:
            metrics["warning"] = warning
        if change is not None:
            metrics["auroc_change"] = detection_metrics(change, arrays["noisy"], ks=())["auroc"]
    return rows, metrics


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rows with the same keys -> a CSV file (header from the union of keys, in order)."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    f = io.StringIO(newline="")
    writer = csv.DictWriter(f, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, f.getvalue())


# -- cleanlab ------------------------------------------------------------------------------------
@dataclass
class CleanlabResult:
    """Out-of-sample predicted probabilities and cleanlab's verdict on the training set."""

    pred_probs: np.ndarray  # (N, C), each row from the fold that did not train on it
    self_confidence: np.ndarray  # (N,) p(given label | x); low = suspect
    issues: np.ndarray  # indices cleanlab flags, most suspect first
    metrics: dict[str, Any] | None = field(default=None)  # against the noisy mask, if known


def out_of_fold_probs(
    split: Split,
    bundle: DataBundle,
    model_factory: Callable[[], nn.Module],
    folds: int = 5,
    epochs: int = 10,
    batch_size: int = 100,
    optim: OptimConfig | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> np.ndarray:
    """K-fold cross-validated softmax probabilities of plain CE classifiers on `split`.

    Parameters
    ----------
    split : Split
        The (noisy) training split; its labels ``y`` are what the classifiers fit.
    bundle : DataBundle
        Supplies ``num_classes`` and ``inputs()`` (normalisation, augmentation).
    model_factory : callable
        Returns a fresh classifier (already on `device`).
    folds, epochs, batch_size : int
        Cross-validation folds, epochs per fold, batch size.
    optim : OptimConfig, optional
        The classifiers' optimizer; default Adam 1e-3 without weight decay, constant rate.
    device : torch.device or str
        Where to train.
    seed : int
        Seeds the fold assignment and the batch order.

    Returns
    -------
    np.ndarray
        (N, C) probabilities, each row predicted by the model that never saw that example.

    Example
    -------
    >>> probs = out_of_fold_probs(bundle.train, bundle, lambda: create_model("mlp", 10, (64,)))
    """
    optim = optim or OptimConfig("adam", 1e-3, 0.0, False, 0.0, "constant")
    n = len(split)
    if folds < 2 or folds > n:
        raise LFMError(f"cross-validation needs 2 <= folds <= {n}, got {folds}", "use --folds 5")
    g = torch.Generator().manual_seed(seed)
    fold_of = torch.randperm(n, generator=g) % folds
    probs = torch.zeros(n, bundle.num_classes)
    for k in range(folds):
        held = torch.nonzero(fold_of == k).squeeze(1)
        fit = split.subset(torch.nonzero(fold_of != k).squeeze(1))
        model = model_factory()
        opt = make_optimizer(model.parameters(), optim)
        model.train()
        for epoch in range(epochs):
            for b in iterate_batches(fit, batch_size, device=device, seed=seed + k, epoch=epoch):
                loss = F.cross_entropy(model(bundle.inputs(b.x, train=True)), b.y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        model.eval()
        with torch.no_grad():
            part = split.subset(held)
            out = [
                F.softmax(model(bundle.inputs(b.x, train=False)).float(), 1).cpu()
                for b in iterate_batches(part, 500, device=device, shuffle=False)
            ]
        probs[held] = torch.cat(out)
    return probs.numpy()


def cleanlab_ranking(
    bundle: DataBundle,
    model_factory: Callable[[], nn.Module],
    folds: int = 5,
    epochs: int = 10,
    batch_size: int = 100,
    optim: OptimConfig | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> CleanlabResult:
    """cleanlab's label issues on ``bundle.train``, from K-fold out-of-sample probabilities.

    Parameters
    ----------
    bundle : DataBundle
        The data; the training split's ``y`` are the (possibly noisy) given labels.
    model_factory : callable
        Returns a fresh plain classifier on `device` (the run's architecture is a fair choice).
    folds, epochs, batch_size, optim, device, seed :
        As `out_of_fold_probs`.

    Returns
    -------
    CleanlabResult
        ``issues`` from ``cleanlab.filter.find_label_issues(labels, pred_probs,
        return_indices_ranked_by='self_confidence')``, the self-confidence of every example,
        and, when ``bundle.train.noisy`` is known, `detection_metrics` of that score.

    Example
    -------
    >>> res = cleanlab_ranking(bundle, lambda: create_model("mlp", 10, (64,)), folds=5)
    >>> res.metrics["auroc"]
    """
    try:
        from cleanlab.filter import find_label_issues
    except ImportError as e:  # pragma: no cover - cleanlab is an optional extra
        raise LFMError("cleanlab is not installed", "pip install 'lfm[suspects]'") from e
    probs = out_of_fold_probs(
        bundle.train, bundle, model_factory, folds, epochs, batch_size, optim, device, seed
    )
    labels = bundle.train.y.numpy()
    # Every class must appear among the given labels for cleanlab; rows are renormalised so
    # float32 rounding cannot trip its sum-to-one check.
    probs = probs / probs.sum(1, keepdims=True)
    issues = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence")
    conf = probs[np.arange(len(labels)), labels]
    noisy = bundle.train.noisy
    metrics = None if noisy is None else detection_metrics(conf, noisy.numpy())
    if metrics is not None:
        flagged = np.zeros(len(labels), bool)
        flagged[issues] = True
        true = noisy.numpy()
        metrics["flagged"] = int(flagged.sum())
        metrics["flagged_precision"] = float(true[flagged].mean()) if flagged.any() else math.nan
        metrics["flagged_recall"] = float(flagged[true].mean()) if true.any() else math.nan
    return CleanlabResult(probs, conf, np.asarray(issues), metrics)


def cleanlab_for_run(
    run_dir: str | Path, folds: int = 5, epochs: int = 10, **kwargs: Any
) -> CleanlabResult:
    """`cleanlab_ranking` on the exact data and architecture of a finished run.

    Example
    -------
    >>> cleanlab_for_run("bench/runs/digits-imb1-flip0.4-l2rw-s0").metrics
    """
    from lfm.config import RunConfig, from_dict
    from lfm.data.build import build_data
    from lfm.device import resolve_device

    results = json.loads((Path(run_dir) / "results.json").read_text())
    cfg = from_dict(RunConfig, {**results["config"], "out": None})
    bundle = build_data(cfg.data)
    device = resolve_device(cfg.device)
    return cleanlab_ranking(
        bundle,
        model_for(cfg, bundle, device),
        folds,
        epochs,
        device=device,
        seed=cfg.seed,
        **kwargs,
    )


def model_for(cfg: Any, bundle: DataBundle, device: torch.device) -> Callable[[], nn.Module]:
    """A factory of fresh classifiers of the run's architecture, on `device`."""
    from lfm.models import create_model

    def make() -> nn.Module:
        return create_model(
            cfg.model.name, bundle.num_classes, bundle.input_shape, **cfg.model.kwargs
        ).to(device)

    return make


def _register_methods() -> None:
    """Make sure every method a saved run may name is registered."""
    import lfm.methods  # noqa: F401
    import lfm.methods.meta  # noqa: F401
    import lfm.methods.small_loss  # noqa: F401
