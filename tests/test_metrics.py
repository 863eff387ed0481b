"""Metrics against a plain per-row reference (pyxclib's definitions) on random rankings."""
import math

import numpy as np
import pytest
import torch

from torch_xmc import metrics


def reference(topk, truth_rows, inv_prop, ks):
    """Per row, with Python sets: P@k, nDCG@k, and PSP@k / PSnDCG@k as ratio of means to the best ranking."""
    out = {}
    n = len(truth_rows)
    for k in ks:
        p = ndcg = psp = psp_best = psd = psd_best = 0.0
        for i in range(n):
            truth = set(truth_rows[i])
            ranked = topk[i][:k]
            p += sum(l in truth for l in ranked) / k
            ideal = sum(1 / math.log2(j + 2) for j in range(min(k, len(truth))))
            dcg = sum((l in truth) / math.log2(j + 2) for j, l in enumerate(ranked))
            w = sorted((inv_prop[l] for l in truth), reverse=True)[:k]
            psp += sum(inv_prop[l] for l in ranked if l in truth) / k
            psp_best += sum(w) / k
            if ideal > 0:
                ndcg += dcg / ideal
                psd += sum(inv_prop[l] * (l in truth) / math.log2(j + 2) for j, l in enumerate(ranked)) / ideal
                psd_best += sum(x / math.log2(j + 2) for j, x in enumerate(w)) / ideal
        out[f"P@{k}"] = 100 * p / n
        out[f"nDCG@{k}"] = 100 * ndcg / n
        out[f"PSP@{k}"] = 100 * psp / psp_best
        out[f"PSP@{k}_raw"] = 100 * psp / n
        out[f"PSnDCG@{k}"] = 100 * psd / psd_best
        out[f"PSnDCG@{k}_raw"] = 100 * psd / n
    return out


def random_case(seed, n=300, L=40, K=5):
    rng = np.random.default_rng(seed)
    truth_rows = [sorted(rng.choice(L, rng.integers(0, 8), replace=False).tolist()) for _ in range(n)]
    # rankings biased towards the truth so that hits are frequent
    topk = []
    for t in truth_rows:
        cand = list(t) + rng.choice(L, 10, replace=False).tolist()
        rng.shuffle(cand)
        topk.append(list(dict.fromkeys(cand))[:K])
        topk[-1] += [l for l in range(L) if l not in topk[-1]][:K - len(topk[-1])]
    indptr = torch.tensor([0] + np.cumsum([len(t) for t in truth_rows]).tolist())
    indices = torch.tensor([l for t in truth_rows for l in t], dtype=torch.int64)
    return torch.tensor(topk), truth_rows, indptr, indices


@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_reference(seed):
    L = 40
    topk, truth_rows, indptr, indices = random_case(seed, L=L)
    counts = torch.bincount(indices, minlength=L)
    inv_prop = metrics.inverse_propensity(counts, len(truth_rows))
    got = metrics.evaluate(topk, indptr, indices, L, inv_prop)
    want = reference(topk.tolist(), truth_rows, inv_prop.tolist(), (1, 3, 5))
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-6), key


def test_perfect_ranking_scores_100():
    truth = [[3], [1, 2], [0, 4, 5, 6, 7, 8]]
    indptr = torch.tensor([0, 1, 3, 9])
    indices = torch.tensor([l for t in truth for l in t])
    inv_prop = torch.linspace(1, 3, 10, dtype=torch.float64)
    topk = torch.tensor([[3, 0, 1, 2, 4], [2, 1, 0, 3, 4], [8, 7, 6, 5, 4]])  # largest weights first
    m = metrics.evaluate(topk, indptr, indices, 10, inv_prop)
    assert m["P@1"] == pytest.approx(100.0)
    assert m["nDCG@5"] == pytest.approx(100.0)
    assert m["PSP@1"] == pytest.approx(100.0)
    assert m["PSnDCG@5"] == pytest.approx(100.0)


def test_inverse_propensity_formula():
    counts = torch.tensor([0, 1, 10, 1000])
    A, B, N = 0.6, 2.6, 5000
    C = (math.log(N) - 1) * (B + 1) ** A
    want = [1 + C * (c + B) ** -A for c in counts.tolist()]
    assert metrics.inverse_propensity(counts, N, A, B).tolist() == pytest.approx(want, rel=1e-12)


def test_rejects_short_topk():
    with pytest.raises(ValueError, match="topk must be"):
        metrics.evaluate(torch.zeros(2, 3, dtype=torch.int64), torch.tensor([0, 1, 2]), torch.tensor([0, 1]), 4)
