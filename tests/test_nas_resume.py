"""Checkpoint and resume of `lfm search` and `lfm evaluate`: a run killed after an epoch and
continued from its checkpoint ends exactly where one uninterrupted run ends.

The kill is simulated in-process: `CheckpointDir.save` is wrapped so that the run raises right
after its k-th checkpoint is on disk, which is the state a SIGKILL at that moment leaves
(tests/test_kill_resume.py covers kills inside the write itself). The resumed call starts from
that file alone: its learners, optimizers and RNG are rebuilt from scratch and then loaded.
"""

from __future__ import annotations

import json

import pytest
import torch

from lfm.cli.main import main
from lfm.data.types import DataBundle
from lfm.errors import LFMError
from lfm.nas import EvalConfig, Genotype, SearchConfig, run_evaluate, run_search
from lfm.nas import search as search_mod
from lfm.train.checkpoint import CheckpointDir, safe_load


class Killed(Exception):
    """Stands for the process dying right after a checkpoint write."""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits(digits_images) -> DataBundle:
    """Half of the search data as validation, as the data layer's val_fraction=0.5 gives."""
    return digits_images(128, 128)


def _tiny(method: str, **kw) -> SearchConfig:
    base = dict(
        method=method, layers=1, C=4, epochs=2, batch_size=64, steps_per_epoch=1, w_lr=0.05,
        arch_lr=3e-3, stage_layers=(1, 2), stage_ops=(8, 4), skip_dropout=(0.3, 0.3),
        warmup_epochs=0, encoder_dim=8,
    )  # fmt: skip
    return SearchConfig(**(base | kw))


def _killed_at(monkeypatch, k: int, call):
    """Run `call()` so that it dies right after writing its k-th checkpoint."""
    real = CheckpointDir.save

    def save_then_die(self, state, step):
        path = real(self, state, step)
        if step == k:
            raise Killed
        return path

    with monkeypatch.context() as m:
        m.setattr(CheckpointDir, "save", save_then_die)
        with pytest.raises(Killed):
            call()


def _count_steps(monkeypatch) -> list[int]:
    """Count search iterations from now on (to see that a resumed run skips the done epochs)."""
    calls = [0]
    real = search_mod._Learners.step

    def step(self, *a, **kw):
        calls[0] += 1
        return real(self, *a, **kw)

    monkeypatch.setattr(search_mod._Learners, "step", step)
    return calls


def _without_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in rec.items() if k != "seconds"} for rec in history]


@pytest.mark.parametrize(
    "method, kill_after, kw",
    [
        ("darts", 1, dict(order=2)),  # second order reads SGD momentum buffers: restored
        ("pdarts", 2, dict(order=1)),  # across the stage boundary: op dropping, fresh supernet
        ("lfm-darts", 1, dict()),  # W1, W2, V, r, Adam of alpha and of V/r
    ],
)
def test_search_resumed_equals_uninterrupted(digits, tmp_path, monkeypatch, method, kill_after, kw):
    cfg = _tiny(method, **kw)
    whole = run_search(digits, cfg)  # no out folder: the API as before, no checkpoints
    _killed_at(monkeypatch, kill_after, lambda: run_search(digits, cfg, out=tmp_path))
    torch.manual_seed(123)  # the resumed run must not depend on the state the process is in
    steps = _count_steps(monkeypatch)
    resumed = run_search(digits, cfg, out=tmp_path)
    total_epochs = len(whole.history)
    assert steps[0] == (total_epochs - kill_after) * cfg.steps_per_epoch  # only the rest ran
    for a, b in zip(whole.alphas, resumed.alphas, strict=True):
        assert torch.equal(a, b)
    assert resumed.genotype == whole.genotype
    assert resumed.normal_ops == whole.normal_ops and resumed.reduce_ops == whole.reduce_ops
    assert _without_seconds(resumed.history) == _without_seconds(whole.history)
    # a finished run's folder resumes to the same result without another step
    again = run_search(digits, cfg, out=tmp_path)
    assert steps[0] == (total_epochs - kill_after) * cfg.steps_per_epoch
    assert torch.equal(again.alphas[0], whole.alphas[0]) and again.genotype == whole.genotype


def test_evaluate_resumed_equals_uninterrupted(digits, tmp_path, monkeypatch):
    g = Genotype.load("DARTS_V2")
    # cutout draws from its own generator every step, drop-path from torch's from epoch 1 on:
    # both generators must be restored (the kill comes after epoch 2, so drop-path has drawn)
    cfg = EvalConfig(layers=2, C=4, epochs=3, batch_size=32, steps_per_epoch=2, cutout=3)
    whole = run_evaluate(digits, g, cfg, out=tmp_path / "whole")
    _killed_at(monkeypatch, 2, lambda: run_evaluate(digits, g, cfg, out=tmp_path / "killed"))
    torch.manual_seed(123)
    resumed = run_evaluate(digits, g, cfg, out=tmp_path / "killed")
    assert _without_seconds(resumed["history"]) == _without_seconds(whole["history"])
    assert resumed["test_acc"] == whole["test_acc"]
    final = [safe_load(CheckpointDir(p / "evaluate" / "checkpoints").paths()[-1]) for p in (
        tmp_path / "whole", tmp_path / "killed"
    )]  # fmt: skip
    assert final[0]["epoch"] == final[1]["epoch"] == cfg.epochs
    w0, w1 = final[0]["method"]["model"], final[1]["method"]["model"]
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)


