"""Command line: ``python -m torch_xmc train | evaluate | compare``.

Data: an XC-format folder (``--data DIR`` with train.txt and test.txt, the Extreme Classification Repository
layout) or, by default, the built-in synthetic long-tail task (sizes chosen so that ``compare`` finishes in a
few minutes on two CPU cores).
"""
import argparse
import json
import os
import sys
from dataclasses import asdict, replace

import torch

from . import metrics
from .data import SyntheticSpec, load_folder, synthetic_split
from .train import ModelConfig, TrainConfig, Trainer, evaluate_model, measure_run, normalized

# The README's main job: dense vs GSFFI on this task, on CPU, in under 5 minutes on 2 cores.
DEFAULT_SYNTHETIC = {"spec": SyntheticSpec(num_features=20_000, num_labels=20_000), "num_train": 25_000,
                     "num_test": 5_000, "seed": 0}
SHOWN = ("P@1", "P@3", "P@5", "nDCG@5", "PSP@5")


def load_data(args_or_source):
    """(train, test, inv_prop, source) with normalised features; source describes the data for checkpoints."""
    source = args_or_source if isinstance(args_or_source, dict) else _source(args_or_source)
    if source["data"]:
        train, test = load_folder(source["data"])
    else:
        spec = SyntheticSpec(**source["synthetic"]["spec"])
        s = source["synthetic"]
        train, test = synthetic_split(s["num_train"], s["num_test"], spec, seed=s["seed"])
    inv_prop = metrics.inverse_propensity(train.label_counts(), train.num_points, source["A"], source["B"])
    return normalized(train), normalized(test), inv_prop, source


def _source(args):
    syn = dict(DEFAULT_SYNTHETIC)
    syn["spec"] = asdict(replace(syn["spec"], **{k: v for k, v in (("num_labels", args.synthetic_labels),
                                                                    ("num_features", args.synthetic_features))
                                                 if v is not None}))
    if args.synthetic_train is not None:
        syn["num_train"] = args.synthetic_train
    if args.synthetic_test is not None:
        syn["num_test"] = args.synthetic_test
    return {"data": args.data, "synthetic": None if args.data else syn, "A": args.prop_a, "B": args.prop_b}


def _describe(source, train, test):
    name = source["data"] or "synthetic"
    return (f"data: {name}: {train.num_points} train / {test.num_points} test points, "
            f"{train.num_features} features, {train.num_labels} labels")


def _add_data_args(p):
    g = p.add_argument_group("data")
    g.add_argument("--data", help="XC-format folder with train.txt and test.txt (default: built-in synthetic task)")
    g.add_argument("--synthetic-labels", type=int, help=f"synthetic: labels (default {DEFAULT_SYNTHETIC['spec'].num_labels})")
    g.add_argument("--synthetic-features", type=int,
                   help=f"synthetic: features (default {DEFAULT_SYNTHETIC['spec'].num_features})")
    g.add_argument("--synthetic-train", type=int, help=f"synthetic: train points (default {DEFAULT_SYNTHETIC['num_train']})")
    g.add_argument("--synthetic-test", type=int, help=f"synthetic: test points (default {DEFAULT_SYNTHETIC['num_test']})")
    g.add_argument("--prop-a", type=float, default=0.55, help="propensity A (Jain et al. 2016; default 0.55)")
    g.add_argument("--prop-b", type=float, default=1.5, help="propensity B (default 1.5)")


