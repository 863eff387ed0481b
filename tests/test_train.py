"""Model, loss, chunked top-k and the trainer: a run resumed from a checkpoint equals the uninterrupted run."""
from dataclasses import replace

import pytest
import torch
from torch import nn

from torch_xmc import GroupSharedFanIn, metrics
from torch_xmc.data import SyntheticSpec, synthetic_split
from torch_xmc.train import (ModelConfig, TrainConfig, Trainer, bce_loss, build_model, fused_bce_loss, make_batch,
                             normalized, predict_topk)

SPEC = SyntheticSpec(num_features=400, num_labels=150, labels_per_topic=10)


@pytest.fixture(scope="module")
def split():
    train, test = synthetic_split(500, 120, SPEC, seed=0)
    return normalized(train), normalized(test)


def test_normalized_rows_have_unit_norm(split):
    train, _ = split
    rows = torch.repeat_interleave(torch.arange(train.num_points), train.feat_indptr.diff())
    sq = torch.zeros(train.num_points).index_add_(0, rows, train.feat_values ** 2)
    assert torch.allclose(sq, torch.ones_like(sq), atol=1e-5)


def test_bce_loss_equals_dense_reference():
    torch.manual_seed(0)
    head = nn.Linear(8, 6)
    hidden = torch.randn(3, 8)
    indptr, indices = torch.tensor([0, 2, 2, 3]), torch.tensor([1, 4, 0])
    target = torch.zeros(3, 6)
    target[0, 1] = target[0, 4] = target[2, 0] = 1
    want = nn.functional.binary_cross_entropy_with_logits(head(hidden), target, reduction="sum") / 3
    assert torch.allclose(bce_loss(head, hidden, indptr, indices), want)


@pytest.mark.parametrize("head", ["dense", "gsffi"])
def test_predict_topk_chunked_equals_full(split, head):
    _, test = split
    torch.manual_seed(0)
    model = build_model(ModelConfig(SPEC.num_features, SPEC.num_labels, hidden=32, head=head, fan_in=4, group_size=8))
    full = predict_topk(model, test, k=5)  # fused top-k op
    chunked = predict_topk(model, test, k=5, max_elements=7 * SPEC.num_labels, fused=False)  # 7 rows per chunk
    assert torch.equal(full, chunked)
    b = make_batch(test, torch.arange(test.num_points))
    model.eval()
    with torch.no_grad():
        assert torch.equal(full, model(b.indices, b.offsets, b.weights).topk(5, dim=1).indices)


@pytest.mark.parametrize("head", ["dense", "gsffi"])
def test_fused_loss_equals_dense_logits_loss(head):
    torch.manual_seed(0)
    model = build_model(ModelConfig(50, 300, hidden=16, head=head, fan_in=4, group_size=8))
    hidden = torch.randn(5, 16)
    indptr, indices = torch.tensor([0, 2, 2, 5, 6, 7]), torch.tensor([1, 299, 0, 7, 100, 3, 64])
    loss = fused_bce_loss(model.head, hidden, indptr, indices)
    loss.backward()
    grads = [p.grad.clone() for p in model.head.parameters()]
    model.zero_grad()
    want = bce_loss(model.head, hidden, indptr, indices)
    want.backward()
    assert torch.allclose(loss, want, rtol=1e-5)
    for g, p in zip(grads, model.head.parameters()):
        assert torch.allclose(g, p.grad, rtol=1e-4, atol=1e-6)


def test_gsffi_head_is_the_module():
    model = build_model(ModelConfig(10, 20, hidden=16, head="gsffi", fan_in=2, group_size=4))
    assert isinstance(model.head, GroupSharedFanIn) and model.head.fan_in == 2


def configs(head):
    mc = ModelConfig(SPEC.num_features, SPEC.num_labels, hidden=32, dropout=0.3, head=head, fan_in=4, group_size=8)
    tc = TrainConfig(epochs=2, batch_size=64, lr=5e-3, warmup_steps=3, eval_every=5, seed=3, progress=False)
    return mc, tc


