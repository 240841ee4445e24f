"""`lfm report`: PNGs and a self-contained index.html, for a bench folder and for one run."""

from __future__ import annotations

import re

from lfm.apps.bench import BenchConfig, make_settings, parse_method_specs, run_suite
from lfm.apps.report import ablation_groups, load_runs, make_report, markdown_to_html
from lfm.config import RunConfig
from lfm.data.config import DataConfig


def _images(index) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', index.read_text())


def test_report_on_bench_and_single_run(tmp_path):
    out = tmp_path / "bench"
    base = RunConfig(data=DataConfig("digits"), epochs=2, max_steps=4, progress=False)
    cfg = BenchConfig(
        base=base,
        methods=parse_method_specs(["ce", "small-loss", "sl-0.2"], ["sl-0.2=small-loss:rho=0.2"]),
        settings=make_settings([1], ["flip:0.4"]),
        seeds=[0],
        out=str(out),
    )
    run_suite(cfg, log=None)
    runs = load_runs(out)
    assert ablation_groups(runs) == [["small-loss", "sl-0.2"]]

    index = make_report(out)
    assert index == out / "report" / "index.html"
    images = _images(index)
    for kind in ("curves_", "per_class_", "confusion_", "weights_", "ablation_"):
        assert any(i.startswith(kind) for i in images), kind
    for name in images:  # referenced relatively, and there
        assert "/" not in name and (index.parent / name).stat().st_size > 1000
    page = index.read_text()
    assert "<table>" in page and "Test accuracy at the last epoch" in page
    assert "http" not in page  # self-contained

    one = out / "runs" / "digits-imb1-flip0.4-small-loss-s0"
    index1 = make_report(one, out=tmp_path / "single", compare=["small-loss"])
    assert any(i.startswith("weights_") for i in _images(index1))
    assert all((index1.parent / i).is_file() for i in _images(index1))


def test_markdown_to_html():
    text = "# T\n\n| a | b |\n|---|---|\n| **1** | `x` |\n\n- item"
    page = markdown_to_html(text)
    assert "<h1>T</h1>" in page
    assert "<th>a</th>" in page and "<td><b>1</b></td>" in page and "<code>x</code>" in page
    assert "<li>item</li>" in page
