"""Equations (2)-(5): x, z, a, the ablation switches and how b enters stage 1."""

from __future__ import annotations

import pytest
import torch

from lfm.reweight.function import attention, b_weights, label_match, reweight, similarity


def test_attention_rows_are_softmax_over_validation():
    e_tr, e_val = torch.randn(4, 3), torch.randn(6, 3)
    x = attention(e_tr, e_val, "dot")
    torch.testing.assert_close(x.sum(1), torch.ones(4))
    torch.testing.assert_close(x, torch.softmax(e_tr @ e_val.T, 1))


def test_similarities():
    a, b = torch.randn(3, 4), torch.randn(5, 4)
    torch.testing.assert_close(similarity(a, b, "l2"), -torch.cdist(a, b), atol=1e-5, rtol=1e-5)
    cos = torch.nn.functional.cosine_similarity(a[:, None], b[None], dim=2)
    torch.testing.assert_close(similarity(a, b, "cosine"), cos)
    with pytest.raises(ValueError):
        similarity(a, b, "nope")


def test_a_matches_equation_5_and_ablations():
    x = torch.softmax(torch.randn(4, 6), 1)
    z = label_match(torch.tensor([0, 1, 2, 0]), torch.tensor([0, 0, 1, 2, 2, 1]))
    u, r = torch.rand(6), torch.randn(6)
    a = reweight(x, z, u, r)
    torch.testing.assert_close(a, torch.sigmoid((x * z * u[None] * r[None]).sum(1)))
    torch.testing.assert_close(reweight(None, z, u, r), torch.sigmoid((z * u * r / 6).sum(1)))
    torch.testing.assert_close(reweight(x, None, u, r), torch.sigmoid((x * u * r).sum(1)))
    torch.testing.assert_close(reweight(x, z, None, r), torch.sigmoid((x * z * r).sum(1)))
    an = reweight(x, z, u, r, normalise=True)
    torch.testing.assert_close(an.mean(), torch.tensor(1.0))


def test_label_match():
    z = label_match(torch.tensor([1, 2]), torch.tensor([2, 1, 1]))
    assert z.tolist() == [[0, 1, 1], [1, 0, 0]]


def test_b_modes():
    b = torch.tensor([0.5, 1.5, 1.0])
    assert torch.equal(b_weights(b, "raw"), b)
    torch.testing.assert_close(b_weights(b, "sigmoid"), torch.sigmoid(b))
    torch.testing.assert_close(b_weights(b, "batch-normalised"), b / b.mean())
