"""Label noise: each kind hits its rate, goes where it should, and is a function of the seed."""

import math

import numpy as np
import pytest
import torch

from lfm.data import inject_noise, parse_noise, transition_matrix
from lfm.errors import LFMError

N, C = 20000, 10


@pytest.fixture(scope="module")
def y() -> torch.Tensor:
    return torch.randint(0, C, (N,), generator=torch.Generator().manual_seed(0))


def _close(rate: float, expected: float) -> bool:
    se = math.sqrt(expected * (1 - expected) / N)
    return abs(rate - expected) < 4 * se + 1e-12


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("uniform:0.4", 0.4 * (C - 1) / C),  # may land on the true class
        ("uniform:0.2", 0.2 * (C - 1) / C),
        ("flip:0.4", 0.4),
        ("flip:0.2", 0.2),
        ("flip2:0.4", 0.4),
        ("uniform-exact:0.4", 0.4),
    ],
)
def test_rate_within_sampling_error(y, spec, expected):
    yn = inject_noise(y, C, spec, seed=1)
    assert _close((yn != y).float().mean().item(), expected)


def test_flip_goes_to_next_class_only(y):
    yn = inject_noise(y, C, "flip:0.4", seed=1)
    changed = yn != y
    assert torch.equal(yn[changed], (y[changed] + 1) % C)


def test_flip2_goes_to_next_two_classes_about_evenly(y):
    yn = inject_noise(y, C, "flip2:0.4", seed=1)
    shift = ((yn - y) % C)[yn != y]
    assert set(shift.tolist()) == {1, 2}
    assert _close((shift == 1).float().mean().item(), 0.5)


def test_uniform_exact_changes_exactly_round_pn_to_other_classes(y):
    for p in (0.0, 0.37, 1.0):
        yn = inject_noise(y, C, f"uniform-exact:{p}", seed=2)
        assert int((yn != y).sum()) == round(p * N)
    other = ((yn - y) % C).bincount(minlength=C) / N  # p = 1: spread evenly over the 9 others
    assert other[0] == 0 and torch.all((other[1:] - 1 / (C - 1)).abs() < 0.01)


def test_uniform_spreads_over_all_classes(y):
    yn = inject_noise(y, C, "uniform:1.0", seed=3)
    freq = torch.bincount(yn, minlength=C).float() / N
    assert torch.all((freq - 1 / C).abs() < 0.01)


def test_seeded_pure_and_input_untouched(y):
    before = y.clone()
    a = inject_noise(y, C, "uniform:0.3", seed=5)
    assert torch.equal(a, inject_noise(y, C, "uniform:0.3", seed=5))
    assert not torch.equal(a, inject_noise(y, C, "uniform:0.3", seed=6))
    assert torch.equal(y, before)
    g = torch.Generator().manual_seed(5)
    assert torch.equal(inject_noise(y, C, "uniform:0.3", generator=g), a)


def test_none_and_zero_rate_change_nothing(y):
    for spec in ("none", "flip:0", "uniform:0.0"):
        assert torch.equal(inject_noise(y, C, spec, seed=0), y)


def test_matrix_identity_changes_nothing(y, tmp_path):
    np.save(tmp_path / "eye.npy", np.eye(C))
    assert torch.equal(inject_noise(y, C, f"matrix:{tmp_path / 'eye.npy'}", seed=0), y)


def test_matrix_empirical_transitions_match(y, tmp_path):
    m = transition_matrix("flip2:0.3", C)
    m[0] = 0.0
    m[0, 5] = 1.0  # class 0 always becomes 5
    np.savetxt(tmp_path / "t.csv", m, delimiter=",")
    spec = f"matrix:{tmp_path / 't.csv'}"
    yn = inject_noise(y, C, spec, seed=0)
    assert torch.all(yn[y == 0] == 5)
    emp = np.zeros((C, C))
    np.add.at(emp, (y.numpy(), yn.numpy()), 1)
    emp /= emp.sum(1, keepdims=True)
    assert np.abs(emp - m).max() < 0.05
    assert np.allclose(transition_matrix(spec, C), m)


@pytest.mark.parametrize("spec", ["uniform:0.4", "uniform-exact:0.4", "flip:0.4", "flip2:0.4"])
def test_transition_matrix_is_stochastic_and_matches_rates(y, spec):
    m = transition_matrix(spec, C)
    assert np.allclose(m.sum(1), 1) and (m >= 0).all()
    yn = inject_noise(y, C, spec, seed=4)
    assert _close((yn != y).float().mean().item(), 1 - np.mean(np.diag(m)))


@pytest.mark.parametrize(
    "spec, words",
    [
        ("flip:1.5", "outside [0, 1]"),
        ("uniform:-0.1", "outside [0, 1]"),
        ("flip:abc", "not a number"),
        ("flip", "cannot read noise spec"),
        ("salt:0.1", "cannot read noise spec"),
        ("matrix:/nonexistent/t.npy", "not found"),
    ],
)
def test_parse_errors(spec, words):
    with pytest.raises(LFMError, match=words.replace("[", r"\[").replace("]", r"\]")):
        parse_noise(spec)


def test_parse_round_trip():
    assert str(parse_noise("flip:0.4")) == "flip:0.4"
    assert parse_noise(" NONE ").kind == "none"
    assert parse_noise("uniform-exact:0.25").rate == 0.25


@pytest.mark.parametrize(
    "matrix, words",
    [
        (np.ones((2, 3)) / 3, "not C x C"),
        (np.array([[1.2, -0.2], [0.0, 1.0]]), "negative entry"),
        (np.array([[0.5, 0.4], [0.0, 1.0]]), "row 0 sums to"),
        (np.array([[np.nan, 1.0], [0.0, 1.0]]), "non-finite"),
    ],
)
def test_bad_matrix_files(tmp_path, matrix, words):
    np.save(tmp_path / "m.npy", matrix)
    with pytest.raises(LFMError, match=words):
        parse_noise(f"matrix:{tmp_path / 'm.npy'}")


def test_matrix_class_count_mismatch(y, tmp_path):
    np.save(tmp_path / "m.npy", np.eye(3))
    with pytest.raises(LFMError, match="3 x 3 but the data set has 10 classes"):
        inject_noise(y, C, f"matrix:{tmp_path / 'm.npy'}")


def test_labels_out_of_range():
    with pytest.raises(LFMError, match="labels must be in"):
        inject_noise(torch.tensor([0, 5]), 3, "flip:0.5")
