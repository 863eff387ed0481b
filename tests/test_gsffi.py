"""GSFFI layer: ops against a plain-PyTorch float64 reference, gradcheck, opcheck, torch.compile, the module,
determinism, and every argument error."""
import copy
import math

import pytest
import torch
from torch import nn

import torch_xmc
from torch_xmc import GroupSharedFanIn
from torch_xmc import functional as XF

OP = torch.ops.torch_xmc.gsffi_forward
BWD = torch.ops.torch_xmc.gsffi_backward

# (B, H, L, F, G): L not a multiple of G, B = 1, B = 0, F = H, G = 1, G > L, a group wider than one label
# block of the CPU kernel (128), more rows than one batch tile (64), enough rows to split by rows.
SHAPES = [
    (5, 33, 37, 7, 5),
    (1, 16, 10, 16, 3),
    (0, 8, 9, 3, 4),
    (3, 20, 12, 4, 1),
    (4, 10, 6, 5, 100),
    (70, 45, 300, 9, 150),
    (300, 64, 200, 32, 32),
]


def reference(x, weight, indices, bias, G):
    """Plain PyTorch in float64: gather each label's inputs, multiply, sum."""
    L = weight.shape[0]
    group = torch.arange(L, device=x.device) // G
    xg = x.double()[..., indices.long()[group]]  # [..., L, F]
    y = torch.einsum("...lf,lf->...l", xg, weight.double())
    return y + bias.double() if bias is not None else y


def make(B, H, L, F, G, device, dtype=torch.float64, lead=None, bias=True):
    lead = lead if lead is not None else (B,)
    x = torch.randn(*lead, H, device=device, dtype=dtype)
    w = torch.randn(L, F, device=device, dtype=dtype)
    idx = torch_xmc.random_indices(XF.num_groups(L, G), H, F).to(device)
    b = torch.randn(L, device=device, dtype=dtype) if bias else None
    return x, w, idx, b


def grads(fn, x, w, b, gy):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    b = b.detach().requires_grad_() if b is not None else None
    fn(x, w, b).backward(gy)
    return x.grad, w.grad, (b.grad if b is not None else None)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference(shape, dtype, bias, device):
    B, H, L, F, G = shape
    x, w, idx, b = make(B, H, L, F, G, device, dtype, bias=bias)
    gy = torch.randn(B, L, device=device, dtype=dtype)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    y = OP(x, w, idx, b, G)
    assert y.shape == (B, L) and y.dtype == dtype
    torch.testing.assert_close(y.double(), reference(x, w, idx, b, G), **tol)
    ours = grads(lambda x, w, b: OP(x, w, idx, b, G), x, w, b, gy)
    ref = grads(lambda x, w, b: reference(x, w, idx, b, G), x.double(), w.double(), b.double() if bias else None,
                gy.double())
    for o, r in zip(ours, ref):
        if r is not None:
            torch.testing.assert_close(o.double(), r, **tol)


def rel_err(a, ref):
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("shape", [(33, 96, 100, 24, 8), (200, 64, 70, 64, 32)])
def test_bfloat16_within_twice_pytorch_error(shape, device):
    """bf16 rule: our error against float64 is at most ~2x that of PyTorch's own bf16 computation."""
    B, H, L, F, G = shape
    x, w, idx, b = make(B, H, L, F, G, device, torch.bfloat16)
    gy = torch.randn(B, L, device=device, dtype=torch.bfloat16)
    ref = reference(x, w, idx, b, G)

    def torch_bf16(x, w, b):  # the same maths in PyTorch, bf16 operands and result
        xg = x[..., idx.long()[torch.arange(L, device=device) // G]]
        return (xg * w).sum(-1) + b

    y = OP(x, w, idx, b, G)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, ref) <= 2 * rel_err(torch_bf16(x, w, b), ref) + 1e-3
    ours = grads(lambda x, w, b: OP(x, w, idx, b, G), x, w, b, gy)
    theirs = grads(torch_bf16, x, w, b, gy)
    exact = grads(lambda x, w, b: reference(x, w, idx, b, G), x.double(), w.double(), b.double(), gy.double())
    for o, t, r in zip(ours, theirs, exact):
        assert o.dtype == torch.bfloat16
        assert rel_err(o, r) <= 2 * rel_err(t, r) + 1e-3


@pytest.mark.parametrize("shape", [(3, 11, 13, 4, 3), (1, 6, 5, 6, 2), (2, 9, 4, 3, 1)])
def test_gradcheck(shape, device):
    B, H, L, F, G = shape
    x, w, idx, b = make(B, H, L, F, G, device)
    args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_())
    assert torch.autograd.gradcheck(lambda x, w, b: OP(x, w, idx, b, G), args)


