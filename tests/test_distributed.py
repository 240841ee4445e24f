"""Data parallel under torchrun: 2 processes learn what 1 process learns at the same global batch.

One `lfm dr --compare ce,l2rw,mwnet` command trains plain CE, L2RW, MW-Net and then LFM-DR
(digits, MLP, no BatchNorm, exact backend): once as a single process for 4 steps, and under
torchrun with 2 gloo processes stopped at step 2 and resumed to step 4 (so resume under torchrun
is covered too). Every learned tensor of the final checkpoints (W1, W2, V, r, b and optimizer
state; CE's model) and the per-example arrays must agree within 1e-5, and so must every logged
value of the last step (`a_mean`, `hg_a`, `w_mean`, L2RW's and MW-Net's loss and weights): the
global batch's, not rank 0's part.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lfm.errors import LFMError
from lfm.train import distributed
from lfm.train.checkpoint import CheckpointDir, safe_load
from lfm.train.distributed import Part, shard_bounds, tensors_in

TOL = 1e-5
ARGS = [
    "dr",
    "--compare",
    "ce,l2rw,mwnet",
    "--dataset",
    "digits",
    "--model",
    "mlp",
    "--epochs",
    "1",
    "--batch-size",
    "50",
    "--backend",
    "exact",
    "--device",
    "cpu",
    "--no-progress",
]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _run(out: Path, steps: int, procs: int) -> None:
    launch = [sys.executable, "-m", "lfm"]
    if procs > 1:
        launch = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(procs),
            "-m",
            "lfm",
        ]
    cmd = [*launch, *ARGS, "--out", str(out), "--max-steps", str(steps)]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]


def _final(run_dir: Path) -> tuple[dict, dict]:
    paths = CheckpointDir(run_dir / "checkpoints").paths()
    state = safe_load(paths[-1])
    arrays = dict(np.load(run_dir / "per_example.npz"))
    return state, arrays


def _max_diff(a, b) -> float:
    ta, tb = tensors_in(a), tensors_in(b)
    assert len(ta) == len(tb) and ta
    return max(
        float((x.double() - y.double()).abs().max()) if x.numel() else 0.0
        for x, y in zip(ta, tb, strict=True)
    )


def two_nodes(args: list[str], node0: Path, node1: Path) -> None:
    """`lfm ARGS` on two torchrun "nodes" of one process each (a static localhost rendezvous),
    node r writing to --out node<r>; both must succeed and node 1's folder must stay empty."""
    import socket

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node-rank",
                str(rank),
                "--nproc-per-node",
                "1",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port),
                "-m",
                "lfm",
                *args,
                "--out",
                str(out),
            ],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank, out in ((0, node0), (1, node1))
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert not node1.exists() or not any(node1.rglob("*")), sorted(node1.rglob("*"))


def _last_logs(run_dir: Path) -> dict[str, float]:
    import json

    return json.loads((run_dir / "results.json").read_text())["history"][-1]["train"]


