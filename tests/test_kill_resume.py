"""SIGKILL a real `lfm train` process at random moments, resume each time: same end result.

The kills land before training starts, mid-training and inside checkpoint writes (the
`LFM_TEST_SLOW_CHECKPOINT` test hook holds a finished temp file before its rename). After every
kill each `ckpt-*.pt` present must load; at the end the parameters and the accuracy history
must equal an uninterrupted run's exactly, and no temp file may be left behind.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lfm.train.checkpoint import SLOW_WRITE_ENV, CheckpointDir, safe_load

EPOCHS = 12  # digits, batch 50: 24 steps an epoch; about 5 s of training after a 4 s start-up
SEED = 20240611  # the kill delays


def _cmd(out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lfm",
        "train",
        "--dataset",
        "digits",
        "--model",
        "mlp",
        "--epochs",
        str(EPOCHS),
        "--batch-size",
        "50",
        "--checkpoint-every",
        "2",
        "--out",
        str(out),
        "--no-progress",
    ]


def _env(slow: float | None = None) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop(SLOW_WRITE_ENV, None)
    if slow:
        env[SLOW_WRITE_ENV] = str(slow)
    return env


def _start(out: Path, slow: float | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        _cmd(out), env=_env(slow), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _ckpts(out: Path) -> list[Path]:
    return CheckpointDir(out / "checkpoints").paths()


def _temps(out: Path) -> list[Path]:
    d = out / "checkpoints"
    return sorted(d.glob(".ckpt-*.tmp")) if d.is_dir() else []


def _newest_step(out: Path) -> int:
    paths = _ckpts(out)
    return int(paths[-1].name[5:14]) if paths else -1


def _wait_for(pred, proc: subprocess.Popen, timeout: float = 60.0) -> bool:
    """Poll `pred` until it holds; False when the process ended first."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    raise AssertionError("timed out waiting for the run")


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)


def _assert_every_checkpoint_loads(out: Path) -> None:
    for p in _ckpts(out):
        state = safe_load(p)  # an LFMError here is a partial file under a final name
        assert "method" in state and "step" in state, p


def _accuracy_history(out: Path) -> list[tuple]:
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "complete"
    return [(h["epoch"], h["step"], h["train"], h["val"], h["test"]) for h in res["history"]]


