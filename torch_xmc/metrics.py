"""XMC ranking metrics from top-k label ids and the sparse truth (never from N x L scores), in percent.

P@k, nDCG@k, and their propensity-scored versions PSP@k, PSnDCG@k (Jain, Prabhu, Varma, KDD 2016). The
propensity-scored values are normalised by the best achievable value, as the XMC literature (and pyxclib)
reports them; the raw values are returned too (``PSP@k_raw``, ``PSnDCG@k_raw``). Rows with no true label
count in every mean and score 0.
"""
import math

import torch


def inverse_propensity(label_counts: torch.Tensor, num_points: int, A: float = 0.55, B: float = 1.5) -> torch.Tensor:
    """float64 [L]: 1/p_l = 1 + C (N_l + B)^-A with C = (ln N - 1)(B + 1)^A, from the training counts N_l."""
    C = (math.log(num_points) - 1.0) * (B + 1.0) ** A
    return 1.0 + C * (label_counts.double() + B) ** (-A)


def hits(topk: torch.Tensor, truth_indptr: torch.Tensor, truth_indices: torch.Tensor, num_labels: int) -> torch.Tensor:
    """bool [N, k]: hits[i, j] = topk[i, j] is a true label of row i. One sort of the truth, one search."""
    n = topk.shape[0]
    rows = torch.repeat_interleave(torch.arange(n), truth_indptr[1:] - truth_indptr[:-1])
    truth_keys = (rows * num_labels + truth_indices).sort().values
    keys = torch.arange(n).unsqueeze(1) * num_labels + topk.long()
    if truth_keys.numel() == 0:
        return torch.zeros_like(keys, dtype=torch.bool)
    pos = torch.searchsorted(truth_keys, keys).clamp_(max=truth_keys.numel() - 1)
    return truth_keys[pos] == keys


def evaluate(topk: torch.Tensor, truth_indptr: torch.Tensor, truth_indices: torch.Tensor, num_labels: int,
             inv_prop: torch.Tensor | None = None, ks=(1, 3, 5)) -> dict[str, float]:
    """Metrics in percent: {"P@k", "nDCG@k"} and, given inv_prop [L] (see inverse_propensity),
    {"PSP@k", "PSnDCG@k", "PSP@k_raw", "PSnDCG@k_raw"} for each k in ks.

    topk int [N, K] label ids, best first, K >= max(ks), distinct per row; truth CSR indptr [N+1] / indices.
    """
    K = max(ks)
    if topk.dim() != 2 or topk.shape[1] < K or topk.shape[0] != truth_indptr.numel() - 1:
        raise ValueError(f"topk must be [N, >= {K}] with N = {truth_indptr.numel() - 1} rows, got {list(topk.shape)}")
    topk = topk[:, :K].long()
    h = hits(topk, truth_indptr, truth_indices, num_labels).double()
    n_true = (truth_indptr[1:] - truth_indptr[:-1]).double()
    disc = 1.0 / torch.log2(torch.arange(K, dtype=torch.float64) + 2.0)
    cum_disc = torch.cumsum(disc, 0)
    out = {}
    for k in ks:
        out[f"P@{k}"] = 100.0 * h[:, :k].sum(1).div(k).mean().item()
        idcg = _ideal(cum_disc, n_true, k)
        dcg = (h[:, :k] * disc[:k]).sum(1)
        out[f"nDCG@{k}"] = 100.0 * _safe_div(dcg, idcg).mean().item()
    if inv_prop is None:
        return out
    inv_prop = inv_prop.double()
    w = h * inv_prop[topk]
    # best achievable: each row's true labels ordered by propensity weight, largest first
    best = _top_true_weights(truth_indptr, truth_indices, inv_prop, K)
    for k in ks:
        psp, psp_best = w[:, :k].sum(1) / k, best[:, :k].sum(1) / k
        out[f"PSP@{k}_raw"] = 100.0 * psp.mean().item()
        out[f"PSP@{k}"] = 100.0 * _ratio_of_means(psp, psp_best)
        idcg = _ideal(cum_disc, n_true, k)
        psdcg = _safe_div((w[:, :k] * disc[:k]).sum(1), idcg)
        psdcg_best = _safe_div((best[:, :k] * disc[:k]).sum(1), idcg)
        out[f"PSnDCG@{k}_raw"] = 100.0 * psdcg.mean().item()
        out[f"PSnDCG@{k}"] = 100.0 * _ratio_of_means(psdcg, psdcg_best)
    return out


def _ideal(cum_disc, n_true, k):
    """DCG of a perfect ranking: sum of the first min(k, n_true) discounts (0 for a row with no labels)."""
    m = n_true.clamp(max=k).long()
    return torch.where(m > 0, cum_disc[(m - 1).clamp(min=0)], torch.zeros_like(n_true))


def _safe_div(a, b):
    return torch.where(b > 0, a / b.clamp(min=1e-300), torch.zeros_like(a))


def _ratio_of_means(a, b):
    d = b.mean().item()
    return a.mean().item() / d if d > 0 else 0.0


def _top_true_weights(indptr, indices, weight, K):
    """float64 [N, K]: per row, the K largest weights of its true labels, descending, 0-padded."""
    n = indptr.numel() - 1
    lengths = indptr[1:] - indptr[:-1]
    rows = torch.repeat_interleave(torch.arange(n), lengths)
    w = weight[indices]
    # sort by (row asc, weight desc): stable sort on weight desc, then stable sort on row
    order = torch.sort(w, descending=True, stable=True).indices
    order = order[torch.sort(rows[order], stable=True).indices]
    rank = torch.arange(indices.numel()) - indptr[rows]
    keep = rank < K
    out = torch.zeros(n, K, dtype=torch.float64)
    out[rows[keep], rank[keep]] = w[order][keep]
    return out