@pytest.mark.parametrize("shape", [(5, 33, 37, 7, 5), (0, 8, 9, 3, 4), (1, 16, 10, 16, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(shape, dtype, device):
    B, H, L, F, G = shape
    x, w, idx, b = make(B, H, L, F, G, device, dtype, lead=(2, B))
    for bias in (b, None):
        torch.library.opcheck(OP, (x.requires_grad_(), w.requires_grad_(), idx, bias, G))
    gy = torch.randn(2, B, L, device=device, dtype=dtype)
    for mask in ([True, True, True], [True, False, False], [False, True, True]):
        torch.library.opcheck(BWD, (gy, x.detach(), w.detach(), idx, G, mask))


def test_backward_mask_returns_none_for_unrequested(device):
    x, w, idx, b = make(3, 10, 8, 4, 3, device)
    gx, gw, gb = BWD(torch.randn(3, 8, device=device, dtype=torch.float64), x, w, idx, 3, [False, True, False])
    assert gx is None and gb is None and gw.shape == w.shape


def test_leading_dims_and_noncontiguous_inputs(device):
    H, L, F, G = 40, 30, 8, 7
    base = torch.randn(H, 6, 4, device=device, dtype=torch.float64)
    x = base.permute(1, 2, 0)  # [6, 4, H], not contiguous
    wbig = torch.randn(L, 2 * F, device=device, dtype=torch.float64)
    w = wbig[:, ::2]
    idx_t = torch_xmc.random_indices(XF.num_groups(L, G), H, F).to(device).t().contiguous().t()
    b = torch.randn(2 * L, device=device, dtype=torch.float64)[::2]
    assert not (x.is_contiguous() or w.is_contiguous() or idx_t.is_contiguous() or b.is_contiguous())
    y = OP(x, w, idx_t, b, G)
    assert y.shape == (6, 4, L)
    torch.testing.assert_close(y, reference(x, w, idx_t, b, G))
    gy = torch.randn(4, 6, L, device=device, dtype=torch.float64).transpose(0, 1)
    ours = grads(lambda x, w, b: OP(x, w, idx_t, b, G), x, w, b, gy)
    ref = grads(lambda x, w, b: reference(x, w, idx_t, b, G), x, w, b, gy)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r)


@pytest.mark.parametrize("B", [3, 700])  # the group-split and the row-split input gradient
def test_deterministic(B, device):
    H, L, F, G = 96, 500, 16, 8
    x, w, idx, b = make(B, H, L, F, G, device, torch.float32)
    gy = torch.randn(B, L, device=device)
    first = grads(lambda x, w, b: OP(x, w, idx, b, G), x, w, b, gy)
    for _ in range(3):
        again = grads(lambda x, w, b: OP(x, w, idx, b, G), x, w, b, gy)
        for a, c in zip(first, again):
            assert torch.equal(a, c)


def test_autocast_computes_in_autocast_dtype(device):
    layer = GroupSharedFanIn(32, 20, 8, 4, device=device)
    x = torch.randn(5, 32, device=device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        y = layer(x)
        ref = nn.functional.linear(x, torch.zeros(20, 32, device=device))
    assert y.dtype == ref.dtype == torch.bfloat16
    exact = reference(x, layer.weight.detach(), layer.indices, layer.bias.detach(), 4)
    assert rel_err(y, exact) < 2e-2


# ---- the module ----

def test_module_is_a_drop_in_for_linear(device):
    torch.manual_seed(0)
    layer = GroupSharedFanIn(64, 1001, 16, 32, device=device)
    assert layer.weight.shape == (1001, 16) and layer.bias.shape == (1001,)
    assert layer.indices.shape == (32, 16) and layer.indices.dtype == torch.int32
    XF.check_indices(layer.indices, 64, 1001, 32)
    assert torch.equal(layer.indices, XF.in_slot_order(layer.indices))  # canonical order
    bound = 1 / math.sqrt(16)
    assert layer.weight.abs().max() <= bound and layer.weight.std() > bound / 3
    assert "in_features=64, out_features=1001, fan_in=16, group_size=32, bias=True" in repr(layer)
    x = torch.randn(2, 3, 64, device=device)
    assert layer(x).shape == nn.Linear(64, 1001, device=device)(x).shape
    torch.manual_seed(0)
    again = GroupSharedFanIn(64, 1001, 16, 32, device=device)
    assert torch.equal(again.indices, layer.indices)  # seeded by the torch generator
    old = layer.indices.clone()
    layer.reset_parameters()
    assert not torch.equal(old, layer.indices)


def test_state_dict_round_trip_and_to(device):
    layer = GroupSharedFanIn(50, 77, 10, 6, device=device)
    other = GroupSharedFanIn(50, 77, 10, 6, device=device)
    other.load_state_dict(layer.state_dict())
    x = torch.randn(4, 50, device=device)
    assert torch.equal(layer(x), other(x))
    assert set(layer.state_dict()) == {"weight", "bias", "indices"}
    d = copy.deepcopy(layer).to(torch.float64)
    assert d.weight.dtype == torch.float64 and d.indices.dtype == torch.int32
    torch.testing.assert_close(d(x.double()), layer(x).double(), rtol=1e-5, atol=1e-5)


def test_load_state_dict_rejects_bad_indices():
    layer = GroupSharedFanIn(20, 10, 4, 3)
    sd = layer.state_dict()
    sd["indices"] = sd["indices"].clone()
    sd["indices"][1, 2] = 20
    with pytest.raises(ValueError, match=r"indices must lie in \[0, in_features\) = \[0, 20\), got 20 at indices\[1, 2\]"):
        layer.load_state_dict(sd)
    sd["indices"][1, 2] = sd["indices"][1, 0]
    with pytest.raises(ValueError, match=r"distinct within a group.*indices\[1\]"):
        layer.load_state_dict(sd)


def test_from_linear_keeps_largest_group_connections(device):
    lin = nn.Linear(30, 10, device=device)
    layer = GroupSharedFanIn.from_linear(lin, fan_in=5, group_size=4)
    w = lin.weight.detach()
    for g in range(layer.num_groups):
        rows = w[g * 4:(g + 1) * 4].abs().sum(0)
        assert set(layer.indices[g].tolist()) == set(rows.topk(5).indices.tolist())
        torch.testing.assert_close(layer.weight[g * 4:(g + 1) * 4], w[g * 4:(g + 1) * 4][:, layer.indices[g].long()])
    assert torch.equal(layer.bias, lin.bias)
    dense = GroupSharedFanIn.from_linear(lin, fan_in=30, group_size=10)  # F = H keeps everything
    x = torch.randn(7, 30, device=device)
    torch.testing.assert_close(dense(x), lin(x), rtol=1e-5, atol=1e-5)


def test_trains_under_torch_compile_fullgraph(device):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), GroupSharedFanIn(32, 50, 8, 6)).to(device)
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True, backend="inductor")
    x = torch.randn(9, 24, device=device)
    y_eager, y_comp = model(x), compiled(x)
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-5, atol=1e-5)
    y_eager.square().sum().backward()
    y_comp.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


