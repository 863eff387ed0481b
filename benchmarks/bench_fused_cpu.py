"""CPU speed and memory of the fused loss and fused top-k (issue 4) against our own unfused path, in one process.

Training step (loss + gradients of x, weight, bias), BCE with logits, reduction sum / B:
  fused     torch_xmc.functional.gsffi_loss(...).backward(): no [B, L] tensor
  unfused   GSFFI forward -> [B, L] logits, F.binary_cross_entropy_with_logits against a dense [B, L] target
            (built once, outside the timing), backward through our gsffi_backward
Training step with the layer's SGDSR step (SGD + momentum; float32 here, so no rounding):
  fused     layer.loss(x, ..., optimizer=opt).backward(): the update applied per label block inside the op
  unfused   the fused step above, then opt.step() over the stored weight gradient
Prediction (top-k labels per row):
  fused     torch_xmc.functional.gsffi_topk
  unfused   GSFFI forward -> [B, L] logits, torch.topk
Reported: median ms, and the peak resident memory above the inputs during one call (peak extra MiB).

    python benchmarks/bench_fused_cpu.py --threads 2 --json benchmarks/results/fused_cpu.json
"""
import argparse
import gc
import os
import sys

# As bench_cpu.py: large buffers go back to the OS when freed, so each call's resident-set peak is its own.
if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
    os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})

import torch  # noqa: E402
import torch.nn.functional as TF  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from bench_cpu import peak_extra_mb  # noqa: E402
import torch_xmc  # noqa: E402
from torch_xmc import functional as XF  # noqa: E402

SHAPE = (256, 768, 131072, 64, 32)
POSITIVES_PER_ROW = 5


def bench(B, H, L, F, G, ks, repeat):
    torch.manual_seed(0)
    layer = torch_xmc.GroupSharedFanIn(H, L, F, G)
    x = torch.randn(B, H, requires_grad=True)
    indptr = torch.arange(B + 1) * POSITIVES_PER_ROW
    labels = torch.randint(0, L, (B * POSITIVES_PER_ROW,))
    target = torch.zeros(B, L)
    target[torch.repeat_interleave(torch.arange(B), POSITIVES_PER_ROW), labels] = 1
    clear, fused_step = common.fused_step_fns(layer, x, indptr, labels)

    def unfused_step():
        clear()
        (TF.binary_cross_entropy_with_logits(layer(x), target, reduction="sum") / B).backward()

    opt = torch_xmc.SGDSR(layer.parameters(), lr=1e-4, momentum=0.9)
    step_with_update_inside, step_then_update = common.update_step_fns(layer, x, indptr, labels, opt)

    xd = x.detach()
    cases = [("train step", "fused gsffi_loss + backward", fused_step),
             ("train step", "unfused forward + BCE + backward", unfused_step),
             ("train step + SGD-SR", "fused: the update inside gsffi_loss_sgd_ + backward", step_with_update_inside),
             ("train step + SGD-SR", "gsffi_loss + backward, then SGDSR.step()", step_then_update)]
    for k in ks:
        cases += [(f"top-{k}", "fused gsffi_topk", lambda k=k: layer.topk(xd, k)),
                  (f"top-{k}", "unfused forward + torch.topk", lambda k=k: layer(xd).topk(k, dim=1))]
    rows = []
    for task, method, fn in cases:
        r = {"task": task, "method": method, "B": B, "H": H, "L": L, "F": F, "G": G}
        with torch.no_grad() if not task.startswith("train") else torch.enable_grad():
            r["ms"] = common.median_time(fn, repeat)
            clear()
            gc.collect()
            r["peak_extra_mb"] = peak_extra_mb(fn)
        clear()
        rows.append(r)
        print(f"  {task}: {method}: {r['ms']:.1f} ms, peak extra {r['peak_extra_mb']:.0f} MiB", flush=True)
    for fused, unfused in zip(rows[::2], rows[1::2]):
        fused["speedup_vs_unfused"] = unfused["ms"] / fused["ms"]
        fused["memory_vs_unfused"] = fused["peak_extra_mb"] / unfused["peak_extra_mb"]
    # the two steps compute the same thing: check it once, outside the timing
    clear()
    fused_loss = layer.loss(x, indptr, labels).item()
    unfused_loss = (TF.binary_cross_entropy_with_logits(layer(x), target, reduction="sum") / B).item()
    return rows, {"fused_loss": fused_loss, "unfused_loss": unfused_loss}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--shape", default=",".join(map(str, SHAPE)), help="B,H,L,F,G")
    ap.add_argument("--k", default="5,100", help="top-k sizes, comma-separated")
    ap.add_argument("--json", default="benchmarks/results/fused_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shape = tuple(map(int, args.shape.split(",")))
    print(f"(B, H, L, F, G) = {shape}, float32, {args.threads} threads, load average {os.getloadavg()}", flush=True)
    load_before = os.getloadavg()
    rows, check = bench(*shape, ks=[int(k) for k in args.k.split(",")], repeat=args.repeat)
    print()
    common.print_table(rows, ["task", "method", "ms", "speedup_vs_unfused", "peak_extra_mb", "memory_vs_unfused"])
    print(f"loss: fused {check['fused_loss']:.6f}, unfused {check['unfused_loss']:.6f}")
    env = {**common.environment(), "load_average_before": load_before}  # environment() holds the one after
    common.write_json(args.json, {"env": env, "rows": rows, "check": check})


if __name__ == "__main__":
    main()
