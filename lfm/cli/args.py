"""The flags shared by every training command, and how they become a RunConfig.

Precedence: built-in defaults < a command's own defaults < --config YAML < flags given.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from lfm.config import RunConfig, from_dict, load_yaml, optim_preset, parse_value
from lfm.errors import LFMError, shown

# flag dest -> (section, field) in RunConfig
_DATA = {
    "dataset": "dataset",
    "data_root": "root",
    "val_per_class": "val_per_class",
    "val_fraction": "val_fraction",
    "select_per_class": "select_per_class",
    "imbalance": "imbalance",
    "imbalance_convention": "imbalance_convention",
    "noise": "noise",
    "mnist1d_samples": "mnist1d_samples",
    "image_size": "image_size",
    "label_from": "label_from",
    "memory_budget_mb": "memory_budget_mb",
    "loader_workers": "loader_workers",
}
_OPTIM = {
    "optimizer": "optimizer",
    "lr": "lr",
    "momentum": "momentum",
    "nesterov": "nesterov",
    "weight_decay": "weight_decay",
    "schedule": "schedule",
    "milestones": "milestones",
    "gamma_lr": "gamma",
    "warmup_epochs": "warmup_epochs",
    "grad_clip": "grad_clip",
}
_TOP = (
    "method",
    "epochs",
    "batch_size",
    "seed",
    "device",
    "out",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "max_steps",
    "precision",
    "compile",
    "tensorboard",
)


def parse_options(pairs: list[str] | None, flag: str) -> dict[str, Any]:
    """KEY=VALUE pairs -> dict, with an error naming a malformed pair."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise LFMError(f"{flag} {shown(pair)} is not KEY=VALUE", f"write e.g. {flag} gamma=2")
        out[key.strip().replace("-", "_")] = parse_value(value)
    return out


