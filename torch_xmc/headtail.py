"""Dense head + sparse tail (DESIGN.md section 2, part 2): the most frequent labels get a small dense Linear,
the long tail a GSFFI layer, and the two halves form one output in the user's label order.

Frequent labels have the training signal to use many features, and there are few of them, so a dense head
for them is cheap; tail labels have little data, and a sparse layer suits them. This replaces the auxiliary
losses or wide intermediate layers that earlier sparse heads needed to stay accurate.
"""
import torch
from torch import nn

from . import functional as XF
from . import grouping as _grouping
from .modules import GroupSharedFanIn
from .optim import loss_with_step


def head_size(num_labels: int, head_fraction: float, group_size: int) -> int:
    """Labels of the dense head: head_fraction of num_labels rounded to a multiple of group_size (so the tail's
    groups start on a group boundary of the frequency order), at most num_labels - 1 (the tail keeps a label)."""
    if not 0.0 <= head_fraction < 1.0:
        raise ValueError(f"head_fraction must be in [0, 1), got {head_fraction}")
    n = round(head_fraction * num_labels / group_size) * group_size
    return max(0, min(n, num_labels - 1))


class HeadTailFanIn(nn.Module):
    """nn.Linear(in_features, out_features) call convention: input [..., in_features] -> [..., out_features] in the
    user's label order, computed as a dense ``head`` (nn.Linear over the labels label_order[:head_labels]) and a
    GSFFI ``tail`` (over label_order[head_labels:], in that order, so its groups are consecutive runs of it).

    ``head_features`` / ``tail_features``: (start, stop) slices of the input each half reads (default: all), so
    the two halves can have private features. Buffers: ``label_order`` int64 [L] (internal position -> user
    label) and its inverse ``position``.
    """

    def __init__(self, in_features: int, out_features: int, fan_in: int, group_size: int, head_labels: int,
                 label_order: torch.Tensor | None = None, head_features: tuple[int, int] | None = None,
                 tail_features: tuple[int, int] | None = None, bias: bool = True, device=None, dtype=None):
        super().__init__()
        if not 0 <= head_labels < out_features:
            raise ValueError(f"head_labels must be in [0, out_features) = [0, {out_features}), got {head_labels}")
        self.in_features, self.out_features, self.head_labels = in_features, out_features, head_labels
        self.head_features = _slice("head_features", head_features, in_features)
        self.tail_features = _slice("tail_features", tail_features, in_features)
        factory = {"device": device, "dtype": dtype}
        hin = self.head_features[1] - self.head_features[0]
        tin = self.tail_features[1] - self.tail_features[0]
        self.head = nn.Linear(hin, head_labels, bias=bias, **factory) if head_labels else None
        self.tail = GroupSharedFanIn(tin, out_features - head_labels, fan_in, group_size, bias=bias, **factory)
        self.register_buffer("label_order", torch.arange(out_features, device=device))
        self.register_buffer("position", torch.arange(out_features, device=device))
        if label_order is not None:
            self.set_label_order(label_order)

    @classmethod
    def from_counts(cls, label_counts: torch.Tensor, in_features: int, fan_in: int, group_size: int,
                    head_fraction: float = 0.05, tail_embeddings: torch.Tensor | None = None,
                    index_embeddings: torch.Tensor | None = None, seed: int = 0, **kwargs) -> "HeadTailFanIn":
        """Head = the most frequent ``head_size(L, head_fraction, G)`` labels (by training counts [L]). Tail order:
        frequency, or semantic clusters of ``tail_embeddings`` [L, D] (e.g. ``grouping.pifa(train)``) when given.
        ``index_embeddings`` [L, tail input width] (user order, e.g. PIFA of encoder outputs) initialise each tail
        group's features from its embedding mass instead of at random."""
        L = label_counts.numel()
        n_head = head_size(L, head_fraction, group_size)
        order = ordered_labels(label_counts, n_head, group_size, tail_embeddings, seed)
        layer = cls(in_features, L, fan_in, group_size, n_head, label_order=order, **kwargs)
        if index_embeddings is not None:
            idx = _grouping.indices_from_embeddings(index_embeddings[order[n_head:]], group_size, fan_in)
            with torch.no_grad():
                layer.tail.indices.copy_(idx)
        return layer

    @torch.no_grad()
    def order_labels(self, train, grouping: str = "frequency", seed: int = 0) -> None:
        """Set the label order from training data: head = the most frequent labels, tail in "frequency" order or
        in "semantic" clusters of the labels' PIFA embeddings (``grouping.pifa``, projected to 256 dimensions
        when the data has more features); "none" keeps the current order."""
        if grouping == "none":
            return
        if grouping not in ("frequency", "semantic"):
            raise ValueError(f"grouping must be 'none', 'frequency' or 'semantic', got {grouping!r}")
        emb = None
        if grouping == "semantic":
            emb = _grouping.pifa(train, dim=256 if train.num_features > 4096 else None, seed=seed)
        self.set_label_order(ordered_labels(train.label_counts(), self.head_labels, self.tail.group_size, emb, seed))

    @torch.no_grad()
    def set_label_order(self, label_order: torch.Tensor) -> None:
        """Use label_order (a permutation of [0, L)) as the internal order."""
        label_order = torch.as_tensor(label_order, dtype=torch.int64)
        if label_order.shape != (self.out_features,) or not torch.equal(
                label_order.sort().values.cpu(), torch.arange(self.out_features)):
            raise ValueError(f"label_order must be a permutation of [0, {self.out_features}), "
                             f"got shape {list(label_order.shape)}")
        self.label_order.copy_(label_order)
        self.position.copy_(torch.argsort(label_order))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        h0, h1 = self.head_features
        t0, t1 = self.tail_features
        y = self.tail(input[..., t0:t1])
        if self.head is not None:
            y = torch.cat([self.head(input[..., h0:h1]), y], dim=-1)
        return y.index_select(-1, self.position)

    def loss(self, input: torch.Tensor, indptr: torch.Tensor, labels: torch.Tensor, loss: str = "bce",
             reduction: str = "batchmean", *, optimizer=None) -> torch.Tensor:
        """The loss of this module's logits for input [B, in_features] against CSR positive labels (user label
        ids), through the fused loss ops of both halves: no [B, out_features] logits. reduction "batchmean" or
        "sum" (both halves' sums add up to the whole one's). optimizer: a torch_xmc.optim.SGDSR holding this
        module's parameters takes its step for both halves inside their fused losses (GroupSharedFanIn.loss)."""
        if reduction not in ("batchmean", "sum"):
            raise ValueError(f"reduction must be 'batchmean' or 'sum', got {reduction!r}")
        pos = self.position[labels.to(self.position.device)]
        rows = torch.repeat_interleave(torch.arange(indptr.numel() - 1, device=pos.device), indptr.diff().to(pos.device))
        in_head = pos < self.head_labels
        t0, t1 = self.tail_features
        total = self.tail.loss(input[..., t0:t1], *_csr(rows[~in_head], pos[~in_head] - self.head_labels, indptr),
                               loss=loss, reduction=reduction, optimizer=optimizer)
        if self.head is not None:
            h0, h1 = self.head_features

            def head_loss(**update):
                return XF.linear_loss(input[..., h0:h1], self.head.weight, self.head.bias,
                                      *_csr(rows[in_head], pos[in_head], indptr), loss=loss, reduction=reduction,
                                      update=update or None)

            total = total + (head_loss() if optimizer is None
                             else loss_with_step(optimizer, self.head.weight, self.head.bias, head_loss))
        return total

    def topk(self, input: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, user label ids) [B, k] of the k highest logits, best first, through the fused top-k ops of
        both halves: no [B, out_features] logits."""
        if not 1 <= k <= self.out_features:
            raise ValueError(f"k must be in [1, out_features = {self.out_features}], got {k}")
        t0, t1 = self.tail_features
        scores, ids = self.tail.topk(input[..., t0:t1], min(k, self.tail.out_features))
        ids = ids.long() + self.head_labels
        if self.head is not None:
            h0, h1 = self.head_features
            hs, hi = XF.linear_topk(input[..., h0:h1], self.head.weight, self.head.bias, min(k, self.head_labels))
            scores, ids = torch.cat([hs, scores], dim=-1), torch.cat([hi.long(), ids], dim=-1)
        best = scores.topk(k, dim=-1)
        return best.values, self.label_order[ids.gather(-1, best.indices)]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, head_labels={self.head_labels}, "
                f"head_features={self.head_features}, tail_features={self.tail_features}")


def ordered_labels(label_counts: torch.Tensor, head_labels: int, group_size: int,
                   tail_embeddings: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    """int64 [L]: the head_labels most frequent labels, then the rest in frequency order, or in balanced semantic
    clusters of tail_embeddings [L, D] when given."""
    order = _grouping.frequency_order(label_counts)
    if tail_embeddings is None:
        return order
    tail = order[head_labels:]
    return torch.cat([order[:head_labels], tail[_grouping.balanced_order(tail_embeddings[tail], group_size, seed=seed)]])


def _csr(rows, cols, indptr):
    """(indptr [B+1], cols) of the entries (rows, cols), rows ascending, of a B-row CSR like indptr."""
    counts = torch.bincount(rows, minlength=indptr.numel() - 1)
    out = torch.zeros_like(indptr)
    torch.cumsum(counts, 0, out=out[1:])
    return out, cols


def _slice(name, value, in_features):
    if value is None:
        return (0, in_features)
    start, stop = value
    if not 0 <= start < stop <= in_features:
        raise ValueError(f"{name} must be (start, stop) with 0 <= start < stop <= {in_features}, got {value}")
    return (int(start), int(stop))
