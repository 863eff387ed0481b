"""The GSFFI layer as functions, in the style of torch.nn.functional."""
import torch

from . import ops


def num_groups(out_features: int, group_size: int) -> int:
    return -(-out_features // group_size)


def slot_order(features: torch.Tensor) -> torch.Tensor:
    """The canonical order of each group's fan-in slots: int64 [n_groups, F] positions such that
    ``features.gather(1, slot_order(features))`` is the order in which the layer keeps its indices.

    Any order computes the same function; this one makes the CUDA kernels' shared-memory gathers and scatters
    conflict-light. Where F is a multiple of 32, the features are ranked by (id mod 8, id) and dealt round-robin
    over the F / 8 sets of 8 slots that one tensor-core gather step reads together (in each 32-slot chunk,
    {0, 1, 8, 9, 16, 17, 24, 25} + {0, 2, 4, 6}), so a set holds up to 8 distinct ids mod 8: distinct shared
    memory banks, where sorted random ids collide ~3 ways. Within a set the residues rise, so the slot pairs
    (2j, 2j + 1) that the input gradient scatters together differ in parity. Otherwise: ascending ids. The
    order depends only on each row's set of ids, so applying it twice changes nothing."""
    n, F = features.shape
    features = features.long()
    if F % 32 != 0:
        return features.argsort(dim=1)
    ranked = ((features & 7) << 32 | features).argsort(dim=1)  # rank i -> the slot holding it
    i = torch.arange(F, device=features.device)
    sets = F // 8
    s_id, u = i % sets, i // sets  # rank i goes to set s_id, position u in it
    chunk, s, b = s_id // 4, (s_id % 4) // 2, s_id % 2
    slot = 32 * chunk + 8 * (u >> 1) + 4 * s + 2 * b + (u & 1)
    return torch.empty_like(ranked).scatter_(1, slot.expand(n, F), ranked)


def in_slot_order(features: torch.Tensor) -> torch.Tensor:
    """features [n_groups, F] with each row's ids in the canonical slot order (slot_order); dtype kept."""
    return features.gather(1, slot_order(features))


def check_indices(indices: torch.Tensor, in_features: int, out_features: int, group_size: int) -> None:
    """Raise ValueError unless indices is an int32 [ceil(out_features / group_size), F] tensor whose rows hold
    F distinct feature ids in [0, in_features). Reads the values (a host sync on GPU): call it where indices
    enter, not on every step."""
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
    n_groups = num_groups(out_features, group_size)
    if indices.dtype != torch.int32 or indices.dim() != 2 or indices.shape[0] != n_groups:
        raise ValueError(
            f"indices must be int32 of shape [ceil(out_features / group_size), fan_in] = [{n_groups}, F], "
            f"got {indices.dtype} {list(indices.shape)}"
        )
    _check_index_values(indices, in_features)


def _check_index_values(indices: torch.Tensor, in_features: int) -> None:
    if indices.numel() == 0:
        return
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= in_features:
        bad = lo if lo < 0 else hi
        g, t = [int(v) for v in (indices == bad).nonzero()[0]]
        raise ValueError(f"indices must lie in [0, in_features) = [0, {in_features}), got {bad} at indices[{g}, {t}]")
    s = indices.sort(dim=1).values
    dup = (s[:, 1:] == s[:, :-1]).nonzero()
    if dup.numel():
        g, t = int(dup[0, 0]), int(dup[0, 1])
        raise ValueError(f"indices must be distinct within a group, got {int(s[g, t])} twice in indices[{g}]")


def _well_formed(input, weight, indices, group_size) -> bool:
    """Shapes and dtypes the op accepts; the op itself reports anything else, so its messages stay the only ones."""
    return (input.dim() >= 1 and weight.dim() == 2 and isinstance(group_size, int) and group_size >= 1
            and weight.shape[1] <= input.shape[-1] and indices.dtype == torch.int32
            and tuple(indices.shape) == (num_groups(weight.shape[0], group_size), weight.shape[1]))


def group_shared_fan_in(
    input: torch.Tensor,
    weight: torch.Tensor,
    indices: torch.Tensor,
    bias: torch.Tensor | None = None,
    group_size: int = 1,
    *,
    check: bool = True,
) -> torch.Tensor:
    """y[..., l] = bias[l] + sum_t input[..., indices[l // group_size, t]] * weight[l, t].

    input [..., H]; weight [L, F]; indices int32 [ceil(L / group_size), F], distinct per row, in [0, H);
    bias [L] or None. float32, bfloat16, float64 (and float16 on CUDA). Under torch.autocast it computes in
    the autocast dtype, as nn.Linear does. check=True validates the index values first (skipped while
    torch.compile traces, where it would break the graph: check once where the indices come from).
    """
    if check and not torch.compiler.is_compiling() and _well_formed(input, weight, indices, group_size):
        _check_index_values(indices, input.shape[-1])
    device_type = input.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        input, weight = input.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    return ops.gsffi_forward(input, weight, indices, bias, group_size)


# ---- fused loss and top-k (issue 4): train and predict without materialising the [B, L] logits ----

def _autocast(input, weight, bias):
    device_type = input.device.type
    if not torch.is_autocast_enabled(device_type):
        return input, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    return input.to(dtype), weight.to(dtype), bias.to(dtype) if bias is not None else None


def gsffi_loss(
    input: torch.Tensor,
    weight: torch.Tensor,
    indices: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    indptr: torch.Tensor,
    labels: torch.Tensor,
    *,
    loss: str = "bce",
    reduction: str = "batchmean",
    check: bool = True,
) -> torch.Tensor:
    """Loss of the GSFFI layer's logits y = group_shared_fan_in(input, ...) against positive-label targets,
    computed with its gradients in one pass over the label groups: no [B, L] tensor is ever allocated.

    input [B, H]; weight, indices, bias, group_size as in group_shared_fan_in. Targets in CSR form, on the CPU or
    on input's device (they are checked on the host: on a GPU that is a copy and a sync): row b's positive label ids are labels[indptr[b]:indptr[b + 1]] (indptr int64 [B + 1], labels int64 [nnz],
    ids in [0, L)); every other label is a negative; a row may have none; a repeated id counts once.
    loss: "bce" (binary cross-entropy with logits) or "squared_hinge" (max(0, 1 - s y)^2, s = +-1).
    reduction of the B * L terms: "batchmean" (sum / B: per-row sum over labels, averaged over rows; the usual
    XMC loss), "mean" (sum / (B * L), as nn.BCEWithLogitsLoss), "sum".
    Returns the 0-dim loss in input's dtype; loss.backward() fills the gradients of input, weight and bias.
    """
    if check and not torch.compiler.is_compiling() and _well_formed(input, weight, indices, group_size):
        _check_index_values(indices, input.shape[-1])
    input, weight, bias = _autocast(input, weight, bias)
    grad = torch.is_grad_enabled()
    mask = [grad and input.requires_grad, grad and weight.requires_grad,
            grad and bias is not None and bias.requires_grad]
    return ops.gsffi_fused_loss(input, weight, indices, bias, group_size, indptr, labels, mask, loss, reduction)[0]


class _PrecomputedInputGrad(torch.autograd.Function):
    """The loss of an op that already computed d loss / d input: the backward only scales that gradient."""

    @staticmethod
    def forward(input, loss, grad_input):
        return loss.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[2])
        ctx.input_dtype = inputs[0].dtype

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_input,) = ctx.saved_tensors
        return (grad_input * grad_loss).to(ctx.input_dtype), None, None


