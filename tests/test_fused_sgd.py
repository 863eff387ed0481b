"""The fused loss with the optimizer step inside (gsffi_fused_loss_sgd_, GroupSharedFanIn.loss(optimizer=...)):
bitwise the unfused step (gsffi_loss + backward + SGDSR.step) on fresh random data over several steps, CPU and
CUDA, float32 and bfloat16, odd shapes and CUDA's label chunks; no weight-sized gradient; opcheck,
torch.compile and every argument error."""
import pytest
import torch

from conftest import has_kernel
from test_fused import SHAPES, random_targets
from test_gsffi import make
from torch_xmc import GroupSharedFanIn
from torch_xmc import functional as XF
from torch_xmc.optim import SGDSR

OP = torch.ops.torch_xmc.gsffi_fused_loss_sgd_


@pytest.fixture(autouse=True)
def _needs_kernel(request):
    if "device" in request.fixturenames and request.getfixturevalue("device") != "cpu":
        if not has_kernel("torch_xmc::gsffi_fused_loss_sgd_", request.getfixturevalue("device").upper()):
            pytest.skip("no fused kernels built for this device")


def twin_layers(shape, dtype, device, bias=True):
    """Two GSFFI layers with the same random parameters (weights of a trained scale, not the init's)."""
    B, H, L, F, G = shape
    a = GroupSharedFanIn(H, L, F, G, bias=bias, device=device, dtype=dtype)
    with torch.no_grad():
        a.weight.normal_(0, 0.3)
        if bias:
            a.bias.normal_(0, 0.3)
    b = GroupSharedFanIn(H, L, F, G, bias=bias, device=device, dtype=dtype)
    b.load_state_dict(a.state_dict())
    return a, b


def run_steps(shape, dtype, device, hyper, steps=3, bias=True, loss="bce", reduction="batchmean"):
    """(unfused, fused) layers, optimizers and per-step (loss, input gradient) after `steps` steps on the same
    fresh random inputs and targets."""
    B, H, L, F, G = shape
    ref, ours = twin_layers(shape, dtype, device, bias)
    o_ref, o_ours = SGDSR(ref.parameters(), **hyper), SGDSR(ours.parameters(), **hyper)
    seen = []
    for _ in range(steps):
        x = torch.randn(B, H, device=device, dtype=dtype)
        indptr, labels = random_targets(B, L, device)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        l1 = ref.loss(x1, indptr, labels, loss, reduction)
        l1.backward()
        o_ref.step()
        o_ref.zero_grad(set_to_none=True)
        l2 = ours.loss(x2, indptr, labels, loss, reduction, optimizer=o_ours)
        l2.backward()
        o_ours.step()  # skips the layer's parameters: they have no .grad
        assert ours.weight.grad is None and (ours.bias is None or ours.bias.grad is None)
        seen.append(((l1.detach(), x1.grad), (l2.detach(), x2.grad)))
    return (ref, o_ref), (ours, o_ours), seen


def assert_same_state(ref, ours, o_ref, o_ours):
    for p_ref, p in zip(ref.parameters(), ours.parameters()):
        assert torch.equal(p_ref, p)
        s_ref, s = o_ref.state[p_ref], o_ours.state[p]
        assert s_ref["step"] == s["step"]
        if s_ref["momentum_buffer"] is not None:
            assert torch.equal(s_ref["momentum_buffer"], s["momentum_buffer"])


