"""Cost of fastlin's data-parallel fit: 2 gloo ranks on this machine (1 thread each).

    python -m bench.distributed [--repeats 7]

Per case, on each rank: the time per step of the 2-rank fit (``fit`` under the process group), of
the single-process fused fit of the same rank's shard (``fit`` inside ``fastlin.distributed.local()``,
one ``ops.fit`` call), and of a bare ``all_reduce`` of the step's buffer; medians of interleaved
repeats. Also the float64 closeness of the 2-rank fit to one process on the concatenated data.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time

import torch

CASES = [  # name, total rows, D, O, epochs
    ("seed data 80 x 1", 80, 1, 1, 200),
    ("16384 x 64", 16384, 64, 1, 20),
    ("262144 x 64", 262144, 64, 1, 4),
]


def _data(n, d, o, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (
        x @ torch.randn(o, d, generator=g, dtype=torch.float64).T
        + 0.5
        + 0.1 * torch.randn(n, o, generator=g, dtype=torch.float64)
    )
    return x.to(dtype), y.to(dtype)


def _worker(rank, port, repeats):
    import torch.distributed as dist

    import fastlin
    from fastlin import distributed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    for name, n, d, o, epochs in CASES:
        # Closeness, float64: the 2-rank fit vs one process on all rows (computed on every rank).
        x, y = _data(n, d, o, torch.float64)
        half = n // 2
        sl = slice(0, half) if rank == 0 else slice(half, n)
        torch.manual_seed(1)
        dreg = fastlin.FusedLinearRegressor(d, o, lr=0.05, momentum=0.9, dtype=torch.float64)
        dreg.fit(x[sl], y[sl], epochs=epochs)
        with distributed.local():
            torch.manual_seed(1)
            sreg = fastlin.FusedLinearRegressor(d, o, lr=0.05, momentum=0.9, dtype=torch.float64)
            sreg.fit(x, y, epochs=epochs)
        rel = max(
            float((a - b).norm() / b.norm())
            for a, b in (
                (dreg.weight.detach(), sreg.weight.detach()),
                (dreg.bias.detach(), sreg.bias.detach()),
            )
        )
        # Timing, float32.
        x, y = _data(n, d, o, torch.float32)
        xs, ys = x[sl].contiguous(), y[sl].contiguous()
        reg = fastlin.FusedLinearRegressor(d, o, lr=0.01)
        buf = torch.zeros(2 + o * d + o)
        t_dist, t_local, t_ar = [], [], []
        for r in range(repeats + 1):
            dist.barrier()
            t0 = time.perf_counter()
            reg.fit(xs, ys, epochs=epochs)
            t1 = time.perf_counter()
            with distributed.local():
                reg.fit(xs, ys, epochs=epochs, progress=False)
            t2 = time.perf_counter()
            dist.barrier()
            t3 = time.perf_counter()
            for _ in range(epochs):
                dist.all_reduce(buf)
            t4 = time.perf_counter()
            if r:
                t_dist.append((t1 - t0) / epochs)
                t_local.append((t2 - t1) / epochs)
                t_ar.append((t4 - t3) / epochs)
        if rank == 0:
            md, ml, ma = (statistics.median(t) * 1e6 for t in (t_dist, t_local, t_ar))
            print(
                f"{name:<18} 2-rank step {md:9.1f} us | local fused step on the shard {ml:9.1f} us | "
                f"overhead {md - ml:8.1f} us ({md / ml:5.2f}x) | bare all_reduce {ma:6.1f} us | "
                f"float64 rel. error vs 1 process {rel:.1e}",
                flush=True,
            )
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--worker", nargs=2, type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return _worker(a.worker[0], a.worker[1], a.repeats)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    print(f"2 gloo ranks x 1 thread, torch {torch.__version__}, medians of {a.repeats} interleaved repeats")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.distributed",
                "--repeats",
                str(a.repeats),
                "--worker",
                str(r),
                str(port),
            ],
            env=env,
        )
        for r in range(2)
    ]
    return max(pr.wait(timeout=600) for pr in procs)


if __name__ == "__main__":
    sys.exit(main())