def _final_params(out: Path) -> dict[str, torch.Tensor]:
    return safe_load(_ckpts(out)[-1])["method"]["model"]


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path):
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    straight = _start(straight_dir)  # runs beside the kills (two cores, one thread each)
    rng = random.Random(SEED)
    # anytime: a random delay from launch (start-up or early training); training: right after
    # this process wrote a checkpoint a random 1-8 checkpoints on, so the kill lands a number
    # of steps in, not a number of seconds (a fast machine runs hundreds of steps a second);
    # write: inside a checkpoint's write window.
    plan = ["anytime", "training", "write", "training", "write"]
    kills, steps = 0, []
    for mode in plan:
        before = _newest_step(killed_dir)
        proc = _start(killed_dir, slow=3.0 if mode == "write" else None)
        if mode == "anytime":
            time.sleep(rng.uniform(0.3, 1.5))
        elif mode == "training":
            target = max(before, 0) + 2 * rng.randint(1, 8)  # --checkpoint-every 2
            if _wait_for(lambda t=target: _newest_step(killed_dir) >= t, proc):
                time.sleep(rng.uniform(0.0, 0.02))
        else:
            old = set(_temps(killed_dir))
            if _wait_for(lambda o=old: set(_temps(killed_dir)) - o, proc):
                time.sleep(rng.uniform(0.0, 0.5))  # still well inside the 3 s pause
                assert proc.poll() is None
        alive = proc.poll() is None
        _kill(proc)
        assert alive, f"the run finished before the {mode!r} kill; raise EPOCHS"
        assert proc.returncode == -signal.SIGKILL
        kills += 1
        if mode == "write":
            # killed between the temp file and its rename: the temp file is all there is
            assert _temps(killed_dir), "the kill missed the checkpoint write window"
        _assert_every_checkpoint_loads(killed_dir)
        steps.append(_newest_step(killed_dir))
        assert steps[-1] >= before
    assert kills == len(plan) and steps[-1] > 0, steps

    # Resume until done (once should do); stale temp files must neither trip it nor stay.
    assert _temps(killed_dir)  # the last kill was inside a write
    for _ in range(3):
        done = subprocess.run(
            _cmd(killed_dir), env=_env(), capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        if (killed_dir / "results.json").is_file():
            break
    assert not _temps(killed_dir) and not list(killed_dir.glob(".*.tmp"))
    _assert_every_checkpoint_loads(killed_dir)

    out, err = straight.communicate(timeout=120)
    assert straight.returncode == 0, err
    assert _accuracy_history(killed_dir) == _accuracy_history(straight_dir)
    res = json.loads((killed_dir / "results.json").read_text())
    assert res["timing"]["resumed"] and res["timing"]["steps"] == EPOCHS * 24
    a, b = _final_params(killed_dir), _final_params(straight_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- the same guarantees, in process, for the windows a random kill rarely hits --------------


def _cfg(out: Path | None, **kw):
    from lfm.config import RunConfig
    from lfm.data import DataConfig

    base = dict(
        data=DataConfig("digits"),
        epochs=2,
        batch_size=100,
        progress=False,
        out=str(out) if out else None,
    )
    base.update(kw)
    return RunConfig(**base)


class _Killed(Exception):
    pass


def test_kill_between_the_last_steps_checkpoint_and_the_epoch_end_keeps_the_history(
    tmp_path, monkeypatch
):
    """A checkpoint at an epoch's last step, killed before the epoch's record: same history."""
    from lfm.methods.plain import PlainMethod
    from lfm.train.trainer import Trainer

    t = Trainer(_cfg(None, epochs=1))
    spe, straight = t.ctx.steps_per_epoch, t.run()
    monkeypatch.setattr(
        PlainMethod, "on_epoch_end", lambda self, ctx: (_ for _ in ()).throw(_Killed())
    )
    with pytest.raises(_Killed):
        Trainer(_cfg(tmp_path, epochs=1, checkpoint_every=spe)).run()
    assert _newest_step(tmp_path) == spe  # saved after the last step, before the epoch closed
    monkeypatch.undo()
    resumed = Trainer(_cfg(tmp_path, epochs=1, checkpoint_every=spe)).run()
    assert resumed["timing"]["resumed"]
    assert resumed["history"] == straight["history"]  # the train loss of epoch 1 included


def test_stale_temp_files_are_ignored_and_removed_on_resume(tmp_path):
    from lfm.train.trainer import Trainer

    Trainer(_cfg(tmp_path, epochs=1)).run()
    ck = tmp_path / "checkpoints"
    stale = [ck / ".ckpt-000000099.pt.abc123_x.tmp", tmp_path / ".results.json.zz9_0000.tmp"]
    stale[0].write_bytes(b"half a checkpoint")
    stale[1].write_bytes(b'{"status": ')
    keep = ck / "notes.tmp"  # not ours: left alone
    keep.write_text("user file")
    res = Trainer(_cfg(tmp_path, epochs=2)).run()
    assert res["timing"]["resumed"] and res["timing"]["steps"] > 0
    assert not any(p.exists() for p in stale) and keep.exists()


def test_no_resume_drops_the_older_runs_checkpoints(tmp_path):
    """--no-resume starts over: the old run's later checkpoint must not be resumed next time."""
    from lfm.train.trainer import Trainer

    Trainer(_cfg(tmp_path, epochs=2)).run()
    old = _newest_step(tmp_path)
    Trainer(_cfg(tmp_path, epochs=1, resume=False)).run()
    assert _newest_step(tmp_path) < old
    again = Trainer(_cfg(tmp_path, epochs=1)).run()
    assert [h["epoch"] for h in again["history"]] == [1]


def test_resume_refuses_a_checkpoint_past_the_requested_epochs(tmp_path):
    from lfm.errors import LFMError
    from lfm.train.trainer import Trainer

    Trainer(_cfg(tmp_path, epochs=2)).run()
    with pytest.raises(LFMError, match="past the 1 epochs"):
        Trainer(_cfg(tmp_path, epochs=1)).run()


def test_a_corrupt_newest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
    """Truncated by hand: one warning naming it, kept as .corrupt, resumed from the older one,
    to the history of an uninterrupted run."""
    from lfm.train.trainer import Trainer

    straight = Trainer(_cfg(None, epochs=2)).run()
    Trainer(_cfg(tmp_path, epochs=2)).run()
    older, newest = _ckpts(tmp_path)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    resumed = Trainer(_cfg(tmp_path, epochs=2)).run()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"lfm: warning: checkpoint {newest} is corrupt")
    assert err[0].endswith(f"kept as {newest.name}.corrupt, resuming from {older.name}"), err
    assert newest.with_name(newest.name + ".corrupt").read_bytes() == data[: len(data) // 2]
    assert resumed["timing"]["resumed"]
    assert resumed["history"] == straight["history"]  # epoch 2 trained again from epoch 1's state
