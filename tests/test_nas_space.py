"""Search space, genotypes, P-DARTS op dropping and evaluation networks."""

from __future__ import annotations

import pytest
import torch

from lfm.errors import LFMError
from lfm.nas import (
    DARTS_V1,
    DARTS_V2,
    GENOTYPES,
    PDARTS,
    PRIMITIVES,
    EvalConfig,
    Genotype,
    NetworkCIFAR,
    NetworkImageNet,
    SearchConfig,
    Supernet,
    count_params,
    cutout,
    derive_genotype,
    drop_ops,
    plot_genotype,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "shape,layers", [((1, 8, 8), 1), ((1, 8, 8), 3), ((3, 16, 16), 4), ((3, 7, 9), 2)]
)
def test_supernet_shapes(shape, layers):
    net = Supernet(4, 5, layers, shape, heads=2)
    alphas = net.new_alphas()
    assert alphas[0].shape == (14, 8) and alphas[1].shape == (14, 8)
    x = torch.randn(2, *shape)
    assert net(x, alphas).shape == (2, 5)
    f, logits = net(x, alphas, all_heads=True)
    assert f.shape == (2, net.feature_dim) and len(logits) == 2
    # alphas are not module parameters: the engine treats them as B
    assert all("alpha" not in k for k, _ in net.named_parameters())
    assert len(list(net.buffers())) == 0  # batch statistics only: a pure function


def test_supernet_rejects_1d_inputs():
    with pytest.raises(LFMError, match="reshape"):
        Supernet(4, 10, 2, (40,))


def _alpha_for(cells: dict[int, tuple[str, float]], base: float = 0.0) -> torch.Tensor:
    """(14, 8) logits with edge e's op raised to the given value."""
    a = torch.full((14, 8), base)
    for e, (op, v) in cells.items():
        a[e, PRIMITIVES.index(op)] = v
    return a


def test_derive_genotype_hand_set_alphas():
    # edges: node 2 <- {0, 1}; node 3 <- {2, 3, 4}; node 4 <- {5..8}; node 5 <- {9..13}
    an = _alpha_for({
        0: ("sep_conv_3x3", 3.0), 1: ("skip_connect", 2.0),
        2: ("none", 9.0), 3: ("dil_conv_3x3", 2.5), 4: ("max_pool_3x3", 2.6),
        6: ("sep_conv_5x5", 4.0), 8: ("avg_pool_3x3", 3.5),
        9: ("skip_connect", 1.0), 13: ("dil_conv_5x5", 2.0), 12: ("sep_conv_3x3", 1.5),
    })  # fmt: skip
    ar = _alpha_for({0: ("max_pool_3x3", 2.0), 1: ("max_pool_3x3", 1.0)})
    g = derive_genotype(an, ar)
    # `none` on edge 2 is ignored; node 3 keeps its two strongest non-none edges (4 then 3)
    assert g.normal[:4] == [
        ("sep_conv_3x3", 0), ("skip_connect", 1), ("max_pool_3x3", 2), ("dil_conv_3x3", 1),
    ]  # fmt: skip
    assert g.normal[4:6] == [("sep_conv_5x5", 1), ("avg_pool_3x3", 3)]
    assert g.normal[6:] == [("dil_conv_5x5", 4), ("sep_conv_3x3", 3)]
    assert g.reduce[:2] == [("max_pool_3x3", 0), ("max_pool_3x3", 1)]


def test_skip_connect_cap():
    # skip-connect is the strongest op on every edge: uncapped, the cell is all skips
    an = torch.zeros(14, 8)
    an[:, PRIMITIVES.index("skip_connect")] = torch.linspace(3.0, 4.0, 14)
    an[:, PRIMITIVES.index("sep_conv_3x3")] = 1.0
    ar = torch.zeros(14, 8)
    assert derive_genotype(an, ar).count("skip_connect") == 8
    g = derive_genotype(an, ar, max_skip_normal=2)
    assert g.count("skip_connect") == 2
    # the two kept skip-connects are the strongest ones (edges 12 and 13 of node 5)
    assert [e for e in g.normal[6:] if e[0] == "skip_connect"] == [("skip_connect", 4),
                                                                  ("skip_connect", 3)]  # fmt: skip
    assert derive_genotype(an, ar, max_skip_normal=0).count("skip_connect") == 0