def gsffi_loss_sgd_(
    input: torch.Tensor,
    weight: torch.Tensor,
    indices: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    indptr: torch.Tensor,
    labels: torch.Tensor,
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    weight_momentum: torch.Tensor | None = None,
    bias_momentum: torch.Tensor | None = None,
    first_step: bool = True,
    weight_key: int = 0,
    bias_key: int = 0,
    loss: str = "bce",
    reduction: str = "batchmean",
    check: bool = True,
) -> torch.Tensor:
    """gsffi_loss that applies the layer's optimizer step itself: weight and bias (float32 or bfloat16,
    contiguous) get torch_xmc.optim.SGDSR's update in place, with the gradients gsffi_loss would have returned,
    as soon as each label chunk's gradient exists. No weight-sized gradient is ever stored: on CUDA one label
    chunk of it; the weight's memory during the step is the weight and its momentum. The result is bitwise that
    of gsffi_loss + backward + ``torch.ops.torch_xmc.sgd_sr_`` with the same arguments.

    The arguments after ``*`` up to ``bias_key`` are sgd_sr_'s, for both parameters (one key each, see
    optim.sr_key); ``SGDSR.fused_update_args(weight, bias)`` returns them for an optimizer's state. input is
    cast to the weight's dtype. Returns the loss; loss.backward() gives input its gradient (weight and bias get
    none: they are already updated).
    """
    if check and not torch.compiler.is_compiling() and _well_formed(input, weight, indices, group_size):
        _check_index_values(indices, input.shape[-1])
    x = input.to(weight.dtype)
    need_gx = torch.is_grad_enabled() and input.requires_grad
    with torch.no_grad():
        out, gx = ops.gsffi_fused_loss_sgd_(x, weight, indices, bias, group_size, indptr, labels, weight_momentum,
                                            bias_momentum, lr, momentum, dampening, weight_decay, nesterov,
                                            first_step, weight_key, bias_key, need_gx, loss, reduction)
    return _PrecomputedInputGrad.apply(input, out, gx) if need_gx else out


