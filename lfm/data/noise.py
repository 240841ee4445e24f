"""Synthetic label noise, injected into the training labels only.

Spec strings (``--noise``):

- ``none``
- ``uniform:P``: with probability P the label is replaced by a uniformly random class, which
  may be the true one (Meta-Weight-Net's "uniform"/"symmetric" noise; realised rate P (C-1)/C).
- ``uniform-exact:P``: exactly round(P N) labels change, each to a uniformly random *other* class.
- ``flip:P``: with probability P, y -> (y + 1) mod C (pair flip).
- ``flip2:P``: with probability P, y -> (y + 1) or (y + 2) mod C, half each.
- ``matrix:PATH``: y is redrawn from row y of a C x C row-stochastic transition matrix
  (``.npy`` or ``.csv``), T[i, j] = P(noisy = j | clean = i).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lfm.data.splits import as_labels, seeded_generator
from lfm.errors import LFMError, shown

RATE_KINDS = ("uniform", "uniform-exact", "flip", "flip2")
KINDS = ("none", *RATE_KINDS, "matrix")
_EXAMPLES = "none, uniform:0.4, uniform-exact:0.4, flip:0.4, flip2:0.4 or matrix:T.npy"


@dataclass(frozen=True)
class NoiseSpec:
    """A parsed noise spec: its kind, its rate P (rate kinds) or transition matrix (matrix)."""

    kind: str
    rate: float = 0.0
    # (C, C) float64, rows sum to 1; only for kind "matrix". Not compared: arrays have no bool ==.
    matrix: np.ndarray | None = field(default=None, compare=False, repr=False)
    path: str | None = None

    def __str__(self) -> str:
        if self.kind == "none":
            return "none"
        if self.kind == "matrix":
            return f"matrix:{self.path}"
        return f"{self.kind}:{self.rate:g}"


def parse_noise(spec: str | NoiseSpec) -> NoiseSpec:
    """Parse a ``--noise`` string; raise LFMError saying what is wrong and what is accepted.

    >>> parse_noise("flip:0.4")
    NoiseSpec(kind='flip', rate=0.4, path=None)
    """
    if isinstance(spec, NoiseSpec):
        return spec
    s = str(spec).strip()
    if s.lower() in ("none", "", "clean"):
        return NoiseSpec("none")
    kind, sep, arg = s.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS or not sep:
        raise LFMError(f"cannot read noise spec {shown(spec)}", f"use one of: {_EXAMPLES}")
    if kind == "matrix":
        path = arg.strip()
        return NoiseSpec("matrix", matrix=load_transition_matrix(path), path=path)
    try:
        rate = float(arg)
    except ValueError:
        raise LFMError(
            f"noise rate {shown(arg)} in {shown(spec)} is not a number", f"e.g. {kind}:0.4"
        ) from None
    if not 0.0 <= rate <= 1.0:
        raise LFMError(
            f"noise rate {rate} in {shown(spec)} is outside [0, 1]",
            f"give a probability, e.g. {kind}:0.4 for 40%",
        )
    return NoiseSpec(kind, rate=rate)


def load_transition_matrix(path: str) -> np.ndarray:
    """Read and check a C x C row-stochastic matrix from a .npy or .csv file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise LFMError(
            f"noise matrix file {shown(str(p))} not found", "pass matrix:PATH to a .npy/.csv"
        )
    try:
        if p.suffix.lower() == ".npy":
            m = np.load(p, allow_pickle=False)  # no pickles: a matrix file must not run code
        elif p.suffix.lower() == ".csv":
            m = np.loadtxt(p, delimiter=",", ndmin=2)
        else:
            raise LFMError(f"noise matrix file {str(p)!r} is neither .npy nor .csv", "save it so")
    except LFMError:
        raise
    except (ValueError, OSError) as e:
        raise LFMError(f"cannot read noise matrix {str(p)!r}: {e}", "save a C x C array") from None
    return check_transition_matrix(np.asarray(m, dtype=np.float64), str(p))