def _add_model_args(p, head=True):
    g = p.add_argument_group("model and training")
    if head:
        g.add_argument("--head", choices=["dense", "gsffi", "headtail"], default="gsffi",
                       help="classifier head (default gsffi); headtail: dense head for the most frequent labels + GSFFI tail")
    g.add_argument("--hidden", type=int, default=256, help="encoder width H (default 256)")
    g.add_argument("--dropout", type=float, default=0.3)
    g.add_argument("--fan-in", type=int, default=None, help="GSFFI inputs per group F (default H/8)")
    g.add_argument("--group-size", type=int, default=32, help="GSFFI labels per group G (default 32)")
    g.add_argument("--head-fraction", type=float, default=0.05,
                   help="headtail: share of the labels in the dense head, rounded to groups (default 0.05)")
    g.add_argument("--grouping", choices=["none", "frequency", "semantic"], default="none",
                   help="GSFFI label groups: user order, frequency order, or balanced PIFA clusters (default none; "
                        "headtail: frequency)")
    g.add_argument("--rewire-interval", type=int, default=0,
                   help="GSFFI: steps between rewirings of the connections (default 0: static)")
    g.add_argument("--rewire-fraction", type=float, default=0.2,
                   help="share of connections rewired first, cosine-decayed to 0 at 2/3 of training (default 0.2)")
    g.add_argument("--head-precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: head weights in bfloat16, SGD + momentum with stochastic rounding, no fp32 copy")
    g.add_argument("--head-lr", type=float, default=32.0, help="bf16 head: SGD learning rate (default 32)")
    g.add_argument("--head-update", choices=["inside", "after"], default="inside",
                   help="bf16 head, fused loss: take the head's SGD step inside the fused loss, with no "
                        "weight-sized gradient (default), or after backward; both give the same result")
    g.add_argument("--epochs", type=float, default=2)
    g.add_argument("--batch-size", type=int, default=256)
    g.add_argument("--lr", type=float, default=1e-2)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--warmup", type=int, default=50, help="warmup steps (default 50)")
    g.add_argument("--schedule", choices=["cosine", "linear", "constant"], default="cosine")
    g.add_argument("--loss", choices=["fused", "dense"], default="fused",
                   help="BCE through the fused op, no B x L logits (default), or over dense logits")
    g.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (default: each epoch)")
    g.add_argument("--eval-points", type=int, default=0, help="evaluate during training on this many test points")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def _configs(args, train, head):
    mc = ModelConfig(train.num_features, train.num_labels, hidden=args.hidden, dropout=args.dropout, head=head,
                     fan_in=args.fan_in or max(1, args.hidden // 8), group_size=args.group_size,
                     head_fraction=args.head_fraction, grouping=args.grouping)
    tc = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                     warmup_steps=args.warmup, schedule=args.schedule, loss=args.loss, eval_every=args.eval_every,
                     eval_points=args.eval_points, seed=args.seed, progress=not args.quiet,
                     rewire_interval=args.rewire_interval, rewire_fraction=args.rewire_fraction,
                     head_precision=args.head_precision, head_lr=args.head_lr, head_update=args.head_update)
    return mc, tc


REWIRE_INTERVAL = 25  # steps between rewirings when a compare spec asks for "+rewire" without --rewire-interval


def _head_spec(args, train, spec):
    """(head, ModelConfig, TrainConfig) of a compare entry: a head, optionally with "+" modifiers: frequency,
    semantic (grouping), rewire, bf16 (head precision), e.g. "gsffi+semantic+rewire" or "headtail+rewire+bf16"."""
    head, *mods = spec.split("+")
    unknown = set(mods) - {"frequency", "semantic", "rewire", "bf16"}
    if head not in ("dense", "gsffi", "headtail") or unknown or (head == "dense" and set(mods) - {"bf16"}):
        raise SystemExit(f"--heads: {spec!r} is not a head (dense, gsffi, headtail) with modifiers among "
                         "+frequency, +semantic, +rewire (GSFFI heads only), +bf16")
    mc, tc = _configs(args, train, head)
    grouping = next((m for m in mods if m in ("frequency", "semantic")), mc.grouping)
    mc = replace(mc, grouping=grouping)
    if "rewire" in mods:
        tc = replace(tc, rewire_interval=args.rewire_interval or REWIRE_INTERVAL)
    if "bf16" in mods:
        tc = replace(tc, head_precision="bf16")
    return head, mc, tc


def _print_metrics(m):
    print("  ".join(f"{k} {m[k]:.2f}" for k in ("P@1", "P@3", "P@5", "nDCG@1", "nDCG@3", "nDCG@5",
                                                   "PSP@1", "PSP@3", "PSP@5", "PSnDCG@5") if k in m))


def cmd_train(args):
    if args.resume:
        trainer = Trainer.load(args.checkpoint, progress=not args.quiet)
        train, test, inv_prop, source = load_data(trainer.extra["source"])
        print(f"resuming {args.checkpoint} at step {trainer.step}")
    else:
        train, test, inv_prop, source = load_data(args)
        mc, tc = _configs(args, train, args.head)
        tc = replace(tc, checkpoint_every=args.checkpoint_every)
        trainer = Trainer(mc, tc)
        trainer.extra["source"] = source
    print(_describe(source, train, test))
    print(trainer.model)
    os.makedirs(os.path.dirname(os.path.abspath(args.checkpoint)), exist_ok=True)
    trainer.fit(train, test, inv_prop, checkpoint=args.checkpoint)
    m = evaluate_model(trainer.model, test, inv_prop, progress=not args.quiet)
    print(f"test ({test.num_points} points), train {trainer.train_seconds:.1f} s:")
    _print_metrics(m)
    print(f"checkpoint: {args.checkpoint}")


