"""Grouping: frequency order, PIFA against a dense reference, balanced clusters of exactly G that recover planted
clusters, index initialisation from embedding mass, argument errors."""
import pytest
import torch

from torch_xmc import functional as XF
from torch_xmc.data import SyntheticSpec, XMCData, synthetic
from torch_xmc.grouping import balanced_order, frequency_order, indices_from_embeddings, label_order, pifa


def tiny():
    # 3 points, 4 features, 3 labels; label 2 has no points
    return XMCData(torch.tensor([0, 2, 3, 5]), torch.tensor([0, 1, 2, 0, 3]), torch.tensor([3.0, 4.0, 1.0, 1.0, 1.0]),
                   torch.tensor([0, 1, 3, 4]), torch.tensor([0, 0, 1, 1]), 4, 3)


def test_frequency_order_is_stable_descending():
    assert frequency_order(torch.tensor([1, 5, 5, 0, 2])).tolist() == [1, 2, 4, 0, 3]


def test_pifa_matches_dense_reference():
    d = tiny()
    X = torch.tensor([[3.0, 4, 0, 0], [0, 0, 1, 0], [1, 0, 0, 1]])
    X = X / X.norm(dim=1, keepdim=True)
    Y = torch.tensor([[1.0, 0, 0], [1, 1, 0], [0, 1, 0]])
    ref = Y.t() @ X
    ref = ref / ref.norm(dim=1, keepdim=True).clamp(min=1e-12)
    torch.testing.assert_close(pifa(d), ref)
    assert torch.all(pifa(d)[2] == 0)
    feats = torch.randn(3, 5)
    ref2 = Y.t() @ torch.nn.functional.normalize(feats, dim=1)
    torch.testing.assert_close(pifa(d, features=feats), torch.nn.functional.normalize(ref2, dim=1))
    # a random projection keeps the label similarities roughly
    data = synthetic(2000, SyntheticSpec(num_features=3000, num_labels=300), seed=1)
    E, P = pifa(data), pifa(data, dim=512)
    assert (E @ E.t() - P @ P.t()).abs().mean() < 0.05


@pytest.mark.parametrize("L,G", [(64, 8), (70, 8), (5, 8), (33, 1), (100, 16)])
def test_balanced_order_is_a_permutation_of_exact_groups(L, G):
    order = balanced_order(torch.randn(L, 6), G)
    assert torch.equal(order.sort().values, torch.arange(L))


def test_balanced_order_recovers_planted_clusters():
    centres = torch.nn.functional.normalize(torch.randn(8, 32), dim=1)
    truth = torch.randperm(64) % 8  # 8 clusters of 8 labels, shuffled
    emb = centres[truth] + 0.05 * torch.randn(64, 32)
    order = balanced_order(emb, 8)
    groups = truth[order].view(8, 8)
    assert all(len(set(row.tolist())) == 1 for row in groups)


def test_label_order_and_errors():
    counts = torch.tensor([3, 1, 2])
    assert label_order(counts, 2).tolist() == [0, 2, 1]
    assert sorted(label_order(counts, 2, "semantic", torch.randn(3, 4)).tolist()) == [0, 1, 2]
    with pytest.raises(ValueError, match="needs embeddings"):
        label_order(counts, 2, "semantic")
    with pytest.raises(ValueError, match="method must be"):
        label_order(counts, 2, "alphabetical")
    with pytest.raises(ValueError, match="group_size"):
        balanced_order(torch.randn(3, 2), 0)


def test_indices_from_embeddings():
    emb = torch.zeros(5, 10)
    emb[0, [7, 2]] = 1.0
    emb[1, 4] = 3.0
    emb[2, 9] = -2.0  # mass counts |value|
    idx = indices_from_embeddings(emb, 2, 3)
    XF.check_indices(idx, 10, 5, 2)
    assert idx[0].tolist() == [2, 4, 7]
    assert idx[1].tolist() == [0, 1, 9]  # one feature with mass, then the lowest ids
    assert idx[2].tolist() == [0, 1, 2]  # no mass at all
    with pytest.raises(ValueError, match="fan_in must be"):
        indices_from_embeddings(emb, 2, 11)
