"""SGD with momentum for low-memory classifier heads: bfloat16 parameters are updated in place with stochastic
rounding, so no float32 master copy is kept (DESIGN.md section 2, part 4).

Rounding a small update to the nearest bf16 loses it whenever it is below half a bf16 spacing of the weight
(2^-9 relative): late in training most updates vanish. Stochastic rounding rounds up with probability equal to
the remainder, so the expected stored value is the exact one and small updates accumulate on average.

The random bits come from a counter-based hash of (seed, parameter, step, element): seeded, independent of the
thread count, and the same on every device. CPU and CUDA run the kernels of ops/cpu/sgd_sr.c and
ops/cuda/sgd_sr.cu (one element update, ops/sgd_sr_update.h); a device without them runs the same arithmetic as
torch ops (``sgd_sr_reference``).

A GroupSharedFanIn head can take its SGDSR step inside its fused loss (``layer.loss(..., optimizer=opt)``, through
``loss_with_step``): the weight is updated chunk by chunk as its gradient is produced and never holds a
weight-sized gradient.
"""
import torch

from . import ops

_M32 = 0xFFFFFFFF


def _mix32(x: int) -> int:
    """lowbias32 on a Python int (the same mixer as ops/cpu/sgd_sr.c)."""
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    x ^= x >> 16
    return x


def sr_key(seed: int, stream: int, step: int) -> int:
    """32-bit key of one parameter's update at one step; element i then uses hash(key, i)."""
    return _mix32(_mix32(_mix32(seed) ^ (stream & _M32)) ^ (step & _M32))


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2^32 for x in [0, 2^32) held in int64, in two 16-bit halves of c so nothing overflows int64
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32_t(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def sr_bits(key: int, n: int, device=None) -> torch.Tensor:
    """int64 [n] in [0, 2^32): the random bits of elements 0..n-1 under key, as the C kernel draws them."""
    i = torch.arange(n, dtype=torch.int64, device=device)
    return _mix32_t(key ^ _mix32_t((i & _M32) ^ _mix32_t(i >> 32)))


def round_stochastic(x: torch.Tensor, bits16: torch.Tensor) -> torch.Tensor:
    """float32 -> bfloat16: add bits16 (int64 in [0, 2^16)) below the 16 kept bits, then truncate.
    Inf and NaN round to nearest."""
    u = x.contiguous().view(torch.int32).to(torch.int64) & _M32
    r = ((u + bits16) >> 16) & 0xFFFF
    r = torch.where(r >= 0x8000, r - 0x10000, r).to(torch.int16).view(torch.bfloat16)
    return torch.where(torch.isfinite(x), r.view_as(x), x.to(torch.bfloat16))


@torch.no_grad()
def sgd_sr_reference(param, momentum_buf, grad, lr, momentum, dampening, weight_decay, nesterov, first_step, key):
    """torch_xmc::sgd_sr_ in torch ops (any device): the same update, rounding and random bits."""
    p = param.float()
    d = grad.float() + weight_decay * p
    bits = sr_bits(key, param.numel(), param.device).view(param.shape) if param.dtype == torch.bfloat16 else None
    if momentum_buf is not None and momentum != 0:
        m = d if first_step else momentum * momentum_buf.float() + (1.0 - dampening) * d
        d = d + momentum * m if nesterov else m
        momentum_buf.copy_(round_stochastic(m, bits >> 16) if bits is not None else m)
    p = p - lr * d
    param.copy_(round_stochastic(p, bits & 0xFFFF) if bits is not None else p)


class SGDSR(torch.optim.Optimizer):
    """SGD with momentum (torch.optim.SGD's update, dampening and Nesterov included) that keeps each parameter in
    its own dtype: float32 parameters get the plain update, bfloat16 ones are rounded stochastically (momentum
    buffers too, also bf16). Memory per bf16 weight: 2 bytes + 2 of momentum + 2 of gradient.

    ``seed`` fixes the rounding: two runs with the same seed, data and order are bitwise identical on any
    number of threads. State per parameter: ``momentum_buffer`` (same dtype and shape) and ``step``.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, dampening: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False, seed: int = 0):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if nesterov and (momentum == 0 or dampening != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening = 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, seed=seed))

    def _params(self):
        """(group, param, stream) for every parameter; stream is its position among all of them, so each gets
        its own random stream."""
        stream = 0
        for group in self.param_groups:
            for p in group["params"]:
                stream += 1
                yield group, p, stream

    def _begin_update(self, group, p, stream):
        """The state of p's next update as (momentum_buffer, first_step, key), counting the step."""
        if p.dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"SGDSR updates float32 or bfloat16 parameters, got {p.dtype}")
        state = self.state[p]
        first = "step" not in state
        if first:
            state["step"] = 0
            state["momentum_buffer"] = torch.zeros_like(p) if group["momentum"] != 0 else None
        key = sr_key(group["seed"], stream, state["step"])
        state["step"] += 1
        return state["momentum_buffer"], first, key

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, p, stream in self._params():
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("SGDSR does not support sparse gradients")
            buf, first, key = self._begin_update(group, p, stream)
            args = (p, buf, p.grad.contiguous(), group["lr"], group["momentum"], group["dampening"],
                    group["weight_decay"], group["nesterov"], first, key)
            if torch._C._dispatch_has_kernel_for_dispatch_key("torch_xmc::sgd_sr_", p.device.type.upper()):
                ops.sgd_sr_(*args)
            else:
                sgd_sr_reference(*args)
        return loss

    @torch.no_grad()
    def fused_update_args(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> dict:
        """The keyword arguments of functional.gsffi_loss_sgd_ that take this optimizer's step for weight (and
        bias) there, as ``step()`` would with their gradients; counts the step. Both must be in one group."""
        found = {id(p): (group, p, stream) for group, p, stream in self._params() if p is weight or p is bias}
        if id(weight) not in found or (bias is not None and id(bias) not in found):
            raise ValueError("the layer's weight and bias must be parameters of this optimizer")
        group = found[id(weight)][0]
        if bias is not None and found[id(bias)][0] is not group:
            raise ValueError("the layer's weight and bias must be in the same parameter group")
        if bias is not None and ("step" in self.state[weight]) != ("step" in self.state[bias]):
            raise ValueError("the layer's weight and bias must both have taken steps, or neither")
        w_buf, first, w_key = self._begin_update(*found[id(weight)])
        b_buf, _, b_key = self._begin_update(*found[id(bias)]) if bias is not None else (None, first, 0)
        return dict(lr=group["lr"], momentum=group["momentum"], dampening=group["dampening"],
                    weight_decay=group["weight_decay"], nesterov=group["nesterov"], first_step=first,
                    weight_momentum=w_buf, bias_momentum=b_buf, weight_key=w_key, bias_key=b_key)


@torch.compiler.disable
def loss_with_step(optimizer: SGDSR, weight: torch.Tensor, bias: torch.Tensor | None, loss_fn) -> torch.Tensor:
    """loss_fn(**optimizer.fused_update_args(weight, bias)): a fused loss that takes the optimizer's step for
    weight and bias inside it (what GroupSharedFanIn.loss(optimizer=...) runs). It runs eagerly under
    torch.compile: the step count and random-bit keys change every call, and as graph constants they would
    recompile the graph every step; the code around it still compiles, and autograd connects through it."""
    if not isinstance(optimizer, SGDSR):
        raise TypeError(f"optimizer must be a torch_xmc.optim.SGDSR to take its step inside the fused loss, got "
                        f"{type(optimizer).__name__}")
    return loss_fn(**optimizer.fused_update_args(weight, bias))
