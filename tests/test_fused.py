"""Fused loss and fused top-k (issue 4): against the unfused reference (layer forward + PyTorch loss on a dense
target built from the CSR, torch.topk / a stable sort of the logits), gradients, bf16 error rule, opcheck,
gradcheck, torch.compile, determinism, no [B, L] allocation, dense heads, and every argument error."""
import copy
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import torch_xmc
from conftest import has_kernel
from test_gsffi import make, reference, rel_err
from torch_xmc import GroupSharedFanIn
from torch_xmc import functional as XF

LOSS = torch.ops.torch_xmc.gsffi_fused_loss
TOPK = torch.ops.torch_xmc.gsffi_topk

# (B, H, L, F, G): L not a multiple of G, B = 1, F = H, G = 1, G wider than one label block of the CPU kernel
# (64), more rows than one row tile (256), G > L.
SHAPES = [
    (5, 33, 37, 7, 5),
    (1, 16, 10, 16, 3),
    (3, 20, 12, 4, 1),
    (7, 24, 300, 6, 150),
    (300, 32, 90, 8, 32),
    (4, 10, 6, 5, 100),
]


@pytest.fixture(autouse=True)
def _needs_fused_kernel(request):
    if "device" in request.fixturenames and request.getfixturevalue("device") != "cpu":
        if not has_kernel("torch_xmc::gsffi_fused_loss", request.getfixturevalue("device").upper()):
            pytest.skip("no fused kernels built for this device")


def random_targets(B, L, device, max_pos=6):
    """CSR targets with 0 .. max_pos positives per row (some rows empty), unsorted, with a repeated id."""
    counts = torch.randint(0, max_pos + 1, (B,))
    if B > 1:
        counts[0] = 0
    labels = [torch.randint(0, L, (int(c),)) for c in counts]
    if B > 2 and len(labels[2]):
        labels[2] = torch.cat([labels[2], labels[2][:1]])  # counts once
    indptr = torch.zeros(B + 1, dtype=torch.int64)
    indptr[1:] = torch.tensor([len(v) for v in labels], dtype=torch.int64).cumsum(0)
    flat = torch.cat(labels) if B else torch.zeros(0, dtype=torch.int64)
    return indptr.to(device), flat.to(device)


def dense_target(indptr, labels, B, L, dtype, device):
    t = torch.zeros(B, L, dtype=dtype, device=device)
    rows = torch.repeat_interleave(torch.arange(B, device=device), indptr.diff())
    t[rows, labels] = 1
    return t


def reference_loss(y, target, loss, reduction):
    """The unfused loss in PyTorch on the [B, L] logits."""
    if loss == "bce":
        total = TF.binary_cross_entropy_with_logits(y, target, reduction="sum")
    else:
        total = (1 - (2 * target - 1) * y).clamp_min(0).square().sum()
    B, L = y.shape
    return total / {"sum": 1, "batchmean": B, "mean": B * L}[reduction]


def loss_and_grads(fn, x, w, b):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    b = b.detach().requires_grad_() if b is not None else None
    out = fn(x, w, b)
    out.backward()
    return out.detach(), x.grad, w.grad, (b.grad if b is not None else None)


def fused(idx, G, indptr, labels, loss="bce", reduction="batchmean"):
    return lambda x, w, b: XF.gsffi_loss(x, w, idx, b, G, indptr, labels, loss=loss, reduction=reduction)


def unfused(idx, G, indptr, labels, loss="bce", reduction="batchmean"):
    def fn(x, w, b):
        t = dense_target(indptr, labels, x.shape[0], w.shape[0], torch.float64, x.device)
        return reference_loss(reference(x, w, idx, b, G), t, loss, reduction)
    return fn


# ---- fused loss ----

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("loss", ["bce", "squared_hinge"])
def test_loss_and_gradients_match_unfused(shape, dtype, loss, device):
    B, H, L, F, G = shape
    x, w, idx, b = make(B, H, L, F, G, device, dtype)
    indptr, labels = random_targets(B, L, device)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for reduction in ("batchmean", "mean", "sum"):
        for bias in (b, None):
            ours = loss_and_grads(fused(idx, G, indptr, labels, loss, reduction), x, w, bias)
            ref = loss_and_grads(unfused(idx, G, indptr, labels, loss, reduction), x.double(), w.double(),
                                 bias.double() if bias is not None else None)
            assert ours[0].dtype == dtype and ours[0].shape == ()
            for o, r in zip(ours, ref):
                if r is not None:
                    torch.testing.assert_close(o.double(), r, **tol)


