"""Searches in the 1-D cell space (issue 12 items 4-7): the supernet, each method end to end in
a tiny setting, and the scores the ground-truth table gives them, on hand-made cases."""

from __future__ import annotations

import math

import pytest
import torch

from lfm.data.types import DataBundle
from lfm.errors import LFMError
from lfm.nas.search import SearchConfig, run_search
from lfm.nas.space1d import OPS_1D, all_archs, arch_string, parse_arch
from lfm.nas.space_search import (
    SPACE_METHODS,
    Found,
    base_config,
    kendall_tau,
    random_sampling,
    run_method,
    score,
    search_bundle,
)
from lfm.nas.supernet1d import Supernet1d, arch_log_prob, derive_arch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny() -> DataBundle:
    """The benchmark's data, cut to 96 training and 48 validation examples."""
    b = search_bundle("flip:0.4", seed=0)
    b.train, b.val = b.train.subset(torch.arange(96)), b.val.subset(torch.arange(48))
    return b


def _tiny_cfg(**kw) -> SearchConfig:
    return base_config(C=4, epochs=1, batch_size=16, steps_per_epoch=3, encoder_dim=8, **kw)


def fake_table(test: dict[str, float], val: dict[str, float] | None = None) -> dict:
    """A table in bench1d's format whose every cell has the given test (and val) accuracy."""
    val = val or test
    run = {"train": 1.0, "seconds": 2.0}
    seeds = {a: {"0": run | {"val": val[a], "test": test[a]}} for a in all_archs()}
    return {"entries": {a: {"params": 1, "seeds": seeds[a]} for a in all_archs()}}


# ------------------------------------------------------------------------------- the supernet


def test_path_forward_is_the_one_hot_mixture():
    """A sampled path (RSWS) computes what the mixture computes at one-hot op weights."""
    torch.manual_seed(0)
    net = Supernet1d(4, 10, 3).double()
    x = torch.randn(6, 40, dtype=torch.float64)
    path = [1, 3, 4]  # skip, sep, dil
    alpha = torch.full((3, len(OPS_1D)), -math.inf, dtype=torch.float64)
    alpha[range(3), path] = 0.0  # softmax: exactly 1 on the path's op, 0 elsewhere
    mixed = net(x, (alpha, torch.zeros(0, 5)))
    assert mixed.shape == (6, 10)
    assert torch.allclose(net(x, path=path), mixed, atol=1e-12)
    assert not torch.allclose(net(x, path=[1, 3, 2]), mixed)


def test_derive_arch_takes_argmax_and_caps_skips():
    a = torch.zeros(3, 5)
    a[0, 1], a[1, 1], a[2, 1] = 3.0, 2.0, 1.0  # all skip_connect, the last one weakest
    a[2, 4] = 0.5  # its next best: dil_conv_3x3
    ops = [list(OPS_1D)] * 3
    assert derive_arch(a, ops) == arch_string(("skip_connect",) * 3)
    capped = derive_arch(a, ops, max_skip=2)
    assert capped == arch_string(("skip_connect", "skip_connect", "dil_conv_3x3"))


def test_arch_log_prob_scores_cells_and_refuses_dropped_ops():
    a = torch.randn(3, 3)
    ops = [["none", "skip_connect", "sep_conv_3x3"]] * 3
    lp = torch.log_softmax(a, -1)
    cell = ("skip_connect", "sep_conv_3x3", "none")
    assert arch_log_prob(a, ops, cell) == pytest.approx(float(lp[0, 1] + lp[1, 2] + lp[2, 0]))
    assert arch_log_prob(a, ops, ("dil_conv_3x3", "none", "none")) == -math.inf


def test_search_config_checks_the_new_fields():
    with pytest.raises(LFMError, match="space"):
        SearchConfig(space="cell2d").validate()
    with pytest.raises(LFMError, match="lfm_form"):
        SearchConfig(lfm_form="mine").validate()
    SearchConfig(space="cell1d").validate()  # a one-stage search ignores the 8-op stage_ops
    with pytest.raises(LFMError, match="stage_ops"):
        SearchConfig("pdarts", space="cell1d").validate()  # 8 > 5 candidates


