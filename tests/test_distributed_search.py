"""Architecture search and evaluation under torchrun give what one process gives.

Each process runs the supernet on its rows of the global training batch, with BatchNorm over
the global batch and P-DARTS's / DARTS's random masks drawn for the whole batch
(`lfm.models.split`); training gradients and mixed derivatives are summed over processes and
the validation passes run whole (`lfm.nas.hypergrad`). Checked here:

- piece by piece (tests/ddp_nas_hypergrad.py): every output of DARTS's, LFM-DARTS's and shared
  LFM-DARTS's hypergradient, exact and fd, with skip dropout on; the evaluation network's
  gradients and running statistics with drop-path and the auxiliary head;
- `lfm search --method lfm-darts` on 2 processes, killed (SIGKILL) after a checkpoint and
  resumed under torchrun, against one uninterrupted process: alphas, r, V, both supernets,
  every optimizer state, the genotype and every logged value, within 1e-5;
- `lfm evaluate` on 2 processes (cutout, drop-path, auxiliary head) against one process;
- two torchrun "nodes" of one process each, for `lfm search --method darts`; node 1's --out
  stays empty.

gloo on a 2-core CPU pays one all-reduce per BatchNorm layer and pass, so a split step is
slower than one process here; the sizes are the smallest that still have every kind of cell.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from test_distributed import _env, _max_diff, two_nodes

from lfm.train.checkpoint import CheckpointDir, safe_load

TOL = 1e-5
# fd divides float32 rounding of two losses by 2 eps = 0.02 / ||v||: a few 1e-6 apart
TOL_FD = 2e-5
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
SEARCH = [
    "search", "--method", "lfm-darts", "--layers", "2", "--C", "4", "--batch-size", "16",
    "--epochs", "2", "--steps-per-epoch", "2", "--device", "cpu", "--no-progress",
]  # fmt: skip
EVALUATE = [
    "evaluate", "--genotype", "DARTS_V2", "--layers", "3", "--C", "4", "--batch-size", "16",
    "--epochs", "2", "--steps-per-epoch", "2", "--set", "cutout=4", "--set", "drop_path=0.3",
    "--device", "cpu", "--no-progress",
]  # fmt: skip


def _lfm(args: list[str], out: Path, procs: int = 1, timeout: int = 300) -> None:
    launch = [*TORCHRUN, "--standalone", "--nproc_per_node", str(procs)] if procs > 1 else []
    cmd = [*(launch or [sys.executable]), "-m", "lfm", *args, "--out", str(out)]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    # torchrun's own report ends stderr; the error a process printed comes before it
    assert res.returncode == 0, res.stderr.split("ChildFailedError")[0][-3000:]


def _kill_all(out: Path, launcher: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers (which run in sessions of their own), as a machine that
    dies would stop them, and wait until they are gone."""
    mine = [
        int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and str(out) in _cmdline(p)
    ]
    for pid in {launcher.pid, *mine}:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + 30
    while any(str(out) in _cmdline(Path(f"/proc/{pid}")) for pid in mine):
        assert time.monotonic() < deadline, "the killed workers are still running"
        time.sleep(0.1)


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _last_state(folder: Path) -> dict:
    return safe_load(CheckpointDir(folder).paths()[-1])


def _steps(out: Path) -> list[dict]:
    rows = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows if r["kind"] == "step"]


def _same_logs(one: list[dict], two: list[dict]) -> None:
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for a, b in zip(one, two, strict=True):
        assert a.keys() == b.keys()
        for k, v in a.items():
            if isinstance(v, float):  # the global batch's values, not rank 0's part
                assert abs(b[k] - v) <= TOL * max(1.0, abs(v)), (a["step"], k, v, b[k])


def test_nas_pieces_split_over_processes_equal_one_process(tmp_path):
    report = tmp_path / "report.json"
    script = str(Path(__file__).resolve().parent / "ddp_nas_hypergrad.py")
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node", "2", script, str(report)]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(report.read_text())
    assert got["world"] == 2
    cases = got["report"]
    assert {"darts-exact", "lfm-full-fd", "lfm-shared-exact", "evalnet"} <= set(cases)
    for case, diffs in cases.items():
        tol = TOL_FD if case.endswith("-fd") else TOL
        for what, d in diffs.items():
            assert d <= tol, (case, what, d)


def test_search_two_processes_killed_and_resumed_is_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _lfm(SEARCH, one)
    # two processes with a checkpoint every step, killed once the second one is on disk
    folder = two / "checkpoints" / "search"
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "lfm", *SEARCH]
    cmd += ["--out", str(two), "--checkpoint-every", "1"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (folder / "ckpt-000000002.pt").exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint at step 2"
        time.sleep(0.1)
    _kill_all(two, proc)
    assert not (two / "search.json").exists()  # it did not finish
    _lfm(SEARCH + ["--checkpoint-every", "1"], two, procs=2)

    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert r2["timing"]["processes"] == 2 and len(r2["timing"]["segments"]) == 2  # it resumed
    s1, s2 = (json.loads((d / "search.json").read_text()) for d in (one, two))
    for x, y in zip(s1["alphas"], s2["alphas"], strict=True):
        np.testing.assert_allclose(np.array(y), np.array(x), atol=TOL, rtol=0)
    g1, g2 = (json.loads((d / "genotype.json").read_text()) for d in (one, two))
    assert g1 == g2
    a, b = _last_state(one / "checkpoints" / "search"), _last_state(folder)
    assert int(a["step"]) == int(b["step"]) == 4
    la, lb = a["method"]["learners"], b["method"]["learners"]
    assert la.keys() == lb.keys() >= {"alphas", "r", "net1", "net2", "encoder", "opt_r", "opt_v"}
    for k in la:
        diff = _max_diff(la[k], lb[k])
        print(f"{k}: max |1 proc - 2 procs| = {diff:.3g}")
        assert diff <= TOL, (k, diff)
    _same_logs(_steps(one), _steps(two))  # each step once, across the kill


def test_evaluate_two_processes_is_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _lfm(EVALUATE, one)
    _lfm(EVALUATE, two, procs=2)
    a = _last_state(one / "evaluate" / "checkpoints")
    b = _last_state(two / "evaluate" / "checkpoints")
    assert int(a["step"]) == int(b["step"]) == 4
    for k in ("model", "optimizer"):
        diff = _max_diff(a["method"][k], b["method"][k])
        print(f"{k}: max |1 proc - 2 procs| = {diff:.3g}")
        assert diff <= TOL, (k, diff)
    _same_logs(_steps(one / "evaluate"), _steps(two / "evaluate"))


def test_search_on_two_nodes_is_one_process_and_only_rank_0_writes(tmp_path):
    # DARTS here (its weight step is a plain torch step on the summed gradients), LFM-DARTS above
    args = [*SEARCH, "--max-steps", "2"]
    args[args.index("lfm-darts")] = "darts"
    one, node0, node1 = tmp_path / "one", tmp_path / "node0", tmp_path / "node1"
    _lfm(args, one)
    two_nodes(args, node0, node1)
    a = _last_state(one / "checkpoints" / "search")
    b = _last_state(node0 / "checkpoints" / "search")
    assert int(a["step"]) == int(b["step"]) == 2
    la, lb = a["method"]["learners"], b["method"]["learners"]
    for k in la:
        assert _max_diff(la[k], lb[k]) <= TOL, k
