"""What a first-time user and a reliability audit ran into (issue 14, items 7-18).

Each test failed on the code before its fix. CLI cases run `lfm.cli.main.main([...])` in
process and check the one-line `lfm: error: <problem>. Fix: <fix>` contract (exit 2).
"""

from __future__ import annotations

import json
from pathlib import Path

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


# -- 10. a model of the wrong width, a module where a factory is expected -------------------------
def _three_class_bundle():
    import torch

    from lfm.data.types import DataBundle, Split

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 8, generator=g), torch.arange(60) % 3

    def split(lo: int, hi: int) -> Split:
        return Split(x[lo:hi], y[lo:hi], torch.arange(lo, hi))

    return DataBundle("toy", 3, (8,), split(0, 40), split(40, 50), split(50, 60))


def _tiny_cfg(method: str = "ce"):
    from lfm.config import RunConfig

    return RunConfig(method=method, epochs=1, batch_size=10, max_steps=2, progress=False)


@pytest.mark.parametrize("method", ["ce", "lfm"])
def test_a_model_with_the_wrong_output_width_is_refused(method):
    from torch import nn

    from lfm.errors import LFMError
    from lfm.train.trainer import Trainer

    with pytest.raises(LFMError, match=r"output is \(2, 10\).*3 classes"):
        Trainer(_tiny_cfg(method), _three_class_bundle(), lambda: nn.Linear(8, 10)).run()
    Trainer(_tiny_cfg(method), _three_class_bundle(), lambda: nn.Linear(8, 3)).run()  # right


def test_a_module_where_a_factory_is_expected_names_the_fix():
    import torch
    from torch import nn

    from lfm.errors import LFMError
    from lfm.methods.base import Context
    from lfm.train.trainer import Trainer

    with pytest.raises(LFMError, match=r"Linear instance.*model_factory=lambda: Linear"):
        Trainer(_tiny_cfg(), _three_class_bundle(), nn.Linear(8, 3))
    b = _three_class_bundle()
    with pytest.raises(LFMError, match=r"new_model=lambda: Linear"):
        Context(b, torch.device("cpu"), nn.Linear(8, 3), None, 1, 1, lambda s: 1.0, None)


# -- 17. every method runs in float64 -------------------------------------------------------------
@pytest.fixture
def float64():
    import torch

    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("method", ["ce", "focal", "cb", "small-loss", "l2rw", "mwnet", "lfm"])
def test_every_method_runs_in_float64(method, float64):
    import math

    import torch

    from lfm.config import RunConfig
    from lfm.data.config import DataConfig
    from lfm.train.trainer import Trainer

    cfg = RunConfig(
        method=method, data=DataConfig(noise="flip:0.4"), epochs=1, max_steps=2, progress=False
    )
    trainer = Trainer(cfg)
    results = trainer.run()
    for model in trainer.method.models().values():
        assert all(p.dtype == torch.float64 for p in model.parameters())
    assert all(math.isfinite(r["val_acc"]) for r in results["last"].values())
    for name, arr in trainer.method.per_example().items():
        assert arr.dtype.kind in "fiub", name  # records stay numeric (float32 weights)


def test_l2rw_step_with_float64_inputs(float64):
    """The audit's case: float64 data and model; `last_weight` was float64, its values float32."""
    import torch
    from torch import nn

    from lfm.train.trainer import Trainer

    b = _three_class_bundle()
    b.prepare = lambda x, train: x.double()
    trainer = Trainer(_tiny_cfg("l2rw"), b, lambda: nn.Linear(8, 3))
    trainer.run()
    w = trainer.method.per_example()["weight"]
    assert torch.isfinite(torch.as_tensor(w)).sum() == 20  # two batches of 10 were weighted


# -- 15. an empty tail class caused by the validation set names --val-per-class -------------------
def test_val_per_class_that_empties_the_tail_names_the_option(capsys):
    err = one_line_error(
        ["train", "--val-per-class", "120", "--imbalance", "5", *TINY],
        capsys,
        "--val-per-class 120",
        "pass --val-per-class 117 or less",  # digits' smallest class has 122 training examples
    )
    assert "imbalance 5" in err


# -- 12 and 13. `lfm suspects` on an `lfm dr` folder, and the key each variant ranks by -----------
def _fake_dr_folder(root: Path, variant: str) -> Path:
    """An `lfm dr --out root` folder: ce/ and lfm/ runs; lfm's b ranks noise up, its a down."""
    import numpy as np

    n = 40
    noisy = np.arange(n) % 4 == 0  # 10 noisy labels
    common = {
        "index": np.arange(n),
        "origin": np.arange(n),
        "label": np.arange(n) % 3,
        "true_label": np.where(noisy, (np.arange(n) + 1) % 3, np.arange(n) % 3),
        "noisy": noisy,
    }
    for method, extra in (
        ("ce", {}),
        ("lfm", {"b": np.where(noisy, 2.0, 1.0), "a": np.where(noisy, 0.1, 0.9)}),
    ):
        d = root / method
        d.mkdir(parents=True)
        np.savez(d / "per_example.npz", **common, **extra)
        cfg = {"method": method, "method_options": {"variant": variant} if extra else {}}
        (d / "results.json").write_text(json.dumps({"config": cfg}))
    return root


