"""One run per run folder, and file-system faults as one clear line (issue 14, items 1-3).

Two real `lfm dr` processes are started on one --out at the same moment: exactly one runs to
completion with the results of an undisturbed run, the other exits 2 at once with the "in use"
line, and no file of the first is touched. `LFM_TEST_SLOW_CHECKPOINT` holds each checkpoint
write open so that the second process meets the first inside a write window. The suite runs 2
rounds (one of each); `LFM_TEST_CONCURRENCY_ROUNDS=10 pytest -k ten_rounds` runs the issue's 10.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lfm.cli.main import main
from lfm.errors import LFMError
from lfm.train.checkpoint import SLOW_WRITE_ENV
from lfm.train.runlock import LOCK_NAME, probe_writable, run_folder_lock

DR = ["dr", "--dataset", "digits", "--epochs", "1", "--batch-size", "100", "--no-progress"]


def _env(slow: float | None = None) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop(SLOW_WRITE_ENV, None)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    if slow:
        env[SLOW_WRITE_ENV] = str(slow)
    return env


def _dr(out: Path, *extra: str, slow: float | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lfm", *DR, *extra, "--out", str(out)]
    return subprocess.Popen(
        cmd, env=_env(slow), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _results(out: Path) -> dict[str, dict]:
    """What must equal between two runs: every method's results.json without the timing."""
    found = {}
    for p in sorted(out.glob("*/results.json")):
        res = json.loads(p.read_text())
        res.pop("timing")
        res["config"].pop("out")
        found[p.parent.name] = res
    return found


def _files(out: Path) -> dict[str, tuple[int, int]]:
    """Every file under `out` (the lock file aside) -> (size, mtime_ns)."""
    return {
        str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != LOCK_NAME
    }


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("undisturbed") / "run"
    p = _dr(out)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    return _results(out)


def _one_round(out: Path, undisturbed: dict, slow: float | None) -> None:
    a, b = _dr(out, slow=slow), _dr(out, slow=slow)  # the same moment, as far as a test can
    (_, err_a), (_, err_b) = a.communicate(timeout=180), b.communicate(timeout=180)
    codes = sorted([a.returncode, b.returncode])
    assert codes == [0, 2], (a.returncode, err_a[-2000:], b.returncode, err_b[-2000:])
    loser_err = err_a if a.returncode == 2 else err_b
    lines = loser_err.strip().splitlines()
    assert len(lines) == 1, loser_err
    assert (
        "is in use by process" in lines[0]
        and "Fix: wait for it, or pass another --out" in (lines[0])
    ), lines[0]
    assert _results(out) == undisturbed
    assert not list(out.rglob("*.tmp"))  # no write of the winner was cut short


def test_two_dr_runs_on_one_out_started_together(tmp_path, undisturbed):
    """Round 1 plain, round 2 with every checkpoint write held open for 1 s."""
    for i, slow in enumerate((None, 1.0)):
        _one_round(tmp_path / f"round{i}", undisturbed, slow)


@pytest.mark.skipif(
    int(os.environ.get("LFM_TEST_CONCURRENCY_ROUNDS", "0")) < 1,
    reason="set LFM_TEST_CONCURRENCY_ROUNDS=10 to run the issue's 10 rounds",
)
def test_two_dr_runs_on_one_out_ten_rounds(tmp_path, undisturbed):
    rounds = int(os.environ["LFM_TEST_CONCURRENCY_ROUNDS"])
    for i in range(rounds):
        _one_round(tmp_path / f"round{i}", undisturbed, 1.0 if i % 2 else None)


def _freeze(proc: subprocess.Popen) -> None:
    """SIGSTOP `proc` and wait until it is stopped (a write in progress completes first)."""
    proc.send_signal(signal.SIGSTOP)
    stat = Path(f"/proc/{proc.pid}/stat")
    for _ in range(500):
        if not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "T":
            return
        time.sleep(0.01)
    raise AssertionError("the process did not stop")


