"""An image folder over its memory budget streams from disk with loader workers, end to end.

Streaming and in-memory runs on the same folder are expected to be EQUAL, not just close: both
decode with the same function (same pixels), take the normalisation statistics from exact
integer sums (same numbers), draw batches in the same seeded order, and the loader never touches
the global RNG (same augmentation draws); so the same CPU computation runs on the same inputs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lfm.config import ModelConfig, RunConfig
from lfm.data import DataConfig, ImageFiles, build_data, iterate_batches
from lfm.train.trainer import Trainer

CLASSES, PER_CLASS, TEST_PER_CLASS, SIZE = 3, 30, 4, 8
# Decoded: (3 * 30 + 3 * 4) images * 3 * 8 * 8 bytes = 0.019 MiB, over this budget.
BUDGET_MB = 0.01


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Class subfolders of 12 x 12 PNGs (resized to 8 x 8), classes told apart by brightness."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        for part, n in (("train", PER_CLASS), ("test", TEST_PER_CLASS)):
            d = root / part / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                px = rng.integers(0, 80, (12, 12, 3)) + 80 * c
                Image.fromarray(px.astype(np.uint8)).save(d / f"{i}.png")
    return root


def _data(folder: Path, budget: float = BUDGET_MB, **kw) -> DataConfig:
    base = dict(root=str(folder), image_size=SIZE, val_per_class=3, memory_budget_mb=budget)
    return DataConfig("imagefolder", **{**base, **kw})


def _cfg(data: DataConfig, out: Path | None = None, **kw) -> RunConfig:
    base = dict(
        method="ce",
        data=data,
        model=ModelConfig("cnn"),
        epochs=2,
        batch_size=16,
        progress=False,
        device="cpu",
        out=str(out) if out else None,
    )
    return RunConfig(**{**base, **kw})


def test_over_budget_streams_and_under_budget_loads(folder):
    s = build_data(_data(folder, noise="uniform:0.4", imbalance=2.0))
    m = build_data(_data(folder, 2048.0, noise="uniform:0.4", imbalance=2.0))
    assert s.info["streaming"] and s.info["source"]["decoded_mb"] > BUDGET_MB
    assert not m.info["streaming"] and isinstance(m.train.x, torch.Tensor)
    assert isinstance(s.train.x.base, ImageFiles) and s.test.streaming
    assert not s.val.streaming  # the clean validation set is decoded into memory
    # noise and long tail act on labels and positions: the same examples, labels and noise mask
    for name in ("train", "val", "test"):
        a, b = getattr(s, name), getattr(m, name)
        assert torch.equal(a.y, b.y) and torch.equal(a.origin, b.origin)
        assert torch.equal(a.x[torch.arange(len(a))], b.x)  # same pixels
    assert s.train.noisy.any() and torch.equal(s.train.noisy, m.train.noisy)
    assert s.info["train_class_counts"][0] > s.info["train_class_counts"][-1]  # the tail
    assert s.info["source"]["mean"] == m.info["source"]["mean"]  # exact statistics
    assert s.info["source"]["std"] == m.info["source"]["std"]


def test_streamed_folder_trains_end_to_end_with_two_loader_workers(folder, tmp_path, monkeypatch):
    """`lfm train` (the CLI) on a folder over --memory-budget-mb, LFM-DR, 2 loader workers."""
    from lfm.cli.main import main

    pids = tmp_path / "pids"
    load = ImageFiles.load

    def logged(self, i):  # which processes decode images (the fork-started workers inherit it)
        with open(pids, "a") as f:
            f.write(f"{os.getpid()}\n")
        return load(self, i)

    monkeypatch.setattr(ImageFiles, "load", logged)
    out = tmp_path / "run"
    argv = ["train", "--dataset", "imagefolder", "--data-root", str(folder), "--image-size", "8"]
    argv += ["--val-per-class", "3", "--memory-budget-mb", str(BUDGET_MB), "--loader-workers", "2"]
    argv += ["--method", "lfm", "--model", "cnn", "--epochs", "2", "--batch-size", "16"]
    argv += ["--noise", "uniform:0.4", "--out", str(out), "--no-progress", "--device", "cpu"]
    assert main(argv) in (0, None)
    res = json.loads((out / "results.json").read_text())
    assert res["data"]["streaming"] and res["data"]["config"]["loader_workers"] == 2
    assert res["data"]["config"]["memory_budget_mb"] == BUDGET_MB  # the flag reached the config
    assert res["timing"]["steps"] == 2 * -(-res["data"]["sizes"]["train"] // 16)  # 2 epochs
    assert len(res["history"]) == 2 and set(res["last"]) == {"W1", "W2"}
    z = np.load(out / "per_example.npz")
    assert len(z["b"]) == res["data"]["sizes"]["train"] and np.isfinite(z["b"]).all()
    workers = set(pids.read_text().split()) - {str(os.getpid())}
    assert len(workers) >= 2  # decoding ran in (at least) two loader processes, not here


def test_streaming_equals_in_memory(folder):
    """Same folder, same order: the training run is the same one (see the module docstring)."""
    runs = {}
    for budget in (BUDGET_MB, 2048.0):
        t = Trainer(_cfg(_data(folder, budget, noise="flip:0.3"), method="l2rw"))
        res = t.run()
        runs[budget] = (
            res,
            {k: v.clone() for k, v in t.method.models()["model"].state_dict().items()},
        )
    (s, ws), (m, wm) = runs[BUDGET_MB], runs[2048.0]
    assert s["data"]["streaming"] and not m["data"]["streaming"]
    assert s["history"] == m["history"]
    for k in ws:
        torch.testing.assert_close(ws[k], wm[k], rtol=0, atol=0)


def test_streamed_run_resumes_exactly(folder, tmp_path):
    """Stopped mid-epoch and resumed (new loaders mid-pass): the straight run's weights."""
    data = _data(folder, augment=True)
    straight = Trainer(_cfg(data))
    straight.run()
    want = straight.method.models()["model"].state_dict()
    Trainer(_cfg(data, tmp_path, max_steps=7, checkpoint_every=3)).run()
    again = Trainer(_cfg(data, tmp_path, checkpoint_every=3))
    assert again.run()["timing"]["resumed"]
    for k, v in again.method.models()["model"].state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=0)