@pytest.mark.parametrize("head", ["dense", "gsffi"])
def test_resume_reproduces_uninterrupted_run(split, tmp_path, head):
    train, test = split
    inv_prop = metrics.inverse_propensity(train.label_counts(), train.num_points)
    mc, tc = configs(head)
    full = Trainer(mc, tc)
    full.fit(train, test, inv_prop)

    ck = str(tmp_path / "ck.pt")
    first = Trainer(mc, tc)
    first.fit(train, test, inv_prop, checkpoint=ck, stop_at=7)  # stops mid-epoch (8 steps per epoch)
    assert first.step == 7
    torch.manual_seed(12345)  # whatever the global RNG did meanwhile, the checkpoint restores it
    resumed = Trainer.load(ck)
    result = resumed.fit(train, test, inv_prop)
    assert result.step == full.step == 16
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    sa, sb = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for key in sa:
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa[key][field], sb[key][field]), (key, field)
    assert full.scheduler.get_last_lr() == resumed.scheduler.get_last_lr()
    assert full.history == resumed.history  # metrics and mean training loss at every evaluation


def test_training_learns(split):
    train, test = split
    mc = ModelConfig(SPEC.num_features, SPEC.num_labels, hidden=64, dropout=0.2)
    tc = TrainConfig(epochs=15, batch_size=64, lr=1e-2, warmup_steps=5, seed=0, progress=False)
    t = Trainer(mc, tc)
    r = t.fit(train, test)
    assert r.history[-1]["P@1"] > r.history[0]["P@1"] + 10
    assert r.history[-1]["loss"] < r.history[0]["loss"]


def test_cli_train_resume_evaluate_compare(tmp_path, capsys):
    from torch_xmc.cli import main

    tiny = ["--synthetic-labels", "300", "--synthetic-features", "500", "--synthetic-train", "400",
            "--synthetic-test", "100", "--hidden", "32", "--batch-size", "64", "--quiet"]
    ck = str(tmp_path / "m.pt")
    main(["train", *tiny, "--epochs", "1", "--checkpoint", ck])
    assert "P@1" in capsys.readouterr().out
    main(["train", "--resume", "--checkpoint", ck, "--quiet"])  # already complete: reloads, trains nothing
    assert "resuming" in capsys.readouterr().out
    main(["evaluate", "--checkpoint", ck, "--quiet", "--json", str(tmp_path / "m.json")])
    assert "P@5" in capsys.readouterr().out and (tmp_path / "m.json").exists()
    main(["compare", *tiny, "--epochs", "1", "--in-process", "--plot", str(tmp_path / "c.png"), "--json", str(tmp_path / "c.json")])
    out = capsys.readouterr().out
    assert "dense" in out and "gsffi F=4 G=32" in out and "head params" in out
    assert (tmp_path / "c.json").exists()


def test_measure_run_isolated(split):
    from torch_xmc.train import measure_run

    train, test = split
    mc, tc = configs("gsffi")
    r = measure_run(mc, tc, train, test)
    assert r["steps"] == 16 and r["peak_bytes"] > 0 and r["head_params"] == mc.num_labels * (mc.fan_in + 1)
    assert 0 <= r["metrics"]["P@1"] <= 100


@pytest.mark.parametrize("head", ["dense", "gsffi", "headtail"])
def test_head_update_inside_the_loss_equals_after(split, head):
    """A bf16 head's SGDSR step taken inside the fused loss (the default) trains bitwise as the step after
    backward over stored gradients: same weights, momentum, losses; the head never holds a .grad."""
    train, _ = split
    mc, tc = configs(head)
    tc = replace(tc, head_precision="bf16", head_lr=4.0, eval_every=0)
    runs = {}
    for mode in ("inside", "after"):
        t = Trainer(mc, replace(tc, head_update=mode))
        t.fit(train)
        runs[mode] = t
        assert all(p.grad is None for p in t.model.head.parameters()) == (mode == "inside")
    a, b = runs["inside"], runs["after"]
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), name
    for p, q in zip(a.model.head.parameters(), b.model.head.parameters()):
        assert torch.equal(a.head_optimizer.state[p]["momentum_buffer"], b.head_optimizer.state[q]["momentum_buffer"])
    assert a.history == b.history
    with pytest.raises(ValueError, match="head_update must be 'inside' or 'after', got 'before'"):
        Trainer(mc, replace(tc, head_update="before"))