def test_a_refused_run_does_not_touch_the_live_run(tmp_path, undisturbed):
    """The issue's case: another seed, started while the first holds a checkpoint write open.

    Before the lock, the refused run deleted the live run's temp checkpoint and the live run
    died with FileNotFoundError."""
    out = tmp_path / "run"
    first = _dr(out, "--compare", "", slow=1.0)  # LFM-DR alone
    t0 = time.monotonic()
    while not list(out.rglob(".ckpt-*.tmp")):  # the first run is inside a checkpoint write
        assert first.poll() is None and time.monotonic() - t0 < 60, first.stderr.read()
        time.sleep(0.01)
    _freeze(first)  # frozen there (its lock held) while the second runs
    before = _files(out)
    second = subprocess.run(
        [sys.executable, "-m", "lfm", *DR, "--compare", "", "--seed", "7", "--out", str(out)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 2, second.stderr
    assert f"run folder {out} is in use by process {first.pid}" in second.stderr
    assert _files(out) == before  # nothing of the first run was touched
    first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=180)
    assert first.returncode == 0, err
    assert _results(out) == {"lfm": undisturbed["lfm"]}


def test_a_killed_run_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "run"
    p = _dr(out, slow=30.0)
    t0 = time.monotonic()
    while not list(out.rglob(".ckpt-*.tmp")):
        assert p.poll() is None and time.monotonic() - t0 < 60
        time.sleep(0.01)
    with pytest.raises(LFMError, match="in use by process"):  # held while it runs ...
        with run_folder_lock(out, "--out"):
            pass
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=30)
    with run_folder_lock(out, "--out"):  # ... and free once the kernel has closed its files
        pass


def test_the_lock_is_reentrant_in_one_process(tmp_path):
    with run_folder_lock(tmp_path / "x", "--out"):
        with run_folder_lock(tmp_path / "x", "--out"):  # lfm dr holds OUT, a trainer OUT too
            pass
        assert (tmp_path / "x" / LOCK_NAME).read_text().strip() == str(os.getpid())


