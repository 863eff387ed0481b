"""XC-format reader/writer (round trip, every malformed-input error) and the synthetic generator."""
import os
from pathlib import Path

import pytest
import torch

from torch_xmc.data import SyntheticSpec, XCFormatError, XMCData, load_folder, read_xc, synthetic, synthetic_split, write_xc

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def small():
    return XMCData(
        feat_indptr=torch.tensor([0, 2, 2, 5]),
        feat_indices=torch.tensor([0, 4, 1, 2, 3]),
        feat_values=torch.tensor([1.0, 0.1, 2.5, 1e-7, 3.0]),
        label_indptr=torch.tensor([0, 2, 3, 3]),
        label_indices=torch.tensor([1, 2, 0]),
        num_features=5,
        num_labels=3,
    )


def assert_same(a: XMCData, b: XMCData):
    assert (a.num_features, a.num_labels) == (b.num_features, b.num_labels)
    for name in ("feat_indptr", "feat_indices", "feat_values", "label_indptr", "label_indices"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name


def test_round_trip(tmp_path):
    d = small()
    write_xc(tmp_path / "d.txt", d)
    text = (tmp_path / "d.txt").read_text().splitlines()
    assert text[0] == "3 5 3" and text[3].startswith(" ")  # a row with no labels starts with a space
    assert_same(read_xc(tmp_path / "d.txt"), d)


def test_round_trip_synthetic(tmp_path):
    d = synthetic(300, SyntheticSpec(num_features=500, num_labels=200), seed=3)
    write_xc(tmp_path / "s.txt", d)
    assert_same(read_xc(tmp_path / "s.txt"), d)


def test_reads_row_with_no_labels_and_no_features(tmp_path):
    (tmp_path / "e.txt").write_text("2 3 2\n \n0 2:1\n")
    d = read_xc(tmp_path / "e.txt")
    assert d.label_indptr.tolist() == [0, 0, 1] and d.feat_indptr.tolist() == [0, 0, 1]


BAD = [
    ("3 5\n", 1, "header"),
    ("a 5 3\n", 1, "header"),
    ("2 5 3\n0 1:1\n", 3, "promises 2 rows"),
    ("1 5 3\n0 1:1\n1 2:1\n", 3, "found more"),
    ("1 5 3\n3 1:1\n", 2, "label id 3 out of range"),
    ("2 5 3\n0 1:1\n-1 1:1\n", 3, "label id -1 out of range"),
    ("2 5 3\n0 1:1\n1 5:1\n", 3, "feature id 5 out of range"),
    ("1 5 3\n0,x 1:1\n", 2, "unparsable label list"),
    ("1 5 3\n0 1:y\n", 2, "unparsable feature token"),
    ("1 5 3\n0 1\n", 2, "unparsable feature token"),
    ("1 5 3\n0,0 1:1\n", 2, "duplicate label"),
]


@pytest.mark.parametrize("text,line,msg", BAD)
def test_malformed_input_names_file_and_line(tmp_path, text, line, msg):
    p = tmp_path / "bad.txt"
    p.write_text(text)
    with pytest.raises(XCFormatError, match=msg) as e:
        read_xc(p)
    assert str(e.value).startswith(f"{p}:{line}: ")


def test_folder_shape_mismatch(tmp_path):
    write_xc(tmp_path / "train.txt", small())
    (tmp_path / "test.txt").write_text("1 6 3\n0 1:1\n")
    with pytest.raises(XCFormatError, match="features"):
        load_folder(tmp_path)


def test_subset():
    d = small()
    s = d.subset(torch.tensor([2, 0]))
    assert s.feat_indptr.tolist() == [0, 3, 5] and s.feat_indices.tolist() == [1, 2, 3, 0, 4]
    assert s.label_indptr.tolist() == [0, 0, 2] and s.label_indices.tolist() == [1, 2]


@pytest.mark.parametrize("name,shape", [("bibtex", (4880, 1836, 159)), ("delicious", (12920, 500, 983))])
def test_real_data(name, shape):
    folder = SHARED / name
    if not folder.is_dir():
        pytest.skip(f"{folder} not present")
    train, test = load_folder(folder)
    assert (train.num_points, train.num_features, train.num_labels) == shape
    assert test.num_labels == shape[2]


def test_synthetic_is_seeded():
    spec = SyntheticSpec(num_features=1000, num_labels=500)
    assert_same(synthetic(200, spec, seed=7), synthetic(200, spec, seed=7))
    a, b = synthetic(200, spec, seed=7), synthetic(200, spec, seed=8)
    assert not torch.equal(a.label_indices[:50], b.label_indices[:50])


def test_synthetic_splits_share_structure():
    spec = SyntheticSpec(num_features=2000, num_labels=1000)
    train, test = synthetic_split(4000, 1000, spec, seed=0)
    c_train, c_test = train.label_counts().double(), test.label_counts().double()
    # the same labels are popular in both splits
    assert torch.corrcoef(torch.stack([c_train, c_test]))[0, 1] > 0.8


def test_synthetic_long_tail_and_valid():
    spec = SyntheticSpec(num_features=5000, num_labels=5000)
    d = synthetic(20000, spec, seed=0)
    assert d.num_points == 20000 and d.label_indices.max() < 5000 and d.feat_indices.max() < 5000
    assert (d.label_indptr.diff() >= 1).all()  # every point has a label
    counts = d.label_counts().sort(descending=True).values
    total = counts.sum()
    assert counts[:50].sum() > 0.25 * total  # 1% of the labels hold over a quarter of the positives
    assert (counts <= 5).sum() > 0.4 * spec.num_labels  # and most labels are rare
    # labels within a row are distinct and sorted
    rows = torch.repeat_interleave(torch.arange(d.num_points), d.label_indptr.diff())
    key = rows * spec.num_labels + d.label_indices
    assert (key.diff() > 0).all()


def test_synthetic_topics_make_labels_cooccur():
    """Labels of one topic co-occur: pairs drawn within points repeat far more than the same labels paired at
    random (same marginals), which is the structure that grouping related labels can use."""
    spec = SyntheticSpec(num_features=2000, num_labels=2000, labels_per_topic=20)
    d = synthetic(20000, spec, seed=1)
    multi = torch.nonzero(d.label_indptr.diff() >= 2).flatten()
    first, second = d.label_indices[d.label_indptr[multi]], d.label_indices[d.label_indptr[multi] + 1]
    shuffled = second[torch.randperm(second.numel(), generator=torch.Generator().manual_seed(0))]
    distinct = (first * 2000 + second).unique().numel()
    distinct_random = (first * 2000 + shuffled).unique().numel()
    assert multi.numel() > 1000
    assert distinct < 0.7 * distinct_random


def test_synthetic_million_labels_is_cheap():
    spec = SyntheticSpec(num_features=50_000, num_labels=1_000_000)
    d = synthetic(2000, spec, seed=0)
    assert d.num_labels == 1_000_000 and d.label_indices.max() < 1_000_000
