"""metrics.jsonl: a line per step and per evaluation; a resumed run logs every step once."""

from __future__ import annotations

import json
from pathlib import Path

from lfm.config import RunConfig
from lfm.data.config import DataConfig
from lfm.train.trainer import Trainer


def _cfg(out: Path, **kw) -> RunConfig:
    base = dict(
        method="lfm", data=DataConfig("digits"), epochs=2, batch_size=100, progress=False,
        out=str(out),
    )  # fmt: skip
    return RunConfig(**(base | kw))


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_every_step_and_evaluation_is_a_line(tmp_path):
    res = Trainer(_cfg(tmp_path)).run()
    rows = _rows(tmp_path)
    steps = [r for r in rows if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(res["timing"]["steps"]))
    assert {"L_val", "a_mean", "b_mean", "lr", "epoch"} <= set(steps[-1])
    assert steps[0]["lr"] > steps[-1]["lr"] > 0  # the cosine schedule, as the steps took it
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [e["epoch"] for e in evals] == [1, 2] and set(evals[-1]["val"]) == {"W1", "W2"}
    assert evals[-1]["test"] == {k: v["test_acc"] for k, v in res["last"].items()}


def test_a_resumed_run_logs_each_step_once(tmp_path):
    """Stopped at step 7 (checkpoints every 3 steps: the newest at 6), then a step line cut
    by a kill; the resumed run drops what the checkpoint does not hold and logs each step
    once, like a straight run."""
    Trainer(_cfg(tmp_path / "straight")).run()
    out = tmp_path / "killed"
    Trainer(_cfg(out, max_steps=7, checkpoint_every=3)).run()
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "step", "step": 7, "L_v')  # a kill in the middle of a line
    ckpts = sorted((out / "checkpoints").glob("ckpt-*.pt"))
    ckpts[-1].unlink()  # the step-7 checkpoint is lost too: resume from step 6
    Trainer(_cfg(out)).run()
    got = [r["step"] for r in _rows(out) if r["kind"] == "step"]
    want = [r["step"] for r in _rows(tmp_path / "straight") if r["kind"] == "step"]
    assert got == want


def test_tensorboard_events_hold_the_logged_scalars(tmp_path):
    """--tensorboard: the step and evaluation scalars of metrics.jsonl, read back from the
    event file with TensorBoard's own reader, at the same steps and values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Trainer(_cfg(tmp_path, method="ce", epochs=1, tensorboard=True)).run()
    files = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    acc = EventAccumulator(str(files[0]))
    acc.Reload()
    steps = [r for r in _rows(tmp_path) if r["kind"] == "step"]
    loss = acc.Scalars("step/loss")
    assert [e.step for e in loss] == [r["step"] for r in steps]
    assert [round(e.value, 4) for e in loss] == [round(r["loss"], 4) for r in steps]
    test_acc = acc.Scalars("eval/test/model")[-1].value
    evals = [r for r in _rows(tmp_path) if r["kind"] == "eval"]
    assert abs(test_acc - evals[-1]["test"]["model"]) < 1e-6
