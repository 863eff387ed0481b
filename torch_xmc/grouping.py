"""Label grouping for GSFFI layers (DESIGN.md section 2, part 3): which labels share a group, and which input
features each group starts with.

A grouping is a label permutation ``order`` (int64 [L]): position i of the layer holds user label order[i], and
the layer's group g is positions [g G, (g + 1) G). Frequency order (the default) puts labels of similar
popularity together; semantic order clusters label embeddings (PIFA, or any the user passes) into balanced
groups of exactly G, so that a group's labels can share input features that matter to all of them.
"""
import torch

from .data import XMCData
from .functional import in_slot_order


def frequency_order(label_counts: torch.Tensor) -> torch.Tensor:
    """int64 [L]: labels by decreasing training count, ties by increasing id."""
    return torch.sort(label_counts, descending=True, stable=True).indices


def pifa(data: XMCData, features: torch.Tensor | None = None, dim: int | None = None, seed: int = 0) -> torch.Tensor:
    """float32 [L, D]: PIFA label embeddings (positive instance feature aggregation): each label's sum of the
    L2-normalised feature vectors of its training points, L2-normalised (zero for a label with no points).

    Feature vectors: ``features`` [N, D] (e.g. encoder outputs) if given, else the data's sparse features; with
    ``dim`` those are first projected to dim random Gaussian directions (distances kept, Johnson-Lindenstrauss),
    so that L x D stays small when num_features is large."""
    N, L = data.num_points, data.num_labels
    if features is None:
        if dim is None:
            X = torch.zeros(N, data.num_features)
            X.index_put_((torch.repeat_interleave(torch.arange(N), data.feat_indptr.diff()), data.feat_indices),
                         data.feat_values.float(), accumulate=True)
        else:
            g = torch.Generator().manual_seed(seed)
            R = torch.randn(data.num_features, dim, generator=g) / dim**0.5
            X = torch.nn.functional.embedding_bag(data.feat_indices, R, data.feat_indptr[:-1],
                                                  per_sample_weights=data.feat_values.float(), mode="sum")
    else:
        if features.shape[0] != N:
            raise ValueError(f"features must have one row per point, [{N}, D], got {list(features.shape)}")
        X = features.float()
    X = torch.nn.functional.normalize(X, dim=1)
    rows = torch.repeat_interleave(torch.arange(N), data.label_indptr.diff())
    emb = torch.zeros(L, X.shape[1]).index_add_(0, data.label_indices, X[rows])
    return torch.nn.functional.normalize(emb, dim=1)


def balanced_order(embeddings: torch.Tensor, group_size: int, iters: int = 8, seed: int = 0,
                   restarts: int = 4) -> torch.Tensor:
    """int64 [L]: a label order whose consecutive runs of group_size labels are semantic clusters of exactly
    group_size (the last may be short), by recursive balanced spherical 2-means on the rows of embeddings [L, D]:
    each split sends the labels most similar to one centroid (as many whole groups as half the segment holds)
    one way and the rest the other, until a segment is one group. Each split keeps the best of ``restarts``
    runs, each started from a random label and the label least similar to it."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    X = torch.nn.functional.normalize(embeddings.float(), dim=1)
    g = torch.Generator().manual_seed(seed)
    done, todo = [], [torch.arange(X.shape[0])]
    # depth first, left before right: the segment holding the short group is always the rightmost, so it ends last
    while todo:
        seg = todo.pop()
        m = -(-seg.numel() // group_size)
        if m <= 1:
            done.append(seg)
            continue
        left, right = _split(X[seg], (m // 2) * group_size, iters, restarts, g)
        todo += [seg[right], seg[left]]
    return torch.cat(done)


def _split(X, n_left, iters, restarts, g):
    # Two random starting centroids often sit in one cluster, and 2-means then cuts clusters in half (about 1 run
    # in 5 on 8 planted clusters); starting from a label and its farthest label, best of a few, almost never does.
    best = None
    for _ in range(restarts):
        a = int(torch.randint(X.shape[0], (1,), generator=g))
        c1, c2 = X[a], X[int(torch.argmin(X @ X[a]))]
        for _ in range(iters):
            # ranking by similarity difference and cutting at n_left is the best balanced assignment for 2 centroids
            order = torch.argsort(X @ (c1 - c2), descending=True, stable=True)
            left, right = order[:n_left], order[n_left:]
            c1 = torch.nn.functional.normalize(X[left].mean(0), dim=0)
            c2 = torch.nn.functional.normalize(X[right].mean(0), dim=0)
        score = float((X[left] @ c1).sum() + (X[right] @ c2).sum())
        if best is None or score > best[0]:
            best = (score, left, right)
    return best[1], best[2]


def label_order(label_counts: torch.Tensor, group_size: int, method: str = "frequency",
                embeddings: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    """int64 [L]: "frequency" (``frequency_order``) or "semantic" (``balanced_order`` of embeddings [L, D],
    e.g. ``pifa(train)``)."""
    if method == "frequency":
        return frequency_order(label_counts)
    if method == "semantic":
        if embeddings is None or embeddings.shape[0] != label_counts.numel():
            got = None if embeddings is None else list(embeddings.shape)
            raise ValueError(f"semantic grouping needs embeddings [L, D] with L = {label_counts.numel()}, got {got}")
        return balanced_order(embeddings, group_size, seed=seed)
    raise ValueError(f"method must be 'frequency' or 'semantic', got {method!r}")


def indices_from_embeddings(embeddings: torch.Tensor, group_size: int, fan_in: int) -> torch.Tensor:
    """int32 [ceil(L / G), fan_in]: each group's fan_in input features of largest |embedding| mass summed over
    its labels, in the canonical slot order (functional.slot_order). embeddings [L, H] are in the layer's label
    order and its input space (e.g. PIFA of the encoder outputs); a group with too little mass fills up with its
    next-largest (tie: lowest) features."""
    L, H = embeddings.shape
    if not 1 <= fan_in <= H:
        raise ValueError(f"fan_in must be in [1, in_features = {H}], got {fan_in}")
    n_groups = -(-L // group_size)
    mass = torch.zeros(n_groups, H).index_add_(0, torch.arange(L) // group_size, embeddings.float().abs())
    # a stable sort keeps ties in feature order, so all-zero groups get 0 .. F-1: deterministic
    top = torch.sort(mass, dim=1, descending=True, stable=True).indices[:, :fan_in]
    return in_slot_order(top).to(torch.int32)
