"""Typed run configuration: dataclasses validated at load, YAML equal to the CLI flags.

A YAML file mirrors `RunConfig`: top-level keys are its fields, `data`, `model` and `optim`
are nested sections. Unknown keys and wrongly typed values are errors that name the field.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lfm.data.config import DataConfig
from lfm.errors import LFMError, shown
from lfm.train.optim import PRESETS as OPTIM_PRESETS
from lfm.train.optim import OptimConfig

PRECISIONS = ("fp32", "bf16")


@dataclass
class ModelConfig:
    """Which classifier the learners are."""

    name: str = "mlp"  # a registry name: `lfm train --help` lists them
    kwargs: dict[str, Any] = field(default_factory=dict)  # constructor options, e.g. hidden sizes
    weights: str | None = None  # local state-dict file (ImageNet ResNets, torchvision format)


@dataclass
class RunConfig:
    """One training run: data, model, optimizer, method, and how to run it."""

    method: str = "ce"  # a method registry name (ce, focal, cb, ce-clean, ce-all, lfm, ...)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    method_options: dict[str, Any] = field(default_factory=dict)  # e.g. {gamma: 2} for focal
    epochs: int = 30  # the digits default; the paper's DR protocols use 100
    batch_size: int = 100  # every DR protocol in the paper uses 100
    seed: int = 0  # seeds data splits, noise, initialisation and data order
    device: str = "auto"  # auto picks cuda when available
    out: str | None = None  # run folder for results and checkpoints; None keeps nothing on disk
    resume: bool = True  # continue from the newest checkpoint in `out` if there is one
    eval_every: int = 1  # epochs between evaluations (the last epoch is always evaluated)
    checkpoint_every: int = 0  # steps between checkpoints; 0 = at each epoch end only
    keep_checkpoints: int = 2  # the newest K are kept, so one can be corrupt and the other not
    max_steps: int | None = None  # stop early (smoke tests); None = run all epochs
    steps_per_epoch: int | None = None  # cap on batches per epoch (None: one pass over train)
    progress: bool = True  # a progress bar on stderr
    precision: str = "fp32"  # fp32 | bf16 (autocast around every method's forward passes)
    compile: bool = False  # torch.compile the model's forward (plain methods only)
    tensorboard: bool = False  # also write the metrics as TensorBoard events (out/tensorboard)

    def validate(self, options: bool = True) -> None:
        """Raise LFMError naming the first bad field.

        options: also parse and range-check `method_options` against the method's declared
        options (False where they are merged later, e.g. a bench suite's base run).
        """
        from lfm.methods import METHODS
        from lfm.methods.options import check_method_options
        from lfm.models import MODELS

        METHODS.get(self.method)
        if options:
            check_method_options(self.method, self.method_options)
        MODELS.get(self.model.name)
        self.data.validate()
        self.optim.validate()
        for name in ("epochs", "batch_size", "eval_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise LFMError(
                    f"{name} must be >= 1, got {getattr(self, name)}", f"pass a positive {name}"
                )
        if not 0 <= self.seed < 2**32:  # numpy's seed range; larger ones overflow torch's
            raise LFMError(f"seed must be in [0, 2**32), got {self.seed}", "pass e.g. --seed 0")
        if self.checkpoint_every < 0:
            raise LFMError("checkpoint_every must be >= 0", "use 0 for epoch ends only")
        if self.precision not in PRECISIONS:
            raise LFMError(
                f"precision must be one of {', '.join(PRECISIONS)}, got {shown(self.precision)}",
                "pass --precision fp32 or --precision bf16",
            )
        if self.max_steps is not None and self.max_steps < 1:
            raise LFMError("max_steps must be >= 1", "omit it to run all epochs")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise LFMError("steps_per_epoch must be >= 1", "omit it for one pass per epoch")


def parse_value(text: str) -> Any:
    """'3' -> 3, '0.5' -> 0.5, 'true' -> True, 'a,b' -> ['a', 'b'], else the string."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (tuple, list):
        return isinstance(value, list | tuple)
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, tp) if isinstance(tp, type) else True


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys and bad types name the field."""
    if not isinstance(data, dict):
        raise LFMError(
            f"config section {where or 'top level'!r} must be a mapping",
            "check the YAML indentation",
        )
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            home = _section_of(cls, key) if not where else None
            if home is not None:  # e.g. a top-level `lr: 0.1` that belongs under `optim:`
                raise LFMError(
                    f"config field {shown(path)} belongs under `{home}:`, not at the top level",
                    f"move it into the `{home}:` section, i.e. `{home}: {{{key}: ...}}`",
                )
            raise LFMError(
                f"unknown config field {shown(path)}",
                f"valid fields here: {', '.join(sorted(names))}",
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, path)
            continue
        if not _type_ok(value, tp):
            raise LFMError(
                f"config field {shown(path)} has the wrong type "
                f"({type(value).__name__}: {shown(value)})",
                f"give a value of type {getattr(tp, '__name__', tp)}",
            )
        if typing.get_origin(tp) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def _section_of(cls: type, key: str) -> str | None:
    """The nested section of `cls` (data, model, optim) that has a field `key`, if one does."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp) and key in {g.name for g in dataclasses.fields(tp)}:
            return f.name
    return None


def _yaml_where(e: Exception) -> str:
    """'line L, column C: ' of a YAML error (1-based, as editors count), or '' without a mark."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    if mark is None:
        return ""
    return f"line {mark.line + 1}, column {mark.column + 1}: "


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict, with errors that name the file."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise LFMError(f"config file {p} does not exist", "check the --config path")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise LFMError(
            f"config file {p} is not valid YAML at {_yaml_where(e)}{problem}",
            "fix the syntax there",
        ) from None
    except UnicodeDecodeError as e:
        raise LFMError(
            f"config file {p} is not valid YAML: not UTF-8 text ({e.reason} at byte {e.start})",
            "give a YAML text file",
        ) from None
    if not isinstance(data, dict):
        raise LFMError(
            f"config file {p} must hold a mapping at the top level", "write `key: value` lines"
        )
    sections = {"data": data, "model": data, "optim": data, "method_options": data}
    sections["kwargs"] = data.get("model") if isinstance(data.get("model"), dict) else {}
    for key, parent in sections.items():
        if key in parent and not isinstance(parent[key], dict):
            where = "model.kwargs" if key == "kwargs" else key
            raise LFMError(
                f"config section {where!r} must be a mapping, got {shown(parent[key])} (in {p})",
                "write it as indented `key: value` lines",
            )
    return data


def optim_preset(name: str) -> OptimConfig:
    """A copy of a named optimizer preset."""
    if name not in OPTIM_PRESETS:
        raise LFMError(
            f"unknown optimizer preset {shown(name)}", f"choose one of {', '.join(OPTIM_PRESETS)}"
        )
    return dataclasses.replace(OPTIM_PRESETS[name])
