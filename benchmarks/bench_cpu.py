"""CPU speed and memory of the GSFFI layer against dense baselines, all in one process.

For each (B, H, L, F, G): forward, backward and forward+backward (median ms) of dense nn.Linear, the FLOPs-matched
bottleneck Linear(H->F)->Linear(F->L), GSFFI in plain PyTorch (gather + bmm), and torch_xmc; parameter+gradient
memory, and the peak extra resident memory of one forward+backward step.

    python benchmarks/bench_cpu.py --threads 2 --json benchmarks/results/cpu_bench.json
"""
import argparse
import gc
import os
import sys

# Fixed mmap threshold: large buffers go back to the OS when freed, so the resident-set peak of each step
# is its own and not memory another method left in malloc's heap. Set before the interpreter allocates.
if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
    os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import torch_xmc  # noqa: E402

SHAPES = [(256, 768, 131072, 64, 32), (256, 768, 670080, 64, 32)]


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_mb(step):
    """Peak resident memory above the current level while running step(): VmHWM after resetting it."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kb("VmRSS")
    step()
    return (_status_kb("VmHWM") - base) / 1024


def bench_shape(B, H, L, F, G, repeat):
    torch.manual_seed(0)
    gsffi = torch_xmc.GroupSharedFanIn(H, L, F, G)
    heads = {
        "dense nn.Linear": lambda: nn.Linear(H, L),
        "bottleneck H->F->L": lambda: common.Bottleneck(H, L, F),
        "plain PyTorch gather+bmm": lambda: common.GatherBmm(gsffi),
        "torch_xmc GSFFI": lambda: gsffi,
    }
    x = torch.randn(B, H, requires_grad=True)
    gy = torch.randn(B, L)
    rows = []
    for name, make in heads.items():
        head = make()
        params = list(head.parameters())

        def clear():
            x.grad = None
            for p in params:
                p.grad = None

        def fwd():
            head(x)

        def step():
            clear()
            head(x).backward(gy)

        y = head(x)

        def bwd():
            clear()
            y.backward(gy, retain_graph=True)

        r = {"head": name, "B": B, "H": H, "L": L, "F": F, "G": G}
        r["fwd_ms"] = common.median_time(fwd, repeat)
        r["bwd_ms"] = common.median_time(bwd, repeat)
        r["step_ms"] = common.median_time(step, repeat)
        del y
        step()
        r["param_grad_mb"] = sum(p.numel() * p.element_size() * 2 for p in params) / 2**20
        r["param_grad_mb"] += sum(b.numel() * b.element_size() for b in head.buffers()) / 2**20
        clear()
        r["step_peak_extra_mb"] = peak_extra_mb(step)
        clear()
        rows.append(r)
        print(f"  {name}: step {r['step_ms']:.1f} ms", flush=True)
        del head, params
        gc.collect()
    ours = rows[-1]
    for r in rows:
        r["step_speedup_of_ours"] = r["step_ms"] / ours["step_ms"]
        r["fwd_speedup_of_ours"] = r["fwd_ms"] / ours["fwd_ms"]
    dense = rows[0]
    ours["memory_vs_dense"] = ours["param_grad_mb"] / dense["param_grad_mb"]
    ours["density_F_over_H"] = F / H
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--shapes", default=None, help="B,H,L,F,G;B,H,L,F,G (default: the issue's two)")
    ap.add_argument("--json", default="benchmarks/results/cpu_bench.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [tuple(map(int, s.split(","))) for s in args.shapes.split(";")] if args.shapes else SHAPES
    rows = []
    for shape in shapes:
        print(f"(B, H, L, F, G) = {shape}", flush=True)
        rows += bench_shape(*shape, repeat=args.repeat if shape[2] <= 200_000 else max(2, args.repeat // 2))
    print()
    common.print_table(rows, ["L", "head", "fwd_ms", "bwd_ms", "step_ms", "step_speedup_of_ours", "param_grad_mb",
                              "step_peak_extra_mb"])
    common.write_json(args.json, {"env": common.environment(), "rows": rows})


if __name__ == "__main__":
    main()
