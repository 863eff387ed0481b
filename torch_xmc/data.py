"""XMC data: the XC repository text format (reader and writer) and a seeded synthetic long-tail generator.

A data set is an ``XMCData``: CSR-style torch tensors for the sparse features (indptr / indices / values) and
the positive labels (indptr / indices) of N points, plus the feature and label counts. Nothing of size N x L
is ever built.
"""
import math
import os
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class XMCData:
    """N points with sparse features and sparse positive labels, CSR style.

    feat_indptr int64 [N+1], feat_indices int64 [nnz] in [0, num_features), feat_values float32 [nnz];
    label_indptr int64 [N+1], label_indices int64 [n_pos] in [0, num_labels) (distinct within a row).
    """

    feat_indptr: torch.Tensor
    feat_indices: torch.Tensor
    feat_values: torch.Tensor
    label_indptr: torch.Tensor
    label_indices: torch.Tensor
    num_features: int
    num_labels: int

    @property
    def num_points(self) -> int:
        return self.feat_indptr.numel() - 1

    def __len__(self) -> int:
        return self.num_points

    def label_counts(self) -> torch.Tensor:
        """int64 [num_labels]: number of points that carry each label."""
        return torch.bincount(self.label_indices, minlength=self.num_labels)

    def subset(self, rows: torch.Tensor) -> "XMCData":
        """The points ``rows`` (int64 ids, any order, repeats allowed) as a new XMCData."""
        rows = torch.as_tensor(rows, dtype=torch.int64)
        fi, fptr = gather_rows(self.feat_indptr, rows)
        li, lptr = gather_rows(self.label_indptr, rows)
        return XMCData(fptr, self.feat_indices[fi], self.feat_values[fi], lptr, self.label_indices[li],
                       self.num_features, self.num_labels)


