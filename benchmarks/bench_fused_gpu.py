"""GPU speed and memory of the fused loss and fused top-k (issue 4), against our unfused path and the best dense
step we know, in one process (bf16, H = 768, 5 positives per row).

Training step (loss + gradients of x, weight, bias), BCE with logits, reduction sum / B:
  fused       torch_xmc.functional.gsffi_loss(...).backward(): no [B, L] tensor
  unfused     GSFFI forward -> [B, L] logits, F.binary_cross_entropy_with_logits against a dense target, backward
  skip-loss   dense nn.Linear weights, no loss graph (Renee's trick, DESIGN.md section 3): logits = x W^T + b,
  dense       sigmoid in place, subtract 1 at the positives, scale, then grad_W = dz^T x and grad_x = dz W
Training step with the head's optimizer step (SGD + momentum, bf16 stochastic rounding, torch_xmc.optim.SGDSR):
  fused       layer.loss(x, ..., optimizer=opt).backward(): the update is applied per label chunk inside the op,
              so no weight-sized gradient exists
  unfused     the fused step above, then opt.step() over the stored weight gradient
  also        the update inside with the targets on the CPU: they are checked there and copied up without a
              host sync (targets on the GPU are copied down to be checked: a sync per step)
Prediction: fused gsffi_topk; unfused forward + torch.topk; dense x W^T + b then torch.topk.
Reported: median ms of CUDA-event times, and peak extra memory: PyTorch's allocations above their level before
the call (the outputs, so the fused step's includes its weight gradient) plus the kernels' scratch
(torch_xmc.memory: the high-water mark of the device's default cudaMallocAsync pool).

    python benchmarks/bench_fused_gpu.py --json benchmarks/results/fused_gpu.json [--shape 256,3000000,64,32]
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as TF

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch_xmc  # noqa: E402
from torch_xmc import memory  # noqa: E402
from torch_xmc.optim import SGDSR  # noqa: E402
from bench_gpu import H, timed  # noqa: E402
from common import environment, fused_step_fns, print_table, update_step_fns, write_json  # noqa: E402

POSITIVES_PER_ROW = 5


def peak_extra_mib(fn):
    """(PyTorch allocations above the level before the call, kernel scratch) at their peaks, MiB."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    memory.reset_scratch_peak()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20, memory.scratch_peak_bytes() / 2**20


def warm_up(fns, seconds):
    """Run fns in turn for about `seconds` before anything is timed: the first run on a freshly started H100
    (2026-11-25 14:31 UTC) timed the fused step 6% and top-5 37% slower than the same run five minutes later,
    with only timed()'s few warm-up calls per case."""
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for fn in fns:
            fn()
        torch.cuda.synchronize()