def test_suspects_on_a_dr_folder_points_at_the_method_folder(tmp_path, capsys):
    root = _fake_dr_folder(tmp_path / "x", "paper")
    one_line_error(["suspects", f"{root}/", "--no-predict"], capsys, f"lfm suspects {root}/lfm")


def test_suspects_prints_paths_without_double_slashes(tmp_path, capsys):
    root = _fake_dr_folder(tmp_path / "x", "paper")
    assert main(["suspects", f"{root}/lfm/", "--no-predict"]) == 0
    out = capsys.readouterr().out
    assert "//" not in out and f"{root}/lfm/suspects.csv" in out


@pytest.mark.parametrize("variant,key", [("paper", "a"), ("a-only", "a"), ("w1-val", "b")])
def test_suspects_ranks_by_the_variants_signal(variant, key, tmp_path, capsys):
    root = _fake_dr_folder(tmp_path / "x", variant)
    assert main(["suspects", str(root / "lfm"), "--no-predict", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)["suspects"]
    assert metrics["key"] == key


def test_suspects_says_when_a_ranking_is_worse_than_chance(tmp_path, capsys):
    root = _fake_dr_folder(tmp_path / "x", "paper")
    assert main(["suspects", str(root / "lfm"), "--no-predict", "--key", "b"]) == 0
    out = capsys.readouterr().out
    warning = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "below 0.5" in warning[0] and "--key a" in warning[0], out
    assert main(["suspects", str(root / "lfm"), "--no-predict"]) == 0  # a: no warning
    assert "warning" not in capsys.readouterr().out


# -- 14. what `lfm dr` prints, help texts, one-seed tables, Ctrl-C, the genotype picture ----------
def test_dr_output_names_its_setting_and_the_learners(tmp_path, capsys):
    capsys.readouterr()
    assert main(["dr", *TINY, "--compare", "", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "setting (default): digits" in out and "noise flip:0.4" in out
    assert "imbalance 5" in out and "validation 10 per class" in out
    assert "W1: " in out and "W2: " in out


@pytest.mark.parametrize("command", ["train", "dr", "search", "evaluate", "bench", "suspects"])
def test_help_texts_show_single_percent_signs(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert "%%" not in out
    if command == "dr":
        assert "40% flip noise" in out


def test_a_single_seed_cell_has_no_spread():
    from lfm.apps.bench import markdown_tables

    row = {
        "label": "ce",
        "method": "ce",
        "learner": "model",
        "seed": 0,
        "setting": "imb1-none",
        "status": "complete",
        "test_last": 0.5,
        "test_sel": 0.5,
        "dataset": "d",
        "sec_per_iter": 0.1,
        "peak_mem_mb": 1.0,
        "peak_rss_mb": 1.0,
        "run_dir": "r",
        "error": "",
    }
    table = markdown_tables([row])
    assert "± 0.0000" not in table and "| ce | **0.5000 (1 seed)** |" in table
    assert "| ce | 0.6000 ± 0.1414 |" in markdown_tables(
        [{**row, "test_last": 0.5}, {**row, "seed": 1, "test_last": 0.7, "run_dir": "q"}]
    ).replace("**", "")


def test_ctrl_c_before_any_checkpoint_says_it_starts_over(tmp_path, capsys, monkeypatch):
    import lfm.cli.train

    def interrupted(cfg):
        if cfg.out:
            Path(cfg.out).mkdir(parents=True, exist_ok=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(lfm.cli.train, "train", interrupted)
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", *TINY, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "starts over" in err and "resume" not in err
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "ckpt-000000010.pt").write_bytes(b"")
    assert main(["train", *TINY, "--out", str(out)]) == 130
    assert "resume from the last checkpoint" in capsys.readouterr().err
    assert main(["train", *TINY]) == 130  # no --out: nothing was saved
    assert "nothing was saved" in capsys.readouterr().err


def test_genotype_picture_renders_node_names_as_math(tmp_path, monkeypatch):
    import matplotlib.axes

    from lfm.nas.genotypes import PDARTS, plot_genotype

    texts: list[str] = []
    real = matplotlib.axes.Axes.text

    def record(self, x, y, s, *args, **kwargs):
        texts.append(s)
        return real(self, x, y, s, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "text", record)
    plot_genotype(PDARTS, tmp_path / "g.png")
    assert (tmp_path / "g.png").stat().st_size > 0
    subscripted = [t for t in texts if "_{" in t]
    assert subscripted and all(t.startswith("$") and t.endswith("$") for t in subscripted)


# -- 18. `lfm search` defaults to exact mixed second derivatives; the paper presets keep fd -------
def test_search_defaults_to_exact_and_the_paper_presets_keep_fd(capsys):
    from lfm.nas.search import SEARCH_PRESETS, SearchConfig

    assert SearchConfig().backend == "exact" and SEARCH_PRESETS["tiny"].backend == "exact"
    assert SEARCH_PRESETS["darts-paper"].backend == "fd"
    assert SEARCH_PRESETS["pdarts-paper"].backend == "fd"
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    assert "exact (default" in " ".join(capsys.readouterr().out.split())


# -- 16. MW-Net's meta-net optimizer, and settings that reproduce each official script -----------
def _official_mwnet_steps(model, vnet, batches, val_batches, lr, script: str):
    """The official scripts' loop, written out (float64): a plain-SGD virtual step through
    autograd, the meta-net's optimizer step on the clean loss, then the classifier's SGD step
    (momentum 0.9, nesterov, wd 5e-4) with the updated meta-net's weights.

    `train_WRN-28-10_Meta_PGC.py` (2019): v / sum(v), meta-net SGD(1e-3, 0.9, nesterov, 5e-4).
    `MW-Net.py`: sum(cost * w) / len(cost), meta-net Adam(1e-3, weight_decay=1e-4).
    """
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call

    opt_a = torch.optim.SGD(model.parameters(), lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    if script == "2019":
        opt_c = torch.optim.SGD(
            vnet.parameters(), 1e-3, momentum=0.9, nesterov=True, weight_decay=5e-4
        )
    else:
        opt_c = torch.optim.Adam(vnet.parameters(), 1e-3, weight_decay=1e-4)

    def reduce(cost, v):
        if script == "2019":
            s = v.sum()
            return (cost * (v / s if s != 0 else v)).sum()
        return (cost * v).sum() / len(cost)

    def weights(cost):
        return torch.sigmoid(vnet(cost.detach().reshape(-1, 1))).squeeze(1)

    for (x, y), (xv, yv) in zip(batches, val_batches, strict=True):
        params = dict(model.named_parameters())
        cost = F.cross_entropy(functional_call(model, params, (x,)), y, reduction="none")
        grads = torch.autograd.grad(reduce(cost, weights(cost)), list(params.values()),
                                    create_graph=True)  # fmt: skip
        virtual = {k: p - lr * g for (k, p), g in zip(params.items(), grads, strict=True)}
        meta = F.cross_entropy(functional_call(model, virtual, (xv,)), yv)
        opt_c.zero_grad()
        meta.backward()
        opt_c.step()
        cost = F.cross_entropy(model(x), y, reduction="none")
        with torch.no_grad():
            w = weights(cost)
        opt_a.zero_grad()
        reduce(cost, w).backward()
        opt_a.step()


@pytest.mark.parametrize("preset,script", [("official-2019", "2019"), ("official-mwnet-py", "py")])
def test_mwnet_presets_reproduce_the_official_scripts(preset, script, float64):
    import copy

    import torch
    from torch import nn

    from lfm.data.types import Batch
    from lfm.methods.base import Context
    from lfm.methods.meta import MetaWeightNet
    from lfm.train.optim import OptimConfig

    bundle = _three_class_bundle()
    g = torch.Generator().manual_seed(1)
    net = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))
    steps = [torch.randperm(40, generator=g)[:10] for _ in range(3)]
    val = [torch.randperm(10, generator=g)[:5] for _ in range(3)]
    val_iter = iter([Batch(bundle.val.x[i], bundle.val.y[i], i) for i in val])
    lr = 0.1
    ctx = Context(
        bundle,
        torch.device("cpu"),
        lambda: copy.deepcopy(net),
        val_iter,
        4,
        12,
        lambda step: 1.0,
        OptimConfig("sgd", lr, 0.9, nesterov=True, weight_decay=5e-4),
        options={"preset": preset},
    )
    ours = MetaWeightNet()
    ours.setup(ctx)
    ref_model, ref_vnet = copy.deepcopy(net), copy.deepcopy(ours.wnet.net)
    for i in steps:
        ours.step(Batch(bundle.train.x[i], bundle.train.y[i], i), ctx)
    _official_mwnet_steps(
        ref_model,
        ref_vnet,
        [(bundle.train.x[i], bundle.train.y[i]) for i in steps],
        [(bundle.val.x[i], bundle.val.y[i]) for i in val],
        lr,
        script,
    )
    for a, b in zip(ours.wnet.net.parameters(), ref_vnet.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(ours.model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_mwnet_meta_optimizer_is_an_option():
    import torch

    from lfm.methods.meta import MWNET_PRESETS, WeightNet, meta_optimizer, mwnet_options

    opts = mwnet_options({"meta_optim": "sgd", "meta_momentum": "0.9", "meta_nesterov": "true"})
    opt = meta_optimizer(WeightNet().parameters(), opts)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"] is True
    assert mwnet_options({})["meta_optim"] == "adam"  # the default is unchanged
    pgc = mwnet_options({"preset": "official-2019"})
    assert {k: pgc[k] for k in MWNET_PRESETS["official-2019"]} == MWNET_PRESETS["official-2019"]
    assert mwnet_options({"preset": "official-2019", "meta_lr": 0.01})["meta_lr"] == 0.01