HYPER = [dict(lr=0.1, momentum=0.9, weight_decay=0.01, seed=3), dict(lr=0.05, momentum=0.0, seed=1),
         dict(lr=0.1, momentum=0.8, dampening=0.1), dict(lr=0.02, momentum=0.9, nesterov=True, seed=9)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hyper", range(len(HYPER)))
def test_bitwise_the_unfused_step(shape, dtype, hyper, device):
    (ref, o_ref), (ours, o_ours), seen = run_steps(shape, dtype, device, HYPER[hyper])
    for (l1, g1), (l2, g2) in seen:
        assert torch.equal(l1, l2) and torch.equal(g1, g2)
    assert_same_state(ref, ours, o_ref, o_ours)
    assert not torch.equal(ref.weight, twin_layers(shape, dtype, device)[0].weight)  # it did move


@pytest.mark.parametrize("loss", ["bce", "squared_hinge"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_losses_reductions_and_no_bias(loss, reduction, device):
    for bias in (True, False):
        (ref, o_ref), (ours, o_ours), seen = run_steps((9, 40, 77, 8, 6), torch.bfloat16, device, HYPER[0],
                                                       steps=2, bias=bias, loss=loss, reduction=reduction)
        for (l1, g1), (l2, g2) in seen:
            assert torch.equal(l1, l2) and torch.equal(g1, g2)
        assert_same_state(ref, ours, o_ref, o_ours)


@pytest.mark.parametrize("F, G", [(16, 18), (128, 32), (64, 32)])
def test_bitwise_over_cuda_label_chunks(F, G, device, monkeypatch):
    """CUDA's bf16 path updates the weight one label chunk at a time (1 MB chunks: 5 here, the last partial);
    each chunk draws the random bits the whole weight's update would. F = 64, G = 32: the one-pass forward,
    loss and weight gradient writes each chunk's weight gradient to scratch before the update."""
    if device == "cpu":
        pytest.skip("the label-chunked path is CUDA's")
    monkeypatch.setenv("XMC_FUSED_CHUNK_MB", "1")
    (ref, o_ref), (ours, o_ours), seen = run_steps((70, 192, 30000, F, G), torch.bfloat16, device, HYPER[0])
    for (l1, g1), (l2, g2) in seen:
        assert torch.equal(l1, l2) and torch.equal(g1, g2)
    assert_same_state(ref, ours, o_ref, o_ours)


def test_empty_batch_still_steps(device):
    """B = 0: no loss terms, zero gradients; the step still applies weight decay and momentum, as SGDSR's."""
    (ref, o_ref), (ours, o_ours), seen = run_steps((0, 12, 10, 4, 3), torch.float32, device, HYPER[0], steps=2)
    for (l1, _), (l2, _) in seen:
        assert l1.isnan() and l2.isnan()
    assert_same_state(ref, ours, o_ref, o_ours)


def test_no_input_gradient_when_input_needs_none(device):
    layer = GroupSharedFanIn(16, 20, 4, 5, device=device)
    opt = SGDSR(layer.parameters(), lr=0.1)
    indptr, labels = random_targets(3, 20, device)
    out = layer.loss(torch.randn(3, 16, device=device), indptr, labels, optimizer=opt)
    assert not out.requires_grad and out.dim() == 0 and torch.isfinite(out)


def test_no_weight_sized_gradient(device, monkeypatch):
    """bf16 on CUDA: the step's peak memory beyond what it started with (PyTorch's allocator plus the kernels'
    scratch, torch_xmc.memory) stays below half the weight's size with the update inside, where the unfused step
    (gradient, then SGDSR.step) needs at least the weight's size: the weight gradient is never stored whole.
    8 MB label chunks keep the scratch (one chunk of logits and of weight gradient) small against the weight.
    (float32 on CUDA runs the plain kernels, which write the whole weight gradient to scratch first.)"""
    if device == "cpu":
        pytest.skip("peak device memory is measured on CUDA (the CPU kernels' scratch is per label block)")
    from torch_xmc import memory
    monkeypatch.setenv("XMC_FUSED_CHUNK_MB", "8")
    B, H, L, F, G, dtype = 64, 64, 1 << 20, 32, 32, torch.bfloat16
    layer = GroupSharedFanIn(H, L, F, G, device=device, dtype=dtype)
    opt = SGDSR(layer.parameters(), lr=0.1, momentum=0.9)
    indptr, labels = random_targets(B, L, device)

    def peak(inside):
        x = torch.randn(B, H, device=device, dtype=dtype, requires_grad=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        memory.reset_scratch_peak()
        base = torch.cuda.memory_allocated()
        if inside:
            layer.loss(x, indptr, labels, optimizer=opt).backward()
        else:
            layer.loss(x, indptr, labels).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base + memory.scratch_peak_bytes()

    weight_bytes = layer.weight.numel() * layer.weight.element_size()
    peak(True)  # the first step creates the momentum buffers
    inside, outside = peak(True), peak(False)
    assert inside < weight_bytes // 2 <= outside - weight_bytes // 2, (inside >> 20, outside >> 20, weight_bytes >> 20)


def functional_args(device, dtype=torch.float32, B=5):
    x, w, idx, b = make(B, 24, 50, 6, 7, device, dtype)
    indptr, labels = random_targets(B, 50, device)
    return x, w, idx, b, 7, indptr, labels


def test_opcheck(device):
    x, w, idx, b, G, indptr, labels = functional_args(device)
    for mw, mb, mom, input_grad in ((torch.randn_like(w), torch.randn_like(b), 0.9, True), (None, None, 0.0, False)):
        args = (x, w.clone(), idx, b.clone(), G, indptr, labels, mw, mb, 0.1, mom, 0.0, 0.01, False, False, 5, 6,
                input_grad, "bce", "batchmean")
        torch.library.opcheck(OP, args)


def test_torch_compile_fullgraph(device):
    x, w, idx, b, G, indptr, labels = functional_args(device, torch.bfloat16)

    def step(x, w, b, mw, mb):
        return XF.gsffi_loss_sgd_(x, w, idx, b, G, indptr, labels, lr=0.1, momentum=0.9, weight_momentum=mw,
                                  bias_momentum=mb, first_step=False, weight_key=11, bias_key=12, check=False)

    state = [t.clone() for t in (w, b, torch.randn_like(w), torch.randn_like(b))]
    state_c = [t.clone() for t in state]
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    le = step(xe, *state)
    le.backward()
    lc = torch.compile(step, fullgraph=True)(xc, *state_c)
    lc.backward()
    assert torch.equal(le, lc) and torch.equal(xe.grad, xc.grad)
    for a, c in zip(state, state_c):
        assert torch.equal(a, c)


def test_argument_errors(device):
    x, w, idx, b, G, indptr, labels = functional_args(device)
    kw = dict(lr=0.1, momentum=0.9, weight_momentum=torch.zeros_like(w), bias_momentum=torch.zeros_like(b))
    call = lambda *a, **k: XF.gsffi_loss_sgd_(*a, **{**kw, **k})  # noqa: E731
    with pytest.raises(RuntimeError, match=r"gsffi_fused_loss_sgd_: weight must be float32 or bfloat16 \(SGD-SR\), got Double"):
        call(x.double(), w.double(), idx, b.double(), G, indptr, labels,
             weight_momentum=torch.zeros_like(w).double(), bias_momentum=torch.zeros_like(b).double())
    wt = torch.randn(6, 50, device=device).t()
    with pytest.raises(RuntimeError, match=r"gsffi_fused_loss_sgd_: weight must be contiguous"):
        call(x, wt, idx, b, G, indptr, labels, weight_momentum=None, momentum=0.0)
    with pytest.raises(RuntimeError, match=r"momentum = 0.9 needs weight_momentum and \(with a bias\) bias_momentum"):
        call(x, w, idx, b, G, indptr, labels, bias_momentum=None)
    with pytest.raises(RuntimeError, match=r"weight_momentum must have shape \[50, 6\] like param, got \[50, 5\]"):
        call(x, w, idx, b, G, indptr, labels, weight_momentum=torch.zeros(50, 5, device=device))
    with pytest.raises(RuntimeError, match=r"bias_momentum must have dtype Float like param, got BFloat16"):
        call(x, w, idx, b, G, indptr, labels, bias_momentum=torch.zeros_like(b).bfloat16())
    with pytest.raises(RuntimeError, match=r"key must be in \[0, 2\^32\), got -1"):
        call(x, w, idx, b, G, indptr, labels, weight_key=-1)
    with pytest.raises(RuntimeError, match=r"labels must lie in \[0, out_features\) = \[0, 50\), got 50"):
        call(x, w, idx, b, G, torch.tensor([0, 1, 1, 1, 1, 1]), torch.tensor([50]))
    layer = GroupSharedFanIn(24, 50, 6, 7, device=device)
    with pytest.raises(ValueError, match="must be parameters of this optimizer"):
        layer.loss(x, indptr, labels, optimizer=SGDSR([layer.weight], lr=0.1))
    with pytest.raises(TypeError, match="optimizer must be a torch_xmc.optim.SGDSR .* got SGD"):
        layer.loss(x, indptr, labels, optimizer=torch.optim.SGD(layer.parameters(), lr=0.1))
    stepped = SGDSR(layer.parameters(), lr=0.1)
    layer.bias.grad = torch.ones_like(layer.bias)
    stepped.step()  # the bias has taken a step, the weight none
    with pytest.raises(ValueError, match="must both have taken steps, or neither"):
        layer.loss(x, indptr, labels, optimizer=stepped)
    assert "step" not in stepped.state[layer.weight] and stepped.state[layer.bias]["step"] == 1  # nothing counted
    with pytest.raises(ValueError, match="must be in the same parameter group"):
        layer.loss(x, indptr, labels, optimizer=SGDSR([{"params": [layer.weight]}, {"params": [layer.bias]}], lr=0.1))


def test_non_contiguous_input_and_cpu_targets(device):
    """A transposed view as input and CSR targets on the CPU give bitwise what a contiguous input and targets on
    the input's device give."""
    B, H, L, F, G = 6, 24, 50, 6, 7
    results = []
    for variant in ("plain", "strided"):
        torch.manual_seed(0)
        layer = GroupSharedFanIn(H, L, F, G, device=device)
        opt = SGDSR(layer.parameters(), lr=0.1, momentum=0.9)
        x = torch.randn(H, B, device=device).t()
        indptr, labels = random_targets(B, L, "cpu")
        if variant == "plain":
            x, indptr, labels = x.contiguous(), indptr.to(device), labels.to(device)
        assert x.is_contiguous() == (variant == "plain")
        x = x.detach().requires_grad_()
        out = layer.loss(x, indptr, labels, optimizer=opt)
        out.backward()
        results.append((out.detach(), x.grad, layer.weight.detach().clone(), layer.bias.detach().clone()))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_compiled_training_step_does_not_recompile(device):
    """Under torch.compile the module's loss with the optimizer step runs eagerly (its step count and keys change
    every call): six compiled steps compile once, and equal six eager ones bitwise, the encoder's gradients too."""
    import torch._dynamo
    B, H, L, F, G = 8, 32, 100, 8, 10
    torch.manual_seed(0)
    enc, layer = torch.nn.Linear(16, H, device=device), GroupSharedFanIn(H, L, F, G, device=device)
    enc2, layer2 = torch.nn.Linear(16, H, device=device), GroupSharedFanIn(H, L, F, G, device=device)
    enc2.load_state_dict(enc.state_dict())
    layer2.load_state_dict(layer.state_dict())
    opt, opt2 = SGDSR(layer.parameters(), lr=0.1, momentum=0.9), SGDSR(layer2.parameters(), lr=0.1, momentum=0.9)
    indptr, labels = random_targets(B, L, device)

    def step(x, enc, layer, opt):
        return layer.loss(torch.relu(enc(x)), indptr, labels, optimizer=opt)

    torch._dynamo.reset()
    compiled = torch.compile(step)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(6):
            x = torch.randn(B, 16, device=device)
            a, b = compiled(x, enc, layer, opt), step(x, enc2, layer2, opt2)
            a.backward()
            b.backward()
            assert torch.equal(a, b) and torch.equal(enc.weight.grad, enc2.weight.grad)
            enc.zero_grad()
            enc2.zero_grad()
    assert torch.equal(layer.weight, layer2.weight) and torch.equal(layer.bias, layer2.bias)
