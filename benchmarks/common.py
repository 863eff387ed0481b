"""Shared pieces of the benchmarks: the baselines every comparison runs beside ours, timing, memory, output."""
import json
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

import torch_xmc


class Bottleneck(nn.Sequential):
    """The FLOPs-matched dense baseline: Linear(H -> F) then Linear(F -> L)."""

    def __init__(self, H, L, F, **kw):
        super().__init__(nn.Linear(H, F, bias=False, **kw), nn.Linear(F, L, **kw))


class GatherBmm(nn.Module):
    """GSFFI in plain PyTorch: gather each group's inputs, one batched matmul over groups."""

    def __init__(self, layer: torch_xmc.GroupSharedFanIn):
        super().__init__()
        G, F, L, n = layer.group_size, layer.fan_in, layer.out_features, layer.num_groups
        w = torch.zeros(n * G, F, dtype=layer.weight.dtype, device=layer.weight.device)
        w[:L] = layer.weight.detach()
        self.weight = nn.Parameter(w.view(n, G, F))
        self.bias = nn.Parameter(layer.bias.detach().clone())
        self.register_buffer("index", layer.indices.long())
        self.L = L

    def forward(self, x):
        xg = x[:, self.index].transpose(0, 1)  # [n, B, F]
        y = torch.bmm(xg, self.weight.transpose(1, 2))  # [n, B, G]
        return y.transpose(0, 1).reshape(x.shape[0], -1)[:, : self.L] + self.bias


def median_time(fn, repeat, warmup=1, sync=lambda: None):
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def environment():
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "load_average_1_5_15min": [round(v, 2) for v in os.getloadavg()],  # other work on the machine skews CPU times
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def fused_step_fns(layer, x, indptr, labels):
    """(clear, fused_step) of the fused-loss benchmarks: clear drops the gradients of x and the layer's weight
    and bias; fused_step clears them, then runs layer.loss(x, indptr, labels).backward()."""
    params = [x, layer.weight, layer.bias]

    def clear():
        for p in params:
            p.grad = None

    def fused_step():
        clear()
        layer.loss(x, indptr, labels).backward()

    return clear, fused_step


def update_step_fns(layer, x, indptr, labels, optimizer):
    """(inside, after) of the fused-loss benchmarks' step with the layer's SGDSR step: inside runs
    layer.loss(x, indptr, labels, optimizer=optimizer).backward() (the update in the op, no weight gradient);
    after runs the plain fused step, then optimizer.step() over the stored gradient."""
    clear, fused_step = fused_step_fns(layer, x, indptr, labels)

    def inside():
        clear()
        layer.loss(x, indptr, labels, optimizer=optimizer).backward()

    def after():
        fused_step()
        optimizer.step()

    return inside, after


def print_table(rows, columns):
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(w) for c, w in zip(columns, widths)))


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def write_json(path, payload):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")
