"""Hostile and broken input: every case is one clear line, exit code 2, nothing executed.

Each CLI case runs `lfm.cli.main.main([...])` in process and checks stderr is exactly one line
`lfm: error: <problem>. Fix: <fix>` naming the problem, with no traceback and no results
written. Files that try to run code (pickle `__reduce__`, YAML python tags) point at a marker
file that must never appear.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lfm.cli.main import main
from lfm.errors import LFMError

FAST = ["--no-progress", "--epochs", "1", "--batch-size", "100"]


def fails(argv: list[str], capsys, *needles: str, out: Path | None = None) -> str:
    """Run the CLI; assert exit 2, one `lfm: error: ... Fix: ...` line holding every needle.

    The tiny-run flags go first, so that a flag of the case (or its YAML file) wins.
    """
    capsys.readouterr()
    fast = [] if "--config" in argv else FAST
    argv = ["train", *fast, *argv]
    if out is not None and "--out" not in argv:
        argv += ["--out", str(out)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("lfm: error: ") and ". Fix: " in err, err
    for needle in needles:
        assert needle.lower() in err.lower(), (needle, err)
    if out is not None:
        assert not (out / "results.json").exists()  # nothing was trained
    return err


class _Evil:
    """Unpickling this runs `touch MARKER` (if the reader lets it)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# -- CIFAR pickles ---------------------------------------------------------------------------


def _cifar_batch(n: int, start: int) -> dict:
    g = np.random.default_rng(start)
    return {
        b"batch_label": b"fake",
        b"labels": [(start + i) % 10 for i in range(n)],
        b"data": g.integers(0, 256, (n, 3072), dtype=np.uint8),
    }


def _fake_cifar(root: Path) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for i in range(5):
        (d / f"data_batch_{i + 1}").write_bytes(pickle.dumps(_cifar_batch(30, 30 * i), 2))
    (d / "test_batch").write_bytes(pickle.dumps(_cifar_batch(20, 1000), 2))
    return d


CIFAR_TAMPER = {
    "wrong-keys": (lambda b: {b"pixels": b[b"data"], b"labels": b[b"labels"]}, "expected keys"),
    "float-data": (lambda b: {**b, b"data": b[b"data"].astype(np.float64)}, "float64"),
    "wrong-shape": (lambda b: {**b, b"data": b[b"data"][:, :1000]}, "(N, 3072)"),
    "data-not-array": (lambda b: {**b, b"data": [1, 2, 3]}, "list"),
    "labels-out-of-range": (lambda b: {**b, b"labels": [10] * 30}, "outside [0, 10)"),
    "negative-labels": (lambda b: {**b, b"labels": [-1] * 30}, "outside [0, 10)"),
    "labels-too-short": (lambda b: {**b, b"labels": b[b"labels"][:7]}, "30 images but 7 labels"),
    "labels-not-ints": (lambda b: {**b, b"labels": ["cat"] * 30}, "not a list of integers"),
    "not-a-dict": (lambda b: [b[b"data"]], "expected keys"),
}


@pytest.mark.parametrize("case", list(CIFAR_TAMPER))
def test_tampered_cifar_batch(case, tmp_path, capsys):
    d = _fake_cifar(tmp_path / "data")
    change, needle = CIFAR_TAMPER[case]
    (d / "data_batch_2").write_bytes(pickle.dumps(change(_cifar_batch(30, 30)), 2))
    fails(["--dataset", "cifar10", "--data-root", str(tmp_path / "data")], capsys, needle)


