"""`lfm suspects`: ranking by weight, AUROC / precision@k, suspects.csv, cleanlab comparison."""

from __future__ import annotations

import argparse
import csv

import numpy as np
import pytest

from lfm.apps.suspects import (
    cleanlab_ranking,
    detection_metrics,
    suspects_table,
    suspicion_order,
    weight_change,
)
from lfm.errors import LFMError


def _auroc_by_pairs(scores, noisy):
    """P(a noisy example scores lower than a clean one), ties counting one half."""
    pos, neg = scores[noisy], scores[~noisy]
    wins = (pos[:, None] < neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def test_detection_metrics_on_a_constructed_case():
    # 6 examples, noisy = {0, 2, 5}; weights rank 0, 2 lowest but 5 above two clean ones
    w = np.array([0.1, 0.9, 0.2, 0.5, 0.4, 0.6])
    noisy = np.array([1, 0, 1, 0, 0, 1], bool)
    m = detection_metrics(w, noisy, ks=(None, 2, 100))
    assert m["n_noisy"] == 3
    assert m["auroc"] == pytest.approx(_auroc_by_pairs(w, noisy)) == pytest.approx(7 / 9)
    assert m["precision@3"] == pytest.approx(2 / 3)  # top 3: 0, 2, 4
    assert m["precision@2"] == 1.0
    assert m["precision@6"] == 0.5  # k = 100 is capped at N
    # a perfect ranking, and NaN (never seen) counted as not suspect
    assert (
        detection_metrics(np.array([0.0, np.nan, 0.1, 1.0]), np.array([1, 0, 1, 0], bool))["auroc"]
        == 1.0
    )
    assert detection_metrics(w, np.zeros(6, bool))["auroc"] is None
    assert suspicion_order(np.array([0.5, np.nan, 0.1])).tolist() == [2, 0, 1]
    rng = np.random.default_rng(0)
    s, nz = rng.random(200), rng.random(200) < 0.3
    assert detection_metrics(s, nz)["auroc"] == pytest.approx(_auroc_by_pairs(s, nz))


def _fake_run(tmp_path):
    n = 8
    np.savez(
        tmp_path / "per_example.npz",
        index=np.arange(n),
        origin=np.arange(n) + 100,
        label=np.arange(n) % 3,
        true_label=np.array([0, 1, 0, 0, 1, 2, 0, 1]),
        noisy=np.array([0, 0, 1, 1, 0, 0, 0, 0], bool),
        weight=np.array([1.0, 0.9, 0.0, 0.1, 0.8, np.nan, 1.2, 1.1]),
        weight_history=np.array(
            [
                [1.0, 1.0, 1.0, 0.5, np.nan, np.nan, 1.0, 1.0],
                [1.0, 0.9, 0.0, 0.1, 0.8, np.nan, 1.2, 1.1],
            ]
        ),
    )
    return tmp_path


def test_suspects_csv_and_cli(tmp_path, capsys):
    run = _fake_run(tmp_path)
    rows, metrics = suspects_table(run)  # no checkpoints: predicted_label stays empty
    assert [r["index"] for r in rows[:4]] == [2, 3, 4, 1]
    assert rows[0]["rank"] == 1 and rows[0]["origin"] == 102 and rows[0]["noisy"] == 1
    assert rows[-1]["index"] == 5  # never seen: last
    assert metrics["auroc"] == 1.0 and metrics["precision@2"] == 1.0
    with open(run / "suspects.csv") as f:
        table = list(csv.DictReader(f))
    assert table[0]["predicted_label"] == "" and table[0]["weight"] == "0.0"
    assert float(table[0]["weight_change"]) == -1.0 and table[0]["change_rank"] == "1"
    assert weight_change(np.array([[np.nan, 1.0], [0.5, 0.2]])).tolist() == [
        0.0,
        pytest.approx(-0.8),
    ]
    with pytest.raises(LFMError, match="--key"):
        suspects_table(run, key="b")

    from lfm.cli import suspects as cli

    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["suspects", str(run), "--top", "3"])
    assert args.func(args) == 0
    assert "AUROC 1.0000" in capsys.readouterr().out


def test_cleanlab_ranking_finds_flipped_labels():
    from lfm.data.build import build_data
    from lfm.data.config import DataConfig
    from lfm.models import create_model

    bundle = build_data(DataConfig("digits", noise="flip:0.3"))
    res = cleanlab_ranking(
        bundle,
        lambda: create_model("mlp", bundle.num_classes, bundle.input_shape),
        folds=2,
        epochs=3,
    )
    n = len(bundle.train)
    assert res.pred_probs.shape == (n, bundle.num_classes)
    assert np.allclose(res.pred_probs.sum(1), 1, atol=1e-5)
    assert len(res.issues) > 0 and res.metrics["auroc"] > 0.6
