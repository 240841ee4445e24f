"""The benchmarks run end to end at a tiny size."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch


def _run(script: str, argv: list[str]) -> list[dict]:
    """Import benchmarks/<script>.py and run its main(argv), restoring torch's thread count."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{script}.py"
    spec = importlib.util.spec_from_file_location(script, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    threads = torch.get_num_threads()
    try:  # one thread: the 2-core CI machine is often shared, and oversubscription is slow
        return mod.main(argv + ["--threads", "1"])
    finally:
        torch.set_num_threads(threads)


def test_bench_dr_step_runs_small(capsys):
    rows = _run("bench_dr_step", ["--small", "--batch", "4", "--iters", "1", "--model", "fallback"])
    assert len(rows) == 7 and all(r["sec"] > 0 for r in rows)
    assert "x CE step" in capsys.readouterr().out


def test_bench_nas_step_runs_small(capsys):
    argv = ["--layers", "2", "--C", "4", "--batch", "4", "--size", "8", "--steps", "1"]
    rows = _run("bench_nas_step", argv)
    assert [r["method"] for r in rows][1] == "darts-2nd" and rows[1]["x_time"] == 1.0
    assert len(rows) == 4 and all(r["sec"] > 0 and r["mib"] > 0 for r in rows)
    assert "x DARTS-2nd" in capsys.readouterr().out


def test_bench_api_step_runs_small(capsys):
    rows = _run("bench_api_step", ["--small", "--batch", "4", "--iters", "3"])
    assert [r["method"] for r in rows] == ["lfm", "lfm", "mwnet", "l2rw"]
    assert all(r["sec_method"] > 0 and r["sec_public"] > 0 for r in rows)
    assert "public step" in capsys.readouterr().out


def test_bench_streaming_runs_small(capsys):
    argv = ["--images", "120", "--classes", "3", "--src-size", "12", "--image-size", "8"]
    argv += ["--malloc-default"]  # mallopt would change this whole test process's allocator
    rows = _run("bench_streaming", argv + ["--budget-mb", "0.01", "--batch", "16"])
    assert [r["path"] for r in rows] == ["streaming", "in memory"]
    assert rows[0]["workers"] == 2 and rows[0]["decoded_mb"] > 0.01
    assert all(r["data_eps"] > 0 and r["step_eps"] > 0 for r in rows)
    out = capsys.readouterr().out
    assert "peak RSS growth" in out and "examples/s, data only" in out


def test_bench_search_procs_runs_small(capsys):
    """One search in one process and split over two (torchrun), the smallest supernet."""
    argv = ["--layers", "1", "--C", "2", "--batch", "8", "--steps", "1"]
    rows = _run("bench_search_procs", argv)
    assert [r["procs"] for r in rows] == [1, 2] and rows[0]["ratio"] == 1.0
    assert all(r["sec"] > 0 for r in rows)
    assert rows[1]["alphas"] < 1e-5 and rows[1]["r"] < 1e-5  # what one process learns
    assert "ratio to 1" in capsys.readouterr().out