def gather_rows(indptr: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions into a CSR's data of the rows ``rows``, in order, and the new indptr [len(rows)+1]."""
    starts, ends = indptr[rows], indptr[rows + 1]
    lengths = ends - starts
    new_ptr = torch.zeros(rows.numel() + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=new_ptr[1:])
    # position k of the output belongs to row r = the row whose [new_ptr[r], new_ptr[r+1]) holds k
    owner = torch.repeat_interleave(torch.arange(rows.numel()), lengths)
    pos = starts[owner] + torch.arange(int(new_ptr[-1])) - new_ptr[owner]
    return pos, new_ptr


class XCFormatError(ValueError):
    """Malformed XC-format file; the message names the file and the 1-based line."""


def _fail(path, line_no, msg):
    raise XCFormatError(f"{path}:{line_no}: {msg}")


def read_xc(path: str | os.PathLike) -> XMCData:
    """Read an XC repository text file: a header ``N F L`` and N rows ``l1,l2,... f:v f:v ...`` (0-based ids;
    a row with no labels starts with a space). Raises XCFormatError naming file and line for a bad header,
    a wrong row count, an id out of range, a duplicate label or an unparsable token; nothing is returned
    half-loaded."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        header = f.readline()
        parts = header.split()
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            _fail(path, 1, f"header must be 'num_points num_features num_labels' (3 non-negative ints), got {header.strip()!r}")
        n, n_feat, n_lab = (int(p) for p in parts)
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    if len(lines) < n:
        _fail(path, len(lines) + 2, f"header promises {n} rows, file ends after {len(lines)}")
    for k in range(n, len(lines)):
        if lines[k].strip():
            _fail(path, k + 2, f"header promises {n} rows, found more (row {k + 1} is not empty)")

    lab_len = np.zeros(n, dtype=np.int64)
    feat_len = np.zeros(n, dtype=np.int64)
    labs: list[int] = []
    fids: list[int] = []
    fvals: list[float] = []
    for r in range(n):
        line = lines[r].rstrip("\r")
        lab_part, _, feat_part = line.partition(" ")
        try:
            if lab_part:
                row_labs = [int(t) for t in lab_part.split(",")]
                if len(set(row_labs)) != len(row_labs):
                    _fail(path, r + 2, f"duplicate label id in {lab_part!r}")
                labs.extend(row_labs)
                lab_len[r] = len(row_labs)
        except ValueError as e:
            if isinstance(e, XCFormatError):
                raise
            _fail(path, r + 2, f"unparsable label list {lab_part!r} (expected comma-separated ints)")
        toks = feat_part.split()
        for tok in toks:
            fid, colon, val = tok.partition(":")
            try:
                if not colon:
                    raise ValueError
                fids.append(int(fid))
                fvals.append(float(val))
            except ValueError:
                _fail(path, r + 2, f"unparsable feature token {tok!r} (expected 'id:value')")
        feat_len[r] = len(toks)

    lab_arr = np.asarray(labs, dtype=np.int64)
    fid_arr = np.asarray(fids, dtype=np.int64)
    for arr, lens, bound, what in ((lab_arr, lab_len, n_lab, "label"), (fid_arr, feat_len, n_feat, "feature")):
        bad = np.flatnonzero((arr < 0) | (arr >= bound))
        if bad.size:
            row = int(np.searchsorted(np.cumsum(lens), bad[0], side="right"))
            _fail(path, row + 2, f"{what} id {int(arr[bad[0]])} out of range [0, {bound})")
    return XMCData(
        feat_indptr=_indptr(feat_len),
        feat_indices=torch.from_numpy(fid_arr),
        feat_values=torch.from_numpy(np.asarray(fvals, dtype=np.float32)),
        label_indptr=_indptr(lab_len),
        label_indices=torch.from_numpy(lab_arr),
        num_features=n_feat,
        num_labels=n_lab,
    )


def _indptr(lengths: np.ndarray) -> torch.Tensor:
    ptr = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=ptr[1:])
    return torch.from_numpy(ptr)


def write_xc(path: str | os.PathLike, data: XMCData) -> None:
    """Write ``data`` in the XC repository text format; values are written with 9 significant digits, which
    round-trips float32 exactly."""
    lptr, lab = data.label_indptr.tolist(), data.label_indices.tolist()
    fptr, fid = data.feat_indptr.tolist(), data.feat_indices.tolist()
    fval = data.feat_values.tolist()
    out = [f"{data.num_points} {data.num_features} {data.num_labels}\n"]
    for r in range(data.num_points):
        labels = ",".join(map(str, lab[lptr[r]:lptr[r + 1]]))
        feats = " ".join(f"{fid[k]}:{fval[k]:.9g}" for k in range(fptr[r], fptr[r + 1]))
        out.append(f"{labels} {feats}\n")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(out)


def load_folder(folder: str | os.PathLike) -> tuple[XMCData, XMCData]:
    """(train, test) from an XC-format data folder holding train.txt and test.txt (the layout of the
    Extreme Classification Repository splits)."""
    train = read_xc(os.path.join(folder, "train.txt"))
    test = read_xc(os.path.join(folder, "test.txt"))
    if (train.num_features, train.num_labels) != (test.num_features, test.num_labels):
        raise XCFormatError(
            f"{folder}: train.txt has {train.num_features} features / {train.num_labels} labels, "
            f"test.txt has {test.num_features} / {test.num_labels}"
        )
    return train, test


# --------------------------------------------------------------------------------------------------- synthetic


@dataclass(frozen=True)
class SyntheticSpec:
    """The generative model of ``synthetic``. Labels have Zipf popularity (exponent ``zipf``) over a random
    id order; each label belongs to one of ``num_labels / labels_per_topic`` latent topics. A point draws
    1-2 topics, then its labels from those topics by popularity; its words are each label's own signature
    words (each kept with probability ``signature_keep``), words of its topics, and background noise."""

    num_features: int = 20_000
    num_labels: int = 10_000
    labels_per_topic: int = 32
    zipf: float = 1.0
    mean_labels: float = 4.0
    signature_words: int = 6
    signature_keep: float = 0.6
    topic_words: int = 40
    topic_draws: int = 8
    noise_words: int = 10


def synthetic(num_points: int, spec: SyntheticSpec = SyntheticSpec(), seed: int = 0, *,
              structure_seed: int | None = None) -> XMCData:
    """``num_points`` points from the long-tail model ``spec``. ``structure_seed`` (default ``seed``) fixes the
    labels, topics and words; ``seed`` the points, so a train and a test split share one structure:
    ``synthetic(n, spec, seed=1, structure_seed=0)`` / ``synthetic(m, spec, seed=2, structure_seed=0)``.
    Memory is O(num_points * words + num_labels * signature_words); nothing N x L."""
    L, V = spec.num_labels, spec.num_features
    srng = np.random.default_rng(seed if structure_seed is None else structure_seed)
    n_topics = max(1, math.ceil(L / spec.labels_per_topic))
    # label with popularity rank r gets a random id; popularity decays as (r + 1)^-zipf
    rank_to_id = srng.permutation(L)
    popularity = np.empty(L)
    popularity[rank_to_id] = (np.arange(L) + 1.0) ** -spec.zipf
    topic = srng.integers(0, n_topics, L)
    signature = srng.integers(0, V, (L, spec.signature_words))
    topic_vocab = srng.integers(0, V, (n_topics, spec.topic_words))
    # labels sorted by topic with a running popularity sum: drawing a label of topic t by popularity is a
    # uniform draw in [cum[start_t], cum[end_t]) and a search
    by_topic = np.argsort(topic, kind="stable")
    cum = np.concatenate([[0.0], np.cumsum(popularity[by_topic])])
    t_start = np.searchsorted(topic[by_topic], np.arange(n_topics), side="left")
    t_end = np.searchsorted(topic[by_topic], np.arange(n_topics), side="right")
    topic_pop = cum[t_end] - cum[t_start]
    topic_cdf = np.cumsum(topic_pop) / topic_pop.sum()

    rng = np.random.default_rng([seed, 1])
    N = num_points
    n_top = 1 + (rng.random(N) < 0.3)
    point_of_topic = np.repeat(np.arange(N), n_top)
    topics = np.minimum(np.searchsorted(topic_cdf, rng.random(point_of_topic.size), side="right"), n_topics - 1)
    n_lab = 1 + rng.poisson(max(spec.mean_labels - 1, 0) / n_top.mean(), point_of_topic.size)
    draw_topic = np.repeat(topics, n_lab)
    draw_point = np.repeat(point_of_topic, n_lab)
    lo, hi = cum[t_start[draw_topic]], cum[t_end[draw_topic]]
    pos = np.searchsorted(cum, lo + rng.random(draw_topic.size) * (hi - lo), side="right") - 1
    labels = by_topic[np.clip(pos, t_start[draw_topic], t_end[draw_topic] - 1)]
    # distinct labels per point, sorted: unique over the key point * L + label
    key = np.unique(draw_point.astype(np.int64) * L + labels)
    lab_point, lab_id = key // L, key % L

    sig_w = signature[lab_id].ravel()
    sig_p = np.repeat(lab_point, spec.signature_words)
    keep = rng.random(sig_w.size) < spec.signature_keep
    top_w = topic_vocab[np.repeat(topics, spec.topic_draws), rng.integers(0, spec.topic_words, topics.size * spec.topic_draws)]
    top_p = np.repeat(point_of_topic, spec.topic_draws)
    noise_w = rng.integers(0, V, N * spec.noise_words)
    noise_p = np.repeat(np.arange(N), spec.noise_words)
    words = np.concatenate([sig_w[keep], top_w, noise_w])
    wpoint = np.concatenate([sig_p[keep], top_p, noise_p])
    wkey, counts = np.unique(wpoint.astype(np.int64) * V + words, return_counts=True)
    feat_point, feat_id = wkey // V, wkey % V
    return XMCData(
        feat_indptr=_indptr(np.bincount(feat_point, minlength=N)),
        feat_indices=torch.from_numpy(feat_id),
        feat_values=torch.from_numpy((1.0 + np.log(counts)).astype(np.float32)),
        label_indptr=_indptr(np.bincount(lab_point, minlength=N)),
        label_indices=torch.from_numpy(lab_id),
        num_features=V,
        num_labels=L,
    )


def synthetic_split(num_train: int, num_test: int, spec: SyntheticSpec = SyntheticSpec(),
                    seed: int = 0) -> tuple[XMCData, XMCData]:
    """(train, test) drawn from one synthetic structure (fixed by ``seed``)."""
    return (synthetic(num_train, spec, seed=2 * seed + 1, structure_seed=seed),
            synthetic(num_test, spec, seed=2 * seed + 2, structure_seed=seed))