def test_truncated_cifar_pickle(tmp_path, capsys):
    d = _fake_cifar(tmp_path / "data")
    whole = (d / "data_batch_3").read_bytes()
    (d / "data_batch_3").write_bytes(whole[: len(whole) // 2])
    fails(
        ["--dataset", "cifar10", "--data-root", str(tmp_path / "data")],
        capsys,
        "data_batch_3",
        "truncated or corrupt",
        out=tmp_path / "run",
    )


def test_cifar_pickle_that_runs_a_command_is_refused(tmp_path, capsys):
    d = _fake_cifar(tmp_path / "data")
    marker = tmp_path / "pwned"
    (d / "data_batch_1").write_bytes(pickle.dumps({b"data": _Evil(marker), b"labels": []}, 2))
    fails(
        ["--dataset", "cifar10", "--data-root", str(tmp_path / "data")],
        capsys,
        "refused",
        "system",
    )
    assert not marker.exists()


def test_cifar_data_root_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "cifar.tar.gz"
    f.write_bytes(b"\x1f\x8b not extracted")
    fails(["--dataset", "cifar10", "--data-root", str(f)], capsys, str(f))


# -- checkpoints and weights files -----------------------------------------------------------


def test_malicious_checkpoint_in_the_run_folder_is_not_executed(tmp_path, capsys):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    (run / "checkpoints").mkdir(parents=True)
    buf = io.BytesIO()
    torch.save({"method": _Evil(marker), "step": 1}, buf)
    (run / "checkpoints" / "ckpt-000000005.pt").write_bytes(buf.getvalue())
    fails(["--out", str(run)], capsys, "ckpt-000000005.pt", "not a plain-data checkpoint", out=run)
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [b"", os.urandom(2048), b"PK\x03\x04 a zip that ends here"],
    ids=["empty", "random-bytes", "truncated-zip"],
)
def test_garbage_checkpoint(payload, tmp_path, capsys):
    """A damaged checkpoint and nothing older: one warning line, kept as .corrupt, start over."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    bad = run / "checkpoints" / "ckpt-000000003.pt"
    bad.write_bytes(payload)
    capsys.readouterr()
    assert main(["train", *FAST, "--out", str(run)]) == 0
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"lfm: warning: checkpoint {bad} is corrupt"), err
    assert err.endswith("kept as ckpt-000000003.pt.corrupt, starting over"), err
    assert bad.with_name(bad.name + ".corrupt").read_bytes() == payload  # kept for inspection
    assert (run / "results.json").is_file()


def test_hints_name_only_flags_that_exist():
    """Every `--flag` in an error's fix (or anywhere in lfm/'s strings) is an option of some
    command: a hint once said "point --resume at another checkpoint", and no command has one."""
    import argparse
    import re

    from lfm.cli.main import build_parser

    known = {"--help", "--standalone", "--nproc"}  # the last two: torchrun's, in docstrings

    def collect(parser: argparse.ArgumentParser) -> None:  # commands and their subcommands
        for a in parser._actions:
            known.update(o for o in a.option_strings if o.startswith("--"))
            if isinstance(a, argparse._SubParsersAction):
                for sub in a.choices.values():
                    collect(sub)

    collect(build_parser())
    root = Path(__file__).resolve().parents[1] / "lfm"
    named = {}
    for p in root.rglob("*.py"):
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]", p.read_text()):
            named.setdefault(flag, p.name)
    unknown = {f: where for f, where in named.items() if f not in known}
    assert not unknown, unknown


@pytest.mark.parametrize(
    "state",
    [{"weights": torch.ones(3)}, [1, 2, 3], {"method": {}, "step": 1, "config": "{not json"}],
    ids=["wrong-keys", "a-list", "bad-config"],
)
def test_plain_data_checkpoint_of_the_wrong_shape(state, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save(state, run / "checkpoints" / "ckpt-000000003.pt")
    fails(["--out", str(run)], capsys, "ckpt-000000003.pt", "not a checkpoint", out=run)


def _resnet18_torchvision_sd() -> dict[str, torch.Tensor]:
    from lfm.models import create_model

    model = create_model("resnet18", 10, (3, 32, 32))
    return {
        ("fc." + k[5:] if k.startswith("head.") else k[5:]): v
        for k, v in model.state_dict().items()
    }


def test_malicious_weights_file_is_not_executed(tmp_path, capsys):
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"conv1.weight": _Evil(marker)}, evil)
    fails(
        ["--model", "resnet18", "--weights", str(evil)],
        capsys,
        "evil.pt",
        "not a plain tensor state dict",
        out=tmp_path / "run",
    )
    assert not marker.exists()


def test_weights_file_with_wrong_shapes(tmp_path, capsys):
    sd = _resnet18_torchvision_sd()
    sd["layer2.0.conv1.weight"] = torch.zeros(7, 7, 3, 3)
    torch.save(sd, tmp_path / "w.pt")
    fails(
        ["--model", "resnet18", "--weights", str(tmp_path / "w.pt")],
        capsys,
        "wrong shape",
        "layer2.0.conv1.weight",
    )


def test_weights_file_that_is_not_a_state_dict(tmp_path, capsys):
    torch.save([torch.ones(2)], tmp_path / "w.pt")
    fails(["--model", "resnet18", "--weights", str(tmp_path / "w.pt")], capsys, "not a state dict")


# -- noise transition matrices ---------------------------------------------------------------

EYE = np.eye(10)
MATRICES = {
    "wrong-class-count": (np.eye(3), "3 x 3 but the data set has 10 classes"),
    "not-square": (np.ones((10, 5)) / 5, "not C x C"),
    "negative": (EYE * 1.5 - 0.05, "negative entry"),
    "rows-not-1": (EYE * 0.5, "sums to 0.5"),
    "nan": (np.where(EYE > 0, np.nan, 0.0), "non-finite"),
    "inf": (np.where(EYE > 0, np.inf, 0.0), "non-finite"),
}


@pytest.mark.parametrize("case", list(MATRICES))
def test_bad_noise_matrix(case, tmp_path, capsys):
    m, needle = MATRICES[case]
    np.save(tmp_path / "T.npy", m)
    fails(["--noise", f"matrix:{tmp_path / 'T.npy'}"], capsys, needle)


def test_noise_matrix_csv_with_text(tmp_path, capsys):
    (tmp_path / "T.csv").write_text("0.9,0.1\nhello,world\n")
    fails(["--noise", f"matrix:{tmp_path / 'T.csv'}"], capsys, "cannot read noise matrix")


def test_noise_matrix_pickle_is_not_executed(tmp_path, capsys):
    marker = tmp_path / "pwned"
    np.save(tmp_path / "T.npy", np.array([_Evil(marker)], dtype=object), allow_pickle=True)
    fails(["--noise", f"matrix:{tmp_path / 'T.npy'}"], capsys, "cannot read noise matrix")
    assert not marker.exists()


# -- image folders ---------------------------------------------------------------------------


def _png(path: Path, value: int = 0) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 6, 3), value, dtype=np.uint8)).save(path)


IMG = ["--dataset", "imagefolder", "--image-size", "8", "--val-per-class", "1", "--model", "mlp"]


def _image_folder(root: Path, classes=("cat", "dog"), per_class: int = 4) -> Path:
    for c in classes:
        for i in range(per_class):
            _png(root / "train" / c / f"{i}.png", 40 * i)
    return root


def test_image_folder_with_an_empty_class_folder(tmp_path, capsys):
    root = _image_folder(tmp_path / "imgs")
    (root / "train" / "emu").mkdir()
    fails([*IMG, "--data-root", str(root)], capsys, "emu", "no images")


def test_image_folder_without_images(tmp_path, capsys):
    (tmp_path / "imgs" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "imgs" / "train" / "cat" / "readme.txt").write_text("no pictures here")
    fails([*IMG, "--data-root", str(tmp_path / "imgs")], capsys, "no class subfolders")


def test_image_folder_with_a_corrupt_image(tmp_path, capsys):
    root = _image_folder(tmp_path / "imgs")
    (root / "train" / "dog" / "9.png").write_bytes(b"\x89PNG\r\n\x1a\n then nothing")
    fails([*IMG, "--data-root", str(root)], capsys, "9.png", "cannot read image")


def test_image_folder_root_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "images.zip"
    f.write_bytes(b"PK")
    fails([*IMG, "--data-root", str(f)], capsys, "not a folder")


def test_image_folder_filename_labels_without_numbers(tmp_path, capsys):
    _png(tmp_path / "imgs" / "training" / "cat_001.png")
    fails(
        [*IMG, "--label-from", "filename", "--data-root", str(tmp_path / "imgs")],
        capsys,
        "cat_001.png",
    )


# -- user-given data through the API ---------------------------------------------------------


def _bundle(x_train: torch.Tensor, y_train: torch.Tensor):
    from lfm.data.types import DataBundle, Split

    def split(x, y):
        return Split(x, y, torch.arange(len(y)), y.clone())

    g = torch.Generator().manual_seed(0)
    xv, yv = torch.randn(20, 4, generator=g), torch.arange(20) % 2
    return DataBundle("mine", 2, (4,), split(x_train, y_train), split(xv, yv), split(xv, yv))


def _api_cfg():
    from lfm.config import RunConfig

    return RunConfig(epochs=1, batch_size=10, progress=False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=str)
def test_non_finite_values_in_user_data(bad):
    from lfm.train.trainer import Trainer

    x = torch.randn(40, 4)
    x[7, 2] = bad
    with pytest.raises(LFMError, match="NaN or inf") as e:
        Trainer(_api_cfg(), bundle=_bundle(x, torch.arange(40) % 2))
    assert "train" in str(e.value) and "Fix:" in str(e.value)


@pytest.mark.parametrize("label", [2, -1], ids=["too-big", "negative"])
def test_labels_out_of_range_in_user_data(label):
    from lfm.train.trainer import Trainer

    y = torch.arange(40) % 2
    y[3] = label
    with pytest.raises(LFMError, match=r"labels outside \[0, 2\)"):
        Trainer(_api_cfg(), bundle=_bundle(torch.randn(40, 4), y))


def test_float_labels_in_user_data():
    from lfm.train.trainer import Trainer

    y = (torch.arange(40) % 2).float()
    with pytest.raises(LFMError, match="integer"):
        Trainer(_api_cfg(), bundle=_bundle(torch.randn(40, 4), y))


# -- YAML config files -----------------------------------------------------------------------

YAMLS = {
    "unknown-top": ("epochz: 3\n", "'epochz'"),
    "unknown-nested": ("optim:\n  lr: 0.1\n  momentun: 0.9\n", "'optim.momentun'"),
    "unknown-model": ("model:\n  name: mlp\n  hidden: 3\n", "'model.hidden'"),
    "wrong-type-int": ("batch_size: ten\n", "'batch_size'"),
    "wrong-type-bool": ("epochs: true\n", "'epochs'"),
    "wrong-type-nested": ("data:\n  imbalance: lots\n", "imbalance"),
    "section-not-mapping": ("optim: 0.1\n", "'optim' must be a mapping"),
    "list-at-top": ("- epochs: 3\n- lr: 0.1\n", "mapping at the top level"),
    "scalar-at-top": ("just some words\n", "mapping at the top level"),
    "bad-syntax": ("epochs: [3\n", "not valid YAML"),
    "tab-indent": ("data:\n\tdataset: digits\n", "not valid YAML"),
    "nan-lr": ("optim:\n  lr: .nan\n", "lr"),
    "binary": (b"\xff\xfe\x00garbage\x81", "not valid"),
}


@pytest.mark.parametrize("case", list(YAMLS))
def test_bad_yaml(case, tmp_path, capsys):
    text, needle = YAMLS[case]
    f = tmp_path / "run.yaml"
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    fails(["--config", str(f)], capsys, needle)


@pytest.mark.parametrize(
    "tag",
    ["!!python/object/apply:os.system", "!!python/object/new:os.system", "!!python/name:os.system"],
)
def test_yaml_python_tag_is_not_executed(tag, tmp_path, capsys):
    marker = tmp_path / "pwned"
    f = tmp_path / "run.yaml"
    f.write_text(f"epochs: {tag} ['touch {marker}']\n")
    fails(["--config", str(f)], capsys, "not valid YAML")
    assert not marker.exists()


def test_config_that_is_a_folder(tmp_path, capsys):
    fails(["--config", str(tmp_path)], capsys, str(tmp_path))


# -- absurd values ---------------------------------------------------------------------------

ABSURD = [
    (["--epochs", "0"], "epochs must be >= 1"),
    (["--batch-size", "-1"], "batch_size must be >= 1"),
    (["--eval-every", "0"], "eval_every"),
    (["--keep-checkpoints", "0"], "keep_checkpoints"),
    (["--checkpoint-every", "-3"], "checkpoint_every"),
    (["--max-steps", "0"], "max_steps"),
    (["--imbalance", "1e9"], "0 training examples"),
    (["--imbalance", "inf"], "finite"),
    (["--noise", "uniform:2"], "outside [0, 1]"),
    (["--noise", "flip:nan"], "flip:nan"),
    (["--val-per-class", "1000"], "val"),
    (["--val-fraction", "1.5"], "val_fraction"),
    (["--mnist1d-samples", "0", "--dataset", "mnist1d"], "mnist1d_samples"),
    (["--image-size", "0"], "image_size"),
    (["--lr", "nan"], "lr"),
    (["--momentum", "-1"], "momentum"),
    (["--seed", "99999999999999999999"], "seed must be in"),
    (["--val-per-class", "0"], "validation set is empty"),
    (["--model-opt", "hidden_sizes=[-3]"], "positive"),
    (["--model-opt", "hidden_sizes=abc"], "hidden_sizes"),
    (["--model-opt", "nope=1"], "unknown option"),
    (["--opt", "nope=1"], "nope"),
    (["--warmup-epochs", "-1"], "warmup_epochs"),
    (["--milestones", "5,1", "--schedule", "step"], "milestones"),
]


def _id(case) -> str:
    return " ".join((case.values if hasattr(case, "values") else case)[0][:2])


@pytest.mark.parametrize("argv,needle", ABSURD, ids=[_id(c) for c in ABSURD])
def test_absurd_values(argv, needle, tmp_path, capsys):
    fails(argv, capsys, needle, out=tmp_path / "run")


def test_huge_lr_diverges_into_a_clear_nan_error(tmp_path, capsys):
    fails(["--lr", "1e6", "--model", "mlp"], capsys, "loss became", out=tmp_path / "run")


def test_out_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "results.txt"
    f.write_text("mine")
    fails(["--out", str(f)], capsys, "not a folder")
    assert f.read_text() == "mine"


# -- a few through a real process: the console script's own error path ------------------------


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--noise", "matrix:/nonexistent/T.npy"], "not found"),
        (["--dataset", "imagefolder", "--data-root", "/nonexistent/images"], "does not exist"),
    ],
    ids=["missing-matrix", "missing-folder"],
)
def test_subprocess_errors_are_one_line(extra, needle):
    p = subprocess.run(
        [sys.executable, "-m", "lfm", "train", *extra, *FAST],
        capture_output=True,
        text=True,
        timeout=120,
    )
    err = p.stderr.strip()
    assert p.returncode == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("lfm: error: ") and needle in err
