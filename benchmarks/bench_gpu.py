"""GSFFI on one GPU: correctness against a float64 reference (--check) and speed against dense baselines.

  python benchmarks/bench_gpu.py --check            # random odd shapes, every dtype, poisoned outputs, determinism
  python benchmarks/bench_gpu.py --small            # one small shape per dtype and path (for compute-sanitizer)
  python benchmarks/bench_gpu.py --json results/gpu_bench.json [--rows 0,1]   # DESIGN.md section 3's rows

Timing: CUDA events around each call, warm-up first, median of --repeat calls, inputs rotated across enough
copies to exceed L2. The floor of each op is max(bytes / copy bandwidth, FLOPs / matmul rate), with both
ceilings measured in the same run (DESIGN.md: 2.96 TB/s and 769 TFLOP/s on the H100).
"""
import argparse
import math
import os
import statistics
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch_xmc  # noqa: E402
from common import Bottleneck, environment, print_table, write_json  # noqa: E402

FWD = torch.ops.torch_xmc.gsffi_forward
BWD = torch.ops.torch_xmc.gsffi_backward
ROWS = [(256, 3_000_000, 64, 32), (256, 670_080, 64, 32), (1024, 670_080, 64, 32), (64, 670_080, 64, 16),
        (256, 670_080, 128, 32), (256, 3_000_000, 128, 64)]
H = 768


def indices(n_groups, H, F, device):
    return torch_xmc.random_indices(n_groups, H, F).to(device)