def test_pdarts_drop_ops_keeps_largest_alphas():
    ops = [list(PRIMITIVES)] * 14
    alpha = torch.randn(14, 8, generator=torch.Generator().manual_seed(0))
    kept = drop_ops(alpha, ops, 5)
    for e in range(14):
        top = set(torch.topk(alpha[e], 5).indices.tolist())
        assert kept[e] == [PRIMITIVES[k] for k in sorted(top)]
    # second transition: 5 -> 3 over the reduced candidate lists
    alpha2 = torch.randn(14, 5, generator=torch.Generator().manual_seed(1))
    kept2 = drop_ops(alpha2, kept, 3)
    for e in range(14):
        top = torch.topk(alpha2[e], 3).indices.tolist()
        assert set(kept2[e]) == {kept[e][k] for k in top}
    # a supernet over the survivors has alphas of the new width
    net = Supernet(4, 3, 2, (1, 8, 8), normal_ops=kept2, reduce_ops=kept2)
    assert net.new_alphas()[0].shape == (14, 3)
    # never leave an edge with only `none`
    a = torch.zeros(14, 8)
    a[:, 0] = 5.0
    assert all(o != ["none"] for o in drop_ops(a, ops, 1))


def test_genotype_json_roundtrip_and_errors(tmp_path):
    p = tmp_path / "g.json"
    DARTS_V2.save(p)
    assert Genotype.load(p) == DARTS_V2
    assert Genotype.load("PDARTS") == PDARTS
    with pytest.raises(LFMError, match="not found"):
        Genotype.load(tmp_path / "missing.json")
    with pytest.raises(LFMError, match="unknown op"):
        Genotype([("conv_9x9", 0), ("skip_connect", 1)], [2], [("skip_connect", 0)] * 2, [2])
    with pytest.raises(LFMError, match="does not exist"):
        Genotype([("skip_connect", 0), ("skip_connect", 2)], [2], [("skip_connect", 0)] * 2, [2])
    plot_genotype(DARTS_V2, tmp_path / "g.png")
    assert (tmp_path / "g.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "genotype,published",
    # DARTS / P-DARTS papers: CIFAR-10 params (M), auxiliary head excluded as in their code
    [(DARTS_V1, 3.3), (DARTS_V2, 3.3), (PDARTS, 3.4)],
)
def test_published_parameter_counts(genotype, published):
    n = count_params(NetworkCIFAR(genotype, 36, 10, 20, auxiliary=True))
    assert abs(n / 1e6 - published) / published < 0.05, n
    if genotype is DARTS_V2:
        assert n == 3_349_342  # the DARTS code prints "param size = 3.349342MB"


def test_imagenet_network_shape_and_params():
    # DARTS V2 in the mobile setting: 4.7M parameters (Liu et al. 2019, Table 3)
    net = NetworkImageNet(DARTS_V2, 48, 1000, 14, auxiliary=True)
    assert abs(count_params(net) / 1e6 - 4.7) < 0.1
    net.train()
    logits, aux = net(torch.randn(2, 3, 224, 224))
    assert logits.shape == (2, 1000) and aux.shape == (2, 1000)


def test_eval_network_forward_and_aux():
    for g in GENOTYPES.values():
        net = NetworkCIFAR(g, 8, 10, 5, auxiliary=True, input_shape=(3, 32, 32))
        net.drop_path_prob = 0.2
        logits, aux = net(torch.randn(2, 3, 32, 32))
        assert logits.shape == (2, 10) and aux.shape == (2, 10)
        net.eval()
        assert net(torch.randn(2, 3, 32, 32))[1] is None
    small = NetworkCIFAR(DARTS_V2, 8, 10, 3, input_shape=(1, 8, 8))
    assert small(torch.randn(2, 1, 8, 8))[0].shape == (2, 10)


def test_cutout_zeroes_one_square():
    x = torch.ones(3, 2, 32, 32)
    y = cutout(x, 16, torch.Generator().manual_seed(0))
    zeros = (y[:, 0] == 0).sum(dim=(1, 2))
    assert ((zeros > 0) & (zeros <= 256)).all()
    assert torch.equal(y[:, 0] == 0, y[:, 1] == 0)  # same square on every channel


def test_search_config_validation_names_field():
    with pytest.raises(LFMError, match="search.backend"):
        SearchConfig(backend="magic").validate()
    with pytest.raises(LFMError, match="search.method"):
        SearchConfig(method="enas").validate()
    with pytest.raises(LFMError, match="stage_ops"):
        SearchConfig(stage_ops=(8, 9, 3)).validate()
    with pytest.raises(LFMError, match="warmup_epochs"):  # P-DARTS: warm-up must leave epochs
        SearchConfig(method="pdarts", epochs=1, warmup_epochs=1).validate()
    SearchConfig(method="darts", epochs=1, warmup_epochs=1).validate()  # DARTS has no warm-up


def test_eval_config_and_genotype_errors_name_a_fix(tmp_path):
    with pytest.raises(LFMError, match="evaluate.layers.*Fix: use a positive integer"):
        EvalConfig(layers=0).validate()
    (tmp_path / "junk.json").write_text("junk{")
    with pytest.raises(LFMError, match="not JSON.*Fix: pass a genotype.json"):
        Genotype.load(tmp_path / "junk.json")
