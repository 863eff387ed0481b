"""SGDSR: the C kernel against the torch-ops reference (bitwise), torch.optim.SGD for float32, unbiased
stochastic rounding, determinism across thread counts, state round trip, opcheck and argument errors."""
import copy

import pytest
import torch

from torch_xmc import optim
from torch_xmc.optim import SGDSR, round_stochastic, sgd_sr_reference, sr_bits

OP = torch.ops.torch_xmc.sgd_sr_


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("momentum,dampening,wd,nesterov", [(0.0, 0.0, 0.0, False), (0.9, 0.0, 0.01, False),
                                                            (0.9, 0.1, 0.0, False), (0.8, 0.0, 0.0, True)])
@pytest.mark.parametrize("aligned", [True, False])
def test_kernel_matches_reference_bitwise(dtype, momentum, dampening, wd, nesterov, aligned, device):
    """The device's kernel against the torch-ops reference; unaligned: views starting one element into their
    storage (CUDA's 16-byte vector path cannot take them), n not a multiple of the vector width either."""
    def fresh():
        t = torch.randn(3 * 1237 + 1, device=device).to(dtype)
        return (t[:-1] if aligned else t[1:]).view(3, 1237)

    p = fresh()
    buf = fresh().zero_() if momentum else None
    p_ref, buf_ref = p.clone(), (buf.clone() if buf is not None else None)
    for step in range(4):
        g = fresh()
        args = (g, 0.05, momentum, dampening, wd, nesterov, step == 0, optim.sr_key(7, 1, step))
        OP(p, buf, *args)
        sgd_sr_reference(p_ref, buf_ref, *args)
        assert torch.equal(p, p_ref)
        if buf is not None:
            assert torch.equal(buf, buf_ref)


def test_float32_equals_torch_sgd():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(50, 20))
    w_ref = torch.nn.Parameter(w.detach().clone())
    opt = SGDSR([w], lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)
    ref = torch.optim.SGD([w_ref], lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)
    for _ in range(5):
        g = torch.randn_like(w)
        w.grad, w_ref.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-6)


def test_stochastic_rounding_is_unbiased():
    # the bf16 spacing at 1 is 2^-7, so 1 + 2^-10 lies 1/8 of the way to the next value: rounds up w.p. 1/8
    x = torch.full((200_000,), 1.0 + 2**-10)
    r = round_stochastic(x, sr_bits(3, x.numel()) & 0xFFFF).float()
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs((r == 1.0 + 2**-7).float().mean().item() - 1 / 8) < 0.005
    neg = round_stochastic(-x, sr_bits(4, x.numel()) & 0xFFFF).float()
    assert abs(neg.mean().item() + x[0].item()) < 2e-5
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0])
    out = round_stochastic(special, torch.full((4,), 0xFFFF, dtype=torch.int64)).float()
    assert out[0] == float("inf") and out[1] == float("-inf") and out[2].isnan() and out[3] == 0


def test_small_updates_accumulate_in_bf16():
    # updates of 1e-4 on weights of 1 are below half a bf16 spacing: nearest rounding never moves the weight
    w_sr = torch.nn.Parameter(torch.ones(20_000, dtype=torch.bfloat16))
    opt = SGDSR([w_sr], lr=1e-4, momentum=0.0, seed=1)
    for _ in range(100):
        w_sr.grad = torch.ones_like(w_sr)
        opt.step()
    assert abs(w_sr.float().mean().item() - (1 - 100 * 1e-4)) < 2e-4
    nearest = torch.ones(10, dtype=torch.bfloat16)
    for _ in range(100):
        nearest = (nearest.float() - 1e-4).bfloat16()
    assert torch.all(nearest == 1)


def _run(threads, seed=0):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(5)
        w = torch.nn.Parameter(torch.randn(300, 257, generator=g).bfloat16())
        opt = SGDSR([w], lr=0.1, momentum=0.9, seed=seed)
        for _ in range(3):
            w.grad = torch.randn(w.shape, generator=g).bfloat16()
            opt.step()
        return w.detach().clone(), opt.state[w]["momentum_buffer"].clone()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_result_on_every_device(dtype, device):
    """SGDSR steps on the device (CUDA: the torch-ops path) give bitwise the CPU C kernel's parameters and
    momentum: the random bits depend only on (seed, parameter, step, element)."""
    g = torch.Generator().manual_seed(11)
    w0 = torch.randn(37, 129, generator=g).to(dtype)
    grads = [torch.randn(37, 129, generator=g).to(dtype) for _ in range(3)]
    out = []
    for dev in ("cpu", device):
        w = torch.nn.Parameter(w0.clone().to(dev))
        opt = SGDSR([w], lr=0.05, momentum=0.9, weight_decay=0.01, seed=4)
        for gr in grads:
            w.grad = gr.to(dev)
            opt.step()
        out.append((w.detach().cpu(), opt.state[w]["momentum_buffer"].cpu()))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


def test_deterministic_and_independent_of_threads():
    a, b = _run(1), _run(2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = _run(2, seed=1)
    assert not torch.equal(a[0], c[0])


def test_state_dict_round_trip_continues_identically():
    def make():
        return torch.nn.Parameter(torch.arange(64, dtype=torch.float32).bfloat16().view(8, 8))

    w1 = make()
    o1 = SGDSR([w1], lr=0.01, seed=3)
    grads = [torch.randn(8, 8).bfloat16() for _ in range(4)]
    for g in grads[:2]:
        w1.grad = g
        o1.step()
    w2 = torch.nn.Parameter(w1.detach().clone())
    o2 = SGDSR([w2], lr=0.01, seed=3)
    o2.load_state_dict(copy.deepcopy(o1.state_dict()))  # as through a file: loading keeps tensors it can share
    for g in grads[2:]:
        w1.grad, w2.grad = g, g.clone()
        o1.step()
        o2.step()
    assert torch.equal(w1, w2)


def test_opcheck():
    p = torch.randn(40, 8).bfloat16()
    args = (p, torch.zeros_like(p), torch.randn_like(p), 0.1, 0.9, 0.0, 0.0, False, False, 12)
    torch.library.opcheck(OP, args, test_utils=("test_schema", "test_faketensor"))


def test_argument_errors():
    p = torch.randn(4, 4)
    with pytest.raises(RuntimeError, match="grad must have shape"):
        OP(p, None, torch.randn(4, 5), 0.1, 0.0, 0.0, 0.0, False, True, 0)
    with pytest.raises(RuntimeError, match="param must be float32 or bfloat16"):
        OP(p.double(), None, p.double(), 0.1, 0.0, 0.0, 0.0, False, True, 0)
    with pytest.raises(RuntimeError, match="needs a momentum_buf"):
        OP(p, None, p, 0.1, 0.9, 0.0, 0.0, False, True, 0)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        OP(p.t(), None, p, 0.1, 0.0, 0.0, 0.0, False, True, 0)
    with pytest.raises(RuntimeError, match="grad must have dtype"):
        OP(p, None, p.bfloat16(), 0.1, 0.0, 0.0, 0.0, False, True, 0)
    with pytest.raises(ValueError, match="momentum must be in"):
        SGDSR([torch.nn.Parameter(p)], lr=0.1, momentum=1.5)
    w = torch.nn.Parameter(p.double())
    w.grad = torch.ones_like(w)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        SGDSR([w], lr=0.1).step()