def cmd_evaluate(args):
    trainer = Trainer.load(args.checkpoint, progress=not args.quiet)
    source = dict(trainer.extra["source"])
    if args.data:
        source["data"] = args.data
    train, test, inv_prop, source = load_data(source)
    print(_describe(source, train, test))
    m = evaluate_model(trainer.model, test, inv_prop, progress=not args.quiet)
    print(f"{args.checkpoint} (step {trainer.step}) on {test.num_points} test points:")
    _print_metrics(m)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(m, f, indent=1)


def _fmt_bytes(n):
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def cmd_compare(args):
    train, test, inv_prop, source = load_data(args)
    print(_describe(source, train, test))
    rows = []
    for spec in args.heads.split(","):
        head, mc, tc = _head_spec(args, train, spec)
        label = "dense" if head == "dense" else f"{spec} F={mc.fan_in} G={mc.group_size}"
        print(f"--- {label}")
        r = measure_run(mc, tc, train, test, inv_prop, isolate=not args.in_process)
        r["name"] = label
        rows.append(r)
    header = ["head", *SHOWN, "head params", "head memory", "peak memory", "s/epoch"]
    table = [[r["name"], *(f"{r['metrics'][k]:.2f}" for k in SHOWN), f"{r['head_params']:,}",
              _fmt_bytes(r["head_bytes"]), _fmt_bytes(r["peak_bytes"]), f"{r['seconds_per_epoch']:.1f}"]
             for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table)]
    print()
    for line in [header, *table]:
        print("  ".join(str(x).rjust(w) for x, w in zip(line, widths)))
    print("head memory: head parameters + gradients + Adam state + index buffers; peak memory: peak RSS of the "
          "run's own process above its level before training (training and evaluation)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"source": source, "args": vars(args), "runs": rows}, f, indent=1, default=str)
        print(f"wrote {args.json}")
    if args.plot:
        plot_p1_vs_memory(rows, args.plot, title=source["data"] or "synthetic")


def plot_p1_vs_memory(rows, path, title=""):
    """PNG: P@1 against head memory, one point per run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path} (pip install matplotlib)", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for r in rows:
        x = r["head_bytes"] / 2**20
        ax.scatter([x], [r["metrics"]["P@1"]], s=40)
        ax.annotate(r["name"], (x, r["metrics"]["P@1"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.margins(x=0.4, y=0.2)
    ax.set_xlabel("head training memory (MiB, log scale)")
    ax.set_ylabel("P@1 (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m torch_xmc", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one model and save a checkpoint")
    _add_data_args(t)
    _add_model_args(t)
    t.add_argument("--checkpoint", default="runs/model.pt", help="checkpoint path (default runs/model.pt)")
    t.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (default: at the end)")
    t.add_argument("--resume", action="store_true", help="continue the run saved in --checkpoint")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="evaluate a checkpoint on its (or another) test split")
    e.add_argument("--checkpoint", default="runs/model.pt")
    e.add_argument("--data", help="XC-format folder (default: the data the checkpoint was trained on)")
    e.add_argument("--json", help="write the metrics to this JSON file")
    e.add_argument("--quiet", action="store_true")
    e.add_argument("--threads", type=int, default=None)
    e.set_defaults(func=cmd_evaluate)

    c = sub.add_parser("compare", help="train dense and GSFFI heads with the same encoder and budget; table + plot")
    _add_data_args(c)
    _add_model_args(c, head=False)
    c.add_argument("--heads", default="dense,gsffi",
                   help="comma-separated heads to compare (default dense,gsffi); a GSFFI head may carry modifiers "
                        "+frequency, +semantic, +rewire, +bf16, e.g. dense,gsffi,gsffi+rewire,gsffi+semantic,headtail+rewire,gsffi+bf16")
    c.add_argument("--plot", default="compare.png", help="PNG of P@1 against head memory (default compare.png)")
    c.add_argument("--json", help="write the runs to this JSON file")
    c.add_argument("--in-process", action="store_true",
                   help="run the heads in this process (faster start; peak memory then also counts earlier runs' cache)")
    c.set_defaults(func=cmd_compare)

    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.func(args)
