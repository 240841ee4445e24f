"""Tiny end-to-end searches on 8x8 digits (offline, from scikit-learn) and an evaluation."""

from __future__ import annotations

import json

import pytest

from lfm.data.types import DataBundle
from lfm.nas import SEARCHERS, EvalConfig, Genotype, SearchConfig, run_evaluate, run_search

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits(digits_images) -> DataBundle:
    """Half of the search data as validation, as the data layer's val_fraction=0.5 gives."""
    return digits_images(256, 256)


def _tiny(method: str, **kw) -> SearchConfig:
    base = dict(
        method=method, layers=2, C=4, epochs=2, batch_size=32, steps_per_epoch=3, w_lr=0.05,
        arch_lr=3e-3, stage_layers=(1, 2), stage_ops=(8, 4), skip_dropout=(0.0, 0.3),
        warmup_epochs=0,
    )  # fmt: skip
    return SearchConfig(**(base | kw))


def _check(result, progressive: bool = False) -> None:
    g = result.genotype
    assert isinstance(g, Genotype) and len(g.normal) == 8 and len(g.reduce) == 8
    assert result.alphas[0].shape[0] == 14
    assert result.history and result.history[-1]["val_acc"] > 0.15  # chance is 0.1
    if progressive:
        assert len(result.normal_ops[0]) == 4 and g.count("skip_connect") <= 2


def test_searchers_registered():
    assert SEARCHERS.names() == ["darts", "lfm-darts", "lfm-pdarts", "pdarts"]


# Each method's own settings; one or two iterations per epoch keep the search to a few seconds.
METHODS = {
    "darts": dict(order=2, steps_per_epoch=1),  # second order: the unrolled hypergradient
    "pdarts": dict(order=1, warmup_epochs=1, steps_per_epoch=2),  # P-DARTS's first order
    "lfm-darts": dict(steps_per_epoch=2),
    "lfm-pdarts": dict(warmup_epochs=1, steps_per_epoch=1),
}
# Three epochs of the DARTS evaluation recipe (auxiliary head, drop-path) on train + val; the
# last epoch's test accuracy is reported, nothing is picked by it.
EVAL = EvalConfig(layers=2, C=8, epochs=3, batch_size=32)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_search_then_evaluate(digits, tmp_path, method):
    progressive = method.endswith("pdarts")
    res = run_search(digits, _tiny(method, **METHODS[method]))
    _check(res, progressive)
    if progressive:
        assert res.history[0]["layers"] == 1 and res.history[-1]["layers"] == 2
        assert res.history[0]["arch"] is False  # warm-up epoch trains weights only
    if method.startswith("lfm"):
        assert 0 < res.history[-1]["a_mean"] < 1
    res.genotype.save(tmp_path / "g.json")
    g = Genotype.load(tmp_path / "g.json")
    assert g == res.genotype
    out = run_evaluate(digits, g, EVAL)
    assert out["test_acc"] > 0.5, out["test_acc"]  # chance is 0.1
    assert out["params"] > 0 and len(out["history"]) == EVAL.epochs


def test_lfm_darts_shared_step_runs(digits):
    res = run_search(digits, _tiny("lfm-darts", encoder="shared", epochs=1, steps_per_epoch=1))
    assert "a_mean" in res.history[-1] and 0 < res.history[-1]["a_mean"] < 1


def test_paper_presets_run_on_a_local_cifar_folder(tmp_path, capsys):
    """`--preset darts-paper` search and evaluation read CIFAR-10 from a folder in its python
    format; only the size is shrunk by flags (cells, channels, batch, steps), so the rest of
    the recipe runs as on a GPU: 3x32x32 input, cutout 16, auxiliary head, drop-path."""
    from test_data_cifar import make_fake_cifar10  # tests/ is on sys.path under pytest

    from lfm.cli.main import main

    make_fake_cifar10(tmp_path / "cifar")
    data = ["--dataset", "cifar10", "--data-root", str(tmp_path / "cifar"), "--no-progress"]
    small = ["--set", "steps_per_epoch=1", "--set", "batch_size=8", "--set", "layers=3"]
    search = ["search", "--preset", "darts-paper", "--layers", "2", "--C", "4", "--epochs", "1"]
    assert main(search + ["--steps-per-epoch", "1", "--batch-size", "8"] + data
                + ["--out", str(tmp_path / "s")]) == 0  # fmt: skip
    evaluate = [
        "evaluate",
        "--preset",
        "darts-paper",
        "--genotype",
        str(tmp_path / "s/genotype.json"),
    ]
    assert main(evaluate + small + ["--set", "C=4", "--set", "epochs=1"] + data
                + ["--out", str(tmp_path / "e")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "genotype (darts)" in out and (tmp_path / "s" / "genotype.png").is_file()
    rec = json.loads((tmp_path / "e" / "evaluation.json").read_text())
    assert rec["config"]["cutout"] == 16 and rec["config"]["auxiliary_weight"] == 0.4
    assert rec["config"]["drop_path"] == 0.2 and rec["config"]["C"] == 4  # preset + overrides
    assert 0.0 <= rec["test_acc"] <= 1.0 and rec["genotype"]["normal"]