def add_run_args(p: argparse.ArgumentParser, methods: list[str] | None = None) -> None:
    """Add the data, model, optimizer and run flags (default None: unset flags override nothing)."""
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help="digits (default), mnist1d, cifar10, cifar100 or imagefolder")
    g.add_argument(
        "--data-root", help="local folder holding CIFAR (python format) or an image folder"
    )
    g.add_argument(
        "--val-per-class",
        type=int,
        help="clean validation examples per class taken out of train (default 10)",
    )
    g.add_argument(
        "--val-fraction",
        type=float,
        help="instead, this random fraction of train as validation (0.5 = NAS split)",
    )
    g.add_argument(
        "--select-per-class",
        type=int,
        help="clean examples per class held out of all training, for choosing among methods "
        "(default 0: none)",
    )
    g.add_argument(
        "--imbalance",
        type=float,
        help="long-tail imbalance factor >= 1 (largest / smallest class); 1 = balanced",
    )
    g.add_argument(
        "--imbalance-convention",
        choices=["mwnet", "cb"],
        help="mwnet: largest class = per-class train size minus the meta set; cb: 5000",
    )
    g.add_argument(
        "--noise",
        help="label noise: none, uniform:P, uniform-exact:P, flip:P, flip2:P or matrix:FILE",
    )
    g.add_argument(
        "--mnist1d-samples", type=int, help="MNIST-1D examples to generate (80%% train, 20%% test)"
    )
    g.add_argument("--image-size", type=int, help="image-folder images are resized to this side")
    g.add_argument(
        "--label-from",
        choices=["folder", "filename"],
        help="image folder labels: sub-folder names, or file names' leading number (ANIMAL-10N)",
    )
    g.add_argument(
        "--memory-budget-mb",
        type=float,
        help="an image folder larger than this decoded (MiB) streams from disk (default 2048; "
        "0 = always stream)",
    )
    g.add_argument(
        "--loader-workers",
        type=int,
        help="loader processes decoding a streamed image folder (default 2; 0 = none)",
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        help="classifier, e.g. mlp, cnn, cnn1d, resnet32, wrn28_10, vgg19_bn, resnet18",
    )
    g.add_argument(
        "--model-opt",
        action="append",
        metavar="KEY=VALUE",
        help="model constructor option (repeatable)",
    )
    g.add_argument("--weights", help="local torchvision-format state dict for the ImageNet ResNets")
    g = p.add_argument_group("optimizer")
    g.add_argument("--preset", help="optimizer preset: dr-paper, darts, cpu-sgd or adam")
    g.add_argument("--optimizer", choices=["sgd", "adam"], help="optimizer of the learners")
    g.add_argument("--lr", type=float, help="initial learning rate")
    g.add_argument("--momentum", type=float, help="SGD momentum")
    g.add_argument("--nesterov", action="store_true", default=None, help="Nesterov momentum")
    g.add_argument("--weight-decay", type=float, help="L2 weight decay")
    g.add_argument(
        "--schedule", choices=["constant", "step", "cosine"], help="learning-rate schedule"
    )
    g.add_argument(
        "--milestones",
        type=lambda s: tuple(float(v) for v in s.split(",")),
        help="step schedule: epochs at which lr is multiplied by --gamma-lr, e.g. 80,90",
    )
    g.add_argument("--gamma-lr", type=float, help="step schedule factor (default 0.1)")
    g.add_argument("--warmup-epochs", type=float, help="linear learning-rate warm-up")
    g.add_argument("--grad-clip", type=float, help="clip the gradient norm of the learners")
    g = p.add_argument_group("run")
    if methods is not None:
        g.add_argument("--method", help=f"training method: {', '.join(methods)}")
    g.add_argument(
        "--opt",
        action="append",
        metavar="KEY=VALUE",
        help="method option, e.g. gamma=2 for focal, beta=0.999 for cb (repeatable)",
    )
    g.add_argument("--epochs", type=int, help="training epochs")
    g.add_argument("--batch-size", type=int, help="examples per batch (default 100)")
    g.add_argument("--seed", type=int, help="seed of splits, noise, initialisation and order")
    g.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    g.add_argument("--out", help="run folder for results.json, per-example arrays and checkpoints")
    g.add_argument(
        "--no-resume", action="store_true", help="ignore checkpoints in --out and start over"
    )
    g.add_argument("--eval-every", type=int, help="epochs between evaluations")
    g.add_argument(
        "--checkpoint-every", type=int, help="steps between checkpoints (0 = each epoch end)"
    )
    g.add_argument("--keep-checkpoints", type=int, help="how many checkpoints to keep")
    g.add_argument("--max-steps", type=int, help="stop after this many steps (smoke tests)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        help="bf16: autocast the forward passes (losses, hypergradients stay fp32; "
        "LFM's fd backend always runs in fp32)",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="torch.compile the model's forward (plain methods; a one-off compile cost)",
    )
    g.add_argument(
        "--tensorboard",
        action="store_true",
        default=None,
        help="also write metrics.jsonl's scalars as TensorBoard events in --out/tensorboard "
        '(needs pip install "lfm[tensorboard]")',
    )
    g.add_argument("--config", help="YAML file with the same settings (flags given win)")


def run_config(
    args: argparse.Namespace, defaults: dict[str, Any] | None = None, check_options: bool = True
) -> RunConfig:
    """Merge command defaults, the YAML file and the flags into a validated RunConfig.

    check_options: also check `method_options` against the method (False when they belong to
    other methods, e.g. a bench suite's base or the baselines of `lfm dr`).
    """
    tree: dict[str, Any] = {"data": {}, "model": {}, "optim": {}}
    _merge(tree, defaults or {})
    if getattr(args, "config", None):
        _merge(tree, load_yaml(args.config))
    preset = getattr(args, "preset", None) or tree.pop("preset", None)
    if preset:
        tree["optim"] = {**dataclasses.asdict(optim_preset(preset)), **tree.get("optim", {})}
    v = vars(args)
    for dest, key in _DATA.items():
        if v.get(dest) is not None:
            tree["data"][key] = v[dest]
    if v.get("val_fraction") and v.get("val_per_class") is None:
        tree["data"]["val_per_class"] = 0  # a fraction replaces the per-class meta set
    for dest, key in _OPTIM.items():
        if v.get(dest) is not None:
            tree["optim"][key] = v[dest]
    for key in _TOP:
        if v.get(key) is not None:
            tree[key] = v[key]
    if v.get("model"):
        tree["model"]["name"] = v["model"]
    if v.get("model_opt"):
        tree["model"]["kwargs"] = {
            **tree["model"].get("kwargs", {}),
            **parse_options(v["model_opt"], "--model-opt"),
        }
    if v.get("weights"):
        tree["model"]["weights"] = v["weights"]
    if v.get("opt"):
        tree["method_options"] = {
            **tree.get("method_options", {}),
            **parse_options(v["opt"], "--opt"),
        }
    if v.get("no_resume"):
        tree["resume"] = False
    if v.get("no_progress"):
        tree["progress"] = False
    if "optim" in tree and isinstance(tree["optim"].get("milestones"), list):
        tree["optim"]["milestones"] = tuple(tree["optim"]["milestones"])
    cfg = from_dict(RunConfig, tree)
    cfg.validate(options=check_options)
    return cfg


def _merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, val in src.items():
        if isinstance(val, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], val)
        else:
            dst[k] = val
