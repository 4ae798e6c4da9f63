"""Input dtypes on the CPU: the fused train_step against one read of the same x, and fastlin's
linear / mse_loss against torch's, for float32, bfloat16 and float16 inputs.

    python -m bench.bench_dtypes                       # 2^26-element x, D = 32, 64, 256, all threads
    python -m bench.bench_dtypes --elems 21 --threads 1   # x in L3, one core: the kernels' compute rate

A 16-bit x halves the bytes of one read; the kernels convert it to float32 in registers, so the
ratio to its own read says whether the conversion (or anything else per element) costs more than
the read. Medians of interleaved rounds (bench/harness.py); "x read" is torch.sum of the same x in
the same rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F

from bench.harness import Contender, fmt_seconds, format_table, machine_info, measure

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def step_contenders(n: int, d: int, dt: torch.dtype):
    from fastlin import ops

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g).to(dt)
    y = torch.randn(n, 1, generator=g).to(dt)
    w, b = torch.zeros(1, d), torch.zeros(1)

    def step(r):
        ops.train_step(x, y, w, b, None, None, None, lr=1e-6, momentum=0.0, backend="cpp")

    return x, [Contender("train_step", step), Contender("x read", lambda r: x.sum())]


def op_contenders(n: int, d: int, dt: torch.dtype):
    from fastlin import ops

    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=g).to(dt)
    t = torch.randn(n, d, generator=g).to(dt)
    out = []
    for o in (1, 16):
        w = torch.randn(o, d, generator=g).to(dt)
        b = torch.randn(o, generator=g).to(dt)
        out += [
            Contender(f"fastlin linear O={o}", lambda r, w=w, b=b: ops.linear(x, w, b, backend="cpp")),
            Contender(f"torch linear O={o}", lambda r, w=w, b=b: F.linear(x, w, b)),
        ]
    out += [
        Contender("fastlin mse_loss", lambda r: ops.mse_loss(x, t, "mean", backend="cpp")),
        Contender("torch mse_loss", lambda r: F.mse_loss(x, t)),
    ]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_dtypes", description=__doc__.split("\n\n")[0])
    p.add_argument("--elems", type=int, default=26, help="x holds 2^ELEMS elements (default 26)")
    p.add_argument("--dims", type=int, nargs="+", default=[32, 64, 256], help="feature counts D")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--no-ops", action="store_true", help="only the train_step table")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import fastlin  # noqa: F401  (registers the ops)

    info = machine_info("cpu")
    print(f"python -m bench.bench_dtypes {' '.join(argv if argv is not None else sys.argv[1:])}".strip())
    print(f"{info['cpu']}, {torch.get_num_threads()} threads, torch {info['torch']}\n", flush=True)

    rows = []
    for d in args.dims:
        n = (1 << args.elems) // d
        for name in args.dtypes:
            x, cs = step_contenders(n, d, DTYPES[name])
            st = measure(cs, repeats=args.repeats, warmup=2)
            s, r = st["train_step"], st["x read"]
            paired = statistics.median(a / c for a, c in zip(s.samples, r.samples))
            rows.append(
                [
                    f"{n}x{d}x1",
                    name,
                    fmt_seconds(s.median),
                    fmt_seconds(r.median),
                    f"{x.nbytes / s.median / 1e9:.1f}",
                    f"{s.median / r.median:.2f}x",
                    f"{paired:.2f}x",
                ]
            )
    head = ["N x D x O", "x dtype", "train_step", "x read", "GB/s", "step / read", "paired median"]
    print("\ntrain_step (cpp) against torch.sum of the same x, interleaved rounds:")
    print(format_table(head, rows))

    if not args.no_ops:
        d = 256
        n = (1 << args.elems) // d
        rows = []
        for name in args.dtypes:
            st = measure(op_contenders(n, d, DTYPES[name]), repeats=args.repeats, warmup=2)
            for what in ("linear O=1", "linear O=16", "mse_loss"):
                f, t = st[f"fastlin {what}"], st[f"torch {what}"]
                rows.append(
                    [name, what, fmt_seconds(f.median), fmt_seconds(t.median), f"{t.median / f.median:.2f}x"]
                )
        print(f"\nfastlin (cpp) against torch, {n}x{d}, interleaved rounds:")
        print(format_table(["x dtype", "op", "fastlin", "torch", "speed-up"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
