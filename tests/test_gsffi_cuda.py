"""CUDA-only checks of the GSFFI kernels: the tensor-core paths (bf16/fp16) against a float64 reference on shapes
that reach each variant, bitwise determinism, every output element written, and misaligned inputs (fallbacks).
Skipped where torch has no GPU or the CUDA kernels were not built."""
import pytest
import torch

import torch_xmc
from torch_xmc import functional as XF

OP = torch.ops.torch_xmc.gsffi_forward
BWD = torch.ops.torch_xmc.gsffi_backward

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key("torch_xmc::gsffi_forward",
                                                                                       "CUDA")),
    reason="needs a GPU and the CUDA kernels",
)

# (B, H, L, F, G): every fast-path template (G 8/16/32/64/128, F 8..256), L not a multiple of G, B = 1,
# B beyond one batch tile (128 rows), H too large for the shared-memory tile (generic path), odd G; grad_input
# in quads (B = 17, 77, 64; 70 with two ring stages), in quads with three or more half-group ring stages (G =
# 64, 104, 48 at H = 740, 700, 768, the last group's second half part-filled), in pairs of 16 or 48 rows (B = 1,
# 33, 40, 129) and of 64 rows without the grad_y ring (257). The forward's plain logits at F <= 64 run 640-thread
# blocks, except where their staging does not fit beside the x^T tile (H = 820 at 128 rows: 512 threads).
SHAPES = [
    (200, 820, 1500, 64, 32),
    (70, 740, 1000, 128, 64),
    (65, 700, 1000, 64, 104),
    (64, 768, 1000, 72, 48),
    (1, 768, 1000, 64, 32),
    (77, 768, 4008, 64, 32),
    (17, 768, 4099, 64, 32),
    (130, 96, 999, 24, 8),
    (64, 768, 3000, 64, 16),
    (257, 768, 5003, 128, 64),
    (70, 768, 1200, 128, 32),
    (100, 512, 2000, 256, 8),
    (40, 300, 1001, 8, 128),
    (129, 1000, 2048, 96, 40),
    (33, 200, 777, 40, 12),
    (300, 9000, 300, 64, 32),
    (9, 64, 50, 64, 7),
]
# Relative error (norm) against float64 that each dtype's rounding of the outputs allows.
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}