@pytest.mark.parametrize("command", ["search", "evaluate", "bench", "train"])
def test_every_command_refuses_a_locked_folder(command, tmp_path, capsys):
    out = tmp_path / "run"
    argv = {
        "search": ["search", "--epochs", "1", "--no-progress"],
        "evaluate": ["evaluate", "--genotype", "DARTS_V2", "--epochs", "1", "--no-progress"],
        "bench": ["bench", "--methods", "ce", "--epochs", "1", "--no-progress"],
        "train": ["train", "--epochs", "1", "--no-progress"],
    }[command]
    out_flag = "--out"
    holder = subprocess.Popen(  # another process holds the folder
        [
            sys.executable,
            "-c",
            "import sys, time; from lfm.train.runlock import run_folder_lock\n"
            "with run_folder_lock(sys.argv[1], '--out'):\n"
            "    print('held', flush=True); time.sleep(60)",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _files(out)
        capsys.readouterr()
        assert main([*argv, out_flag, str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (
            f"lfm: error: run folder {out} is in use by process {holder.pid}. "
            "Fix: wait for it, or pass another --out"
        ), err
        assert _files(out) == before
    finally:
        holder.kill()
        holder.communicate()


# -- file-system faults ----------------------------------------------------------------------


def _one_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("lfm: error: ") and ". Fix: " in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


def _no_training(self) -> dict:
    raise AssertionError("training started")


def test_a_read_only_out_folder_is_one_line_before_training(tmp_path, capsys, monkeypatch):
    """EROFS / EACCES from the probe (running as root, chmod alone cannot deny a write)."""
    import lfm.train.runlock as runlock

    for code, needle in ((errno.EROFS, "read-only"), (errno.EACCES, "permission denied")):
        real = runlock._probe_write

        def refuse(path: Path, data: bytes, code: int = code) -> None:
            raise OSError(code, os.strerror(code), str(path))

        monkeypatch.setattr(runlock, "_probe_write", refuse)
        monkeypatch.setattr("lfm.train.trainer.Trainer.run", _no_training)
        assert main([*DR, "--out", str(tmp_path / "ro")]) == 2
        _one_line(capsys, str(tmp_path / "ro"), needle)
        monkeypatch.setattr(runlock, "_probe_write", real)


def test_a_file_name_too_long_is_one_line(tmp_path, capsys):
    out = tmp_path / ("x" * 300)
    assert main(["train", "--epochs", "1", "--no-progress", "--out", str(out)]) == 2
    _one_line(capsys, "name too long", "shorter --out")


def test_probe_removes_its_file(tmp_path):
    probe_writable(tmp_path)
    assert list(tmp_path.iterdir()) == []


def _tmpfs_shell() -> str | None:
    """`unshare` with a private mount namespace where tmpfs can be mounted, or None."""
    if shutil.which("unshare") is None:
        return None
    t = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt && echo ok"],
        capture_output=True,
        text=True,
    )
    return "ok" if t.stdout.strip() == "ok" else None


SEARCH = [sys.executable, "-m", "lfm", "search", "--epochs", "1", "--steps-per-epoch", "2"]


@pytest.mark.skipif(_tmpfs_shell() is None, reason="needs unshare -rm and tmpfs mounts")
def test_a_full_disk_truncates_no_output_and_is_one_line(tmp_path):
    """A real ENOSPC: `lfm search` on a 2 MB tmpfs, then again with the disk filled.

    The second run resumes the finished search (no checkpoint written) and rewrites
    genotype.json, genotype.png and search.json, whose earlier version was smaller; one page
    is left free, enough for the probe. Every output must stay a
    whole file, and the error must be one line naming the path."""
    mnt, copy = tmp_path / "mnt", tmp_path / "after"
    mnt.mkdir()
    out = mnt / "s"
    script = f"""
set -e
mount -t tmpfs -o size=16m tmpfs {mnt}
{" ".join(SEARCH)} --out {out} --no-progress > /dev/null
python3 - <<'EOF'
import os
p = "{out}/search.json"
open(p, "w").write("{{}}")  # a small earlier version
st = os.statvfs("{mnt}")
with open("{mnt}/filler", "wb") as f:
    f.write(b"x" * (st.f_bavail * st.f_frsize - 4096))
EOF
set +e
{" ".join(SEARCH)} --out {out} --no-progress > {tmp_path}/stdout 2> {tmp_path}/stderr
echo $? > {tmp_path}/rc
rm {mnt}/filler
cp -a {out} {copy}
"""
    res = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=_env(), timeout=300)
    assert res.returncode == 0
    rc = int((tmp_path / "rc").read_text())
    err = (tmp_path / "stderr").read_text().strip()
    assert rc == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "no space left on device" in err and "last good checkpoint" in err, err
    assert str(out) in err
    json.loads((copy / "search.json").read_text())  # whole: the old file or the new one
    json.loads((copy / "genotype.json").read_text())
    assert not list(copy.rglob("*.tmp"))


def test_no_output_is_written_outside_the_atomic_helper():
    """Every file a command writes goes through lfm.train.atomic (temp file, fsync, rename).

    A plain `write_text`, `open(..., "w")`, `json.dump` to a file, `np.savez` to a path,
    `savefig` to a path or `to_csv` under lfm/ is how a full disk left `search.json` half
    written; the one exception is the data cache, a temp file renamed by hand, whose loss only
    costs a regeneration, and a write to a /proc control file."""
    import re

    root = Path(__file__).resolve().parents[1] / "lfm"
    raw = re.compile(
        r"\.write_text\(|\.write_bytes\(|open\([^)]*['\"][wax]b?['\"]|json\.dump\(|"
        r"np\.savez(_compressed)?\((?!buf|f,)|\.savefig\((?!buf)|\.to_csv\("
    )
    allowed = {
        ("train/atomic.py", 'os.fdopen(fd, "wb")'),  # the helper itself
        ("data/builtin.py", 'os.fdopen(fd, "wb")'),  # the data cache (docstring)
        ("train/memory.py", "/proc/self/clear_refs"),  # a kernel control file, not an output
        # metrics.jsonl is a log appended line by line; at resume it is rewritten atomically to
        # the checkpoint's step, and a line cut by a kill is dropped then
        ("train/metrics.py", 'self.path.open("a")'),
    }
    found = []
    for p in sorted(root.rglob("*.py")):
        rel = str(p.relative_to(root))
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if raw.search(line) and not any(rel == a and s in line for a, s in allowed):
                found.append(f"{rel}:{n}: {line.strip()}")
    assert not found, "\n".join(found)


TRAIN = [sys.executable, "-m", "lfm", "train", "--epochs", "3", "--batch-size", "100"]


@pytest.mark.skipif(_tmpfs_shell() is None, reason="needs unshare -rm and tmpfs mounts")
def test_a_disk_that_fills_mid_run_keeps_the_last_good_checkpoint(tmp_path):
    """`lfm train` on a tmpfs with room for one checkpoint (about 0.7 MB) but not two: the
    second write fails, one line says how to continue, and the first checkpoint still loads."""
    mnt, copy = tmp_path / "mnt", tmp_path / "after"
    mnt.mkdir()
    out = mnt / "t"
    script = f"""
mount -t tmpfs -o size=1200k tmpfs {mnt} || exit 3
{" ".join(TRAIN)} --out {out} --no-progress > /dev/null 2> {tmp_path}/stderr
echo $? > {tmp_path}/rc
cp -a {out} {copy}
"""
    res = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=_env(), timeout=300)
    assert res.returncode == 0
    err = (tmp_path / "stderr").read_text().strip()
    assert int((tmp_path / "rc").read_text()) == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "no space left on device" in err and "continues from the last good checkpoint" in err
    assert str(out / "checkpoints") in err
    from lfm.train.checkpoint import CheckpointDir, safe_load

    (good,) = CheckpointDir(copy / "checkpoints").paths()
    assert int(safe_load(good)["step"]) > 0
    assert not list(copy.rglob("*.tmp"))


@pytest.mark.skipif(_tmpfs_shell() is None, reason="needs unshare -rm and tmpfs mounts")
def test_a_really_read_only_out_folder_fails_before_the_search_trains(tmp_path):
    """A read-only mount (EROFS from the kernel, not a mock): one line, exit 2, no training
    (before, `lfm search` trained a whole epoch and then printed a 38-line traceback)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = f"""
mount -t tmpfs -o size=1m tmpfs {mnt} && mkdir {mnt}/s && mount -o remount,ro {mnt} || exit 3
{" ".join(SEARCH)} --out {mnt}/s --no-progress > {tmp_path}/stdout 2> {tmp_path}/stderr
echo $? > {tmp_path}/rc
"""
    res = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=_env(), timeout=120)
    assert res.returncode == 0
    err = (tmp_path / "stderr").read_text().strip()
    assert int((tmp_path / "rc").read_text()) == 2, err
    assert err == (
        f"lfm: error: cannot write {mnt}/s: read-only file system. "
        "Fix: pass --out a folder on a writable file system"
    ), err
    assert (tmp_path / "stdout").read_text() == ""  # no epoch, no genotype


def test_atomic_outputs_keep_the_permissions_of_a_plain_write(tmp_path):
    from lfm.train.atomic import write_atomic

    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "table.md", "| a |\n")
        (tmp_path / "plain.md").write_text("| a |\n")
    finally:
        os.umask(old)
    assert (tmp_path / "table.md").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "plain.md").stat().st_mode & 0o777 == 0o644