# ------------------------------------------------------------------------- searches end to end


def test_cell1d_search_moves_alpha_and_returns_its_argmax(tiny):
    cfg = _tiny_cfg(method="darts", order=2, seed=3)
    res = run_search(tiny, cfg)
    init = 1e-3 * torch.randn(3, 5, generator=torch.Generator().manual_seed(3))
    assert res.alphas[0].shape == (3, 5) and res.alphas[1].shape == (0, 5)
    assert (res.alphas[0] - init).abs().max() > 1e-3  # alpha stepped (Adam: ~lr per step)
    assert res.genotype == derive_arch(res.alphas[0], res.normal_ops)
    assert isinstance(res.history[-1]["genotype"], str)


@pytest.mark.parametrize("name", SPACE_METHODS.names())
def test_each_method_runs_end_to_end_and_returns_its_best_scored_cell(tiny, name):
    found = run_method(name, tiny, _tiny_cfg(max_skip=None))  # P-DARTS's cap may overrule
    parse_arch(found.arch)
    assert found.method == name and found.seconds > 0
    assert set(found.scores) == set(all_archs())
    # the returned cell is the method's own choice: its best-scored one (alpha or one-shot val)
    best = max(found.scores.values())
    assert found.scores[found.arch] == best
    assert len(set(found.scores.values())) > 1  # the method scored cells apart


@pytest.mark.parametrize("encoder", ["full", "shared"])
def test_lfm_authors_form_changes_the_search(tiny, encoder):
    """The switch reaches the hypergradient: the two forms end at different alphas."""
    paper = run_search(tiny, _tiny_cfg(method="lfm-darts", encoder=encoder))
    authors = run_search(tiny, _tiny_cfg(method="lfm-darts", encoder=encoder, lfm_form="authors"))
    assert not torch.allclose(paper.alphas[0], authors.alphas[0], rtol=0, atol=1e-9)


# ------------------------------------------------------------------------------------ scores


def test_kendall_tau_agrees_with_scipy_tau_b_with_ties():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (40,), generator=g).tolist()
    b = torch.randint(0, 6, (40,), generator=g).tolist()
    assert kendall_tau(a, b) == pytest.approx(stats.kendalltau(a, b).statistic, abs=1e-12)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0


def test_scores_on_a_hand_made_table():
    archs = all_archs()
    test = {a: i / 1000 for i, a in enumerate(archs)}  # the last cell is the best
    table = fake_table(test)
    cell = archs[-3]  # third best
    f = Found("m", 0, cell, 10.0, {a: -test[a] for a in archs})  # a ranking upside down
    s = score(f, table)
    assert s["test"] == pytest.approx(test[cell])
    assert s["regret"] == pytest.approx(0.002)
    assert s["rank"] == 3
    assert s["percentile"] == pytest.approx(100 * 122 / 124)
    assert s["tau"] == pytest.approx(-1.0)
    assert s["cell_trainings"] == pytest.approx(5.0)  # 10 s / 2 s per table training
    assert s["param_free"] == sum(op in ("none", "skip_connect", "avg_pool_3x3")
                                  for op in parse_arch(cell))  # fmt: skip
    assert score(Found("m", 0, archs[0], 1.0), table)["rank"] == 125
    assert math.isnan(score(Found("m", 0, archs[0], 1.0), table)["tau"])


def test_random_sampling_chooses_by_validation_not_test():
    archs = all_archs()
    test = {a: i / 1000 for i, a in enumerate(archs)}
    val = {a: -t for a, t in test.items()}  # validation prefers the worst test cell
    f = random_sampling(len(archs), seed=0, table=fake_table(test, val))
    assert f.arch == archs[0]  # best by val, worst by test
    assert f.seconds == pytest.approx(125 * 2.0)
    few = random_sampling(5, seed=1, table=fake_table(test, val))
    assert few.extra["k"] == 5