def test_two_processes_learn_what_one_does(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _run(one, 4, 1)
    _run(two, 2, 2)  # stop mid-epoch at step 2 ...
    _run(two, 4, 2)  # ... and resume under torchrun to step 4
    for method in ("ce", "l2rw", "mwnet", "lfm"):
        l1, l2 = _last_logs(one / method), _last_logs(two / method)
        assert l1.keys() == l2.keys() and l1, method
        for k, v in l1.items():  # rank 0's part differed by 1e-3 (a_mean) to 0.5 (l2rw loss)
            assert abs(l2[k] - v) <= TOL * max(1.0, abs(v)), (method, k, v, l2[k])
    for method, keys in (("ce", ("model",)), ("lfm", ("W1", "W2", "V", "r", "b"))):
        s1, a1 = _final(one / method)
        s2, a2 = _final(two / method)
        assert int(s1["step"]) == int(s2["step"]) == 4
        for k in keys:
            diff = _max_diff(s1["method"][k], s2["method"][k])
            print(f"{method} {k}: max |1 proc - 2 procs| = {diff:.3g}")
            assert diff <= TOL, (method, k, diff)
        moved = _max_diff(s2["method"][keys[0]], _initial(two / method, keys[0]))
        assert moved > 1e-3  # the learners did train
        for k, v in a1.items():
            if v.dtype.kind == "f":
                np.testing.assert_allclose(a2[k], v, atol=TOL, rtol=0, equal_nan=True)
            else:
                np.testing.assert_array_equal(a2[k], v)


def _initial(run_dir: Path, key: str):
    """The learner `key` at initialisation (seed 0): rebuilt by a fresh trainer."""
    import json

    from lfm.config import RunConfig, from_dict
    from lfm.train.trainer import Trainer

    cfg = json.loads((run_dir / "results.json").read_text())["config"]
    trainer = Trainer(from_dict(RunConfig, {**cfg, "out": None, "progress": False}))
    return trainer.method.state_dict()[key]


def test_shards_are_contiguous_and_cover_the_batch():
    for n, world in ((100, 2), (7, 3), (4, 4), (50, 4)):
        parts = [shard_bounds(n, world, r) for r in range(world)]
        assert sum(size for _, size in parts) == n
        assert [off for off, _ in parts] == [sum(s for _, s in parts[:r]) for r in range(world)]
        assert max(s for _, s in parts) - min(s for _, s in parts) <= 1
        sizes = [len(t) for t in torch.tensor_split(torch.arange(n), world)]
        assert [s for _, s in parts] == sizes


def test_a_whole_batch_is_the_plain_computation():
    v = torch.tensor([1.0, 2.0, 6.0])
    part = Part.whole(3)
    assert not part.split
    assert part.mean(v) is not None and float(part.mean(v)) == 3.0
    assert part.local(v) is v and part.gather(v) is v
    assert Part(1, 2, 4).mean(v[:2]) == 0.75  # a part's share of the global mean
    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_main()


def test_batch_size_must_split_over_the_processes(monkeypatch):
    from lfm.config import RunConfig
    from lfm.data.config import DataConfig
    from lfm.train.trainer import Trainer

    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    cfg = RunConfig(data=DataConfig(dataset="digits"), batch_size=50, epochs=1, progress=False)
    with pytest.raises(LFMError, match="cannot be split over 3 processes"):
        Trainer(cfg)


def test_torchrun_on_a_folder_in_use_stops_at_once(tmp_path):
    """Rank 0 takes the run-folder lock for every rank: on a busy folder it says so in one line
    (exit 2; torchrun then stops rank 1 and exits 1) and nothing in the folder is touched."""
    out = tmp_path / "busy"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from lfm.train.runlock import run_folder_lock\n"
            "with run_folder_lock(sys.argv[1], '--out'):\n"
            "    print('held', flush=True); time.sleep(120)",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "lfm",
            *ARGS,
            "--out",
            str(out),
        ]
        res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
        assert res.returncode != 0
        line = (
            f"lfm: error (rank 0): run folder {out} is in use by process {holder.pid}. "
            "Fix: wait for it, or pass another --out"
        )
        assert line in res.stderr.splitlines(), res.stderr[-3000:]
        assert "rank 1)" not in res.stderr  # rank 1 neither locks nor complains
        assert [p.name for p in out.iterdir()] == [".lfm.lock"]
    finally:
        holder.kill()
        holder.communicate()


def test_two_nodes_learn_what_one_process_does_and_only_rank_0_writes(tmp_path):
    """The multi-node path: two torchrun "nodes" on this machine (one process each, a static
    localhost rendezvous) train `lfm dr` to what one process trains, within 1e-5. Node 1 is
    given its own --out, as a second machine would have: it must stay untouched."""

    args = [a for a in ARGS if a not in ("--compare", "ce,l2rw,mwnet")] + ["--max-steps", "3"]
    one, node0, node1 = tmp_path / "one", tmp_path / "node0", tmp_path / "node1"
    res = subprocess.run(
        [sys.executable, "-m", "lfm", *args, "--out", str(one)],
        env=_env(), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    two_nodes(args, node0, node1)
    for method in ("lfm",):
        s1, a1 = _final(one / method)
        s2, a2 = _final(node0 / method)
        assert int(s1["step"]) == int(s2["step"]) == 3
        for k in ("W1", "W2", "V", "r", "b"):
            assert _max_diff(s1["method"][k], s2["method"][k]) <= TOL, k
        for k, v in a1.items():
            if v.dtype.kind == "f":
                np.testing.assert_allclose(a2[k], v, atol=TOL, rtol=0, equal_nan=True)