def test_loss_with_extreme_logits(device):
    """Large |logits| (saturated sigmoid, e^-|y| underflowing) stay finite and match the reference."""
    B, H, L, F, G = 16, 24, 100, 8, 8
    x, w, idx, b = make(B, H, L, F, G, device, torch.float32)
    w = w * 20
    indptr, labels = random_targets(B, L, device)
    ours = loss_and_grads(fused(idx, G, indptr, labels), x, w, b)
    ref = loss_and_grads(unfused(idx, G, indptr, labels), x.double(), w.double(), b.double())
    for o, r in zip(ours, ref):
        assert torch.isfinite(o).all()
        torch.testing.assert_close(o.double(), r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(33, 96, 100, 24, 8), (200, 64, 70, 64, 32), (100, 80, 96, 64, 32)])
@pytest.mark.parametrize("loss", ["bce", "squared_hinge"])
def test_bfloat16_loss_within_twice_pytorch_error(shape, loss, device):
    """bf16 rule: our error against float64 is at most ~2x that of PyTorch's own bf16 computation."""
    B, H, L, F, G = shape
    x, w, idx, b = make(B, H, L, F, G, device, torch.bfloat16)
    indptr, labels = random_targets(B, L, device)
    group = torch.arange(L, device=device) // G

    def torch_bf16(x, w, b):  # the same maths in PyTorch, bf16 operands, logits and loss
        y = (x[..., idx.long()[group]] * w).sum(-1) + b
        return reference_loss(y, dense_target(indptr, labels, B, L, torch.bfloat16, device), loss, "batchmean")

    ours = loss_and_grads(fused(idx, G, indptr, labels, loss), x, w, b)
    theirs = loss_and_grads(torch_bf16, x, w, b)
    exact = loss_and_grads(unfused(idx, G, indptr, labels, loss), x.double(), w.double(), b.double())
    for o, t, r in zip(ours, theirs, exact):
        assert o.dtype == torch.bfloat16
        assert rel_err(o, r) <= 2 * rel_err(t, r) + 1e-3


def test_bfloat16_bce_small_and_large_logits_side_by_side(device):
    """bf16 BCE where 64-row slices without positives have logits far past e^z's range (std ~100: rows 0 .. 63)
    or all small (std ~0.5: rows 64 .. 127, a few positives), and a part slice (rows 128, 129). On Hopper the
    one-pass kernel takes e^z itself for a warp's logits only where all are <= 8, otherwise e^-|z|: both must
    match float64 as PyTorch's own bf16 does."""
    B, H, L, F, G = 130, 128, 2048, 64, 32
    x, w, idx, b = make(B, H, L, F, G, device, torch.bfloat16)
    w, b = w * 0.06, b * 0.1
    x[:64] *= 250
    counts = torch.cat([torch.zeros(64, dtype=torch.int64), torch.randint(0, 3, (B - 64,))])
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(device)
    labels = torch.randint(0, L, (int(counts.sum()),)).to(device)
    group = torch.arange(L, device=device) // G

    def torch_bf16(x, w, b):
        y = (x[..., idx.long()[group]] * w).sum(-1) + b
        return reference_loss(y, dense_target(indptr, labels, B, L, torch.bfloat16, device), "bce", "batchmean")

    y = reference(x.double(), w.double(), idx, b.double(), G)
    assert y[:64].abs().max() > 100 and y[64:].abs().max() < 6
    ours = loss_and_grads(fused(idx, G, indptr, labels), x, w, b)
    theirs = loss_and_grads(torch_bf16, x, w, b)
    exact = loss_and_grads(unfused(idx, G, indptr, labels), x.double(), w.double(), b.double())
    for o, t, r in zip(ours, theirs, exact):
        assert torch.isfinite(o).all()
        assert rel_err(o, r) <= 2 * rel_err(t, r) + 1e-3
    # the small half alone: its rows' input gradient is not swamped by the large half's
    assert rel_err(ours[1][64:], exact[1][64:]) <= 2 * rel_err(theirs[1][64:], exact[1][64:]) + 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss", ["bce", "squared_hinge"])
