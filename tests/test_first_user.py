"""What a first-time user and a reliability audit ran into (issue 14, items 7-18).

Each test failed on the code before its fix. CLI cases run `lfm.cli.main.main([...])` in
process and check the one-line `lfm: error: <problem>. Fix: <fix>` contract (exit 2).
"""

from __future__ import annotations

import pytest

from lfm.cli.main import main

TINY = ["--no-progress", "--epochs", "1", "--max-steps", "2"]


def one_line_error(argv: list[str], capsys, *needles: str) -> str:
    """Run the CLI; assert exit 2 and one `lfm: error: ... Fix: ...` line holding every needle."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err[:2000]
    assert err.startswith("lfm: error: ") and ". Fix: " in err, err[:2000]
    for needle in needles:
        assert needle.lower() in err.lower(), (needle, err)
    return err


# -- 7. echoed values are cut to about 100 characters ---------------------------------------------
HUGE = "x" * 2_000_000


@pytest.mark.parametrize(
    "yaml_text",
    [
        f"data:\n  dataset: {HUGE}\n",
        f"data:\n  noise: {HUGE}\n",
        f"method: {HUGE}\n",
        f"optim:\n  schedule: {HUGE}\n",
        f"? {HUGE}\n: 1\n",  # an explicit key: plain ones stop at 1024 characters
        f"data:\n  val_per_class: {HUGE}\n",
        f"device: {HUGE}\n",
    ],
    ids=["dataset", "noise", "method", "schedule", "key", "val_per_class", "device"],
)
def test_a_huge_value_is_echoed_cut(yaml_text, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    err = one_line_error(["train", "--config", str(cfg), *TINY], capsys)
    assert len(err) < 1000, len(err)
    assert "characters)" in err  # says the value was cut, and how long it was


def test_a_huge_option_value_is_echoed_cut(capsys):
    err = one_line_error(["train", "--loss", "focal", "--opt", f"gamma={HUGE}", *TINY], capsys)
    assert len(err) < 1000


# -- 8. every --opt value parsed and range-checked by the same code -------------------------------
@pytest.mark.parametrize(
    "argv,needles",
    [
        (["train", "--loss", "focal", "--opt", "gamma=two"], ["gamma='two'", "a number >= 0"]),
        (["train", "--loss", "focal", "--opt", "gamma=-3"], ["gamma=-3", "a number >= 0"]),
        (["train", "--method", "cb", "--opt", "beta=1"], ["beta=1", "[0, 1)"]),
        (["train", "--method", "cb", "--opt", "base=hinge"], ["base", "one of ce, focal"]),
        (["train", "--method", "mwnet", "--opt", "hidden=0"], ["hidden=0", "whole number >= 1"]),
        (["train", "--method", "mwnet", "--opt", "normalize=maybe"], ["true or false"]),
        (["train", "--method", "small-loss", "--opt", "rho=1.5"], ["rho=1.5", "or auto"]),
        (["train", "--method", "lfm", "--opt", "b_lr=abc"], ["b_lr='abc'", "a number > 0"]),
        (["train", "--method", "lfm", "--opt", "val_bank=1.5"], ["val_bank", "whole number"]),
        (["dr", "--compare", "ce", "--opt", "b_lr=abc"], ["b_lr='abc'", "a number > 0"]),
        (["dr", "--compare", "ce", "--variant", "nope"], ["variant", "w1-val"]),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) and v and v[0] in ("train", "dr") else "",
)
def test_bad_option_values_are_one_line(argv, needles, tmp_path, capsys):
    one_line_error([*argv, *TINY, "--out", str(tmp_path / "run")], capsys, *needles)
    assert not list(tmp_path.rglob("results.json"))  # nothing trained, not even the baseline


def test_option_strings_are_parsed_by_type():
    from lfm.methods.options import check_method_options

    # YAML 1.1 reads 1e-3 as a string; it is still a number here
    assert check_method_options("focal", {"gamma": "1e-1"}) == {"gamma": 0.1}
    assert check_method_options("small-loss", {"rho": "0.2"})["rho"] == 0.2
    assert check_method_options("small-loss", {})["rho"] == "auto"
    assert check_method_options("lfm", {"b_lr": "1e-2"}).b_lr == 0.01


# -- 9. a suite is checked whole before the first run ---------------------------------------------
@pytest.mark.parametrize(
    "extra,needles",
    [
        (["--methods", "ce,mwn"], ["unknown method 'mwn'"]),
        (["--methods", "ce,sl", "--variant", "sl=small-loss:rho=2"], ["sl", "rho=2"]),
        (["--methods", "ce,sl", "--variant", "sl=smallloss:rho=0.2"], ["--variant sl"]),
        (["--methods", "ce,mwnet", "--opt", "meta_lr=x"], ["meta_lr"]),
        (["--methods", "ce", "--noise", "none,flip:2"], ["flip:2"]),
    ],
)
def test_bench_checks_the_whole_suite_first(extra, needles, tmp_path, capsys):
    out = tmp_path / "bench"
    one_line_error(["bench", *TINY, *extra, "--out", str(out)], capsys, *needles)
    assert not out.exists()  # not even the first method ran


# -- 11. YAML: where a misplaced key belongs; where a syntax error is ------------------------------
@pytest.mark.parametrize(
    "text,needles",
    [
        ("lr: 0.1\n", ["'lr' belongs under `optim:`", "optim: {lr: ...}"]),
        ("noise: flip:0.2\n", ["'noise' belongs under `data:`"]),
        ("hidden_sizes: [64]\n", ["unknown config field 'hidden_sizes'"]),  # no section has it
        ("data:\n  dataset: digits\n noise: [x\n", ["line 3, column 2"]),
        ("epochs: 1\n\tseed: 2\n", ["line 2, column 1"]),
    ],
)
def test_yaml_errors_say_where(text, needles, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    one_line_error(["train", "--config", str(cfg), *TINY], capsys, *needles)
