"""Dynamic sparse training for GSFFI layers: periodic prune-and-regrow of each group's shared input features
(DESIGN.md section 2, part 1).

Every ``interval`` steps until ``end``: score each (group, slot) by the mean |weight| over the group's labels,
prune the globally lowest ``fraction(step)`` of all slots, and give each group as many new input features as it
lost, drawn among the features it does not hold (at random, or by gradient evidence). Regrown weights are
re-initialised (zero by default) and their optimizer state (momentum, Adam moments) is reset. Index rows stay
distinct and in the canonical slot order (functional.slot_order): slots are re-ordered and the weight columns
and optimizer state are permuted with them, so the layer computes the same function on the kept connections
before and after.
"""
import math

import torch

from . import functional as XF
from .modules import GroupSharedFanIn

_CHUNK = 4096  # groups handled at a time: bounds the [chunk, in_features] scratch of the regrowth draw


def cosine_fraction(step: int, start_fraction: float, end: int) -> float:
    """Pruned fraction at ``step``: start_fraction decayed to 0 at ``end`` along a half cosine."""
    return 0.5 * start_fraction * (1.0 + math.cos(math.pi * min(step / max(end, 1), 1.0)))


def slot_scores(layer: GroupSharedFanIn) -> torch.Tensor:
    """float32 [n_groups, F]: mean |weight[l, t]| over the labels l of each group (the last may be short)."""
    L, G = layer.out_features, layer.group_size
    group_of = torch.arange(L, device=layer.weight.device) // G
    score = torch.zeros(layer.num_groups, layer.fan_in, device=layer.weight.device, dtype=torch.float32)
    score.index_add_(0, group_of, layer.weight.detach().abs().float())
    count = torch.bincount(group_of, minlength=layer.num_groups).clamp(min=1)
    return score / count.unsqueeze(1)


