#!/usr/bin/python3
"""PyTorch's uncompressed training step on the suite's shapes: the peer that bench/suite.cpp is set against.

For each shape N x n -> m it times, in float on the CPU with torch.set_num_threads(threads):
    y = linear(x)            forward of nn.Linear(n, m, bias=False), x (N, n) requiring grad
    y.backward(dy)           dX and dW, dy (N, m)
    opt.step(); zero_grad    torch.optim.AdamW with the suite's hyper-parameters
(the median over steps after a warm-up), and the bytes autograd keeps for backward, measured with
torch.autograd.graph.saved_tensors_hooks: the storage bytes of the unique tensors it saves, split into
activations and parameters (nn.Linear saves X and W; W is kept for training anyway).

Before timing, one step is checked: dW against dy^T x and dX against dy W in float64 on sampled rows,
and the saved activation bytes against N n 4 (X, the only activation a linear layer needs for backward).

Usage (bench/run_suite.sh runs it with the shape list of `suite --list`):
    /usr/bin/python3 bench/pytorch_peer.py --shapes 4096x1024x1024,... [--threads 2] [--seconds 5]
                                           [--csv PATH] [--meta PATH] [--smoke]
                                           [--wait-quiet s] [--busy-limit c]
Output: CSV on stdout or --csv (one row per shape; the columns suite --peer reads) and, with --meta, a
JSON file with the torch version, its thread count and the BLAS library it runs on.
Exit status: 0 when the checks pass, 1 when one fails, 2 for a bad command line, 77 when torch is absent.
"""

import argparse
import csv
import json
import math
import os
import statistics
import sys
import time

HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)  # as in bench/suite.cpp
SMOKE_SHAPES = "256x128x128,192x96x160"


def parse_shapes(text):
    shapes = []
    for item in text.split(","):
        fields = item.split("x")
        if len(fields) != 3 or not all(f.isdigit() and int(f) > 0 for f in fields):
            raise SystemExit(f"pytorch_peer: --shapes item '{item}' is not NxNinxM (positive integers)")
        shapes.append(tuple(int(f) for f in fields))
    return shapes


class cpu_usage:
    """CPU seconds of the whole machine (/proc/stat) and of this process: their difference over a stretch
    of wall time is how many CPUs other jobs kept busy meanwhile."""

    def __init__(self):
        self.self_seconds = time.process_time()
        self.machine = -1.0
        try:
            with open("/proc/stat") as f:
                fields = f.readline().split()
            if fields[0] == "cpu":
                user, nice, system, idle, iowait, irq, softirq, steal = (float(v) for v in fields[1:9])
                self.machine = (user + nice + system + irq + softirq + steal) / 100.0  # USER_HZ
        except (OSError, ValueError, IndexError):
            pass

    @staticmethod
    def others(a, b, wall):
        if a.machine < 0 or b.machine < 0 or wall < 0.5:
            return -1.0
        return max(0.0, (b.machine - a.machine) - (b.self_seconds - a.self_seconds)) / wall


def wait_for_quiet(limit, busy):
    """Waits up to `limit` seconds for 2 s in which other jobs keep at most `busy` CPUs busy; returns the
    seconds waited (the suite does the same before each of its shapes)."""
    start = time.perf_counter()
    while limit > 0:
        before, t0 = cpu_usage(), time.perf_counter()
        time.sleep(2)
        others = cpu_usage.others(before, cpu_usage(), time.perf_counter() - t0)
        if others < 0 or others <= busy or time.perf_counter() - start >= limit:
            break
    return time.perf_counter() - start


def blas_libraries():
    """The BLAS and OpenMP libraries mapped into this process (after a matmul has run)."""
    names = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1] if len(line.split()) >= 6 else ""
                base = os.path.basename(path)
                if "blas" in base or "mkl" in base or "dnnl" in base or "gomp" in base:
                    names.add(os.path.realpath(path))
    except OSError:
        pass
    return sorted(names)


