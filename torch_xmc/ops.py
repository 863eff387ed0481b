"""The registered ops, their fake (meta) kernels and autograd.

Schemas live in bindings/library.cpp and the device kernels in bindings/<op>_<device>.cpp -> ops/. This module
makes them traceable (fake kernels for torch.compile / opcheck) and differentiable (register_autograd, with the
backward itself a registered op, so torch.compile sees through it).
"""
import torch

from . import _C  # noqa: F401  (loads the library; its static initialisers register the ops)

gsffi_forward = torch.ops.torch_xmc.gsffi_forward
gsffi_backward = torch.ops.torch_xmc.gsffi_backward


@torch.library.register_fake("torch_xmc::gsffi_forward")
def _gsffi_forward_fake(x, weight, indices, bias, group_size):
    torch._check(x.dim() >= 1, lambda: f"x must have at least 1 dimension, got shape {tuple(x.shape)}")
    torch._check(weight.dim() == 2, lambda: f"weight must be 2-D [out_features, fan_in], got {tuple(weight.shape)}")
    torch._check(weight.dtype == x.dtype, lambda: f"weight must have dtype {x.dtype} like x, got {weight.dtype}")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("torch_xmc::gsffi_backward")
def _gsffi_backward_fake(grad_y, x, weight, indices, group_size, output_mask):
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format) if output_mask[0] else None,
        torch.empty_like(weight, memory_format=torch.contiguous_format) if output_mask[1] else None,
        weight.new_empty(weight.shape[0]) if output_mask[2] else None,
    )


def _setup_context(ctx, inputs, output):
    x, weight, indices, bias, group_size = inputs
    ctx.save_for_backward(x, weight, indices)
    ctx.group_size = group_size
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y):
    x, weight, indices = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], need[1], ctx.has_bias and need[3]]
    gx, gw, gb = gsffi_backward(grad_y, x, weight, indices, ctx.group_size, mask)
    return gx, gw, None, gb, None


torch.library.register_autograd("torch_xmc::gsffi_forward", _backward, setup_context=_setup_context)


sgd_sr_ = torch.ops.torch_xmc.sgd_sr_


@torch.library.register_fake("torch_xmc::sgd_sr_")
def _sgd_sr_fake(param, momentum_buf, grad, lr, momentum, dampening, weight_decay, nesterov, first_step, key):
    torch._check(grad.shape == param.shape, lambda: f"grad must have shape {tuple(param.shape)}, got {tuple(grad.shape)}")
    return None


# ---- fused loss and top-k over a GSFFI layer (issue 4): no B x L logits anywhere ----

gsffi_fused_loss = torch.ops.torch_xmc.gsffi_fused_loss
gsffi_topk = torch.ops.torch_xmc.gsffi_topk


@torch.library.register_fake("torch_xmc::gsffi_fused_loss")
def _gsffi_fused_loss_fake(x, weight, indices, bias, group_size, indptr, labels, output_mask, loss="bce",
                           reduction="batchmean"):
    torch._check(x.dim() == 2, lambda: f"x must be 2-D [batch, in_features], got shape {tuple(x.shape)}")
    torch._check(weight.dim() == 2, lambda: f"weight must be 2-D [out_features, fan_in], got {tuple(weight.shape)}")
    torch._check(weight.dtype == x.dtype, lambda: f"weight must have dtype {x.dtype} like x, got {weight.dtype}")
    return (
        x.new_empty(()),
        x.new_empty(x.shape) if output_mask[0] else None,
        weight.new_empty(weight.shape) if output_mask[1] else None,
        weight.new_empty(weight.shape[0]) if output_mask[2] and bias is not None else None,
    )


gsffi_fused_loss_sgd_ = torch.ops.torch_xmc.gsffi_fused_loss_sgd_


@torch.library.register_fake("torch_xmc::gsffi_fused_loss_sgd_")
def _gsffi_fused_loss_sgd_fake(x, weight, indices, bias, group_size, indptr, labels, weight_momentum, bias_momentum,
                               lr, momentum, dampening, weight_decay, nesterov, first_step, weight_key, bias_key,
                               input_grad, loss="bce", reduction="batchmean"):
    torch._check(x.dim() == 2, lambda: f"x must be 2-D [batch, in_features], got shape {tuple(x.shape)}")
    torch._check(weight.dtype == x.dtype, lambda: f"weight must have dtype {x.dtype} like x, got {weight.dtype}")
    return x.new_empty(()), x.new_empty(x.shape) if input_grad else None


@torch.library.register_fake("torch_xmc::gsffi_topk")
def _gsffi_topk_fake(x, weight, indices, bias, group_size, k):
    torch._check(weight.dim() == 2, lambda: f"weight must be 2-D [out_features, fan_in], got {tuple(weight.shape)}")
    torch._check(1 <= k <= weight.shape[0], lambda: f"k must be in [1, out_features] = [1, {weight.shape[0]}], got {k}")
    shape = (*x.shape[:-1], k)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.int64)


def _fused_loss_setup_context(ctx, inputs, output):
    grads = output[1:]
    ctx.save_for_backward(*grads)
    # The returned gradients are not differentiable; their incoming gradients stay None instead of being
    # materialised as zeros (one of them weight-sized, costing memory and a fill per step).
    ctx.mark_non_differentiable(*(g for g in grads if g is not None))
    ctx.set_materialize_grads(False)


def _fused_loss_backward(ctx, grad_loss, *_):
    # The op already returned d loss / d (x, weight, bias); the chain rule only scales them. For the usual
    # loss.backward() (grad_loss = 1) in eager mode they are passed on as they are, saving a parameter-sized
    # copy of the weight gradient (745 MiB of peak memory at 3M labels in bf16). Reading grad_loss costs a
    # device sync on CUDA: microseconds, against the copy's time and memory.
    if grad_loss is None:  # not materialised (see set_materialize_grads above): the loss got no gradient
        return None, None, None, None, None, None, None, None, None, None
    saved = ctx.saved_tensors
    eager_one = (type(grad_loss) is torch.Tensor and not torch.compiler.is_compiling()
                 and bool(grad_loss == 1))
    if not eager_one:
        saved = [g * grad_loss if g is not None else None for g in saved]
    gx, gw, gb = saved
    return gx, gw, None, gb, None, None, None, None, None, None


torch.library.register_autograd("torch_xmc::gsffi_fused_loss", _fused_loss_backward,
                                setup_context=_fused_loss_setup_context)
