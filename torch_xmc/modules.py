"""nn modules: GroupSharedFanIn, the drop-in sparse replacement for an nn.Linear classifier head."""
import math

import torch
from torch import nn

from . import functional as XF
from .optim import loss_with_step

_INDEX_CHUNK = 4096  # groups drawn at a time: bounds the [chunk, in_features] scratch of random_indices


def random_indices(n_groups: int, in_features: int, fan_in: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """int32 [n_groups, fan_in] on the CPU: per row, fan_in distinct ids of [0, in_features) in the canonical
    slot order (functional.slot_order), drawn from the torch generator (the default one unless given), so
    torch.manual_seed fixes them."""
    out = torch.empty(n_groups, fan_in, dtype=torch.int32)
    for g0 in range(0, n_groups, _INDEX_CHUNK):
        g1 = min(g0 + _INDEX_CHUNK, n_groups)
        keys = torch.rand(g1 - g0, in_features, generator=generator)
        feat = keys.topk(fan_in, dim=1).indices
        out[g0:g1] = XF.in_slot_order(feat).to(torch.int32)
    return out


class GroupSharedFanIn(nn.Module):
    """Group-shared fixed fan-in layer: y = x A^T + b for a sparse A in which each group of ``group_size``
    consecutive labels reads the same ``fan_in`` inputs and each label has its own ``fan_in`` weights.

    Drops in for ``nn.Linear(in_features, out_features)``: input [..., in_features], output [..., out_features]
    in the same label order. Parameters: ``weight`` [out_features, fan_in], ``bias`` [out_features]; buffer:
    ``indices`` int32 [ceil(out_features / group_size), fan_in] (distinct per group, in the canonical slot order
    of ``functional.slot_order``; any order is computed correctly, that one fastest on the GPU).
    """

    __constants__ = ["in_features", "out_features", "fan_in", "group_size"]

    def __init__(self, in_features: int, out_features: int, fan_in: int, group_size: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        for name, value, low in (("in_features", in_features, 1), ("out_features", out_features, 1),
                                 ("fan_in", fan_in, 1), ("group_size", group_size, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if fan_in > in_features:
            raise ValueError(f"fan_in must be <= in_features = {in_features}, got {fan_in}")
        self.in_features, self.out_features = in_features, out_features
        self.fan_in, self.group_size = fan_in, group_size
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, fan_in, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        n_groups = XF.num_groups(out_features, group_size)
        self.register_buffer("indices", torch.empty(n_groups, fan_in, dtype=torch.int32, device=device))
        self.reset_parameters()

    @property
    def num_groups(self) -> int:
        return self.indices.shape[0]

    def reset_parameters(self) -> None:
        """Fresh random index sets, and nn.Linear's initialisation scaled by the true fan-in F."""
        if self.indices.device.type != "meta":
            self.indices.copy_(random_indices(self.num_groups, self.in_features, self.fan_in))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # U(-1/sqrt(F), 1/sqrt(F))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # indices were checked where they entered (construction, load_state_dict, from_linear)
        return XF.group_shared_fan_in(input, self.weight, self.indices, self.bias, self.group_size, check=False)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, fan_in={self.fan_in}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "indices"
        if key in state_dict:
            XF.check_indices(state_dict[key], self.in_features, self.out_features, self.group_size)
            if state_dict[key].shape[1] != self.fan_in:
                raise ValueError(f"{key} must have fan_in = {self.fan_in} columns, got {list(state_dict[key].shape)}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @classmethod
    def from_linear(cls, linear: nn.Linear, fan_in: int, group_size: int) -> "GroupSharedFanIn":
        """A GSFFI layer that keeps, per group, the fan_in inputs with the largest total |weight| over the
        group's labels in a (trained) dense head, with those weights and the same bias."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        L, H = w.shape
        layer = cls(H, L, fan_in, group_size, bias=linear.bias is not None, device=w.device, dtype=w.dtype)
        group_of = torch.arange(L, device=w.device) // group_size
        score = torch.zeros(layer.num_groups, H, device=w.device, dtype=torch.float32)
        score.index_add_(0, group_of, w.abs().float())
        idx = XF.in_slot_order(score.topk(fan_in, dim=1).indices)
        with torch.no_grad():
            layer.indices.copy_(idx)
            layer.weight.copy_(w.gather(1, idx[group_of]))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer

    def loss(self, input: torch.Tensor, indptr: torch.Tensor, labels: torch.Tensor, loss: str = "bce",
             reduction: str = "batchmean", *, optimizer=None) -> torch.Tensor:
        """The loss of this layer's logits for input [B, in_features] against CSR positive labels, fused with its
        gradients, without [B, out_features] logits: see torch_xmc.functional.gsffi_loss.

        optimizer: a torch_xmc.optim.SGDSR holding this layer's parameters takes its step for them here, chunk by
        chunk, instead of in ``optimizer.step()`` (which then skips them: they get no .grad). The weight
        gradient is never stored whole (functional.gsffi_loss_sgd_); loss.backward() still reaches the input."""
        if optimizer is None:
            return XF.gsffi_loss(input, self.weight, self.indices, self.bias, self.group_size, indptr, labels,
                                 loss=loss, reduction=reduction, check=False)
        return loss_with_step(optimizer, self.weight, self.bias, lambda **update: XF.gsffi_loss_sgd_(
            input, self.weight, self.indices, self.bias, self.group_size, indptr, labels, loss=loss,
            reduction=reduction, check=False, **update))

    def topk(self, input: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, label ids) [..., k] of this layer's k highest logits, without [..., out_features] logits: see
        torch_xmc.functional.gsffi_topk."""
        return XF.gsffi_topk(input, self.weight, self.indices, self.bias, self.group_size, k, check=False)