def test_changed_settings_are_refused_by_name(digits, tmp_path):
    cfg = _tiny("darts", order=1, epochs=1)
    run_search(digits, cfg, out=tmp_path)
    with pytest.raises(LFMError, match=r"different search\.epochs \(1 then, 2 now\)"):
        run_search(digits, _tiny("darts", order=1, epochs=2), out=tmp_path)
    fewer = DataBundle("digits", 10, (1, 8, 8), digits.train.subset(torch.arange(96)),
                       digits.val, digits.test)  # fmt: skip
    with pytest.raises(LFMError, match=r"different data\.labels"):
        run_search(fewer, cfg, out=tmp_path)
    # starting over on purpose replaces the old checkpoints
    res = run_search(digits, _tiny("darts", order=1, epochs=2), out=tmp_path, resume=False)
    assert len(res.history) == 2
    again = run_search(digits, _tiny("darts", order=1, epochs=2), out=tmp_path)
    assert torch.equal(again.alphas[0], res.alphas[0])  # resumed the new run, not the old one

    ev = EvalConfig(layers=1, C=4, epochs=1, batch_size=32, steps_per_epoch=1)
    run_evaluate(digits, Genotype.load("DARTS_V2"), ev, out=tmp_path)
    with pytest.raises(LFMError, match=r"different genotype\.normal"):
        run_evaluate(digits, Genotype.load("DARTS_V1"), ev, out=tmp_path)


def test_foreign_file_is_a_clear_error(digits, tmp_path):
    folder = tmp_path / "checkpoints" / "search"
    folder.mkdir(parents=True)
    torch.save({"step": 3}, folder / "ckpt-000000001.pt")
    with pytest.raises(LFMError, match="not a checkpoint of `lfm search`"):
        run_search(digits, _tiny("darts", order=1, epochs=1), out=tmp_path)


def test_cli_resumes_and_no_resume_starts_over(tmp_path, capsys):
    argv = ["search", "--out", str(tmp_path), "--no-progress", "--layers", "1", "--C", "4",
            "--epochs", "1", "--steps-per-epoch", "1", "--order", "1",
            "--set", "warmup_epochs=0", "--val-fraction", "0.5"]  # fmt: skip
    assert main(argv) == 0
    first = json.loads((tmp_path / "search.json").read_text())
    assert main(argv) == 0  # the finished run resumes: same alphas, nothing retrained
    assert json.loads((tmp_path / "search.json").read_text())["alphas"] == first["alphas"]
    capsys.readouterr()
    assert main(argv + ["--seed", "1"]) == 2
    assert "different search.seed" in capsys.readouterr().err
    assert main(argv + ["--seed", "1", "--no-resume"]) == 0

    # evaluate the searched genotype into the same folder: its checkpoints live apart
    argv = ["evaluate", "--genotype", str(tmp_path / "genotype.json"), "--out", str(tmp_path),
            "--no-progress", "--layers", "1", "--C", "4", "--epochs", "1",
            "--steps-per-epoch", "1"]  # fmt: skip
    assert main(argv) == 0 and main(argv) == 0
    capsys.readouterr()
    assert main(argv + ["--epochs", "2"]) == 2
    assert "different evaluate.epochs (1 then, 2 now)" in capsys.readouterr().err
    assert main(argv + ["--epochs", "2", "--no-resume"]) == 0
    done = json.loads((tmp_path / "evaluation.json").read_text())
    assert [r["epoch"] for r in done["history"]] == [0, 1]


def test_search_logs_every_step_once_across_a_kill(digits, tmp_path, monkeypatch):
    """`metrics.jsonl` of a search killed after its first epoch's checkpoint and resumed holds
    each step once, with the losses and hypergradient norms, like an uninterrupted search."""
    cfg = _tiny("lfm-darts", steps_per_epoch=2)
    run_search(digits, cfg, out=tmp_path / "straight")
    # the Trainer numbers checkpoints by step: the first epoch's (2 steps) is number 2
    _killed_at(monkeypatch, 2, lambda: run_search(digits, cfg, out=tmp_path / "killed"))
    run_search(digits, cfg, out=tmp_path / "killed")

    def rows(name: str) -> list[dict]:
        text = (tmp_path / name / "metrics.jsonl").read_text()
        return [json.loads(line) for line in text.splitlines()]

    steps = [r for r in rows("killed") if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [0, 1, 2, 3]
    assert {"train_loss", "val_loss", "hg_alpha", "hg_r", "lr", "epoch"} <= set(steps[0])
    assert all(r["hg_alpha"] > 0 for r in steps)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in rows("straight")]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in rows("killed")] == strip


def test_search_takes_the_trainers_run_settings(digits, tmp_path):
    """On the Trainer a search gains --max-steps, --checkpoint-every and bf16: it stops at the
    step asked, checkpoints on the step grid, and a bf16 search keeps finite alphas."""
    cfg = _tiny("lfm-darts", steps_per_epoch=3, batch_size=16)
    run_search(digits, cfg, out=tmp_path, max_steps=4, checkpoint_every=2)
    folder = tmp_path / "checkpoints" / "search"
    steps = sorted(int(p.stem.split("-")[1]) for p in folder.glob("ckpt-*.pt"))
    assert steps == [3, 4]  # 2, 3 (the epoch's end), then 4 (the stop): the newest 2 are kept
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "step"] == [0, 1, 2, 3]
    res = run_search(digits, _tiny("darts", order=2), precision="bf16")
    assert all(torch.isfinite(a).all() for a in res.alphas)
    assert json.loads((tmp_path / "results.json").read_text())["lfm-darts"]["genotype"]
