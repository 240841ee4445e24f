"""`lfm bench`: runs, tables, skipping complete runs, recording failures."""

from __future__ import annotations

import argparse
import csv
import json

import pytest

from lfm.apps.bench import (
    BenchConfig,
    Setting,
    collect_rows,
    make_settings,
    markdown_tables,
    mean_std,
    parse_method_specs,
    run_suite,
)
from lfm.config import RunConfig
from lfm.data.config import DataConfig
from lfm.errors import LFMError


def _bench(out, suspects=False) -> BenchConfig:
    base = RunConfig(data=DataConfig("digits"), epochs=1, max_steps=3, progress=False)
    return BenchConfig(
        base=base,
        methods=parse_method_specs(
            ["ce", "small-loss", "bad"], ["bad=lfm:encoder_weights=missing.pt"]
        ),
        settings=make_settings([1], ["none", "flip:0.4"]),
        seeds=[0],
        out=str(out),
        suspects=suspects,
        cleanlab_folds=2,
        cleanlab_epochs=1,
    )


def test_suite_runs_skips_completed_and_records_failures(tmp_path):
    out = tmp_path / "bench"
    s1 = run_suite(_bench(out, suspects=True), log=None)
    assert len(s1["ran"]) == 4 and len(s1["failed"]) == 2 and not s1["skipped"]
    runs = out / "runs"
    done = sorted(runs.glob("*/results.json"))
    assert len(done) == 4
    for p in done:
        assert json.loads(p.read_text())["status"] == "complete"
    fail = json.loads((runs / "digits-imb1-flip0.4-bad-s0" / "failed.json").read_text())
    # a run that fails in training (options are checked before the suite starts)
    assert fail["status"] == "failed" and "missing.pt" in fail["error"]
    with open(out / "all_runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    assert {r["status"] for r in rows} == {"complete", "failed"}
    table = (out / "table.md").read_text()
    assert "failed" in table and "**" in table and "× ce" in table
    assert "Test accuracy at the epoch chosen on validation" in table
    # --suspects: small-loss weights and cleanlab scored against the noise mask
    sus = json.loads((runs / "digits-imb1-flip0.4-small-loss-s0" / "suspects.json").read_text())
    assert 0 <= sus["auroc"] <= 1
    assert (out / "cleanlab" / "digits-imb1-flip0.4-s0.json").is_file()
    assert "cleanlab" in table

    # a second invocation (through the CLI) skips complete runs and retries the failed ones
    mtimes = {p: p.stat().st_mtime_ns for p in done}
    from lfm.cli import bench as cli

    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(
        [
            "bench",
            "--dataset",
            "digits",
            "--methods",
            "ce,small-loss,bad",
            "--variant",
            "bad=lfm:encoder_weights=missing.pt",
            "--noise",
            "none,flip:0.4",
            "--epochs",
            "1",
            "--max-steps",
            "3",
            "--out",
            str(out),
        ]
    )
    assert args.func(args) == 1  # failures -> exit code 1
    assert {p: p.stat().st_mtime_ns for p in done} == mtimes
    assert len(collect_rows(out)) == 6


def test_specs_and_settings():
    specs = parse_method_specs(["ce", "sl"], ["sl=small-loss:rho=0.2,ramp=0", "x=l2rw"])
    assert [(s.label, s.method, s.options) for s in specs] == [
        ("ce", "ce", {}),
        ("sl", "small-loss", {"rho": 0.2, "ramp": 0}),
        ("x", "l2rw", {}),
    ]
    with pytest.raises(LFMError):
        parse_method_specs(["ce"], ["nolabel"])
    assert [s.name for s in make_settings([1, 10], ["none", "uniform:0.4"])] == [
        "imb1-none",
        "imb1-uniform0.4",
        "imb10-none",
        "imb10-uniform0.4",
    ]
    assert [s.name for s in make_settings([1, 50], ["none", "flip:0.2"], "sweep")] == [
        "imb1-none",
        "imb50-none",
        "imb1-flip0.2",
    ]
    assert Setting(50.0, "flip:0.4").name == "imb50-flip0.4"
    assert mean_std([2.0]) == (2.0, 0.0)


def test_table_from_rows_multi_learner_and_partial_failure():
    def row(label, learner, seed, acc, status="complete"):
        return {
            "label": label,
            "learner": learner,
            "seed": seed,
            "setting": "imb1-none",
            "status": status,
            "test_last": acc,
            "test_sel": acc,
            "dataset": "d",
            "sec_per_iter": 0.1 if label == "ce" else 0.5,
            "peak_mem_mb": 1.0,
            "peak_rss_mb": 1.0,
            "run_dir": f"r/{label}{seed}",
            "error": "",
        }

    rows = [
        row("ce", "model", 0, 0.5),
        row("ce", "model", 1, 0.7),
        row("lfm", "W1", 0, 0.6),
        row("lfm", "W2", 0, 0.9),
        {**row("lfm", "", 1, None, "failed"), "error": "boom"},
    ]
    table = markdown_tables(rows)
    assert "| ce | 0.6000 ± 0.1414 |" in table
    assert "| lfm W2 | **0.9000 (1/2 seeds)** |" in table  # one seed: no spread shown
    assert "| lfm W1 | 0.6000 (1/2 seeds) |" in table
    assert "| lfm | 0.5000 | 5.00 |" in table  # 5x the ce step on the same setting and seed
    assert "boom" in table


class _Killed(Exception):
    pass


def test_a_resumed_run_reports_its_cost_per_process_segment(tmp_path, monkeypatch):
    """A run killed after a checkpoint and finished by a second `run_suite` (another process in
    real use): each process's cost is recorded, and the table does not pass the resuming
    process's memory off as the run's."""
    from lfm.methods.plain import PlainMethod

    base = RunConfig(
        data=DataConfig("digits"), epochs=1, batch_size=100, checkpoint_every=2, progress=False
    )
    cfg = BenchConfig(base, parse_method_specs(["ce"]), make_settings([1], ["none"]), [0], "")
    cfg.out = str(tmp_path / "bench")
    step = PlainMethod.step

    def dies_at_step_3(self, batch, ctx):
        if ctx.step == 3:
            raise _Killed("killed")
        return step(self, batch, ctx)

    import lfm.apps.bench as bench

    monkeypatch.setattr(bench, "_warm_up", lambda cfg, bundle: None)  # its steps count too
    monkeypatch.setattr(PlainMethod, "step", dies_at_step_3)
    assert run_suite(cfg, log=None)["failed"]  # checkpoint at step 2, then the "kill"
    monkeypatch.setattr(PlainMethod, "step", step)
    assert run_suite(cfg, log=None)["ran"]  # resumes from step 2
    run_dir = tmp_path / "bench" / "runs" / "digits-imb1-none-ce-s0"
    t = json.loads((run_dir / "results.json").read_text())["timing"]
    assert t["resumed"] and [(s["from_step"], s["to_step"]) for s in t["segments"]] == [
        (0, 2),
        (2, t["steps"]),
    ]
    assert all(s["peak_mem_mb"] > 0 and s["train_seconds"] >= 0 for s in t["segments"])
    assert t["peak_mem_mb"] == max(s["peak_mem_mb"] for s in t["segments"])
    assert t["peak_rss_mb"] is None  # only the last process was watched
    assert "peak_rss_mb" in t["segments"][-1]
    with open(tmp_path / "bench" / "all_runs.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["segments"] == "2"
    table = (tmp_path / "bench" / "table.md").read_text()
    cost = [line for line in table.splitlines() if line.startswith("| ce |")][-1]
    assert cost.endswith("(resumed) | resumed | 1 (1 resumed) |"), cost
