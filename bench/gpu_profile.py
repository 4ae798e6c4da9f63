"""The kernels behind the GPU bench's missed targets, for Nsight Compute (the "profile" stage of
bench/gpu_check.sh, opt-in):

    ncu --csv --profile-from-start off --metrics <list> python bench/gpu_profile.py   # gpu_check.sh
    python bench/gpu_profile.py --summarize ncu.csv             # one line per kernel launch

Each case is warmed up outside the profiled range (compilation, autotuning), then runs once inside
it (`ncu --profile-from-start off`). Cases: train_step O = 1 on
1M x 256 rows in fp32 and bf16 on both backends (H200, 4M x 256: bf16 at 73% (Triton) / 85% (CUDA)
of its read limit against fp32's 99% / 105%), and sgd_update_ of a 4096 x 4096 layer + bias with
momentum on both backends (63% / 58% of the copy bandwidth) and, for comparison, torch's fused SGD
(79%).
"""

from __future__ import annotations

import csv
import sys

# (Nsight Compute metric, column heading)
METRICS = (
    ("gpu__time_duration.sum", "time"),
    ("dram__throughput.avg.pct_of_peak_sustained_elapsed", "dram %peak"),
    ("dram__bytes_read.sum", "dram read"),
    ("dram__bytes_write.sum", "dram write"),
    ("sm__throughput.avg.pct_of_peak_sustained_elapsed", "sm %peak"),
    ("l1tex__throughput.avg.pct_of_peak_sustained_active", "l1 %peak"),
    ("sm__warps_active.avg.pct_of_peak_sustained_active", "occupancy %"),
    ("smsp__inst_executed.sum", "warp instr"),
    ("smsp__issue_active.avg.pct_of_peak_sustained_active", "issue %"),
    # where the warps wait, in % of active warp cycles (what tells a latency-bound kernel from an
    # instruction-bound one): global loads outstanding (long scoreboard), __syncthreads, shared
    # memory / shuffles (short scoreboard), the load-store queue full (lg throttle), the MIO queue
    # full (mio throttle), fixed-latency dependencies (wait)
    ("smsp__warp_issue_stalled_long_scoreboard_per_warp_active.pct", "st:global"),
    ("smsp__warp_issue_stalled_barrier_per_warp_active.pct", "st:barrier"),
    ("smsp__warp_issue_stalled_short_scoreboard_per_warp_active.pct", "st:shared"),
    ("smsp__warp_issue_stalled_lg_throttle_per_warp_active.pct", "st:lg-thr"),
    ("smsp__warp_issue_stalled_mio_throttle_per_warp_active.pct", "st:mio-thr"),
    ("smsp__warp_issue_stalled_wait_per_warp_active.pct", "st:wait"),
    ("launch__registers_per_thread", "regs"),
    ("launch__grid_size", "grid"),
    ("launch__block_size", "block"),
)


def run_cases() -> None:
    """Every case once under the profiler, after a warm-up outside it (compilation, autotuning: with
    `ncu --profile-from-start off` only the launches between cudaProfilerStart/Stop are profiled)."""
    import torch

    import fastlin
    from fastlin import ops

    status = fastlin.backends.status()
    cases = []
    n, d = 1 << 20, 256
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(n, d, device="cuda").to(dtype)
        y = torch.randn(n, 1, device="cuda").to(dtype)
        for backend in ("triton", "cuda"):
            if status[backend][0]:
                w, b = torch.zeros(1, d, device="cuda"), torch.zeros(1, device="cuda")
                cases.append(
                    (
                        f"train_step O=1 {str(dtype)[6:]} {backend}",
                        lambda x=x, y=y, w=w, b=b, be=backend: ops.train_step(
                            x, y, w, b, lr=0.01, backend=be
                        ),
                    )
                )
    p = [torch.randn(4096, 4096, device="cuda"), torch.randn(4096, device="cuda")]
    g = [torch.randn_like(t) for t in p]
    buf = [torch.zeros_like(t) for t in p]
    for backend in ("cuda", "triton"):
        if status[backend][0]:
            cases.append(
                (
                    f"sgd_update_ {backend}",
                    lambda be=backend: ops.sgd_update_(p, g, buf, lr=0.01, momentum=0.9, backend=be),
                )
            )
    tp = [t.clone().requires_grad_(True) for t in p]
    for t, gg in zip(tp, g):
        t.grad = gg.clone()
    opt = torch.optim.SGD(tp, lr=0.01, momentum=0.9, fused=True)
    cases.append(("torch fused SGD", opt.step))
    for _, fn in cases:  # warm-up: the first fused step also creates its buffers
        fn()
        fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for label, fn in cases:
        print(f"gpu_profile case: {label}", flush=True)
        fn()
        torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print("gpu_profile: cases done")


def summarize(path: str) -> None:
    """ncu --csv output -> one line per kernel launch, in launch order (the cases of run_cases, once
    each: train_step fp32 triton, cuda; bf16 triton, cuda; sgd_update_ cuda, triton; torch's fused
    SGD)."""
    with open(path, newline="") as f:
        lines = [ln for ln in f if ln.startswith('"')]  # ncu prints its own log lines too
    rows = list(csv.DictReader(lines))
    if not rows:
        print(f"gpu_profile: no metric rows in {path}")
        return
    launches: dict[str, dict] = {}
    units: dict[str, str] = {}
    for r in rows:
        k = launches.setdefault(r.get("ID", "?"), {"kernel": r.get("Kernel Name", "?")})
        k[r["Metric Name"]] = r.get("Metric Value", "")
        units[r["Metric Name"]] = r.get("Metric Unit", "")
    print("id  kernel".ljust(50) + " ".join(f"{h:>12}" for _, h in METRICS))
    for i, k in launches.items():
        cells = " ".join(f"{k.get(m, '-')[:12]:>12}" for m, _ in METRICS)
        print(f"{i:>3} {k['kernel'][:45]}".ljust(50) + cells)
    print("units: " + ", ".join(f"{h} {units[m]}" for m, h in METRICS if m in units))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--summarize":
        summarize(sys.argv[2])
    elif len(sys.argv) == 2 and sys.argv[1] == "--metrics":
        print(",".join(m for m, _ in METRICS))
    else:
        run_cases()