@torch.no_grad()
def gradient_evidence(layer: GroupSharedFanIn, input: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """float32 [n_groups, in_features]: sum over each group's labels of |dLoss/dW_dense[l, h]|, the gradient a
    dense connection l <- h would get on this batch (input [B, H], grad_output [B, L] of the layer's output).
    Computed a chunk of groups at a time: never the whole L x H."""
    G, H = layer.group_size, layer.in_features
    x = input.reshape(-1, H).float()
    dy = grad_output.reshape(-1, layer.out_features).float()
    out = torch.empty(layer.num_groups, H, device=x.device)
    for g0 in range(0, layer.num_groups, _CHUNK):
        g1 = min(g0 + _CHUNK, layer.num_groups)
        l0, l1 = g0 * G, min(g1 * G, layer.out_features)
        dense = (dy[:, l0:l1].t() @ x).abs()  # [labels, H]
        group_of = torch.arange(l1 - l0, device=x.device) // G
        out[g0:g1] = torch.zeros(g1 - g0, H, device=x.device).index_add_(0, group_of, dense)
    return out


@torch.no_grad()
def rewire(layer: GroupSharedFanIn, fraction: float, optimizer: torch.optim.Optimizer | None = None,
           regrow: str = "random", evidence: torch.Tensor | None = None, init: str = "zero",
           generator: torch.Generator | None = None) -> int:
    """Prune the globally lowest-scoring ``fraction`` of the layer's (group, slot) connections and regrow as many
    per group; returns the number rewired. regrow: "random" or "gradient" (needs ``evidence`` [n_groups, H], e.g.
    from ``gradient_evidence``). init: "zero" or "uniform" (U(-1/sqrt(F), 1/sqrt(F)), the layer's own init).
    Every optimizer state tensor shaped like the weight is permuted with it and zeroed at the regrown slots."""
    if regrow not in ("random", "gradient"):
        raise ValueError(f"regrow must be 'random' or 'gradient', got {regrow!r}")
    if init not in ("zero", "uniform"):
        raise ValueError(f"init must be 'zero' or 'uniform', got {init!r}")
    NG, F, H, G = layer.num_groups, layer.fan_in, layer.in_features, layer.group_size
    if regrow == "gradient" and (evidence is None or tuple(evidence.shape) != (NG, H)):
        got = None if evidence is None else list(evidence.shape)
        raise ValueError(f"regrow='gradient' needs evidence of shape [n_groups, in_features] = [{NG}, {H}], got {got}")
    n_prune = int(fraction * NG * F)
    if n_prune <= 0 or F == H:  # F == H: every feature is already held, nothing new to grow
        return 0
    device = layer.weight.device
    flat = slot_scores(layer).flatten()
    pruned = torch.zeros(NG * F, dtype=torch.bool, device=device)
    pruned[flat.topk(n_prune, largest=False, sorted=False).indices] = True
    pruned = pruned.view(NG, F)
    idx = layer.indices.long()
    new_feat = torch.empty_like(idx)
    for g0 in range(0, NG, _CHUNK):
        g1 = min(g0 + _CHUNK, NG)
        new_feat[g0:g1] = _draw(idx[g0:g1], pruned[g0:g1], H, evidence[g0:g1] if regrow == "gradient" else None,
                                generator)
    feat = torch.where(pruned, new_feat, idx)
    order = XF.slot_order(feat)
    is_new = pruned.gather(1, order)
    group_of = torch.arange(layer.out_features, device=device) // G
    col = order[group_of]  # [L, F]: old slot feeding each new slot
    new_rows = is_new[group_of]
    layer.indices.copy_(feat.gather(1, order))
    w = layer.weight.gather(1, col)
    if init == "zero":
        w[new_rows] = 0
    else:
        bound = 1.0 / math.sqrt(F)
        fresh = torch.empty(w.shape, device=device).uniform_(-bound, bound, generator=generator)
        w = torch.where(new_rows, fresh.to(w.dtype), w)
    layer.weight.copy_(w)
    if optimizer is not None:
        for value in optimizer.state.get(layer.weight, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == layer.weight.shape:
                value.copy_(value.gather(1, col).masked_fill_(new_rows, 0))
    return n_prune


def _draw(idx, pruned, H, evidence, generator):
    """[g, F]: for each group, its k-th pruned slot gets the k-th new feature (not held, best key first)."""
    g = idx.shape[0]
    keys = torch.rand(g, H, device=idx.device, generator=generator)
    if evidence is not None:
        # evidence ranks first; the random keys only break its ties (e.g. all-zero evidence)
        ev = evidence.float()
        keys = ev / ev.amax(dim=1, keepdim=True).clamp(min=1e-30) + 1e-6 * keys
    # kept features are never drawn; the just-pruned ones only when a group has too few unheld features left
    keys.scatter_(1, idx, torch.where(pruned, -1.0, -3.0))
    k_max = max(int(pruned.sum(1).max()), 1)
    cand = keys.topk(k_max, dim=1).indices
    rank = (pruned.cumsum(1) - 1).clamp(0, k_max - 1)
    return cand.gather(1, rank)


class Rewirer:
    """The rewiring schedule of one GSFFI layer: call ``step()`` once per training step, after the optimizer.

    Every ``interval`` steps up to ``end`` it rewires ``cosine_fraction(step, fraction, end)`` of the layer's
    connections (see ``rewire``). With regrow="gradient" pass ``evidence`` (``gradient_evidence`` of the current
    batch) on the steps where ``due()`` is true. Deterministic from ``seed``; ``state_dict`` holds the step
    count and the generator, so a resumed run rewires as the uninterrupted one does.
    """

    def __init__(self, layer: GroupSharedFanIn, optimizer: torch.optim.Optimizer | None = None, *, interval: int = 100,
                 end: int, fraction: float = 0.2, regrow: str = "random", init: str = "zero", seed: int = 0):
        if not isinstance(layer, GroupSharedFanIn):
            raise TypeError(f"layer must be a GroupSharedFanIn, got {type(layer).__name__}")
        if interval < 1 or end < 0 or not 0.0 <= fraction < 1.0:
            raise ValueError(f"need interval >= 1, end >= 0, 0 <= fraction < 1; got {interval}, {end}, {fraction}")
        self.layer, self.optimizer = layer, optimizer
        self.interval, self.end, self.fraction, self.regrow, self.init = interval, end, fraction, regrow, init
        self.generator = torch.Generator(device=layer.weight.device).manual_seed(seed)
        self.steps = 0
        self.rewired = 0  # connections rewired so far

    def due(self) -> bool:
        """Whether the next ``step()`` call rewires."""
        s = self.steps + 1
        return s % self.interval == 0 and s <= self.end

    def step(self, evidence: torch.Tensor | None = None) -> int:
        """Advance one training step; rewire if due. Returns the number of connections rewired (0 if none)."""
        n = 0
        if self.due():
            f = cosine_fraction(self.steps + 1, self.fraction, self.end)
            n = rewire(self.layer, f, self.optimizer, self.regrow, evidence, self.init, self.generator)
            self.rewired += n
        self.steps += 1
        return n

    def state_dict(self) -> dict:
        return {"steps": self.steps, "rewired": self.rewired, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.rewired = state["steps"], state["rewired"]
        self.generator.set_state(state["generator"])
