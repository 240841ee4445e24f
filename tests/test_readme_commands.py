"""Every row of the README's command table runs through the CLI, at a small size.

The commands are read from README.md itself, so a row that is edited or added is what runs.
Each gets flags that shrink it (later flags win in argparse) and nothing else: the paper's CIFAR
protocol reads a small CIFAR-10 folder in the standard python format, and the rows that read
another row's output (report, suspects, evaluate) run in the folder the first ones wrote.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from test_data_cifar import make_fake_cifar10  # tests/ is on sys.path under pytest

from lfm.cli.main import main

README = Path(__file__).resolve().parent.parent / "README.md"

# Per subcommand: what makes it small (appended after the README's own flags).
FAST = ["--epochs", "1", "--max-steps", "2", "--no-progress"]
SHRINK: dict[str, list[str]] = {
    "train": FAST,
    "dr": [*FAST, "--mnist1d-samples", "1500", "--compare", "ce"],
    "bench": [*FAST, "--seeds", "1", "--imbalance", "10", "--noise", "flip:0.4"],
    "report": [],
    "suspects": ["--folds", "2", "--cleanlab-epochs", "1", "--top", "3"],
    "search": ["--layers", "1", "--C", "4", "--epochs", "1", "--steps-per-epoch", "1"]
    + ["--batch-size", "8", "--no-progress"],
    "evaluate": ["--layers", "1", "--C", "4", "--epochs", "1", "--steps-per-epoch", "1"]
    + ["--batch-size", "8", "--no-progress"],
}


def readme_commands() -> list[str]:
    """The first `lfm ...` command of each row of the 'What you can do with it' table."""
    text = README.read_text()
    table = text.split("## What you can do with it", 1)[1].split("\n## ", 1)[0]
    cmds = []
    for line in table.splitlines():
        m = re.match(r"^\|[^|]+\|\s*`(lfm [^`]+)`", line)
        if m:
            cmds.append(m[1])
    return cmds


COMMANDS = readme_commands()


def _argv(cmd: str, cifar: Path) -> list[str]:
    argv = shlex.split(cmd.replace("~/data", str(cifar)))[1:]
    sub = argv[0]
    if sub == "dr" and "paper-cifar-lt" in argv:
        # 10 images per class are left after the meta set: imbalance 100 would leave none, and
        # a batch of 100 would be the whole set; ResNet-32 and the rest stay as the paper's
        small = ["--imbalance", "2", "--batch-size", "20", "--max-steps", "1", "--compare", "ce"]
        return [*argv, *FAST, *small]
    if sub == "suspects":
        argv = [a.replace("<run>", _run_name()) for a in argv]
    return [*argv, *SHRINK[sub]]


def _run_name() -> str:
    """A bench run of the LFM method (the table's suspects row points at one of them)."""
    runs = sorted(p.name for p in Path("bench/runs").iterdir() if "-lfm-" in p.name)
    assert runs, "the bench row wrote no lfm run"
    return runs[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("readme")
    make_fake_cifar10(d / "cifar")
    return d


def test_the_table_has_the_rows_this_file_knows():
    subs = [shlex.split(c)[1] for c in COMMANDS]
    assert len(COMMANDS) >= 8 and set(subs) <= set(SHRINK), subs
    assert {"train", "dr", "bench", "report", "suspects", "search", "evaluate"} <= set(subs)


def _expect(sub: str, argv: list[str], out: str) -> None:
    """What each command must have produced, beyond exit status 0."""
    if sub in ("train", "dr"):
        assert "test" in out.lower() and re.search(r"0\.\d{3}", out), out
    elif sub == "bench":
        rows = list(Path("bench/runs").iterdir())
        assert len(rows) >= 9 and all((r / "results.json").is_file() for r in rows)
    elif sub == "report":
        assert Path("bench/report/index.html").stat().st_size > 1000
    elif sub == "suspects":
        run = Path(argv[1])
        assert (run / "suspects.csv").is_file() and "cleanlab" in out.lower(), out
    elif sub == "search":
        g = json.loads(Path("search/genotype.json").read_text())
        assert len(g["normal"]) == 8 and Path("search/genotype.png").is_file()
    elif sub == "evaluate":
        assert "test" in out.lower(), out


@pytest.mark.slow
@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.split(" --")[0] for c in COMMANDS])
def test_readme_row_runs(cmd, workdir, monkeypatch, capsys):
    """Rows run in table order in one folder (bench before report and suspects, search before
    evaluate), as a reader would type them."""
    monkeypatch.chdir(workdir)
    argv = _argv(cmd, workdir / "cifar")
    assert main(argv) == 0, argv
    _expect(argv[0], argv, capsys.readouterr().out)


@pytest.mark.slow
def test_evaluate_a_published_genotype(workdir, monkeypatch, capsys):
    """The evaluate row's alternative: `lfm evaluate --genotype DARTS_V2` (a built-in cell)."""
    row = next(c for c in README.read_text().splitlines() if "`lfm evaluate" in c)
    assert "`--genotype DARTS_V2`" in row
    monkeypatch.chdir(workdir)
    argv = ["evaluate", "--genotype", "DARTS_V2", "--out", "eval-darts-v2", *SHRINK["evaluate"]]
    assert main(argv) == 0
    rec = json.loads(Path("eval-darts-v2/evaluation.json").read_text())
    assert rec["genotype"]["normal"] and 0.0 <= rec["test_acc"] <= 1.0
