"""The paper's training method around the GSFFI layer (issue 6), measured: rewiring, head/tail, semantic grouping,
bf16 + stochastic rounding.

    python benchmarks/bench_method.py bibtex delicious   # 3 seeds each -> results/method_<name>.json
    python benchmarks/bench_method.py synthetic-1m       # 1,000,000 labels: fp32 vs bf16 + SR head -> results/method_synthetic-1m.json
    python benchmarks/bench_method.py synthetic-100k     # the same task at 100,000 labels, plus bf16 rounded to nearest
    python benchmarks/bench_method.py synthetic-100k --epochs 3 --head-lr 4 --tag=-3ep   # longer, smaller steps

Every configuration trains the same bag-of-words encoder (torch_xmc.train.BowEncoder) with the same budget and
schedule; only the classifier head and its training differ. Data: ../shared/data/<name>/ beside the checkout
(or --data-root). Settings per data set are those the accuracy benchmark tuned for the dense head
(benchmarks/bench_accuracy.py: the dense head matches a one-vs-rest linear SVM there); sparse heads use
F = H / 8.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from torch_xmc import GroupSharedFanIn, grouping, metrics  # noqa: E402
from torch_xmc.data import SyntheticSpec, load_folder, synthetic_split  # noqa: E402
from torch_xmc.headtail import HeadTailFanIn, head_size  # noqa: E402
from torch_xmc.optim import SGDSR  # noqa: E402
from torch_xmc.rewire import Rewirer, gradient_evidence  # noqa: E402
from torch_xmc import functional as XF  # noqa: E402
from torch_xmc.train import (BowEncoder, XMCModel, bce_loss, make_batch, normalized, peak_rss,  # noqa: E402
                             reset_peak_rss)

from common import environment, write_json  # noqa: E402


@dataclass(frozen=True)
class Setting:
    hidden: int
    dropout: float
    lr: float
    epochs: float
    batch_size: int
    group_size: int
    warmup: int = 50
    head_fraction: float = 0.05


SETTINGS = {  # from bench_accuracy.py (tuned on the dense head)
    "bibtex": Setting(hidden=1024, dropout=0.5, lr=3e-3, epochs=20, batch_size=128, group_size=8),
    "delicious": Setting(hidden=512, dropout=0.5, lr=1e-2, epochs=20, batch_size=128, group_size=32),
}


@dataclass(frozen=True)
class Config:
    """One way to build and train the classifier head."""

    name: str
    head: str = "gsffi"  # "dense", "gsffi" (one GSFFI layer) or "headtail"
    grouping: str = "none"  # "none" (user label order), "frequency" or "semantic" (PIFA balanced clusters)
    rewire: bool = False
    regrow: str = "random"
    index_init: str = "random"  # or "pifa": each group's top-F features of the PIFA of encoder outputs at init
    precision: str = "fp32"  # "fp32" or "bf16" (head weights; bf16 needs optimizer "sgd": SGDSR)
    optimizer: str = "adamw"  # head: "adamw" (with the encoder), "sgd" (SGDSR, momentum 0.9) or "sgd-nearest"
    # ("sgd-nearest": torch.optim.SGD, which rounds a bf16 update to nearest: the control for stochastic rounding)
    head_lr: float | None = None  # "sgd": its learning rate
    match_density: bool = False  # headtail: shrink the tail's F so that the whole head has density <= 1/8


REAL_CONFIGS = [
    Config("dense", head="dense"),
    Config("gsffi static"),
    Config("gsffi freq", grouping="frequency"),
    Config("gsffi freq + rewire", grouping="frequency", rewire=True),
    Config("gsffi semantic", grouping="semantic"),
    Config("gsffi semantic + rewire", grouping="semantic", rewire=True),
    Config("headtail freq", head="headtail", grouping="frequency"),
    Config("headtail freq + rewire", head="headtail", grouping="frequency", rewire=True),
    Config("headtail semantic", head="headtail", grouping="semantic"),
    Config("headtail semantic + rewire", head="headtail", grouping="semantic", rewire=True),
    Config("gsffi freq + rewire (gradient)", grouping="frequency", rewire=True, regrow="gradient"),
    Config("headtail sem + rewire + pifa init", head="headtail", grouping="semantic", rewire=True, index_init="pifa"),
    Config("headtail freq (total density 1/8)", head="headtail", grouping="frequency", match_density=True),
    Config("headtail sem + rewire (total density 1/8)", head="headtail", grouping="semantic", rewire=True,
           match_density=True),
]


class CastHead(nn.Module):
    """Runs a head in its parameters' dtype: input cast in, logits cast back to float32 (for the loss)."""

    def __init__(self, head: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.head, self.dtype = head.to(dtype), dtype

    def forward(self, x):
        return self.head(x.to(self.dtype)).float()


def head_loss(head, hidden, indptr, labels):
    """BCE summed over labels, averaged over rows, through the fused loss ops (no [B, L] logits)."""
    if isinstance(head, CastHead):
        return head_loss(head.head, hidden.to(head.dtype), indptr, labels).float()
    if isinstance(head, nn.Linear):
        return XF.linear_loss(hidden, head.weight, head.bias, indptr, labels)
    return head.loss(hidden, indptr, labels)


def head_topk(head, hidden, k):
    if isinstance(head, CastHead):
        return head_topk(head.head, hidden.to(head.dtype), k)
    if isinstance(head, nn.Linear):
        return XF.linear_topk(hidden, head.weight, head.bias, k)[1]
    return head.topk(hidden, k)[1]


@torch.no_grad()
def evaluate(model, data, inv_prop, k=5, chunk=4096):
    """Metrics of model on data through the fused top-k (no [N, L] scores)."""
    model.eval()
    out = torch.empty(data.num_points, k, dtype=torch.int64)
    for r0 in range(0, data.num_points, chunk):
        rows = torch.arange(r0, min(r0 + chunk, data.num_points))
        b = make_batch(data, rows)
        out[rows] = head_topk(model.head, model.encoder(b.indices, b.offsets, b.weights), k).long()
    model.train()
    return metrics.evaluate(out, data.label_indptr, data.label_indices, data.num_labels, inv_prop)


def build_head(cfg: Config, s: Setting, train, encoder, seed):
    H, L, G = s.hidden, train.num_labels, s.group_size
    Fi = H // 8
    counts = train.label_counts()
    if cfg.head == "dense":
        return nn.Linear(H, L)
    tail_emb = grouping.pifa(train, dim=256 if train.num_features > 4096 else None) if cfg.grouping == "semantic" else None
    index_emb = None
    if cfg.index_init == "pifa":
        with torch.no_grad():
            rows = torch.arange(train.num_points)
            b = make_batch(train, rows)
            index_emb = grouping.pifa(train, features=encoder.eval()(b.indices, b.offsets, b.weights))
            encoder.train()
    if cfg.head == "headtail":
        if cfg.match_density:  # dense head labels * H + tail labels * F <= L * H / 8
            n_head = head_size(L, s.head_fraction, G)
            Fi = int((L / 8 - n_head) * H // (L - n_head))
        return HeadTailFanIn.from_counts(counts, H, Fi, G, head_fraction=s.head_fraction, tail_embeddings=tail_emb,
                                         index_embeddings=index_emb, seed=seed)
    if cfg.grouping == "none":
        return GroupSharedFanIn(H, L, Fi, G)
    # one GSFFI layer over all labels in frequency or semantic order: a head/tail module with no head
    order = (grouping.frequency_order(counts) if tail_emb is None
             else grouping.balanced_order(tail_emb, G, seed=seed))
    layer = HeadTailFanIn(H, L, Fi, G, head_labels=0, label_order=order)
    if index_emb is not None:
        with torch.no_grad():
            layer.tail.indices.copy_(grouping.indices_from_embeddings(index_emb[order], G, Fi))
    return layer


def sparse_layer(head):
    h = head.head if isinstance(head, CastHead) else head
    if isinstance(h, GroupSharedFanIn):
        return h, None
    if isinstance(h, HeadTailFanIn):
        return h.tail, h
    return None, None


def bias_prior(head, L):
    # every label starts at a prior of ~1/L (as train.build_model does for its heads)
    for m in head.modules():
        if isinstance(m, (nn.Linear, GroupSharedFanIn)) and m.bias is not None:
            nn.init.constant_(m.bias, -math.log(L))


def run(cfg: Config, s: Setting, train, test, inv_prop, seed, progress=False, max_steps=None, eval_points=None):
    torch.manual_seed(seed)
    L = train.num_labels
    base = reset_peak_rss()
    encoder = BowEncoder(train.num_features, s.hidden, s.dropout)
    head = build_head(cfg, s, train, encoder, seed)
    bias_prior(head, L)
    if cfg.precision == "bf16":
        head = CastHead(head, torch.bfloat16)
    model = XMCModel(encoder, head)
    n, bs = train.num_points, s.batch_size
    per_epoch = math.ceil(n / bs)
    total = max(1, round(s.epochs * per_epoch))
    if max_steps:
        total = min(total, max_steps)
    if cfg.optimizer == "adamw":
        optimizers = [torch.optim.AdamW(model.parameters(), lr=s.lr, fused=True)]
    else:
        sgd = (SGDSR(head.parameters(), lr=cfg.head_lr, momentum=0.9, seed=seed) if cfg.optimizer == "sgd"
               else torch.optim.SGD(head.parameters(), lr=cfg.head_lr, momentum=0.9))
        optimizers = [torch.optim.AdamW(encoder.parameters(), lr=s.lr, fused=True), sgd]
    warm = min(s.warmup, total // 10 + 1)
    lam = lambda t: (t + 1) / warm if t < warm else 0.5 * (1 + math.cos(math.pi * min((t - warm) / max(1, total - warm), 1.0)))  # noqa: E731
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lam) for o in optimizers]
    layer, ht = sparse_layer(head)
    rewirer = None
    if cfg.rewire:
        rewirer = Rewirer(layer, optimizers[-1], interval=max(1, total // 40), end=(2 * total) // 3, fraction=0.2,
                          regrow=cfg.regrow, seed=seed)
    g = torch.Generator().manual_seed(seed)
    train_seconds, step, loss_sum = 0.0, 0, 0.0
    from tqdm.auto import tqdm
    bar = tqdm(total=total, desc=cfg.name, disable=not progress, leave=False)
    while step < total:
        order = torch.randperm(n, generator=g)
        for i in range(0, n, bs):
            if step >= total:
                break
            t0 = time.perf_counter()
            b = make_batch(train, order[i:i + bs])
            hidden = encoder(b.indices, b.offsets, b.weights)
            want_evidence = rewirer is not None and cfg.regrow == "gradient" and rewirer.due()
            if want_evidence:  # the regrowth evidence needs the logits' gradient: this step goes through logits
                logits = head(hidden)
                logits.retain_grad()
                loss = bce_loss(lambda h: logits, hidden, b.label_indptr, b.label_indices)
            else:
                loss = head_loss(head, hidden, b.label_indptr, b.label_indices)
            for o in optimizers:
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o, sc in zip(optimizers, schedulers):
                o.step()
                sc.step()
            if rewirer is not None:
                ev = None
                if want_evidence:
                    x_tail, dy = hidden.detach(), logits.grad
                    if ht is not None:
                        x_tail = x_tail[..., ht.tail_features[0]:ht.tail_features[1]]
                        dy = dy[:, ht.label_order[ht.head_labels:]]
                    ev = gradient_evidence(layer, x_tail, dy)
                rewirer.step(ev)
            train_seconds += time.perf_counter() - t0
            loss_sum += loss.item()
            step += 1
            bar.update(1)
    bar.close()
    t0 = time.perf_counter()
    test_eval = test if not eval_points else test.subset(torch.arange(min(eval_points, test.num_points)))
    m = evaluate(model, test_eval, inv_prop)
    eval_seconds = time.perf_counter() - t0
    head_params = sum(p.numel() for p in head.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in head.parameters())
    state_bytes = sum(v.numel() * v.element_size() for o in optimizers for p in head.parameters()
                      for v in o.state.get(p, {}).values() if isinstance(v, torch.Tensor))
    buffer_bytes = sum(b.numel() * b.element_size() for b in head.buffers())
    nonzero = head_params - (layer.bias.numel() if layer is not None and layer.bias is not None else 0)
    return {
        "config": asdict(cfg), "seed": seed, "metrics": m, "steps": step, "final_loss": loss_sum / max(step, 1),
        "head_params": head_params,
        # parameters + their gradients + optimizer state + buffers (indices, label order)
        "head_bytes": 2 * param_bytes + state_bytes + buffer_bytes,
        "density": (nonzero - (L if cfg.head == "dense" else 0)) / (L * s.hidden),
        "peak_bytes": max(0, peak_rss() - base),
        "rewired": rewirer.rewired if rewirer is not None else 0,
        "train_seconds": train_seconds, "seconds_per_step": train_seconds / max(step, 1),
        "eval_seconds": eval_seconds,
    }


def summarize(runs):
    def stats(v):
        return {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                "min": min(v), "max": max(v)}

    out = {k: stats([r["metrics"][k] for r in runs]) for k in runs[0]["metrics"]}
    for k in ("head_bytes", "peak_bytes", "density", "train_seconds", "seconds_per_step"):
        out[k] = stats([float(r[k]) for r in runs])
    return out


def print_rows(rows):
    print(f"{'config':<28} {'P@1':>13} {'P@3':>13} {'P@5':>13} {'PSP@5':>13} {'density':>7} {'head MiB':>9} "
          f"{'peak MiB':>9} {'s/step':>7}")
    for name, s in rows:
        def ms(k):
            return f"{s[k]['mean']:6.2f}±{s[k]['std']:<5.2f}"
        print(f"{name:<28} {ms('P@1')} {ms('P@3')} {ms('P@5')} {ms('PSP@5') if 'PSP@5' in s else '-':>13} "
              f"{s['density']['mean']:7.3f} {s['head_bytes']['mean'] / 2**20:9.2f} {s['peak_bytes']['mean'] / 2**20:9.1f} "
              f"{s['seconds_per_step']['mean']:7.4f}")


def bench_real(name, args):
    train, test = load_folder(os.path.join(args.data_root, name))
    inv_prop = metrics.inverse_propensity(train.label_counts(), train.num_points)
    train, test = normalized(train), normalized(test)
    s = SETTINGS[name]
    if args.epochs:
        s = replace(s, epochs=args.epochs)
    configs = [c for c in REAL_CONFIGS if not args.configs or c.name in args.configs.split(",")]
    results = {"data": name, "setting": asdict(s), "environment": environment(), "configs": []}
    path = os.path.join(args.out, f"method_{name}{args.tag}.json")
    if args.configs and os.path.exists(path):  # a partial re-run keeps the other configs' results
        with open(path) as f:
            kept = json.load(f)["configs"]
        results["configs"] = [c for c in kept if c["name"] not in {c2.name for c2 in configs}]
    rows = []
    for cfg in configs:
        runs = []
        for seed in range(args.seeds):
            r = run(cfg, s, train, test, inv_prop, seed, progress=args.progress)
            print(f"  {name} {cfg.name} seed {seed}: P@1 {r['metrics']['P@1']:.2f} P@5 {r['metrics']['P@5']:.2f} "
                  f"({r['train_seconds']:.1f} s)", flush=True)
            runs.append(r)
        summary = summarize(runs)
        rows.append((cfg.name, summary))
        results["configs"].append({"name": cfg.name, "config": asdict(cfg), "summary": summary, "runs": runs})
        write_json(path, results)
    print_rows(rows)
    return results


SYNTHETIC = {  # labels -> task; 100k is the same task at a tenth of the labels, where a control fits the time
    n: {"spec": SyntheticSpec(num_features=50_000, num_labels=n), "num_train": 30_000, "num_test": 3_000,
        "setting": Setting(hidden=128, dropout=0.2, lr=1e-2, epochs=1, batch_size=128, group_size=32)}
    for n in (100_000, 1_000_000)
}
SYNTHETIC_CONFIGS = [
    Config("gsffi fp32 SGD", precision="fp32", optimizer="sgd"),
    Config("gsffi bf16 SGD + SR", precision="bf16", optimizer="sgd"),
    Config("gsffi bf16 SGD nearest", precision="bf16", optimizer="sgd-nearest"),
]


def bench_synthetic(args, num_labels):
    """1,000,000 labels: the GSFFI head trained by SGD + momentum in float32 against bfloat16 weights and
    momentum with stochastic rounding (no float32 copy), same seeds, same everything else."""
    cfg = SYNTHETIC[num_labels]
    name = f"synthetic-{num_labels // 1000}k" if num_labels < 1_000_000 else f"synthetic-{num_labels // 1_000_000}m"
    s = cfg["setting"]
    if args.epochs:
        s = replace(s, epochs=args.epochs)
    t0 = time.perf_counter()
    train, test = synthetic_split(cfg["num_train"], cfg["num_test"], cfg["spec"], seed=0)
    inv_prop = metrics.inverse_propensity(train.label_counts(), train.num_points)
    train, test = normalized(train), normalized(test)
    print(f"synthetic: {train.num_points} train / {test.num_points} test, {train.num_labels} labels, "
          f"generated in {time.perf_counter() - t0:.0f} s", flush=True)
    results = {"data": name, "spec": asdict(cfg["spec"]), "num_train": cfg["num_train"],
               "num_test": cfg["num_test"], "setting": asdict(s), "environment": environment(), "configs": []}
    configs = [replace(c, head_lr=args.head_lr) for c in SYNTHETIC_CONFIGS
               if not args.configs or c.name in args.configs.split(",")]
    path = os.path.join(args.out, f"method_{name}{args.tag}.json")
    kept = []
    if args.configs and os.path.exists(path):  # a partial re-run keeps the other configs' results
        with open(path) as f:
            kept = [c for c in json.load(f)["configs"] if c["name"] not in {c2.name for c2 in configs}]
    runs = {c.name: [] for c in configs}
    for seed in range(args.seeds):  # seeds outermost: a cut-short run still compares the configs on equal seeds
        for c in configs:
            r = run(c, s, train, test, inv_prop, seed, progress=args.progress, max_steps=args.max_steps)
            print(f"  {name} {c.name} seed {seed}: P@1 {r['metrics']['P@1']:.2f} P@5 {r['metrics']['P@5']:.2f} "
                  f"head {r['head_bytes'] / 2**20:.0f} MiB peak {r['peak_bytes'] / 2**20:.0f} MiB "
                  f"({r['train_seconds']:.0f} s, {r['steps']} steps)", flush=True)
            runs[c.name].append(r)
            results["configs"] = kept + [{"name": c2.name, "config": asdict(c2), "summary": summarize(runs[c2.name]),
                                          "runs": runs[c2.name]} for c2 in configs if runs[c2.name]]
            write_json(path, results)
    print_rows([(c["name"], c["summary"]) for c in results["configs"]])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("datasets", nargs="+",
                   help="bibtex, delicious (real, from --data-root), synthetic-1m or synthetic-100k")
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=float, default=None, help="override the data set's epochs")
    p.add_argument("--configs", default="", help="comma-separated config names (default: all)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--head-lr", type=float, default=32.0,
                   help="synthetic-1m: SGD learning rate of the head (default 32: best of 0.5, 4, 32, 128, 512 for "
                        "float32 on a 100,000-label version of the task)")
    p.add_argument("--max-steps", type=int, default=None, help="cap the training steps (quick trials)")
    p.add_argument("--tag", default="", help="suffix of the output file name, e.g. -3ep: method_<data>-3ep.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.datasets:
        if name in ("synthetic-1m", "synthetic-100k"):
            bench_synthetic(args, 1_000_000 if name == "synthetic-1m" else 100_000)
        else:
            bench_real(name, args)


if __name__ == "__main__":
    main()