def gsffi_topk(
    input: torch.Tensor,
    weight: torch.Tensor,
    indices: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    k: int,
    *,
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, label ids) [..., k] of the k highest logits of the GSFFI layer per row, best first, without a
    [B, L] tensor. Equal scores rank the lower label id first; 1 <= k <= L. Not differentiable."""
    if check and not torch.compiler.is_compiling() and _well_formed(input, weight, indices, group_size):
        _check_index_values(indices, input.shape[-1])
    input, weight, bias = _autocast(input, weight, bias)
    return ops.gsffi_topk(input, weight, indices, bias, group_size, k)


# Labels per group when a dense head runs through the GSFFI kernels. Every group reads all inputs, so a wide group
# costs nothing in the kernels (they take a group in blocks of at most 64 labels) and keeps the [L / G, H] index
# table small.
DENSE_GROUP_SIZE = 256


def dense_indices(in_features: int, out_features: int, group_size: int = DENSE_GROUP_SIZE,
                  device=None) -> torch.Tensor:
    """int32 [ceil(out_features / group_size), in_features], every row 0 .. in_features - 1: the indices that make
    a dense head (nn.Linear's weight [L, H]) a GSFFI layer with fan_in = H, so the fused ops serve it too."""
    n = num_groups(out_features, group_size)
    return torch.arange(in_features, dtype=torch.int32, device=device).expand(n, in_features).contiguous()


def linear_loss(input, weight, bias, indptr, labels, *, loss="bce", reduction="batchmean",
                group_size: int = DENSE_GROUP_SIZE, update: dict | None = None) -> torch.Tensor:
    """gsffi_loss for a dense head y = input @ weight.T + bias (weight [L, H], as nn.Linear); with update (the
    step's arguments, e.g. SGDSR.fused_update_args(weight, bias)), gsffi_loss_sgd_ instead."""
    idx = dense_indices(weight.shape[1], weight.shape[0], group_size, input.device)
    if update is not None:
        return gsffi_loss_sgd_(input, weight, idx, bias, group_size, indptr, labels, loss=loss, reduction=reduction,
                               check=False, **update)
    return gsffi_loss(input, weight, idx, bias, group_size, indptr, labels, loss=loss, reduction=reduction,
                      check=False)


def linear_topk(input, weight, bias, k: int, *, group_size: int = DENSE_GROUP_SIZE):
    """gsffi_topk for a dense head y = input @ weight.T + bias (weight [L, H], as nn.Linear)."""
    idx = dense_indices(weight.shape[1], weight.shape[0], group_size, input.device)
    return gsffi_topk(input, weight, idx, bias, group_size, k, check=False)
