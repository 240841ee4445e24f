"""Flags shared by `lfm search` and `lfm evaluate`: data, a preset, and its overrides."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from lfm.cli.args import parse_options
from lfm.config import from_dict, load_yaml
from lfm.data.config import DataConfig
from lfm.errors import LFMError


def add_data_args(p: argparse.ArgumentParser) -> None:
    """Data flags; the NAS default is the paper's split: half of train as validation."""
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset", default="digits", help="digits (default), cifar10, cifar100, imagefolder"
    )
    g.add_argument(
        "--data-root", help="local folder holding CIFAR (python format) or an image folder"
    )
    g.add_argument(
        "--val-fraction",
        type=float,
        default=0.5,
        help="fraction of train used as validation (default 0.5, the paper's NAS split)",
    )
    g.add_argument(
        "--seed", type=int, default=0, help="seed of the split, initialisation and order"
    )
    g.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """The Trainer's run flags that a search and an evaluation take as `lfm dr` does."""
    p.add_argument("--max-steps", type=int, help="stop after this many steps (smoke tests)")
    p.add_argument(
        "--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: epoch ends)"
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="bf16: autocast the forward passes (exact mixed derivatives stay fp32)",
    )
    p.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write metrics.jsonl's scalars as TensorBoard events in --out/tensorboard",
    )


def run_flags(args: argparse.Namespace) -> dict[str, Any]:
    """`add_run_flags`'s values as RunConfig fields."""
    return {
        "max_steps": args.max_steps,
        "checkpoint_every": args.checkpoint_every,
        "precision": args.precision,
        "tensorboard": args.tensorboard,
    }


def add_resume_arg(p: argparse.ArgumentParser) -> None:
    """--no-resume: start over even when --out holds a checkpoint of the same command."""
    p.add_argument(
        "--no-resume",
        action="store_true",
        help="ignore checkpoints in --out and start over (default: continue from the newest)",
    )


def data_config(args: argparse.Namespace) -> DataConfig:
    """The DataConfig of a NAS command."""
    cfg = DataConfig(
        dataset=args.dataset,
        root=args.data_root,
        val_per_class=0,
        val_fraction=args.val_fraction,
        seed=args.seed,
    )
    cfg.validate()
    return cfg


def config_with_overrides(
    cls: type, base: Any, args: argparse.Namespace, section: str, flags: dict[str, str]
) -> Any:
    """`base` (a preset) updated from --config's `section`, the named flags, then --set pairs."""
    tree = dataclasses.asdict(base)
    if getattr(args, "config", None):
        data = load_yaml(args.config)
        unknown = set(data) - {section}
        if unknown:
            raise LFMError(
                f"unknown config section(s) {sorted(unknown)}", f"put settings under `{section}:`"
            )
        tree.update(data.get(section) or {})
    for dest, key in flags.items():
        if getattr(args, dest, None) is not None:
            tree[key] = getattr(args, dest)
    tree.update(parse_options(getattr(args, "set", None), "--set"))
    hints = typing.get_type_hints(cls)
    for k, v in tree.items():  # JSON-like lists back to the tuples the dataclass declares
        if isinstance(v, list) and typing.get_origin(hints.get(k)) is tuple:
            tree[k] = tuple(v)
    cfg = from_dict(cls, tree, section)
    cfg.validate()
    return cfg
