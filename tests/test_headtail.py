"""Head/tail module: output in the user's label order against a per-label reference, head = most frequent
labels, private feature slices, semantic tail order, state_dict round trip, gradients, errors."""
import pytest
import torch

from torch_xmc import GroupSharedFanIn
from torch_xmc.headtail import HeadTailFanIn, head_size


def reference(m, x):
    """Per user label: the dense row or the GSFFI row that holds it, in float64."""
    x = x.double()
    h0, h1 = m.head_features
    t0, t1 = m.tail_features
    out = torch.empty(*x.shape[:-1], m.out_features, dtype=torch.float64)
    for p, u in enumerate(m.label_order.tolist()):
        if p < m.head_labels:
            out[..., u] = x[..., h0:h1] @ m.head.weight[p].double() + m.head.bias[p].double()
        else:
            q = p - m.head_labels
            feats = m.tail.indices[q // m.tail.group_size].long()
            out[..., u] = x[..., t0:t1][..., feats] @ m.tail.weight[q].double() + m.tail.bias[q].double()
    return out


def test_head_size_rounds_to_groups():
    assert head_size(1000, 0.05, 16) == 48
    assert head_size(1000, 0.0, 16) == 0
    assert head_size(10, 0.9, 8) == 8
    assert head_size(4, 0.9, 8) == 0  # 0.45 groups rounds to none
    with pytest.raises(ValueError, match="head_fraction"):
        head_size(10, 1.0, 2)


@pytest.mark.parametrize("private", [False, True])
def test_matches_reference_in_user_order(private):
    counts = torch.randint(0, 50, (70,))
    kw = {"head_features": (0, 12), "tail_features": (8, 30)} if private else {}
    m = HeadTailFanIn.from_counts(counts, 30, 5, 4, head_fraction=0.1, **kw)
    assert m.head_labels == 8
    x = torch.randn(2, 3, 30)
    torch.testing.assert_close(m(x).double(), reference(m, x), rtol=1e-5, atol=1e-5)
    # the head holds the most frequent labels
    head_set = set(m.label_order[:8].tolist())
    assert min(counts[list(head_set)]) >= max(counts[[u for u in range(70) if u not in head_set]])
    if private:  # the tail never reads features 0..7, the head never 12..29
        x2 = x.clone()
        x2[..., :8] += 1.0
        tail_labels = m.label_order[8:]
        torch.testing.assert_close(m(x2)[..., tail_labels], m(x)[..., tail_labels])


def test_semantic_tail_and_index_init():
    L, H = 40, 16
    counts = torch.arange(L, 0, -1)
    emb = torch.randn(L, 6)
    idx_emb = torch.zeros(L, H)
    idx_emb[:, 3] = 1.0
    m = HeadTailFanIn.from_counts(counts, H, 4, 4, head_fraction=0.1, tail_embeddings=emb, index_embeddings=idx_emb)
    assert m.label_order[:4].tolist() == [0, 1, 2, 3]
    assert sorted(m.label_order.tolist()) == list(range(L))
    assert torch.all((m.tail.indices == 3).any(dim=1))
    x = torch.randn(5, H)
    torch.testing.assert_close(m(x).double(), reference(m, x), rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip_and_gradients():
    m = HeadTailFanIn.from_counts(torch.randint(0, 9, (50,)), 20, 4, 4, head_fraction=0.2)
    m2 = HeadTailFanIn(20, 50, 4, 4, head_labels=m.head_labels)
    m2.load_state_dict(m.state_dict())
    x = torch.randn(4, 20, requires_grad=True)
    torch.testing.assert_close(m2(x), m(x))
    m(x).sum().backward()
    assert x.grad is not None and m.head.weight.grad is not None and m.tail.weight.grad is not None
    bf = m.to(torch.bfloat16)
    assert bf.label_order.dtype == torch.int64 and bf(x.detach().bfloat16()).dtype == torch.bfloat16


def test_no_head():
    m = HeadTailFanIn(10, 12, 3, 4, head_labels=0)
    assert m.head is None and isinstance(m.tail, GroupSharedFanIn)
    x = torch.randn(2, 10)
    torch.testing.assert_close(m(x), m.tail(x))


def test_argument_errors():
    with pytest.raises(ValueError, match="head_labels must be in"):
        HeadTailFanIn(10, 12, 3, 4, head_labels=12)
    with pytest.raises(ValueError, match="tail_features must be"):
        HeadTailFanIn(10, 12, 3, 4, head_labels=4, tail_features=(5, 11))
    m = HeadTailFanIn(10, 12, 3, 4, head_labels=4)
    with pytest.raises(ValueError, match="permutation"):
        m.set_label_order(torch.zeros(12, dtype=torch.int64))


@pytest.mark.parametrize("head_fraction", [0.0, 0.15])
def test_fused_loss_and_topk_match_the_logits(head_fraction, device):
    torch.manual_seed(1)
    m = HeadTailFanIn.from_counts(torch.randint(0, 30, (60,)), 24, 6, 4, head_fraction=head_fraction,
                                  head_features=(0, 16), tail_features=(4, 24)).to(device)
    x = torch.randn(5, 24, device=device, requires_grad=True)
    indptr = torch.tensor([0, 2, 2, 5, 6, 8], device=device)
    labels = torch.tensor([3, 40, 0, 1, 59, 7, 8, 9], device=device)
    logits = m(x)
    target = torch.zeros_like(logits)
    target[torch.repeat_interleave(torch.arange(5, device=device), indptr.diff()), labels] = 1
    ref = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="sum") / 5
    ref.backward()
    ref_grads = [x.grad.clone()] + [p.grad.clone() for p in m.parameters()]
    x.grad = None
    m.zero_grad()
    fused = m.loss(x, indptr, labels)
    fused.backward()
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip([x.grad] + [p.grad for p in m.parameters()], ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    scores, ids = m.topk(x.detach(), 7)
    want = logits.detach().topk(7, dim=1)
    torch.testing.assert_close(scores, want.values, rtol=1e-5, atol=1e-5)
    assert torch.equal(ids, want.indices)


def test_order_labels_from_data():
    from torch_xmc.data import SyntheticSpec, synthetic

    data = synthetic(500, SyntheticSpec(num_features=300, num_labels=64), seed=2)
    m = HeadTailFanIn(16, 64, 4, 8, head_labels=8)
    m.order_labels(data, "frequency")
    counts = data.label_counts()
    assert torch.equal(counts[m.label_order], counts.sort(descending=True, stable=True).values)
    m.order_labels(data, "semantic")
    assert set(m.label_order[:8].tolist()) == set(counts.sort(descending=True, stable=True).indices[:8].tolist())
    assert sorted(m.label_order.tolist()) == list(range(64))
    with pytest.raises(ValueError, match="grouping must be"):
        m.order_labels(data, "random")
