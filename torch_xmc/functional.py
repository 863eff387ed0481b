"""The GSFFI layer as functions, in the style of torch.nn.functional."""
import torch

from . import ops


def num_groups(out_features: int, group_size: int) -> int:
    return -(-out_features // group_size)


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