def bench(B, L, F, G, ks, repeat, dense):
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    layer = torch_xmc.GroupSharedFanIn(H, L, F, G, device=dev, dtype=dt)
    x = torch.randn(B, H, device=dev, dtype=dt, requires_grad=True)
    indptr = torch.arange(B + 1, device=dev) * POSITIVES_PER_ROW
    labels = torch.randint(0, L, (B * POSITIVES_PER_ROW,), device=dev)
    rows_of = torch.repeat_interleave(torch.arange(B, device=dev), POSITIVES_PER_ROW)
    xd = x.detach()
    clear, fused_step = fused_step_fns(layer, x, indptr, labels)

    target = None

    def unfused_step():
        clear()
        (TF.binary_cross_entropy_with_logits(layer(x), target, reduction="sum") / B).backward()

    opt = SGDSR(layer.parameters(), lr=1e-4, momentum=0.9, seed=0)
    step_with_update_inside, step_then_update = update_step_fns(layer, x, indptr, labels, opt)
    # targets on the CPU, as a data loader yields them
    step_with_update_inside_cpu_targets, _ = update_step_fns(layer, x, indptr.cpu(), labels.cpu(), opt)

    cases = [("train step", "fused gsffi_loss + backward", fused_step, True),
             ("train step + SGD-SR", "fused: the update inside gsffi_loss_sgd_ + backward", step_with_update_inside,
              True),
             ("train step + SGD-SR", "gsffi_loss + backward, then SGDSR.step()", step_then_update, True),
             ("train step + SGD-SR", "the update inside, targets on the CPU (no host sync)",
              step_with_update_inside_cpu_targets, True)]
    for k in ks:
        cases.append((f"top-{k}", "fused gsffi_topk", lambda k=k: layer.topk(xd, k), True))
    rows = []
    warm_up([fused_step, lambda: torch.no_grad()(layer.topk)(xd, max(ks, default=5))], seconds=3.0)
    clear()

    def run(task, method, fn):
        r = {"task": task, "method": method, "B": B, "H": H, "L": L, "F": F, "G": G}
        with torch.no_grad() if not task.startswith("train") else torch.enable_grad():
            r["ms"] = timed(fn, repeat)
            clear()
            r["torch_peak_extra_mib"], r["scratch_peak_mib"] = peak_extra_mib(fn)
            r["peak_extra_mib"] = r["torch_peak_extra_mib"] + r["scratch_peak_mib"]
        clear()
        rows.append(r)
        print(f"  {task}: {method}: {r['ms']:.3f} ms, peak extra {r['torch_peak_extra_mib']:.0f} MiB (PyTorch) + "
              f"{r['scratch_peak_mib']:.0f} MiB (kernel scratch)", flush=True)

    for task, method, fn, _ in cases:
        run(task, method, fn)
    # the same step unfused: a dense bf16 target (1.5 GB at 3M labels), built outside the timing
    target = torch.zeros(B, L, device=dev, dtype=dt)
    target[rows_of, labels] = 1
    clear()
    fused_loss = layer.loss(x, indptr, labels).item()
    unfused_loss = (TF.binary_cross_entropy_with_logits(layer(x).float(), target.float(), reduction="sum") / B).item()
    run("train step", "unfused forward + BCE + backward", unfused_step)
    del target
    for k in ks:
        run(f"top-{k}", "unfused forward + torch.topk", lambda k=k: layer(xd).topk(k, dim=1))
    if dense:
        W = torch.randn(L, H, device=dev, dtype=dt) * 0.02
        b = torch.zeros(L, device=dev, dtype=dt)
        xs = xd.clone()

        def skip_loss_step():
            z = torch.addmm(b, xs, W.t())
            z.sigmoid_()
            z[rows_of, labels] -= 1
            z.mul_(1.0 / B)
            return z.t() @ xs, z @ W, z.sum(0)

        run("train step", "skip-loss dense (logits, sigmoid in place, 2 GEMMs)", skip_loss_step)
        for k in ks:
            run(f"top-{k}", "dense x W^T + torch.topk", lambda k=k: torch.addmm(b, xs, W.t()).topk(k, dim=1))
        del W
    torch.cuda.empty_cache()
    fused = {r["task"]: r for r in rows if r["method"].startswith("fused")}
    for r in rows:
        if not r["method"].startswith("fused"):
            r["ms_vs_fused"] = r["ms"] / fused[r["task"]]["ms"]
    return rows, {"fused_loss": fused_loss, "unfused_loss_fp32": unfused_loss}


def profile(B, L, F, G):
    """Kernel-by-kernel CUDA time of 3 fused steps and 3 fused top-5 calls (torch.profiler)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    dev, dt = "cuda", torch.bfloat16
    layer = torch_xmc.GroupSharedFanIn(H, L, F, G, device=dev, dtype=dt)
    x = torch.randn(B, H, device=dev, dtype=dt, requires_grad=True)
    indptr = torch.arange(B + 1, device=dev) * POSITIVES_PER_ROW
    labels = torch.randint(0, L, (B * POSITIVES_PER_ROW,), device=dev)
    _, fused_step = fused_step_fns(layer, x, indptr, labels)  # clears the gradients: no accumulation kernels
    for name, fn in (("step", fused_step),
                     ("top-5", lambda: layer.topk(x.detach(), 5))):
        fn()
        torch.cuda.synchronize()
        with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
        print(f"--- {name}: 3 calls")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="256,3000000,64,32", help="B,L,F,G")
    ap.add_argument("--k", default="5,100", help="top-k sizes, comma-separated")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--no-dense", action="store_true", help="skip the dense baselines (their weights are L x H)")
    ap.add_argument("--profile", action="store_true", help="print the CUDA kernel times of one fused step and top-5")
    ap.add_argument("--json")
    a = ap.parse_args()
    B, L, F, G = (int(v) for v in a.shape.split(","))
    ks = [int(k) for k in a.k.split(",") if k]
    print(f"{torch.cuda.get_device_name()}, bf16, (B, H, L, F, G) = ({B}, {H}, {L}, {F}, {G}), "
          f"XMC_FUSED_CHUNK_MB={os.environ.get('XMC_FUSED_CHUNK_MB', 'default')}")
    if a.profile:
        profile(B, L, F, G)
        return
    rows, check = bench(B, L, F, G, ks, a.repeat, not a.no_dense)
    print()
    print_table(rows, ["task", "method", "ms", "torch_peak_extra_mib", "scratch_peak_mib", "ms_vs_fused"])
    print(f"loss: fused {check['fused_loss']:.6g}, unfused (fp32 BCE of the bf16 logits) {check['unfused_loss_fp32']:.6g}")
    if a.json:
        write_json(a.json, {"environment": environment(), "units": "milliseconds (median of CUDA-event times)",
                            "dtype": "bfloat16", "chunk_mb": os.environ.get("XMC_FUSED_CHUNK_MB", "default"),
                            "rows": rows, "check": check})


if __name__ == "__main__":
    main()