# ---- argument errors ----

def test_module_argument_errors():
    with pytest.raises(ValueError, match="fan_in must be <= in_features = 8, got 9"):
        GroupSharedFanIn(8, 10, 9, 2)
    with pytest.raises(ValueError, match="group_size must be an int >= 1, got 0"):
        GroupSharedFanIn(8, 10, 4, 0)
    with pytest.raises(ValueError, match="out_features must be an int >= 1, got 0"):
        GroupSharedFanIn(8, 0, 4, 2)


def bad_cases(device):
    H, L, F, G = 12, 10, 4, 3
    x, w, idx, b = make(2, H, L, F, G, device, torch.float32)
    bad_idx = idx.clone()
    bad_idx[2, 1] = H
    neg_idx = idx.clone()
    neg_idx[0, 0] = -1
    return [
        ((x.long(), w, idx, b, G), r"x must be float32, bfloat16, .*got Long"),
        ((x, w.double(), idx, b, G), r"weight must have dtype Float like x, got Double"),
        ((x, w, idx, b.double(), G), r"bias must have dtype Float like x, got Double"),
        ((x, w[0], idx, b, G), r"weight must be 2-D \[out_features, fan_in\], got shape \[4\]"),
        ((x, w, idx.long(), b, G), r"indices must be int32 of shape \[ceil\(out_features / group_size\), fan_in\] = \[4, 4\], got Long \[4, 4\]"),
        ((x, w, idx[:3], b, G), r"indices must be int32 of shape .* = \[4, 4\], got Int \[3, 4\]"),
        ((x, w, idx, b[:5], G), r"bias must have shape \[10\], got \[5\]"),
        ((x, w, idx, b, 0), r"group_size must be >= 1, got 0"),
        ((x[:, :3], w, idx, b, G), r"fan_in \(weight.size\(1\) = 4\) must be <= in_features \(x.size\(-1\) = 3\)"),
        ((x, w, idx, b, 2), r"indices must be int32 of shape .* = \[5, 4\]"),
        ((x, w, bad_idx, b, G), r"indices must lie in \[0, in_features\) = \[0, 12\), got 12 at indices\[2, 1\]"),
        ((x, w, neg_idx, b, G), r"indices must lie in \[0, in_features\) = \[0, 12\), got -1 at indices\[0, 0\]"),
    ]


