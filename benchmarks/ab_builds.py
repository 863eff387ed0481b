"""A/B of kernel builds: two or more source trees of torch_xmc, each built in place, timed by turns in separate
processes, with a bitwise check of their outputs. This is how every "two builds alternated by process" row of
benchmarks/gpu_notes.md was measured; it exists so that the next such row costs one command.

    python benchmarks/ab_builds.py --patch load_together=benchmarks/experiments/forward_load_together.patch \
        --build --rounds 3 --json $OUT/ab.json
    python benchmarks/ab_builds.py --tree old=/tmp/old --tree new=. --case forward:1024,670080,64,32

Trees: the repository itself is "main" (with --no-main, only the ones named). --tree NAME=DIR adds a tree as it
is; --patch NAME=FILE copies the repository's sources to a scratch directory and applies FILE there with
`patch -p1`. --build runs `setup.py build_ext --inplace` in every tree at once (MAX_JOBS shared among them).
Each round runs one worker process per tree, in an order that alternates between rounds, so that drift of the
machine (clocks, heat, other tenants) falls on every tree alike.

A worker imports torch_xmc from its tree, builds each case's inputs from a fixed seed, records the md5 of the
outputs, then times the op: CUDA events on the GPU (bench_gpu.timed, inputs rotated beyond L2), wall clock on
the CPU. The table shows each tree's medians over the rounds (min-max) and whether its outputs were bitwise
those of the first tree.

Cases (--case OP:B,L,F,G, repeatable; H from --hidden): forward, grad_input, grad_weight (with the bias
gradient), step (the fused BCE loss + backward), topk5, topk100.
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
SCRATCH = os.environ.get("AB_SCRATCH", "/tmp/ab_builds")
SOURCES = ("ops", "bindings", "torch_xmc", "tests", "setup.py", "pyproject.toml", "requirements.txt")
GPU_CASES = ["forward:256,3000000,64,32", "forward:1024,670080,64,32", "forward:64,670080,64,16",
             "grad_input:256,3000000,64,32", "grad_weight:256,3000000,64,32", "step:256,3000000,64,32",
             "topk5:256,3000000,64,32"]
CPU_CASES = ["forward:64,65536,64,32", "grad_input:64,65536,64,32", "grad_weight:64,65536,64,32",
             "step:64,65536,64,32", "topk5:64,65536,64,32"]
POSITIVES_PER_ROW = 5


# ---------------------------------------------------------------- worker (runs inside one tree)


def make_case(op, B, L, F, G, H, device, dtype, seed, idx):
    """A closure that runs the case's op on one set of inputs drawn from `seed` (on the device, so that a
    [B, L] grad_y costs no host time), and returns its outputs."""
    import torch

    import torch_xmc

    g = torch.Generator(device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=g, device=device) * scale).to(dtype)

    x, w, b = randn(B, H), randn(L, F, scale=0.05), randn(L, scale=0.1)
    if op == "forward":
        return lambda: torch.ops.torch_xmc.gsffi_forward(x, w, idx, b, G)
    if op in ("grad_input", "grad_weight"):
        gy = randn(B, L)
        mask = [op == "grad_input", op == "grad_weight", op == "grad_weight"]
        return lambda: torch.ops.torch_xmc.gsffi_backward(gy, x, w, idx, G, mask)
    if op == "step":
        labels = torch.randint(0, L, (B * POSITIVES_PER_ROW,), generator=g, device=device)
        indptr = torch.arange(B + 1, device=device) * POSITIVES_PER_ROW
        xg, wg, bg = (t.detach().requires_grad_() for t in (x, w, b))

        def step():
            for t in (xg, wg, bg):
                t.grad = None
            loss = torch_xmc.functional.gsffi_loss(xg, wg, idx, bg, G, indptr, labels, check=False)
            loss.backward()
            return loss.detach(), xg.grad, wg.grad, bg.grad

        return step
    if op.startswith("topk"):
        k = int(op[4:])
        return lambda: torch_xmc.functional.gsffi_topk(x, w, idx, b, G, k, check=False)
    raise SystemExit(f"--case: unknown op {op!r}; expected forward, grad_input, grad_weight, step, topk<k>")


def digest(outputs):
    import torch

    h = hashlib.md5()
    for t in outputs if isinstance(outputs, (tuple, list)) else (outputs,):
        if t is not None:
            h.update(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]


def worker(args):
    import torch

    import torch_xmc

    here = os.path.dirname(os.path.dirname(os.path.abspath(torch_xmc.__file__)))
    if os.path.realpath(here) != os.path.realpath(args.worker):
        raise SystemExit(f"worker for {args.worker} imported torch_xmc from {here}")
    cuda = args.device == "cuda"
    dtype = getattr(torch, args.dtype)
    if cuda:
        from bench_gpu import timed
    else:
        from common import median_time

        torch.set_num_threads(args.threads)
    indices = {}  # by (n_groups, F): drawn once per worker, shared by its cases and input sets
    for case in args.case:
        op, shape = case.split(":")
        B, L, F, G = (int(v) for v in shape.split(","))
        key = (-(-L // G), F)
        if key not in indices:
            gen = torch.Generator().manual_seed(0)
            indices[key] = torch_xmc.random_indices(key[0], args.hidden, F, generator=gen).to(args.device)
        fns = [make_case(op, B, L, F, G, args.hidden, args.device, dtype, seed, indices[key]) for seed in (1, 2)]
        md5 = digest(fns[0]())
        turn = [0]

        def call():
            turn[0] ^= 1
            return fns[turn[0]]()

        ms = timed(call, args.repeat) if cuda else median_time(call, args.repeat)
        print(json.dumps({"case": case, "md5": md5, "ms": ms}), flush=True)
        del fns
        if cuda:
            torch.cuda.empty_cache()


# ---------------------------------------------------------------- driver


def copy_sources(dst):
    if os.path.exists(dst):
        shutil.rmtree(dst)
    os.makedirs(dst)
    ignore = shutil.ignore_patterns("*.so", "__pycache__", "build", "*.egg-info")
    for name in SOURCES:
        src = os.path.join(ROOT, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(dst, name), ignore=ignore)
        else:
            shutil.copy2(src, dst)
    shutil.copytree(HERE, os.path.join(dst, "benchmarks"), ignore=ignore)


def trees_of(args):
    trees = [] if args.no_main else [("main", ROOT)]
    for spec in args.tree:
        name, _, path = spec.partition("=")
        trees.append((name, os.path.abspath(path)))
    for spec in args.patch:
        name, _, patch = spec.partition("=")
        dst = os.path.join(SCRATCH, name)
        copy_sources(dst)
        with open(patch) as f:
            subprocess.run(["patch", "-p1", "-s", "-d", dst], stdin=f, check=True)
        trees.append((name, dst))
    if len(trees) < 2:
        raise SystemExit(f"need at least two trees to compare, got {[n for n, _ in trees]}")
    return trees


def build(trees):
    jobs = str(max(1, (os.cpu_count() or 2) // len(trees)))
    env = dict(os.environ, MAX_JOBS=jobs)
    start = time.perf_counter()
    procs = [(name, subprocess.Popen([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=path, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)) for name, path in trees]
    for name, p in procs:
        err = p.communicate()[1].decode()
        if p.returncode:
            raise SystemExit(f"build of {name} failed:\n{err[-4000:]}")
    print(f"built {len(trees)} trees in {time.perf_counter() - start:.0f} s ({jobs} jobs each)")


def run_worker(path, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", path, "--device", args.device, "--dtype", args.dtype,
           "--hidden", str(args.hidden), "--repeat", str(args.repeat), "--threads", str(args.threads)]
    for case in args.case:
        cmd += ["--case", case]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([path, os.path.join(path, "benchmarks")]))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"worker in {path} failed:\n{out.stderr[-4000:]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", action="append", default=[], help="NAME=DIR: a source tree, used as it is")
    ap.add_argument("--patch", action="append", default=[], help="NAME=FILE: the repository with FILE applied")
    ap.add_argument("--no-main", action="store_true", help="leave the repository itself out")
    ap.add_argument("--build", action="store_true", help="build every tree in place first")
    ap.add_argument("--case", action="append", help="OP:B,L,F,G (default: the bar shapes, or small CPU ones)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda where available)")
    ap.add_argument("--dtype", default=None, help="default bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads")
    ap.add_argument("--json")
    ap.add_argument("--pick", metavar="FILE", help="write the path of the tree to go on with (see above)")
    ap.add_argument("--pick-gain", type=float, default=0.015, help="least gain on the first case (default 1.5%%)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.case = args.case or (GPU_CASES if args.device == "cuda" else CPU_CASES)
    if args.worker:
        return worker(args)

    sys.path.insert(0, HERE)
    from common import environment, print_table, write_json

    trees = trees_of(args)
    if args.build:
        build(trees)
    runs = {name: [] for name, _ in trees}
    for r in range(args.rounds):
        order = trees if r % 2 == 0 else trees[::-1]
        for name, path in order:
            runs[name].append(run_worker(path, args))
            print(f"round {r + 1}: {name} done", flush=True)
    rows = []
    first = trees[0][0]
    for i, case in enumerate(args.case):
        row = {"case": case}
        ref = runs[first][0][i]["md5"]
        for name, _ in trees:
            ms = [run[i]["ms"] for run in runs[name]]
            md5s = {run[i]["md5"] for run in runs[name]}
            row[name] = f"{min(ms):.4g}-{max(ms):.4g}"
            row[name + " bitwise"] = "yes" if md5s == {ref} else ("differs" if len(md5s) == 1 else "varies")
        rows.append(row)
    columns = ["case"] + [c for name, _ in trees for c in (name, name + " bitwise")]
    print(f"ms, min-max over {args.rounds} rounds of the median of {args.repeat}; bitwise: outputs against {first}")
    print_table(rows, columns)
    if args.json:
        write_json(args.json, {"environment": environment(), "trees": dict(trees), "runs": runs, "table": rows})
    if args.pick:
        name = pick(trees, runs, rows, args.pick_gain)
        with open(args.pick, "w") as f:
            f.write(dict(trees)[name] + "\n")
        print(f"picked: {name} ({dict(trees)[name]})")


def pick(trees, runs, rows, gain):
    """The tree to go on with: see --pick in the module's docstring."""
    import statistics

    def med(name, i):
        return statistics.median(run[i]["ms"] for run in runs[name])

    first = trees[0][0]
    best, best_ms = first, med(first, 0) * (1 - gain)
    for name, _ in trees[1:]:
        bitwise = all(row[name + " bitwise"] == "yes" for row in rows)
        no_loss = all(med(name, i) <= 1.01 * med(first, i) for i in range(len(rows)))
        if bitwise and no_loss and med(name, 0) <= best_ms:
            best, best_ms = name, med(name, 0)
    return best


if __name__ == "__main__":
    main()
