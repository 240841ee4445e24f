"""The 1-D NAS-Bench-201-style cell space: its members, their strings and their networks."""

from __future__ import annotations

import pytest
import torch

from lfm.nas.space1d import EDGES, OPS_1D, CellNet1d, all_archs, arch_string, parse_arch

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_space_has_every_cell_once_and_strings_round_trip():
    archs = all_archs()
    assert len(archs) == len(OPS_1D) ** len(EDGES) == 125 and len(set(archs)) == 125
    for a in archs:
        assert arch_string(parse_arch(a)) == a
    assert parse_arch("|none~0|+|skip_connect~0|dil_conv_3x3~1|") == (
        "none",
        "skip_connect",
        "dil_conv_3x3",
    )


@pytest.mark.parametrize(
    "bad",
    ["|none~0|", "|none~0|+|none~0|", "|conv~0|+|none~0|none~1|", "|none~1|+|none~0|none~1|"],
)
def test_a_malformed_string_is_refused(bad):
    with pytest.raises(ValueError):
        parse_arch(bad)


def test_networks_run_and_their_sizes_follow_the_cell():
    """Every cell's network maps (B, 40) to (B, 10) and back-propagates; the cell's ops decide
    its size (parameter-free cells are the smallest), and edges into node 2 reach the output."""
    sizes = {}
    for a in ("|none~0|+|none~0|none~1|", "|skip_connect~0|+|avg_pool_3x3~0|skip_connect~1|",
              "|sep_conv_3x3~0|+|dil_conv_3x3~0|sep_conv_3x3~1|"):  # fmt: skip
        net = CellNet1d(a)
        x = torch.randn(4, 40)
        out = net(x)
        assert out.shape == (4, 10)
        out.sum().backward()
        sizes[a] = sum(p.numel() for p in net.parameters())
    free, pools, convs = sizes.values()
    assert free == pools < convs
    # a cell whose output node gets only `none` ignores its input: the stage adds nothing
    net = CellNet1d("|sep_conv_3x3~0|+|none~0|none~1|").eval()
    cell = net.cells[0]
    assert torch.equal(cell(torch.randn(2, 16, 40)), torch.zeros(2, 16, 40))