def saved_bytes(torch, layer, x):
    """Bytes of the unique storages autograd saves in one forward: (total, activations, parameters)."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage() if hasattr(t, "untyped_storage") else t.storage()
        nbytes = storage.nbytes()
        storages[storage.data_ptr()] = nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    del y
    params = set()
    for p in layer.parameters():
        storage = p.untyped_storage() if hasattr(p, "untyped_storage") else p.storage()
        params.add(storage.data_ptr())
    total = sum(storages.values())
    param_bytes = sum(b for ptr, b in storages.items() if ptr in params)
    return total, total - param_bytes, param_bytes


def relative_error(torch, got, ref):
    got, ref = got.double(), ref.double()
    return (torch.linalg.norm(got - ref) / torch.linalg.norm(ref)).item()


def measure(torch, shape, threads, seconds, smoke):
    N, n, m = shape
    generator = torch.Generator().manual_seed(2026)
    bound = 1.0 / math.sqrt(n)
    layer = torch.nn.Linear(n, m, bias=False)
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=generator)
    x = torch.empty(N, n).uniform_(-1, 1, generator=generator).requires_grad_()
    dy = torch.empty(N, m).uniform_(-1, 1, generator=generator)
    opt = torch.optim.AdamW(layer.parameters(), **HYPER)

    # Checks, from the initial state.
    w0 = layer.weight.detach().clone()
    layer(x).backward(dy)
    problems = []
    # Float64 references on 16 evenly spread rows of each result: full products would cost as much as
    # several timed steps at the largest shapes.
    w_rows = torch.linspace(0, m - 1, min(m, 16)).long()
    x_rows = torch.linspace(0, N - 1, min(N, 16)).long()
    dw_error = relative_error(torch, layer.weight.grad[w_rows], dy[:, w_rows].double().t() @ x.detach().double())
    dx_error = relative_error(torch, x.grad[x_rows], dy[x_rows].double() @ w0.double())
    for name, err in (("dW = dy^T x", dw_error), ("dX = dy W", dx_error)):
        if not err <= 1e-5:
            problems.append(f"{name} vs float64: relative error {err:.2e} > 1e-05")
    opt.zero_grad(set_to_none=True)
    x.grad = None
    total, activations, parameters = saved_bytes(torch, layer, x)
    if activations != N * n * 4:
        problems.append(f"saved activation bytes {activations} != N n 4 = {N * n * 4}")
    if problems:
        return None, problems

    def step():
        t0 = time.perf_counter()
        y = layer(x)
        t1 = time.perf_counter()
        y.backward(dy)
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        x.grad = None
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2, t3 - t0

    warmup = 1 if smoke else 2
    for _ in range(warmup):
        last = step()[3]
    reps = 2 if smoke else int(min(200, max(3, math.ceil(seconds / max(last, 1e-9)))))
    before = cpu_usage()
    start = time.perf_counter()
    samples = [step() for _ in range(reps)]
    wall = time.perf_counter() - start
    busy = cpu_usage.others(before, cpu_usage(), wall)
    med = [statistics.median(s[k] for s in samples) * 1e3 for k in range(4)]
    row = dict(shape=f"{N}x{n}x{m}", N=N, n=n, m=m, threads=threads, warmup=warmup, reps=reps,
               forward_ms=f"{med[0]:.4f}", backward_ms=f"{med[1]:.4f}", optimizer_ms=f"{med[2]:.4f}",
               step_ms=f"{med[3]:.4f}", step_min_ms=f"{min(s[3] for s in samples) * 1e3:.4f}",
               busy_cpus=f"{busy:.3f}", saved_bytes=total, saved_activation_bytes=activations,
               saved_parameter_bytes=parameters, dw_error=f"{dw_error:.3e}", dx_error=f"{dx_error:.3e}")
    return row, []


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", help="comma-separated NxNinxM shapes (bench/suite --list prints the suite's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per shape (3 to 200 steps)")
    parser.add_argument("--csv", help="write the CSV here instead of stdout")
    parser.add_argument("--meta", help="write torch's version, threads and BLAS as JSON here")
    parser.add_argument("--smoke", action="store_true", help="two tiny shapes, 2 steps: the checks are real")
    parser.add_argument("--wait-quiet", type=float, default=0.0,
                        help="before each shape, wait up to this many seconds for other jobs to keep at most "
                             "--busy-limit CPUs busy")
    parser.add_argument("--busy-limit", type=float, default=0.5)
    args = parser.parse_args()
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    if not args.shapes and not args.smoke:
        parser.error("--shapes is required (or --smoke)")
    shapes = parse_shapes(args.shapes or SMOKE_SHAPES)
    try:
        import torch
    except ImportError:
        print("pytorch_peer: torch is not installed (Debian: python3-torch); skipped", file=sys.stderr)
        return 77
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(True)

    rows, failed = [], False
    for shape in shapes:
        print(f"pytorch_peer: {shape[0]}x{shape[1]}x{shape[2]} ...", end="", file=sys.stderr, flush=True)
        waited = wait_for_quiet(args.wait_quiet, args.busy_limit)
        row, problems = measure(torch, shape, args.threads, args.seconds, args.smoke)
        if problems:
            print(" CHECK FAILED: " + "; ".join(problems), file=sys.stderr)
            failed = True
            continue
        print(f" waited {waited:.0f} s, {row['reps']} steps, {row['step_ms']} ms, other jobs {row['busy_cpus']} CPUs",
              file=sys.stderr)
        rows.append(row)
    if failed:
        return 1

    out = open(args.csv, "w", newline="") if args.csv else sys.stdout
    writer = csv.DictWriter(out, fieldnames=list(rows[0].keys()) if rows else ["shape"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    if args.csv:
        out.close()
    if args.meta:
        meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), libraries=blas_libraries(),
                    omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "(unset)"))
        with open(args.meta, "w") as f:
            json.dump(meta, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
