"""Rewiring: property tests on random layers (valid, distinct indices in the canonical slot order after every
rewire; kept connections keep their weights and optimizer state; regrown ones start at zero), the global prune
rule, gradient-guided regrowth, the schedule and its resume."""
import math

import pytest
import torch

from torch_xmc import GroupSharedFanIn
from torch_xmc import functional as XF
from torch_xmc.rewire import Rewirer, cosine_fraction, gradient_evidence, rewire, slot_scores


def connections(layer, tensor):
    """{(label, feature): value} of a [L, F] tensor laid out like the layer's weight."""
    idx = layer.indices.long()[torch.arange(layer.out_features) // layer.group_size]
    return {(l, int(idx[l, t])): float(tensor[l, t]) for l in range(layer.out_features) for t in range(layer.fan_in)}


def trained(H, L, F, G, opt_cls, **kw):
    layer = GroupSharedFanIn(H, L, F, G)
    opt = opt_cls(layer.parameters(), **kw)
    for _ in range(2):
        opt.zero_grad()
        layer(torch.randn(4, H)).pow(2).sum().backward()
        opt.step()
    return layer, opt


@pytest.mark.parametrize("trial", range(12))
def test_random_layers_stay_valid(trial):
    g = torch.Generator().manual_seed(trial)
    H = int(torch.randint(4, 60, (1,), generator=g))
    F = int(torch.randint(1, H + 1 if trial < 3 else H // 2 + 1, (1,), generator=g))  # a few with F > H / 2
    G = int(torch.randint(1, 9, (1,), generator=g))
    L = int(torch.randint(1, 50, (1,), generator=g))
    adam = trial % 2 == 0
    layer, opt = (trained(H, L, F, G, torch.optim.Adam, lr=0.01) if adam
                  else trained(H, L, F, G, torch.optim.SGD, lr=0.01, momentum=0.9))
    state_keys = ["exp_avg", "exp_avg_sq"] if adam else ["momentum_buffer"]
    for round_ in range(3):
        fraction = float(torch.rand(1, generator=g)) * 0.6
        old_idx = layer.indices.clone()
        old_w = connections(layer, layer.weight.detach())
        old_state = {k: connections(layer, opt.state[layer.weight][k]) for k in state_keys}
        scores = slot_scores(layer).flatten()
        n = rewire(layer, fraction, opt, generator=g)
        assert n == (0 if F == H else int(fraction * layer.num_groups * F))
        XF.check_indices(layer.indices, H, L, G)
        assert torch.equal(layer.indices, XF.in_slot_order(layer.indices))
        if 2 * F > H:
            continue  # a group may then need some just-pruned features back: only validity is promised
        new_w = connections(layer, layer.weight.detach())
        new_state = {k: connections(layer, opt.state[layer.weight][k]) for k in state_keys}
        for (l, h), v in new_w.items():
            kept = h in old_idx[l // G].tolist()
            assert v == (old_w[(l, h)] if kept else 0)
            for k in state_keys:
                assert new_state[k][(l, h)] == (old_state[k][(l, h)] if kept else 0)
        # the pruned slots are the globally lowest scores, and each group regrew as many as it lost
        kept_min, pruned_max = math.inf, -math.inf
        for grp in range(layer.num_groups):
            before, after = set(old_idx[grp].tolist()), set(layer.indices[grp].tolist())
            assert len(after - before) == len(before - after)
            for t, h in enumerate(old_idx[grp].tolist()):
                s = float(scores[grp * F + t])
                if h in after:
                    kept_min = min(kept_min, s)
                else:
                    pruned_max = max(pruned_max, s)
        assert pruned_max <= kept_min


def test_output_loses_only_the_pruned_connections(device):
    layer = GroupSharedFanIn(64, 40, 8, 4, device=device)
    before = GroupSharedFanIn(64, 40, 8, 4, device=device)
    before.load_state_dict(layer.state_dict())
    rewire(layer, 0.25)
    XF.check_indices(layer.indices, 64, 40, 4)  # raises unless every group still holds distinct valid ids
    with torch.no_grad():  # the old layer without its pruned connections
        for grp in range(layer.num_groups):
            gone = ~torch.isin(before.indices[grp], layer.indices[grp])
            before.weight[grp * 4:(grp + 1) * 4, gone] = 0
    x = torch.randn(5, 64, device=device)
    torch.testing.assert_close(layer(x), before(x))


def test_gradient_regrowth_picks_strongest_unheld_features():
    layer = GroupSharedFanIn(32, 8, 4, 4)
    with torch.no_grad():
        layer.indices.copy_(torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]], dtype=torch.int32))
        layer.weight.copy_(torch.tensor([[1.0, 0.001, 1.0, 1.0]] * 4 + [[1.0, 1.0, 1.0, 0.002]] * 4))
    evidence = torch.zeros(2, 32)
    evidence[0, 20] = 5.0
    evidence[0, 1] = 9.0  # held: never regrown
    evidence[1, 30] = 1.0
    rewire(layer, 2 / 8, regrow="gradient", evidence=evidence)
    assert layer.indices.tolist() == [[0, 2, 3, 20], [4, 5, 6, 30]]
    assert torch.all(layer.weight[:4, 3] == 0) and torch.all(layer.weight[4:, 3] == 0)
    assert torch.all(layer.weight[:4, :3] == 1)


def test_gradient_evidence_matches_dense_gradient(device):
    layer = GroupSharedFanIn(10, 7, 3, 3, device=device)
    x, dy = torch.randn(6, 10, device=device), torch.randn(6, 7, device=device)
    dense = (dy.t() @ x).abs()
    expect = torch.stack([dense[0:3].sum(0), dense[3:6].sum(0), dense[6:7].sum(0)])
    torch.testing.assert_close(gradient_evidence(layer, x, dy), expect)


def test_schedule_and_resume():
    assert cosine_fraction(0, 0.2, 100) == pytest.approx(0.2)
    assert cosine_fraction(50, 0.2, 100) == pytest.approx(0.1)
    assert cosine_fraction(100, 0.2, 100) == pytest.approx(0.0)

    def run(stop=None, state=None, layer_state=None):
        torch.manual_seed(0)
        layer = GroupSharedFanIn(50, 30, 6, 5)
        r = Rewirer(layer, interval=3, end=20, fraction=0.3, seed=4)
        if state is not None:
            layer.load_state_dict(layer_state)
            r.load_state_dict(state)
        counts = []
        while r.steps < (stop or 25):
            counts.append(r.step())
        return layer, r, counts

    layer, r, counts = run()
    slots = layer.num_groups * layer.fan_in
    assert counts == [int(cosine_fraction(s, 0.3, 20) * slots) if s % 3 == 0 and s <= 20 else 0 for s in range(1, 26)]
    assert counts[2] > 0 and sum(counts[20:]) == 0
    assert r.rewired == sum(counts)
    half_layer, half, _ = run(stop=10)
    resumed, _, _ = run(state=half.state_dict(), layer_state=half_layer.state_dict())
    assert torch.equal(resumed.indices, layer.indices) and torch.equal(resumed.weight, layer.weight)


def test_argument_errors():
    layer = GroupSharedFanIn(10, 7, 3, 3)
    with pytest.raises(ValueError, match="regrow must be"):
        rewire(layer, 0.1, regrow="magic")
    with pytest.raises(ValueError, match=r"evidence of shape \[n_groups, in_features\] = \[3, 10\], got None"):
        rewire(layer, 0.1, regrow="gradient")
    with pytest.raises(TypeError, match="GroupSharedFanIn"):
        Rewirer(torch.nn.Linear(3, 3), end=5)
    with pytest.raises(ValueError, match="interval"):
        Rewirer(layer, interval=0, end=5)


@pytest.mark.parametrize("head,precision", [("headtail", "bf16"), ("gsffi", "fp32")])
def test_trainer_rewires_and_resumes_exactly(tmp_path, head, precision):
    from torch_xmc.data import SyntheticSpec, synthetic_split
    from torch_xmc.train import ModelConfig, TrainConfig, Trainer, normalized

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tr, te = synthetic_split(400, 50, SyntheticSpec(num_features=300, num_labels=120), seed=0)
        tr, te = normalized(tr), normalized(te)
        mc = ModelConfig(tr.num_features, tr.num_labels, hidden=32, fan_in=4, group_size=8, head=head,
                         grouping="semantic", head_fraction=0.1)
        tc = TrainConfig(epochs=2, batch_size=50, lr=1e-2, warmup_steps=2, rewire_interval=2, progress=False,
                         head_precision=precision, head_lr=4.0)
        full = Trainer(mc, tc)
        full.fit(tr)
        layer = full.rewirer.layer
        assert full.rewirer.rewired > 0
        assert layer.weight.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
        XF.check_indices(layer.indices, layer.in_features, layer.out_features, layer.group_size)
        ck = str(tmp_path / "ck.pt")
        Trainer(mc, tc).fit(tr, checkpoint=ck, stop_at=7)
        resumed = Trainer.load(ck)
        resumed.fit(tr)
        for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
            assert torch.equal(a, b)
    finally:
        torch.set_num_threads(before)