def reference(x, w, idx, b, G):
    L = w.shape[0]
    xg = x.double()[:, idx.long()[torch.arange(L, device=x.device) // G]]
    y = torch.einsum("blf,lf->bl", xg, w.double())
    return y + b.double() if b is not None else y


def ref_grads(x, w, idx, b, G, gy):
    x, w, b = (t.double().requires_grad_() for t in (x, w, b))
    reference(x, w, idx, b, G).backward(gy.double())
    return x.grad, w.grad, b.grad


def rel(a, r):
    return ((a.double() - r).norm() / r.norm().clamp_min(1e-30)).item()


def make(B, H, L, F, G, dtype):
    x = torch.randn(B, H, device="cuda", dtype=dtype)
    w = torch.randn(L, F, device="cuda", dtype=dtype)
    idx = torch_xmc.random_indices(XF.num_groups(L, G), H, F).cuda()
    b = torch.randn(L, device="cuda", dtype=dtype)
    return x, w, idx, b


def poison_next_allocation(n_bytes):
    torch.full((n_bytes // 4 + 1024,), float("nan"), device="cuda")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_matches_float64_reference(shape, dtype):
    B, H, L, F, G = shape
    x, w, idx, b = make(B, H, L, F, G, dtype)
    gy = torch.randn(B, L, device="cuda", dtype=dtype)
    poison_next_allocation(B * L * 8)
    y = OP(x, w, idx, b, G)
    poison_next_allocation((B * H + L * F) * 8)
    gx, gw, gb = BWD(gy, x, w, idx, G, [True, True, True])
    rx, rw, rb = ref_grads(x, w, idx, b, G, gy)
    for out, ref in ((y, reference(x, w, idx, b, G)), (gx, rx), (gw, rw), (gb, rb)):
        assert torch.isfinite(out).all()
        assert rel(out, ref) < TOL[dtype]


@pytest.mark.parametrize("shape", [(256, 768, 20000, 64, 32), (70, 768, 9000, 128, 64)])
def test_bitwise_deterministic(shape):
    B, H, L, F, G = shape
    x, w, idx, b = make(B, H, L, F, G, torch.bfloat16)
    gy = torch.randn(B, L, device="cuda", dtype=torch.bfloat16)
    first = [OP(x, w, idx, b, G), *BWD(gy, x, w, idx, G, [True, True, True])]
    for _ in range(2):
        again = [OP(x, w, idx, b, G), *BWD(gy, x, w, idx, G, [True, True, True])]
        assert all(torch.equal(a, c) for a, c in zip(first, again))


def test_misaligned_inputs_take_the_fallbacks():
    """Views with an odd storage offset cannot use 16-byte loads; results must not change."""
    B, H, L, F, G = 33, 128, 515, 64, 32
    x, w, idx, b = make(B, H, L, F, G, torch.bfloat16)
    wbig = torch.empty(L * F + 1, device="cuda", dtype=torch.bfloat16)
    wmis = wbig[1:].view(L, F)
    wmis.copy_(w)
    gy = torch.randn(B, L, device="cuda", dtype=torch.bfloat16)
    assert rel(OP(x, wmis, idx, b, G), reference(x, w, idx, b, G)) < TOL[torch.bfloat16]
    rx, rw, _ = ref_grads(x, w, idx, b, G, gy)
    gx, gw, _ = BWD(gy, x, wmis, idx, G, [True, True, False])
    assert rel(gx, rx) < TOL[torch.bfloat16] and rel(gw, rw) < TOL[torch.bfloat16]


@pytest.mark.parametrize("shape", [(77, 768, 4008, 64, 32), (129, 1000, 2048, 96, 40), (64, 768, 3000, 64, 16)])
def test_weight_gradient_kernels_agree_bitwise(shape):
    """grad_y 16-byte aligned takes the weight gradient's shared-memory ring, an odd storage offset the
    direct-load kernel: the two read the same fragments in the same order, so they agree bit for bit."""
    B, H, L, F, G = shape
    x, w, idx, _ = make(B, H, L, F, G, torch.bfloat16)
    gy = torch.randn(B, L, device="cuda", dtype=torch.bfloat16)
    gy_mis = torch.empty(B * L + 1, device="cuda", dtype=torch.bfloat16)[1:].view(B, L)
    gy_mis.copy_(gy)
    _, gw, gb = BWD(gy, x, w, idx, G, [False, True, True])
    _, gw_mis, gb_mis = BWD(gy_mis, x, w, idx, G, [False, True, True])
    assert torch.equal(gw, gw_mis) and torch.equal(gb, gb_mis)
    _, rw, rb = ref_grads(x, w, idx, torch.zeros(L, device="cuda"), G, gy)
    assert rel(gw, rw) < TOL[torch.bfloat16] and rel(gb, rb) < TOL[torch.bfloat16]


def test_batch_times_labels_beyond_int32():
    """B * L > 2^31: rows and labels at the far end of the output are right."""
    B, H, L, F, G = 800, 768, 2_800_000, 16, 32
    if torch.cuda.get_device_properties(0).total_memory < 24 << 30:
        pytest.skip("needs ~10 GB of GPU memory")
    x, w, idx, _ = make(B, H, L, F, G, torch.bfloat16)
    y = OP(x, w, idx, None, G)
    rows = torch.tensor([0, B - 1], device="cuda")
    labels = torch.arange(L - 64, L, device="cuda")
    ref = (x[rows].double()[:, idx.long()[labels // G]] * w[labels].double()).sum(-1)
    assert rel(y[rows][:, labels], ref) < 1e-2


def test_cuda_graph_capture_replays_forward_and_backward():
    """The launchers take scratch from the stream-ordered pool and launch with programmatic dependencies, both of
    which CUDA graphs capture: a captured forward + backward replays to the eager results, on new inputs too."""
    B, H, L, F, G = 64, 768, 20000, 64, 32
    x, w, idx, b = make(B, H, L, F, G, torch.bfloat16)
    gy = torch.randn(B, L, device="cuda", dtype=torch.bfloat16)

    def run():
        return [OP(x, w, idx, b, G), *BWD(gy, x, w, idx, G, [True, True, True])]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capturing stream, as torch.cuda.graphs asks
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        gy.copy_(torch.randn_like(gy))
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(c, e) for c, e in zip(captured, run()))