def test_an_unreadable_image_met_by_a_worker_is_a_one_line_error(folder, tmp_path):
    import shutil

    from lfm.errors import LFMError

    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    (bad / "test" / "class1" / "2.png").write_bytes(b"not a png")
    b = build_data(_data(bad))  # train statistics and validation decode fine; test streams
    with pytest.raises(LFMError) as e:
        list(iterate_batches(b.test, 5))  # decoded in the 2 loader workers
    assert str(e.value).startswith("cannot read image") and "2.png" in str(e.value)
    assert "Traceback" not in str(e.value) and e.value.fix == "remove or replace the file"


def test_budget_and_workers_are_validated():
    from lfm.errors import LFMError

    with pytest.raises(LFMError, match="--memory-budget-mb"):
        DataConfig(memory_budget_mb=-1).validate()
    with pytest.raises(LFMError, match="--loader-workers"):
        DataConfig(loader_workers=-1).validate()
    assert DataConfig().memory_budget_mb == 2048 and DataConfig().loader_workers == 2


@pytest.mark.slow
def test_two_processes_on_a_streamed_folder_learn_what_one_does(folder, tmp_path):
    """torchrun, 2 gloo processes, each reading only its part of every global batch from disk."""
    import subprocess
    import sys

    from lfm.train.checkpoint import CheckpointDir, safe_load

    (tmp_path / "noaug.yaml").write_text("data:\n  augment: false\n")  # crops draw per process
    args = ["train", "--config", str(tmp_path / "noaug.yaml"), "--dataset", "imagefolder"]
    args += ["--data-root", str(folder), "--image-size", "8", "--val-per-class", "3"]
    args += ["--memory-budget-mb", str(BUDGET_MB), "--model", "mlp", "--epochs", "2"]
    args += ["--batch-size", "18", "--no-progress", "--device", "cpu"]  # 81 = 4 x 18 + 9
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    states = []
    for procs in (1, 2):
        launch = [sys.executable, "-m", "lfm"]
        if procs > 1:
            launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            launch += ["--nproc_per_node", str(procs), "-m", "lfm"]
        out = tmp_path / f"p{procs}"
        cmd = [*launch, *args, "--out", str(out)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert res.returncode == 0, res.stderr[-3000:]
        assert json.loads((out / "results.json").read_text())["data"]["streaming"]
        states.append(safe_load(CheckpointDir(out / "checkpoints").paths()[-1]))
    one, two = (s["method"]["model"] for s in states)
    assert int(states[0]["step"]) == int(states[1]["step"]) == 10
    assert max(float((one[k].double() - two[k].double()).abs().max()) for k in one) <= 1e-5


def test_a_run_resumes_with_another_reading_setting(tmp_path):
    """memory_budget_mb and loader_workers change how examples are read, not what is learned:
    a checkpoint made with one value resumes under another (and under a config without them)."""
    from lfm.config import RunConfig
    from lfm.data import DataConfig
    from lfm.train.trainer import Trainer

    def cfg(**data):
        return RunConfig(
            data=DataConfig("digits", **data), epochs=2, max_steps=5, batch_size=100,
            progress=False, out=str(tmp_path),
        )  # fmt: skip

    Trainer(cfg(loader_workers=2)).run()
    t = Trainer(cfg(loader_workers=0, memory_budget_mb=16))
    assert t.try_resume() and t.ctx.step == 5
