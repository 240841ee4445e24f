"""The command line: help, YAML equal to flags, and one-line errors with exit code 2."""

import subprocess
import sys

import pytest

from lfm.cli.args import run_config
from lfm.cli.main import build_parser, main


def cfg_of(argv):
    return run_config(build_parser().parse_args(argv))


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--dataset", "--imbalance", "--noise", "--loss", "--config", "--lr", "--out"):
        assert flag in out


def test_yaml_config_equals_the_flags(tmp_path):
    (tmp_path / "run.yaml").write_text(
        "method: focal\nepochs: 3\ndata:\n  dataset: digits\n  imbalance: 50\n  noise: flip:0.4\n"
        "optim:\n  lr: 0.02\n  milestones: [1, 2]\n  schedule: step\n"
        "method_options:\n  gamma: 1.5\n"
    )
    from_yaml = cfg_of(["train", "--config", str(tmp_path / "run.yaml")])
    from_flags = cfg_of(
        [
            "train",
            "--method",
            "focal",
            "--epochs",
            "3",
            "--dataset",
            "digits",
            "--imbalance",
            "50",
            "--noise",
            "flip:0.4",
            "--lr",
            "0.02",
            "--milestones",
            "1,2",
            "--schedule",
            "step",
            "--opt",
            "gamma=1.5",
        ]
    )
    assert from_yaml == from_flags
    assert from_yaml.optim.milestones == (1.0, 2.0)


def test_flags_override_the_yaml(tmp_path):
    (tmp_path / "run.yaml").write_text("epochs: 3\n")
    assert cfg_of(["train", "--config", str(tmp_path / "run.yaml"), "--epochs", "7"]).epochs == 7


def test_preset_sets_the_paper_optimizer():
    cfg = cfg_of(["train", "--preset", "dr-paper"])
    assert (cfg.optim.lr, cfg.optim.schedule, cfg.optim.milestones) == (0.1, "step", (80, 90))


BAD = [
    (["train", "--dataset", "nope"], "unknown dataset 'nope'"),
    (["train", "--model", "nope"], "unknown model 'nope'"),
    (["train", "--method", "nope"], "unknown method 'nope'"),
    (["train", "--imbalance", "0.5"], "imbalance"),
    (["train", "--noise", "flip:1.5"], "outside [0, 1]"),
    (["train", "--noise", "sideways:0.2"], "sideways"),
    (["train", "--val-per-class", "500"], "val"),
    (["train", "--dataset", "cifar10", "--data-root", "/nonexistent/cifar"], "/nonexistent/cifar"),
    (["train", "--lr", "-1"], "optim.lr"),
    (["train", "--opt", "gamma"], "KEY=VALUE"),
    (["train", "--config", "/nonexistent.yaml"], "does not exist"),
]


@pytest.mark.parametrize("argv,needle", BAD, ids=[" ".join(a[1:3]) for a, _ in BAD])
def test_bad_input_is_one_line_and_exit_2(argv, needle, capsys):
    assert main(argv + ["--no-progress", "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "Fix:" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_unknown_yaml_key_names_the_field(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("data:\n  datset: digits\n")
    assert main(["train", "--config", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert "data.datset" in err and "dataset" in err


def test_wrong_yaml_type_names_the_field(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("epochs: many\n")
    assert main(["train", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "'epochs'" in capsys.readouterr().err


def test_console_script_runs_and_prints_a_table(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lfm",
            "train",
            "--epochs",
            "2",
            "--no-progress",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "test acc (last)" in out.stdout and (tmp_path / "results.json").is_file()


def test_console_script_error_has_no_traceback():
    out = subprocess.run(
        [sys.executable, "-m", "lfm", "train", "--noise", "uniform:2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr and "uniform:2" in out.stderr


def test_the_renamed_hvp_flag_names_its_new_name(capsys):
    """`lfm search --hvp fd` (the flag before issue 11) says what to pass instead."""
    assert main(["search", "--hvp", "fd"]) == 2
    assert "--hvp was renamed --backend. Fix: pass --backend fd" in capsys.readouterr().err


def test_a_search_in_the_1d_space_writes_its_cell_and_the_table_knows_it(tmp_path, capsys):
    """`--set space=cell1d` ends in an arch string, not a DARTS genotype: arch.json holds it
    (the search crashed on writing genotype.json) and `lfm nasbench query` reads it back."""
    import json

    argv = ["search", "--dataset", "mnist1d", "--set", "space=cell1d", "--set",
            "encoder_model=cnn1d", "--method", "darts", "--order", "1", "--epochs", "1",
            "--steps-per-epoch", "1", "--no-progress", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    arch = json.loads((tmp_path / "arch.json").read_text())
    assert arch["space"] == "cell1d" and not (tmp_path / "genotype.json").exists()
    capsys.readouterr()
    assert main(["nasbench", "query", arch["arch"]]) == 0
    assert arch["arch"] in capsys.readouterr().out