def check_transition_matrix(m: np.ndarray, name: str = "noise matrix") -> np.ndarray:
    """Return `m` if it is square, finite, non-negative, with rows summing to 1; else LFMError."""
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 1:
        raise LFMError(f"{name} has shape {m.shape}, not C x C", "give one row per clean class")
    if not np.all(np.isfinite(m)):
        raise LFMError(f"{name} has non-finite entries", "use probabilities in [0, 1]")
    if np.any(m < 0):
        i, j = np.argwhere(m < 0)[0]
        raise LFMError(f"{name} has a negative entry at [{i}, {j}]: {m[i, j]}", "use p >= 0")
    sums = m.sum(1)
    bad = np.flatnonzero(np.abs(sums - 1.0) > 1e-4)  # loose: a .csv holds rounded decimals
    if len(bad):
        raise LFMError(
            f"{name} row {bad[0]} sums to {sums[bad[0]]:.6f}, not 1",
            "make every row a probability distribution over noisy labels",
        )
    return m / sums[:, None]


def transition_matrix(spec: str | NoiseSpec, num_classes: int) -> np.ndarray:
    """The expected C x C transition matrix T[clean, noisy] of a spec."""
    s, c = parse_noise(spec), num_classes
    eye, p = np.eye(c), s.rate
    if s.kind == "none":
        return eye
    if s.kind == "uniform":
        return (1 - p) * eye + p / c
    if s.kind == "uniform-exact":
        return eye if c == 1 else (1 - p) * eye + p / (c - 1) * (1 - eye)
    if s.kind == "flip":
        return (1 - p) * eye + p * np.roll(eye, 1, axis=1)
    if s.kind == "flip2":
        return (1 - p) * eye + p / 2 * (np.roll(eye, 1, axis=1) + np.roll(eye, 2, axis=1))
    _check_classes(s, c)
    return s.matrix.copy()


def inject_noise(
    y: torch.Tensor | np.ndarray,
    num_classes: int,
    spec: str | NoiseSpec,
    seed: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return noisy copies of labels `y` (int64 CPU tensor); `y` itself is not changed.

    Parameters
    ----------
    y : (N,) clean integer labels in [0, num_classes).
    num_classes : C.
    spec : a noise spec string (see the module docstring) or a parsed NoiseSpec.
    seed : seeds a private generator, so the draw is a pure function of (y, spec, seed).
    generator : use this CPU generator instead of `seed` (advances its state).

    Example
    -------
    >>> y_noisy = inject_noise(torch.tensor([0, 1, 2, 3]), 4, "flip:1.0")  # -> [1, 2, 3, 0]
    """
    s = parse_noise(spec)
    y = as_labels(y)
    c, n = int(num_classes), len(y)
    if n and (int(y.min()) < 0 or int(y.max()) >= c):
        raise LFMError(f"labels must be in [0, {c}), got range [{int(y.min())}, {int(y.max())}]")
    g = generator if generator is not None else seeded_generator(seed)
    if s.kind == "none" or n == 0 or (s.kind != "matrix" and s.rate == 0.0):
        return y.clone()
    if s.kind in ("flip", "uniform-exact") and c < 2 or s.kind == "flip2" and c < 3:
        raise LFMError(f"{s.kind} noise needs more classes than {c}", "use uniform:P or none")
    if s.kind == "uniform":
        hit = torch.rand(n, generator=g) < s.rate
        return torch.where(hit, torch.randint(0, c, (n,), generator=g), y)
    if s.kind == "uniform-exact":
        hit = torch.zeros(n, dtype=torch.bool)
        hit[torch.randperm(n, generator=g)[: int(round(s.rate * n))]] = True
        shift = torch.randint(1, c, (n,), generator=g)  # 1..C-1: never back to the true class
        return torch.where(hit, (y + shift) % c, y)
    if s.kind == "flip":
        hit = torch.rand(n, generator=g) < s.rate
        return torch.where(hit, (y + 1) % c, y)
    if s.kind == "flip2":
        hit = torch.rand(n, generator=g) < s.rate
        shift = 1 + (torch.rand(n, generator=g) < 0.5).long()
        return torch.where(hit, (y + shift) % c, y)
    _check_classes(s, c)
    rows = torch.as_tensor(s.matrix, dtype=torch.float64)[y]  # (N, C)
    return torch.multinomial(rows, 1, generator=g).flatten()


def _check_classes(s: NoiseSpec, c: int) -> None:
    if s.matrix.shape[0] != c:
        k = s.matrix.shape[0]
        raise LFMError(
            f"noise matrix {s.path!r} is {k} x {k} but the data set has {c} classes",
            f"give a {c} x {c} matrix",
        )