def reference(x, w, idx, bias, G):
    L = w.shape[0]
    xg = x.double()[:, idx.long()[torch.arange(L, device=x.device) // G]]  # [B, L, F]
    y = torch.einsum("blf,lf->bl", xg, w.double())
    return y + bias.double() if bias is not None else y


def reference_grads(x, w, idx, bias, G, gy):
    x, w = x.double().requires_grad_(), w.double().requires_grad_()
    b = bias.double().requires_grad_() if bias is not None else None
    reference(x, w, idx, b, G).backward(gy.double())
    return x.grad, w.grad, (b.grad if b is not None else None)


def rel(a, r):
    return ((a.double() - r).norm() / r.norm().clamp_min(1e-30)).item()


def poison(n_bytes):
    """Fill the caching allocator's next block with NaN so that unwritten outputs show up."""
    t = torch.full((n_bytes // 4 + 1024,), float("nan"), device="cuda")
    del t


TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 2e-3}


def check_one(B, Hh, L, F, G, dtype, bias=True, determinism=False):
    dev = "cuda"
    x = torch.randn(B, Hh, device=dev, dtype=dtype)
    w = torch.randn(L, F, device=dev, dtype=dtype)
    idx = indices(-(-L // G), Hh, F, dev)
    b = torch.randn(L, device=dev, dtype=dtype) if bias else None
    gy = torch.randn(B, L, device=dev, dtype=dtype)
    poison(B * L * 8)
    y = FWD(x, w, idx, b, G)
    poison((B * Hh + L * F) * 8)
    gx, gw, gb = BWD(gy, x, w, idx, G, [True, True, bias])
    torch.cuda.synchronize()
    ry = reference(x, w, idx, b, G)
    rx, rw, rb = reference_grads(x, w, idx, b, G, gy)
    errs = {"y": rel(y, ry), "gx": rel(gx, rx), "gw": rel(gw, rw), "gb": rel(gb, rb) if bias else 0.0}
    finite = all(torch.isfinite(t).all().item() for t in (y, gx, gw) + ((gb,) if bias else ()))
    ok = finite and all(e <= TOL[dtype] for e in errs.values())
    det = None
    if determinism:
        gx2, gw2, gb2 = BWD(gy, x, w, idx, G, [True, True, bias])
        y2 = FWD(x, w, idx, b, G)
        det = torch.equal(gx, gx2) and torch.equal(gw, gw2) and torch.equal(y, y2) and (not bias or torch.equal(gb, gb2))
        ok = ok and det
    return ok, errs, finite, det


def run_check(small=False):
    torch.manual_seed(0)
    shapes = [  # (B, H, L, F, G)
        (5, 33, 37, 7, 5), (1, 16, 10, 16, 3), (3, 20, 12, 4, 1), (4, 10, 6, 5, 100), (70, 45, 300, 9, 150),
        (300, 64, 200, 32, 32), (1, 768, 1000, 64, 32), (17, 768, 4099, 64, 32), (130, 96, 999, 24, 8),
        (33, 200, 777, 40, 12), (64, 768, 3000, 64, 16), (257, 768, 5003, 128, 64), (100, 512, 2000, 256, 8),
        (40, 300, 1001, 8, 128), (129, 1000, 2048, 96, 40), (20, 2000, 640, 64, 32), (300, 9000, 300, 64, 32),
        (9, 64, 50, 64, 7), (48, 128, 512, 16, 200),
    ]
    if small:
        # B >= 64 takes grad_input's kernels compiled for F = 64 / 128 and 8 warps. The last four have room
        # for two grad_y ring stages (quads), for none (warp pairs), and for three of half a group (quads; F =
        # 128, and F = 72 compiled for any F); the others are quads or 48-row pairs
        shapes = [(5, 33, 37, 7, 5), (17, 96, 301, 64, 32), (33, 64, 130, 24, 12), (20, 200, 100, 128, 64),
                  (70, 96, 301, 64, 32), (65, 160, 200, 128, 64), (70, 768, 600, 128, 32), (65, 768, 300, 128, 64),
                  (70, 740, 640, 128, 64), (64, 768, 520, 72, 48)]
    dtypes = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
    rows, all_ok = [], True
    for (B, Hh, L, F, G) in shapes:
        for dt in dtypes:
            if small and dt == torch.float64:
                continue
            ok, errs, finite, det = check_one(B, Hh, L, F, G, dt, bias=(L % 2 == 1 or dt != torch.float16),
                                              determinism=not small and dt == torch.bfloat16)
            all_ok &= ok
            rows.append(dict(shape=f"{B}x{Hh}->{L} F{F} G{G}", dtype=str(dt)[6:], y=errs["y"], gx=errs["gx"],
                             gw=errs["gw"], gb=errs["gb"], finite=finite, det=det, ok=ok))
    print_table(rows, ["shape", "dtype", "y", "gx", "gw", "gb", "finite", "det", "ok"])
    if not small:
        all_ok &= check_big()
    print("CHECK", "PASS" if all_ok else "FAIL")
    return all_ok


def check_big():
    """B x L > 2^31: compare a few rows and labels at the end of the output with the reference."""
    B, L, F, G = 800, 2_800_000, 16, 32
    x = torch.randn(B, H, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(L, F, device="cuda", dtype=torch.bfloat16)
    idx = indices(-(-L // G), H, F, "cuda")
    y = FWD(x, w, idx, None, G)
    rows = torch.tensor([0, B // 2, B - 1], device="cuda")
    labels = torch.cat([torch.arange(L - 100, L, device="cuda"), torch.randint(0, L, (100,), device="cuda")])
    xg = x[rows].double()[:, idx.long()[labels // G]]  # [3, n, F]
    ref = (xg * w[labels].double()).sum(-1)
    err = rel(y[rows][:, labels], ref)
    gy = torch.randn(B, L, device="cuda", dtype=torch.bfloat16) * 0.01
    del y
    gx, gw, _ = BWD(gy, x, w, idx, G, [True, True, False])
    # grad_w of the sampled labels, from the reference formula
    rgw = torch.einsum("bn,bnf->nf", gy[:, labels].double(), x.double()[:, idx.long()[labels // G]])
    err_w = rel(gw[labels], rgw)
    ok = err < 1e-2 and err_w < 1e-2 and torch.isfinite(gx).all().item()
    print(f"big B*L = {B * L} > 2^31: y rel err {err:.2e}, grad_w rel err {err_w:.2e}, grad_x finite: "
          f"{torch.isfinite(gx).all().item()} -> {'ok' if ok else 'FAIL'}")
    return ok


# ---------------------------------------------------------------- timing


def timed(fn, repeat, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def ceilings():
    n = 1 << 29  # 1 GiB of bf16
    a = torch.empty(n, device="cuda", dtype=torch.bfloat16).normal_()
    b = torch.empty_like(a)
    t = timed(lambda: b.copy_(a), 10)
    bw = 2 * a.numel() * 2 / (t * 1e-3)
    del a, b
    m = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = timed(lambda: m @ m, 10)
    fl = 2 * 8192 ** 3 / (t * 1e-3)
    return bw, fl


class Rotor:
    """Cycles through copies of the inputs so repeated calls do not find them in L2."""

    def __init__(self, make, bytes_each, l2=50 << 20):
        self.sets = [make() for _ in range(max(1, min(4, math.ceil(2 * l2 / max(bytes_each, 1)))))]
        self.i = 0

    def next(self):
        self.i = (self.i + 1) % len(self.sets)
        return self.sets[self.i]


def bench_row(B, L, F, G, bw, fl, repeat, gather_bmm):
    dev, dt = "cuda", torch.bfloat16
    ng = -(-L // G)
    idx = indices(ng, H, F, dev)
    out = dict(B=B, L=L, F=F, G=G)

    def make():
        return (torch.randn(B, H, device=dev, dtype=dt), torch.randn(L, F, device=dev, dtype=dt) * 0.05,
                torch.randn(L, device=dev, dtype=dt))

    rot = Rotor(make, L * F * 2)
    gy = torch.randn(B, L, device=dev, dtype=dt)

    def fwd():
        x, w, b = rot.next()
        return FWD(x, w, idx, b, G)

    def gin():
        x, w, b = rot.next()
        return BWD(gy, x, w, idx, G, [True, False, False])

    def gwt():
        x, w, b = rot.next()
        return BWD(gy, x, w, idx, G, [False, True, False])

    def step():
        x, w, b = rot.next()
        y = FWD(x, w, idx, b, G)
        return BWD(gy, x, w, idx, G, [True, True, True]), y

    out["ours_fwd"] = timed(fwd, repeat)
    out["ours_dx"] = timed(gin, repeat)
    out["ours_dw"] = timed(gwt, repeat)
    out["ours_fwd_bwd"] = timed(step, repeat)
    del rot
    torch.cuda.empty_cache()

    # dense nn.Linear(H -> L), same dtype; fwd+bwd = forward then backward with a given grad_y
    lin = nn.Linear(H, L, device=dev, dtype=dt)
    xin = torch.randn(B, H, device=dev, dtype=dt, requires_grad=True)
    out["dense_fwd"] = timed(lambda: lin(xin), repeat)
    out["dense_fwd_bwd"] = timed(lambda: lin(xin).backward(gy), repeat)
    del lin
    torch.cuda.empty_cache()
    bott = Bottleneck(H, L, F, device=dev, dtype=dt)
    out["bottleneck_fwd_bwd"] = timed(lambda: bott(xin).backward(gy), repeat)
    del bott
    torch.cuda.empty_cache()
    if gather_bmm:
        from common import GatherBmm

        layer = torch_xmc.GroupSharedFanIn(H, L, F, G, device=dev, dtype=dt)
        gb = GatherBmm(layer)
        out["gather_bmm_fwd_bwd"] = timed(lambda: gb(xin).backward(gy), 3, warmup=1)
        del gb, layer
        torch.cuda.empty_cache()

    # floors: bytes each way once, FLOPs at the measured matmul rate
    e = 2
    y_b, w_b, x_b = B * L * e, L * F * e, B * H * e
    fl_mm = 2 * B * L * F
    floors = {
        "ours_fwd": max((y_b + w_b + x_b) / bw, fl_mm / fl),
        "ours_dx": max((y_b + w_b + x_b) / bw, fl_mm / fl),
        "ours_dw": max((y_b + w_b + x_b) / bw, fl_mm / fl),
    }
    floors["ours_fwd_bwd"] = max((3 * y_b + 3 * w_b) / bw, 3 * fl_mm / fl)
    for k, f in floors.items():
        out[k + "_floor"] = f * 1e3
        out[k + "_x_floor"] = out[k] / (f * 1e3)
    out["speedup_vs_dense_fwd_bwd"] = out["dense_fwd_bwd"] / out["ours_fwd_bwd"]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--rows", default=",".join(str(i) for i in range(len(ROWS))))
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--gather-bmm-rows", default="1", help="rows (indices) that also time plain-PyTorch GSFFI")
    ap.add_argument("--once", type=int, help="run forward, grad_input, grad_weight of this row twice (for ncu)")
    a = ap.parse_args()
    if a.once is not None:
        B, L, F, G = ROWS[a.once]
        x = torch.randn(B, H, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(L, F, device="cuda", dtype=torch.bfloat16)
        idx, gy = indices(-(-L // G), H, F, "cuda"), torch.randn(B, L, device="cuda", dtype=torch.bfloat16)
        for _ in range(2):
            FWD(x, w, idx, None, G)
            BWD(gy, x, w, idx, G, [True, False, False])
            BWD(gy, x, w, idx, G, [False, True, False])
        torch.cuda.synchronize()
        return
    if a.check or a.small:
        ok = run_check(small=a.small)
        if not a.json:
            sys.exit(0 if ok else 1)
    if not a.json:
        return
    torch.manual_seed(0)
    bw, fl = ceilings()
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e12:.2f} TB/s (read + write), bf16 matmul {fl / 1e12:.0f} TFLOP/s")
    gb_rows = {int(i) for i in a.gather_bmm_rows.split(",") if i}
    results = []
    for i in (int(r) for r in a.rows.split(",")):
        B, L, F, G = ROWS[i]
        r = bench_row(B, L, F, G, bw, fl, a.repeat, i in gb_rows)
        results.append(r)
        print_table([r], ["B", "L", "F", "G", "ours_fwd", "ours_dx", "ours_dw", "ours_fwd_bwd", "dense_fwd",
                          "dense_fwd_bwd"])
        sys.stdout.flush()
    print()
    cols = ["B", "L", "F", "G", "ours_fwd", "ours_fwd_floor", "ours_fwd_x_floor", "ours_dx", "ours_dw",
            "ours_fwd_bwd", "ours_fwd_bwd_floor", "dense_fwd", "dense_fwd_bwd", "bottleneck_fwd_bwd",
            "gather_bmm_fwd_bwd", "speedup_vs_dense_fwd_bwd"]
    print_table(results, cols)
    write_json(a.json, {"environment": environment(), "copy_bytes_per_s": bw, "bf16_flops_per_s": fl,
                        "units": "milliseconds (median of CUDA-event times)", "H": H, "dtype": "bfloat16",
                        "rows": results})


if __name__ == "__main__":
    main()