@pytest.mark.parametrize("reduction", ["batchmean", "mean"])
@pytest.mark.parametrize("F, G", [(16, 18), (128, 32), (12, 8), (64, 32)])
def test_16_bit_loss_over_label_chunks(dtype, loss, reduction, F, G, device, monkeypatch):
    """CUDA's 16-bit path runs the layer's kernels one label chunk at a time: with 1 MB chunks this shape takes
    5 chunks, the last one partial (G = 18: chunks of whole 8-label units of groups, so a row's 8 labels can
    straddle two words of the positives' mask; F = 128 with B >= 64: the grad_input kernel specialised for that
    fan-in; F = 12: the generic forward, then a separate pass for the loss gradients; F = 64, G = 32 in bf16: the
    one-pass forward, loss and weight gradient on the full chunks, B = 70 ending in a part of a 64-row slice, and
    the separate kernels on the last chunk of 48 labels). fp16 with reduction
    "mean" (scale 1 / (B L)) checks that the scaled gradients do not flush to zero."""
    if device == "cpu":
        pytest.skip("the label-chunked 16-bit path is CUDA's")
    monkeypatch.setenv("XMC_FUSED_CHUNK_MB", "1")
    B, H, L = 70, 192, 30000
    x, w, idx, b = make(B, H, L, F, G, device, dtype)
    w, b = w * 0.1, b * 0.1  # logits ~ N(0, 0.2): the summed squared hinge (~30000 per row) stays within fp16
    indptr, labels = random_targets(B, L, device, max_pos=40)
    group = torch.arange(L, device=device) // G

    def torch_16(x, w, b):  # the same maths in PyTorch in this dtype, as test_bfloat16_loss_within_twice_pytorch_error
        y = (x[..., idx.long()[group]] * w).sum(-1) + b
        return reference_loss(y.float(), dense_target(indptr, labels, B, L, torch.float32, device), loss,
                              reduction)

    ours = loss_and_grads(fused(idx, G, indptr, labels, loss, reduction), x, w, b)
    theirs = loss_and_grads(torch_16, x, w, b)
    exact = loss_and_grads(unfused(idx, G, indptr, labels, loss, reduction), x.double(), w.double(), b.double())
    for o, t, r in zip(ours, theirs, exact):
        assert o.dtype == dtype and torch.isfinite(o).all() and r.abs().max() > 0
        assert rel_err(o, r) <= 2 * rel_err(t, r) + 1e-2
    assert (ours[2] != 0).float().mean() > 0.9  # the weight gradient did not underflow


@pytest.mark.parametrize("F, G", [(16, 8), (12, 8)])
def test_16_bit_positives_do_not_leak_across_label_chunks(F, G, device, monkeypatch):
    """The positives' mask of a label chunk is not zeroed whole: each chunk first clears the words that the
    previous chunk's positives set. With thousands of positives per row over 4 chunks, every bias gradient
    (the mean over rows of sigmoid(z) - y) is checked on its own against float64: a positive left over from the
    previous chunk (a negative at the same place in the next chunk taken as a positive) would be off by 1 / B.
    F = 12: the generic forward and the separate loss-gradient pass read the same mask."""
    if device == "cpu":
        pytest.skip("the label-chunked 16-bit path is CUDA's")
    monkeypatch.setenv("XMC_FUSED_CHUNK_MB", "1")
    B, H, L = 8, 64, 200000  # 1 MB chunks: 65536 labels each
    x, w, idx, b = make(B, H, L, F, G, device, torch.bfloat16)
    indptr, labels = random_targets(B, L, device, max_pos=3000)
    ours = loss_and_grads(fused(idx, G, indptr, labels), x, w, b)[3].double()
    exact = loss_and_grads(unfused(idx, G, indptr, labels), x.double(), w.double(), b.double())[3]
    assert exact.abs().max() > 0.1
    assert (ours - exact).abs().max() <= 0.02


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("F, G", [(16, 18), (12, 8), (64, 32)])
def test_16_bit_gradients_asked_alone(dtype, F, G, device, monkeypatch):
    """Each output of the 16-bit chunked path asked alone is the one asked with the others: bitwise, but for the
    bias gradient, which comes from the weight gradient's pass, or alone from a pass of its own (the same sums in
    another order: within one rounding of the dtype). B = 200: two batch tiles of the forward, whose blocks sum
    the loss separately. F = 64, G = 32 in bf16: the one-pass forward, loss and weight gradient on the full chunks,
    whatever is asked (its summation order is its own), the separate kernels on the last chunk (a part group)."""
    if device == "cpu":
        pytest.skip("the label-chunked 16-bit path is CUDA's")
    monkeypatch.setenv("XMC_FUSED_CHUNK_MB", "4")
    B, H, L = 200, 192, 30000
    x, w, idx, b = make(B, H, L, F, G, device, dtype)
    w = w * min(1.0, (16 / F) ** 0.5)  # logits spread as at F = 16: fp16's loss (30000 labels per row) stays finite
    indptr, labels = random_targets(B, L, device, max_pos=40)
    full = LOSS(x, w, idx, b, G, indptr, labels, [True, True, True], "bce", "batchmean")
    assert all(torch.isfinite(t).all() and t.abs().max() > 0 for t in full)
    for i in range(3):
        alone = LOSS(x, w, idx, b, G, indptr, labels, [j == i for j in range(3)], "bce", "batchmean")
        assert torch.equal(alone[0], full[0])
        if i < 2:
            assert torch.equal(alone[i + 1], full[i + 1])
        else:
            ulp = torch.finfo(dtype).eps
            torch.testing.assert_close(alone[3], full[3], rtol=ulp, atol=ulp * full[3].abs().max().item())