@pytest.mark.parametrize("case", range(12))
def test_functional_argument_errors(case, device):
    args, msg = bad_cases(device)[case]
    # through the functional API (index values checked in Python) and, where the glue checks, the raw op
    with pytest.raises((RuntimeError, ValueError), match=msg):
        XF.group_shared_fan_in(*args[:4], group_size=args[4])
    if device == "cpu":
        with pytest.raises(RuntimeError, match=msg):
            OP(*args)


def test_duplicate_indices_rejected(device):
    x, w, idx, b = make(2, 12, 10, 4, 3, device, torch.float32)
    idx[3, 2] = idx[3, 0]
    with pytest.raises(ValueError, match=rf"distinct within a group, got {int(idx[3, 0])} twice in indices\[3\]"):
        XF.group_shared_fan_in(x, w, idx, b, group_size=3)


def test_backward_argument_errors(device):
    x, w, idx, b = make(2, 12, 10, 4, 3, device, torch.float32)
    with pytest.raises(RuntimeError, match=r"grad_y must have shape \[..., out_features\] = \[2, 10\] to match x, got \[2, 9\]"):
        BWD(torch.randn(2, 9, device=device), x, w, idx, 3, [True, True, True])
    with pytest.raises(RuntimeError, match=r"grad_y must have dtype Float like x, got Double"):
        BWD(torch.randn(2, 10, device=device, dtype=torch.float64), x, w, idx, 3, [True, True, True])


def test_device_mismatch_is_an_error():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device")
    x, w, idx, b = make(2, 12, 10, 4, 3, "cpu", torch.float32)
    with pytest.raises(RuntimeError, match=r"weight must be on cpu like x, got cuda"):
        OP(x, w.cuda(), idx, b, 3)


@pytest.mark.parametrize("F", [64, 128, 32, 16, 24])
def test_slot_order(F):
    """A permutation of each row that depends only on the row's set of ids (idempotent); for F % 32 == 0 the
    8-slot gather sets hold distinct ids mod 8 wherever that is possible, and the scatter pairs differ in parity."""
    torch.manual_seed(F)
    feat = torch.rand(50, 768).topk(F, dim=1).indices
    order = XF.slot_order(feat)
    canon = feat.gather(1, order)
    assert torch.equal(canon.sort(dim=1).values, feat.sort(dim=1).values)
    shuffled = feat.gather(1, torch.rand(50, F).argsort(dim=1))
    assert torch.equal(XF.in_slot_order(shuffled), canon)
    if F % 32:
        assert torch.equal(canon, feat.sort(dim=1).values)
        return
    # balanced rows: exactly F / 8 ids of each residue mod 8
    base = torch.stack([torch.randperm(96)[: F // 8] * 8 + r for r in range(8)], dim=1).flatten()
    rows = torch.stack([base[torch.randperm(F)] for _ in range(10)])
    canon = XF.in_slot_order(rows)
    for kc in range(F // 32):
        for s in range(2):
            for b in range(2):
                slots = [32 * kc + 8 * a + 4 * s + 2 * b + e for a in range(4) for e in range(2)]
                res = canon[:, slots] % 8
                assert torch.equal(res.sort(dim=1).values, torch.arange(8).expand(10, 8))
    assert torch.all(canon[:, 0::2] % 2 != canon[:, 1::2] % 2)
