"""Method options (`--opt KEY=VALUE`, YAML `method_options`): declared once, parsed by one function.

Every method declares its options as `Opt` specs (type, range, default). `check_options` parses
each given value by its spec (a command-line string or a YAML value alike) and range-checks it,
so `gamma=two`, `gamma=-3` and `b_lr=abc` all stop before any data is loaded, with one line that
says what the option wants. The methods call the same function in `setup`, so the Python API
gets the same checks as the command line.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lfm.errors import LFMError, shown

KINDS = ("float", "int", "bool", "choice", "str")
_TRUE = ("true", "yes", "1", "on")
_FALSE = ("false", "no", "0", "off")


@dataclass(frozen=True)
class Opt:
    """One option: its kind, default and allowed range (a closed or open interval, or choices)."""

    kind: str  # float | int | bool | choice | str
    default: Any
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple[str, ...] = ()  # kind "choice": the allowed names
    words: tuple[str, ...] = ()  # literal words also accepted by a number, e.g. "auto"
    none_ok: bool = False  # "none" / null is a valid value (an unset optional)

    def wants(self) -> str:
        """What a valid value is, in words, e.g. "a number > 0" or "one of adam, sgd"."""
        if self.kind == "bool":
            text = "true or false"
        elif self.kind == "choice":
            text = "one of " + ", ".join(self.choices)
        elif self.kind == "str":
            text = "a name or path"
        else:
            noun = "a number" if self.kind == "float" else "a whole number"
            text = noun + self._range()
        extra = list(self.words) + (["none"] if self.none_ok else [])
        return text + "".join(f" or {w}" for w in extra)

    def _range(self) -> str:
        lo, hi = self.lo, self.hi
        if lo is not None and hi is not None:
            left = "(" if self.lo_open else "["
            right = ")" if self.hi_open else "]"
            return f" in {left}{lo:g}, {hi:g}{right}"
        if lo is not None:
            return f" {'>' if self.lo_open else '>='} {lo:g}"
        if hi is not None:
            return f" {'<' if self.hi_open else '<='} {hi:g}"
        return ""

    def parse(self, value: Any) -> Any:
        """`value` (a string from the command line, or a YAML value) as this option's type.

        Raises ValueError with no message when it is not one; `check_options` words the error.
        """
        if isinstance(value, str):
            text = value.strip()
            if self.none_ok and text.lower() in ("none", "null", ""):
                return None
            if text in self.words:
                return text
        elif value is None and self.none_ok:
            return None
        if self.kind == "bool":
            return self._bool(value)
        if self.kind == "choice":
            if value not in self.choices:
                raise ValueError
            return value
        if self.kind == "str":
            if not isinstance(value, str):
                raise ValueError
            return value
        number = self._number(value)
        if not self._in_range(number):
            raise ValueError
        return number

    @staticmethod
    def _bool(value: Any) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError

    def _number(self, value: Any) -> float | int:
        # bool is an int in python, but `gamma=true` is a typo, not the number 1.
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError
        # YAML reads "1e-3" as a string (YAML 1.1 wants a dot), so strings are parsed here.
        number = float(value) if isinstance(value, str) else value
        if not math.isfinite(number):
            raise ValueError
        if self.kind == "int":
            if number != int(number):
                raise ValueError
            return int(number)
        return float(number)

    def _in_range(self, v: float) -> bool:
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))


def check_options(
    method: str, given: dict[str, Any], specs: dict[str, Opt], fill: bool = True
) -> dict[str, Any]:
    """The options of `method`: `given`, each parsed and checked, over the defaults (`fill`).

    Parameters
    ----------
    method : str
        The method's name, for the message.
    given : dict
        Options as the user gave them (strings from ``--opt``, or YAML values).
    specs : dict[str, Opt]
        Every valid option of the method.
    fill : bool
        Fill in the defaults of options not given (False: the parsed `given` alone).

    Returns
    -------
    dict
        The options, typed.

    Raises
    ------
    LFMError
        One line: an unknown key (listing the valid ones), or a value of the wrong type or out
        of range (saying what the option wants, and its default).

    Example
    -------
    >>> check_options("focal", {"gamma": "0.5"}, {"gamma": Opt("float", 2.0, lo=0)})
    {'gamma': 0.5}
    """
    unknown = sorted(set(given) - set(specs))
    if unknown:
        valid = ", ".join(f"{k}={v.default}" for k, v in specs.items()) or "none"
        raise LFMError(
            f"method {method!r} got unknown option(s) {shown(', '.join(unknown))}",
            f"its options (with defaults) are: {valid}",
        )
    out = {k: spec.default for k, spec in specs.items()} if fill else {}
    for key, value in given.items():
        spec = specs[key]
        try:
            out[key] = spec.parse(value)
        except (ValueError, TypeError, OverflowError):
            raise LFMError(
                f"method {method!r}: option {key}={shown(value)} is not {spec.wants()}",
                f"pass --opt {key}=VALUE with VALUE {spec.wants()} (default {spec.default})",
            ) from None
    return out


# method name -> its option specs; each method module files its own (see `register_options`)
OPTIONS: dict[str, dict[str, Opt]] = {}


def register_options(name: str, specs: dict[str, Opt]) -> None:
    """File the option specs of method `name` (called next to `METHODS.register`)."""
    OPTIONS[name] = specs


def check_method_options(method: str, given: dict[str, Any] | None) -> Any:
    """Parse and check the options of registered method `method` (the CLI's early check).

    A method whose options are more than independent values (`lfm`: a preset, then fields)
    files its own checker in `METHOD_CHECKS`; the others are checked against `OPTIONS`.
    """
    import lfm.methods  # noqa: F401 - every method module registers its options on import

    if method in METHOD_CHECKS:
        return METHOD_CHECKS[method](dict(given or {}))
    return check_options(method, dict(given or {}), OPTIONS.get(method, {}))


# method name -> a function from the given options to the parsed, checked ones
METHOD_CHECKS: dict[str, Callable[[dict[str, Any]], Any]] = {}