@pytest.mark.parametrize("shape", [(3, 11, 13, 4, 3), (1, 6, 5, 6, 2), (4, 9, 70, 3, 70)])
@pytest.mark.parametrize("loss", ["bce", "squared_hinge"])
def test_gradcheck(shape, loss, device):
    B, H, L, F, G = shape
    x, w, idx, b = make(B, H, L, F, G, device)
    indptr, labels = random_targets(B, L, device, max_pos=3)
    args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_())
    assert torch.autograd.gradcheck(fused(idx, G, indptr, labels, loss, "sum"), args)


@pytest.mark.parametrize("shape", [(5, 33, 37, 7, 5), (0, 8, 9, 3, 4), (1, 16, 10, 16, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(shape, dtype, device):
    B, H, L, F, G = shape
    x, w, idx, b = make(B, H, L, F, G, device, dtype)
    indptr, labels = random_targets(B, L, device)
    for bias, mask, loss, reduction in ((b, [True, True, True], "bce", "batchmean"),
                                        (None, [True, False, False], "squared_hinge", "sum"),
                                        (b, [False, True, True], "bce", "mean"),
                                        (b, [False, False, False], "bce", "sum")):
        args = (x.detach().requires_grad_(mask[0]), w.detach().requires_grad_(mask[1]), idx,
                bias.detach().requires_grad_(mask[2]) if bias is not None else None, G, indptr, labels, mask, loss,
                reduction if B else "sum")  # the means of no terms are NaN, which opcheck compares as unequal
        torch.library.opcheck(LOSS, args)
    torch.library.opcheck(TOPK, (x, w, idx, b, G, min(3, L)))


def test_backward_scales_by_grad_output(device):
    """The op's own gradients are scaled by the incoming gradient (passed on unscaled only when it is 1)."""
    x, w, idx, b = make(5, 14, 20, 4, 6, device)
    indptr, labels = random_targets(5, 20, device)
    ours = loss_and_grads(lambda x, w, b: -2.5 * fused(idx, 6, indptr, labels)(x, w, b), x, w, b)
    ref = loss_and_grads(lambda x, w, b: -2.5 * unfused(idx, 6, indptr, labels)(x, w, b), x, w, b)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r)


def test_output_mask_skips_gradients(device):
    x, w, idx, b = make(4, 12, 10, 4, 3, device)
    indptr, labels = random_targets(4, 10, device)
    full = LOSS(x, w, idx, b, 3, indptr, labels, [True, True, True])
    loss, gx, gw, gb = LOSS(x, w, idx, b, 3, indptr, labels, [False, True, False])
    assert gx is None and gb is None and torch.equal(gw, full[2]) and torch.equal(loss, full[0])
    assert LOSS(x, w, idx, None, 3, indptr, labels, [True, True, True])[3] is None
    with torch.no_grad():  # the functional computes the loss alone when no gradient is wanted
        torch.testing.assert_close(XF.gsffi_loss(x, w.requires_grad_(), idx, b, 3, indptr, labels), full[0])


def test_empty_batch(device):
    x, w, idx, b = make(0, 8, 9, 3, 4, device, torch.float32)
    indptr, labels = torch.zeros(1, dtype=torch.int64, device=device), torch.zeros(0, dtype=torch.int64, device=device)
    loss, gx, gw, gb = LOSS(x, w, idx, b, 4, indptr, labels, [True, True, True], "bce", "sum")
    assert loss.item() == 0 and gx.shape == (0, 8) and not gw.any() and not gb.any()
    assert torch.isnan(LOSS(x, w, idx, b, 4, indptr, labels, [False] * 3, "bce", "batchmean")[0])  # 0 / 0, as torch
    s, i = TOPK(x, w, idx, b, 4, 2)
    assert s.shape == i.shape == (0, 2)


def test_repeated_and_missing_positives(device):
    """A label listed twice in a row counts once; rows without positives are all-negative rows."""
    x, w, idx, b = make(3, 12, 10, 4, 3, device)
    twice = (torch.tensor([0, 3, 3, 5], device=device), torch.tensor([4, 4, 9, 1, 1], device=device))
    once = (torch.tensor([0, 2, 2, 3], device=device), torch.tensor([4, 9, 1], device=device))
    torch.testing.assert_close(XF.gsffi_loss(x, w, idx, b, 3, *twice), XF.gsffi_loss(x, w, idx, b, 3, *once))


@pytest.mark.parametrize("B", [3, 300])
def test_loss_deterministic(B, device):
    H, L, F, G = 96, 500, 16, 8
    x, w, idx, b = make(B, H, L, F, G, device, torch.float32)
    indptr, labels = random_targets(B, L, device)
    first = loss_and_grads(fused(idx, G, indptr, labels), x, w, b)
    for _ in range(3):
        again = loss_and_grads(fused(idx, G, indptr, labels), x, w, b)
        for a, c in zip(first, again):
            assert torch.equal(a, c)


def test_loss_and_topk_do_not_depend_on_the_thread_count():
    """The loss is summed per group in label order and top-k is a total order: both are bitwise the same for any
    thread count (the input gradient is deterministic per thread count)."""
    x, w, idx, b = make(40, 64, 700, 8, 16, "cpu", torch.float32)
    indptr, labels = random_targets(40, 700, "cpu")
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append((LOSS(x, w, idx, b, 16, indptr, labels, [False, True, True]),
                            XF.gsffi_topk(x, w, idx, b, 16, 7)))
    finally:
        torch.set_num_threads(threads)
    for (loss, topk), (loss0, topk0) in zip(results[1:], results[:1] * 2):
        for a, c in zip((*loss, *topk), (*loss0, *topk0)):
            if a is not None:
                assert torch.equal(a, c)


def test_loss_under_autocast(device):
    layer = GroupSharedFanIn(32, 40, 8, 4, device=device)
    x = torch.randn(6, 32, device=device)
    indptr, labels = random_targets(6, 40, device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        loss = layer.loss(x, indptr, labels)
    assert loss.dtype == torch.bfloat16
    loss.backward()
    assert layer.weight.grad.dtype == torch.float32
    exact = unfused(layer.indices, 4, indptr, labels)(x.double(), layer.weight.detach().double(),
                                                      layer.bias.detach().double())
    assert rel_err(loss, exact) < 2e-2


def test_module_loss_and_topk_train_under_torch_compile(device):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), GroupSharedFanIn(32, 50, 8, 6)).to(device)
    indptr, labels = random_targets(9, 50, device)
    x = torch.randn(9, 24, device=device)

    def step(m, x):
        return m[2].loss(m[:2](x), indptr, labels)

    compiled = copy.deepcopy(model)
    eager_loss, comp_loss = step(model, x), torch.compile(step, fullgraph=True)(compiled, x)
    torch.testing.assert_close(comp_loss, eager_loss)
    eager_loss.backward()
    comp_loss.backward()
    for (name, p), q in zip(model.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    ref = loss_and_grads(lambda x, w, b: reference_loss(
        model[2](x), dense_target(indptr, labels, 9, 50, torch.float32, device), "bce", "batchmean"),
        model[:2](x), model[2].weight, model[2].bias)
    torch.testing.assert_close(eager_loss, ref[0])
    scores, ids = torch.compile(lambda h: model[2].topk(h, 4), fullgraph=True)(model[:2](x).detach())
    torch.testing.assert_close(scores, model[2](model[:2](x)).detach().gather(1, ids))
    assert not scores.requires_grad


# ---- fused top-k ----

def stable_topk(y, k):
    """Reference with the documented tie rule: higher score first, equal scores by lower label id."""
    s, i = torch.sort(y, dim=-1, descending=True, stable=True)
    return s[..., :k], i[..., :k]


def assert_exact_topk(x, w, idx, b, G, ks, tag):
    """gsffi_topk equals the stable top-k of the layer's own forward logits, scores and ids, for every k."""
    y = XF.group_shared_fan_in(x, w, idx, b, G).float()
    for k in ks:
        scores, ids = XF.gsffi_topk(x, w, idx, b, G, k)
        rs, ri = stable_topk(y, k)
        assert torch.equal(ids, ri), (tag, k)
        assert torch.equal(scores.float(), rs), (tag, k)


@pytest.mark.parametrize("shape", SHAPES + [(0, 8, 9, 3, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_matches_torch_topk(shape, dtype, device):
    B, H, L, F, G = shape
    x, w, idx, b = make(B, H, L, F, G, device, dtype)
    y = reference(x, w, idx, b, G)
    for k in sorted({1, min(5, L), L}):
        for bias in (b, None):
            scores, ids = XF.gsffi_topk(x, w, idx, bias, G, k)
            assert scores.shape == ids.shape == (B, k) and scores.dtype == dtype and ids.dtype == torch.int64
            ref = reference(x, w, idx, bias, G)
            rs, ri = ref.topk(k, dim=-1)
            torch.testing.assert_close(scores.double(), rs, rtol=1e-5, atol=1e-5)
            if dtype == torch.float64:
                assert torch.equal(ids, ri)
            else:  # near-ties may swap in float32: the ids must carry the reported scores
                torch.testing.assert_close(ref.gather(-1, ids), rs, rtol=1e-5, atol=1e-5)
    assert y.shape == (B, L)


def test_topk_k_100_and_leading_dims(device):
    x, w, idx, b = make(0, 48, 1000, 12, 32, device, lead=(2, 3))
    scores, ids = XF.gsffi_topk(x, w, idx, b, 32, 100)
    rs, ri = reference(x, w, idx, b, 32).topk(100, dim=-1)
    assert ids.shape == (2, 3, 100) and torch.equal(ids, ri)
    torch.testing.assert_close(scores, rs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_ties_go_to_the_lower_label_id(dtype, device):
    """Exact ties inside a group and across groups (two groups with the same inputs and weights, so they land in
    different threads' chunks): the lower label id ranks first."""
    B, H, L, F, G = 6, 16, 64, 4, 8
    x, w, idx, b = make(B, H, L, F, G, device, dtype)
    w = w.round()  # few distinct values: many ties
    w[8:16] = w[40:48]
    idx[1] = idx[5]
    b = torch.zeros_like(b)
    y = reference(x, w, idx, b, G).to(dtype)
    for k in (1, 7, 20, L):
        scores, ids = XF.gsffi_topk(x, w, idx, b, G, k)
        rs, ri = stable_topk(y, k)
        assert torch.equal(ids, ri), k
        torch.testing.assert_close(scores, rs)
    w0 = torch.zeros_like(w)  # every logit 0: ids 0 .. k-1
    assert torch.equal(XF.gsffi_topk(x, w0, idx, None, G, 10)[1], torch.arange(10, device=device).expand(B, 10))


def test_topk_bfloat16(device):
    B, H, L, F, G = 20, 64, 300, 16, 16
    x, w, idx, b = make(B, H, L, F, G, device, torch.bfloat16)
    scores, ids = XF.gsffi_topk(x, w, idx, b, G, 5)
    assert scores.dtype == torch.bfloat16
    exact = reference(x, w, idx, b, G)
    torch.testing.assert_close(scores.double(), exact.gather(1, ids), rtol=1e-2, atol=1e-2)
    assert (exact.gather(1, ids)[:, -1] >= exact.topk(5).values[:, -1] - 0.05).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_topk_over_label_chunks(dtype, device, monkeypatch):
    """CUDA's 16-bit top-k runs the layer's forward kernel one label chunk at a time (1 MB chunks: 3 here, the last
    partial; L odd, so the 16-byte loads fall back): exactly the stable top-k of that kernel's logits, whose
    16-bit values tie often, so the lower-id rule is exercised across chunks and segments."""
    if device == "cpu":
        pytest.skip("the label-chunked 16-bit path is CUDA's")
    monkeypatch.setenv("XMC_FUSED_CHUNK_MB", "1")
    for B, L, G in ((40, 30001, 24), (1, 300001, 16)):
        x, w, idx, b = make(B, 64, L, 16, G, device, dtype)
        assert_exact_topk(x, w, idx, b, G, (1, 5, 100), (B, L))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["random", "rising", "ties", "row chunks"])
@pytest.mark.parametrize("shape", [(37, 64, 500001, 16, 24), (6, 768, 140001, 64, 32)], ids=["partial", "full"])
def test_16_bit_topk_filtered(dtype, case, shape, device, monkeypatch):
    """CUDA's 16-bit top-k over many labels takes a threshold per row from the first 65536 (2048 k) labels and
    keeps only the logits at or above it: exactly the stable top-k of the forward kernel's logits. Rising logits
    (the sample's threshold is low, lists overflow) and logits that all tie take the exact pass (one cooperative
    kernel, gated on the device); with 1 MB of scratch per step the rows go in chunks. "partial": every work
    item short of labels (G = 24) and F = 16, the kernels' element-wise loads; "full": whole items and F = 64,
    their one-base loads."""
    if device == "cpu":
        pytest.skip("the filtered 16-bit top-k is CUDA's")
    if case == "row chunks":
        monkeypatch.setenv("XMC_FUSED_CHUNK_MB", "1")
    B, H, L, F, G = shape
    x, w, idx, b = make(B, H, L, F, G, device, dtype)
    if case == "rising":  # later labels score higher
        b = torch.linspace(-4, 4, L, device=device).to(dtype)
    if case == "ties":
        w, b = torch.zeros_like(w), torch.zeros_like(b)
    assert_exact_topk(x, w, idx, b, G, (1, 5, 100), case)


def test_topk_deterministic_and_nan_first(device):
    x, w, idx, b = make(50, 32, 400, 8, 16, device, torch.float32)
    first = XF.gsffi_topk(x, w, idx, b, 16, 10)
    for _ in range(3):
        again = XF.gsffi_topk(x, w, idx, b, 16, 10)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    b[123] = float("nan")
    scores, ids = XF.gsffi_topk(x, w, idx, b, 16, 3)
    assert (ids[:, 0] == 123).all() and torch.isnan(scores[:, 0]).all()  # as torch.topk


# ---- dense heads ----

@pytest.mark.parametrize("B", [7, 300])  # 300: more rows than one row tile of the CPU kernels
def test_dense_head_through_the_fused_ops(B, device):
    H, L = 20, 150
    lin = nn.Linear(H, L, device=device, dtype=torch.float64)
    x = torch.randn(B, H, device=device, dtype=torch.float64)
    indptr, labels = random_targets(B, L, device)
    t = dense_target(indptr, labels, B, L, torch.float64, device)
    for G in (XF.DENSE_GROUP_SIZE, 32, L):
        ours = loss_and_grads(lambda x, w, b: XF.linear_loss(x, w, b, indptr, labels, group_size=G), x, lin.weight,
                              lin.bias)
        ref = loss_and_grads(lambda x, w, b: TF.binary_cross_entropy_with_logits(TF.linear(x, w, b), t,
                                                                                reduction="sum") / B,
                             x, lin.weight, lin.bias)
        for o, r in zip(ours, ref):
            torch.testing.assert_close(o, r)
        scores, ids = XF.linear_topk(x, lin.weight, lin.bias, 5, group_size=G)
        rs, ri = lin(x).topk(5)
        assert torch.equal(ids, ri)
        torch.testing.assert_close(scores, rs)
    assert XF.dense_indices(H, L, 64).shape == (3, H) and XF.dense_indices(H, L).shape == (1, H)


# ---- memory: nothing proportional to B x L ----

_MEMORY_PROBE = textwrap.dedent("""
    import torch, torch_xmc
    from torch_xmc import functional as XF

    def peak_kib():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))

    torch.manual_seed(0)
    B, H, L, F, G = 256, 8, 1 << 20, 2, 256  # B x L float32 logits would be 1 GiB; weights are 8 MiB
    x = torch.randn(B, H, requires_grad=True)
    w = (torch.randn(L, F) * 0.1).requires_grad_()
    b = torch.zeros(L, requires_grad=True)
    idx = torch.randint(0, H, (L // G, F), dtype=torch.int32)
    idx[:, 1] = (idx[:, 0] + 1) % H
    indptr = torch.arange(B + 1) * 5
    labels = torch.randint(0, L, (B * 5,))
    XF.gsffi_topk(x[:2], w, idx, b, G, 5)  # load everything once
    before = peak_kib()
    XF.gsffi_loss(x, w, idx, b, G, indptr, labels).backward()
    after_loss = peak_kib()
    XF.gsffi_topk(x.detach(), w.detach(), idx, b.detach(), G, 100)
    print(before, after_loss, peak_kib())
""")


def test_fused_paths_allocate_nothing_like_b_by_l(device):
    """At B = 256, L = 2^20 the logits alone would be 1 GiB: the fused step (loss + all gradients, 3 parameter-sized
    buffers of 4-8 MiB) and top-k must raise the process's peak memory by far less."""
    if device == "cuda":
        B, H, L, F, G = 256, 8, 1 << 20, 2, 256
        x, w, idx, b = make(B, H, L, F, G, device, torch.float32)
        indptr, labels = torch.arange(B + 1, device=device) * 5, torch.randint(0, L, (B * 5,), device=device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss_and_grads(fused(idx, G, indptr, labels), x, w, b)
        XF.gsffi_topk(x, w, idx, b, G, 100)
        assert torch.cuda.max_memory_allocated() - base < 128 << 20
        return
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    before, after_loss, after_topk = (int(v) for v in out.stdout.split())
    assert after_loss - before < 128 << 10, f"fused loss raised peak RSS by {(after_loss - before) >> 10} MiB"
    assert after_topk - before < 128 << 10, f"fused top-k raised peak RSS by {(after_topk - before) >> 10} MiB"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_scratch_does_not_grow_with_the_labels(dtype, device):
    """CUDA's 16-bit path keeps one label chunk of logits in scratch (cudaMallocAsync, counted through
    torch_xmc.memory): the step's and top-k's peak memory, PyTorch's plus the scratch, must not grow from
    L = 2^20 to 2^21 labels (B = 256: the logits alone would be 512 MiB and 1 GiB)."""
    if device == "cpu":
        pytest.skip("the label-chunked 16-bit path is CUDA's")
    from torch_xmc import memory

    def peak(L):
        B, H, F, G = 256, 8, 2, 256
        x, w, idx, b = make(B, H, L, F, G, device, dtype)
        indptr, labels = torch.arange(B + 1, device=device) * 5, torch.randint(0, L, (B * 5,), device=device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        memory.reset_scratch_peak()
        base = torch.cuda.memory_allocated()
        grads = loss_and_grads(fused(idx, G, indptr, labels), x, w, b)
        XF.gsffi_topk(x, w, idx, b, G, 100)
        torch.cuda.synchronize()
        params = sum(g.numel() * g.element_size() for g in grads[1:])  # the weight and bias gradients
        return torch.cuda.max_memory_allocated() - base - params + memory.scratch_peak_bytes()

    small, large = peak(1 << 20), peak(1 << 21)
    assert 0 < large <= small * 1.1 + (4 << 20), (small >> 20, large >> 20)
    assert large < (256 << 21) * 2 // 4  # a quarter of the 1 GiB of logits


# ---- argument errors ----

def loss_error_cases(device):
    H, L, F, G = 12, 10, 4, 3
    x, w, idx, b = make(2, H, L, F, G, device, torch.float32)
    ok_ptr, ok_lab = torch.tensor([0, 2, 3]), torch.tensor([1, 9, 0])
    t = lambda v: torch.tensor(v, device=device)  # noqa: E731
    return [
        (t([0, 2, 3]), t([1, 10, 0]), {}, r"labels must lie in \[0, out_features\) = \[0, 10\), got 10 at labels\[1\]"),
        (t([0, 2, 3]), t([1, -1, 0]), {}, r"labels must lie in \[0, out_features\) = \[0, 10\), got -1 at labels\[1\]"),
        (t([0, 3, 2]), ok_lab.to(device), {},
         r"indptr must be non-decreasing, got indptr\[1\] = 3 > indptr\[2\] = 2"),
        (t([0, 2]), ok_lab.to(device), {}, r"indptr must be int64 of shape \[batch \+ 1\] = \[3\], got Long \[2\]"),
        (t([0, 2, 2]), ok_lab.to(device), {},
         r"indptr\[-1\] must equal the number of labels \(labels.numel\(\) = 3\), got 2"),
        (t([1, 2, 3]), ok_lab.to(device), {}, r"indptr\[0\] must be 0, got 1"),
        (ok_ptr.int().to(device), ok_lab.to(device), {}, r"indptr must be int64 of shape .* got Int \[3\]"),
        (ok_ptr.to(device), ok_lab.int().to(device), {}, r"labels must be a 1-D int64 tensor \[nnz\], got Int \[3\]"),
        (ok_ptr.to(device), ok_lab.to(device), {"loss": "hinge"}, r"loss must be 'bce' or 'squared_hinge', got 'hinge'"),
        (ok_ptr.to(device), ok_lab.to(device), {"reduction": "none"},
         r"reduction must be 'batchmean', 'mean' or 'sum', got 'none'"),
    ], (x, w, idx, b, G)


@pytest.mark.parametrize("case", range(10))
def test_loss_argument_errors(case, device):
    cases, (x, w, idx, b, G) = loss_error_cases(device)
    indptr, labels, kw, msg = cases[case]
    with pytest.raises(RuntimeError, match=msg):
        XF.gsffi_loss(x, w, idx, b, G, indptr, labels, **kw)


def test_layer_argument_errors_reach_the_fused_ops(device):
    x, w, idx, b = make(2, 12, 10, 4, 3, device, torch.float32)
    indptr, labels = torch.tensor([0, 1, 2], device=device), torch.tensor([0, 1], device=device)
    with pytest.raises(RuntimeError, match=r"gsffi_fused_loss: weight must have dtype Float like x, got Double"):
        LOSS(x, w.double(), idx, b, 3, indptr, labels, [True] * 3)
    with pytest.raises(RuntimeError, match=r"gsffi_fused_loss: x must be 2-D \[batch, in_features\].*got shape \[1, 2, 12\]"):
        LOSS(x[None], w, idx, b, 3, indptr, labels, [True] * 3)
    with pytest.raises(RuntimeError, match=r"gsffi_topk: bias must have shape \[10\], got \[5\]"):
        TOPK(x, w, idx, b[:5], 3, 2)
    bad = idx.clone()
    bad[1, 1] = 12
    if device == "cpu":
        with pytest.raises(RuntimeError, match=r"indices must lie in \[0, in_features\) = \[0, 12\), got 12 at indices\[1, 1\]"):
            TOPK(x, w, bad, b, 3, 2)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, in_features\) = \[0, 12\), got 12 at indices\[1, 1\]"):
        XF.gsffi_loss(x, w, bad, b, 3, indptr, labels)


@pytest.mark.parametrize("k", [0, -1, 11])
def test_topk_k_out_of_range(k, device):
    x, w, idx, b = make(2, 12, 10, 4, 3, device, torch.float32)
    with pytest.raises(RuntimeError, match=rf"k must be in \[1, out_features\] = \[1, 10\], got {k}"):
        XF.gsffi_topk(x, w, idx, b, 3, k)
