"""fastlin training benchmark: stock PyTorch vs torch.compile vs fastlin, against the machine's limit.

    python -m bench.bench --quick       # < 2 minutes: fewer rounds, fewer steps on the big cases
    python -m bench.bench               # the full run; records bench/RESULTS.md (+ bench/RESULTS.png)

Cases (issue 3): the seed (100x1x1, 1000 full-batch epochs), 262144x256x1, 262144x256x16,
1048576x64x1 and 262144x256x1 with bfloat16 x (float32 parameters). NxDxO = rows x features x outputs.
Contenders, each training from the same nn.Linear initialisation with SGD(lr=0.01) on the MSE:
  stock eager      the seed's loop: nn.Linear + nn.MSELoss + torch.optim.SGD (bf16: under autocast)
  torch.compile    the same loop, forward+loss and optimizer.step compiled (the tutorial recipe)
  fastlin drop-in  the same loop with fastlin.nn.Linear, nn.MSELoss, optim.SGD (bf16: under autocast)
  fastlin step     FusedLinearRegressor.step in a Python loop (one fused train_step op per step)
  fastlin fit      FusedLinearRegressor.fit (the whole loop in one op call)
  limit            one read of x per step at the measured read bandwidth, or the step's 4*N*D*O
                   flops at the measured GEMM rate, whichever is slower (bench/harness.py)
Every timed run does the case's steps (epochs) and continues from the previous run's parameters.
Ratios: "speed-up" = stock median / contender median; "x limit" = contender median / limit.

Writes <out>/bench.json (all samples, limits, machine) and <out>/bench.png (matplotlib, optional).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import shlex
import sys

import torch

from bench.harness import (
    Contender,
    Limits,
    cache_bytes,
    fmt_bytes,
    fmt_seconds,
    format_table,
    machine_info,
    measure,
    memory_probe_env,
    peak_extra_memory,
    rotation_count,
    run_module,
)

LR = 0.01
CONTENDERS = ("stock eager", "torch.compile", "fastlin drop-in", "fastlin step", "fastlin fit")
MEMORY_CONTENDERS = ("stock eager", "fastlin drop-in", "fastlin step", "fastlin fit")


@dataclasses.dataclass
class Case:
    name: str
    n: int
    d: int
    o: int
    steps: int  # per timed run, full run
    quick_steps: int  # per timed run, --quick
    dtype: torch.dtype = torch.float32
    seed_data: bool = False  # the seed's own data: x = randn(100, 1), y = 3x + 2 + noise

    @property
    def shape(self) -> str:
        return f"{self.n}x{self.d}x{self.o}"


CASES = [
    Case("seed", 100, 1, 1, steps=1000, quick_steps=1000, seed_data=True),
    Case("262144x256x1", 262144, 256, 1, steps=20, quick_steps=3),
    Case("262144x256x16", 262144, 256, 16, steps=10, quick_steps=2),
    Case("1048576x64x1", 1048576, 64, 1, steps=20, quick_steps=3),
    Case("262144x256x1-bf16", 262144, 256, 1, steps=20, quick_steps=3, dtype=torch.bfloat16),
]


def make_data(case: Case, device) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, D), y (N, O) in the case's dtype on device; deterministic."""
    if case.seed_data:
        torch.manual_seed(0)
        x = torch.randn(case.n, 1)
        y = 3 * x + 2 + torch.randn(case.n, 1)
    else:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(case.n, case.d, generator=g)
        w = torch.randn(case.o, case.d, generator=g) / math.sqrt(case.d)
        y = x @ w.T + 0.1 * torch.randn(case.n, case.o, generator=g)
    return x.to(device=device, dtype=case.dtype), y.to(device=device, dtype=case.dtype)


def initial_state(case: Case) -> dict:
    torch.manual_seed(1)
    return torch.nn.Linear(case.d, case.o).state_dict()


def make_contenders(case: Case, xs, ys, steps: int, device, backend: str, with_compile: bool = True):
    """The contenders of a case, each with its own parameters, from the same initial state.
    xs, ys: lists of input copies; run(r) uses copy r mod len (rotation against the cache)."""
    import fastlin

    init = initial_state(case)
    low = case.dtype in (torch.bfloat16, torch.float16)
    dev_type = torch.device(device).type

    def autocast():
        return torch.autocast(dev_type, dtype=case.dtype) if low else contextlib.nullcontext()

    def data(r):
        return xs[r % len(xs)], ys[r % len(ys)]

    def torch_model():
        m = torch.nn.Linear(case.d, case.o, device=device)
        m.load_state_dict(init)
        return m

    # stock eager: the seed's loop
    m_s = torch_model()
    crit_s = torch.nn.MSELoss()
    opt_s = torch.optim.SGD(m_s.parameters(), lr=LR)

    def stock(r):
        x, y = data(r)
        for _ in range(steps):
            with autocast():
                loss = crit_s(m_s(x), y)
            opt_s.zero_grad()
            loss.backward()
            opt_s.step()

    out = [Contender("stock eager", stock)]

    # torch.compile: forward+loss (AOTAutograd compiles the backward too) and the optimizer step
    if with_compile:
        m_c = torch_model()
        crit_c = torch.nn.MSELoss()
        opt_c = torch.optim.SGD(m_c.parameters(), lr=LR)
        fwd_c = torch.compile(lambda x, y: crit_c(m_c(x), y))

        @torch.compile(fullgraph=False)
        def opt_step_c():
            opt_c.step()

        def compiled(r):
            x, y = data(r)
            for _ in range(steps):
                with autocast():
                    loss = fwd_c(x, y)
                opt_c.zero_grad()
                loss.backward()
                opt_step_c()

        out.append(Contender("torch.compile", compiled))
    else:
        out.append(Contender("torch.compile", None, skip="--no-compile"))

    # fastlin drop-in: the seed's loop with the three fastlin constructors (bf16: under autocast too)
    m_d = fastlin.nn.Linear(case.d, case.o, device=device, backend=backend)
    m_d.load_state_dict(init)
    crit_d = fastlin.nn.MSELoss(backend=backend)
    opt_d = fastlin.optim.SGD(m_d.parameters(), lr=LR, backend=backend)

    def dropin(r):
        x, y = data(r)
        for _ in range(steps):
            with autocast():
                loss = crit_d(m_d(x), y)
            opt_d.zero_grad()
            loss.backward()
            opt_d.step()

    out.append(Contender("fastlin drop-in", dropin))

    def regressor():
        reg = fastlin.FusedLinearRegressor(case.d, case.o, lr=LR, backend=backend, device=device)
        reg.load_state_dict({**init, "_extra_state": reg.get_extra_state()})
        return reg

    reg_s = regressor()

    def step(r):
        x, y = data(r)
        for _ in range(steps):
            reg_s.step(x, y)

    reg_f = regressor()

    def fit(r):
        x, y = data(r)
        reg_f.fit(x, y, epochs=steps, progress=False)

    out += [Contender("fastlin step", step), Contender("fastlin fit", fit)]
    models = {"stock eager": m_s, "fastlin drop-in": m_d, "fastlin step": reg_s, "fastlin fit": reg_f}
    if with_compile:
        models["torch.compile"] = m_c
    return out, models


# ------------------------------------------------------------------------------------------------
# memory probe: runs in its own process (python -m bench.bench --memory-probe CASE)


def memory_probe(case: Case, device, backend: str, steps: int) -> dict:
    """Peak extra memory (bytes) of one timed run of each contender, after a warm-up run."""
    x, y = make_data(case, device)
    contenders, _ = make_contenders(case, [x], [y], steps, device, backend, with_compile=False)
    out = {}
    for c in contenders:
        if c.skip is not None or c.name not in MEMORY_CONTENDERS:
            continue
        c.run(0)  # warm: thread pools, lazily allocated state (grads, momentum) exist from now on
        out[c.name] = peak_extra_memory(lambda c=c: c.run(0), device)
    return out


def measure_memory(case: Case, device, backend: str, steps: int) -> dict:
    if torch.device(device).type == "cuda":
        return memory_probe(case, device, backend, steps)
    args = [
        "bench.bench",
        "--memory-probe",
        case.name,
        "--device",
        str(device),
        "--backend",
        backend,
        "--steps",
        str(steps),
    ]
    text = run_module(args[0], args[1:], env=memory_probe_env())
    return json.loads(text.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------


def run_case(case: Case, args, log) -> dict:
    device = torch.device(args.device)
    steps = args.steps or (case.quick_steps if args.quick else case.steps)
    if case.seed_data:
        steps = args.seed_epochs or case.steps
    x, y = make_data(case, device)
    k = rotation_count(x.nbytes + y.nbytes, device)
    xs = [x] + [x.clone() for _ in range(k - 1)]
    ys = [y] + [y.clone() for _ in range(k - 1)]
    log(
        f"[{case.name}] {case.shape} {str(case.dtype).replace('torch.', '')}, {steps} steps per run, "
        f"x {fmt_bytes(x.nbytes)}, {k} input cop{'y' if k == 1 else 'ies'}"
    )
    lim = Limits.measure(device, sample=x, dtypes=(case.dtype,))
    torch._dynamo.reset()  # each case compiles afresh (and stays under dynamo's recompile limit)
    contenders, models = make_contenders(
        case, xs, ys, steps, device, args.backend, with_compile=not args.no_compile
    )
    stats = measure(
        contenders + lim.probes(),
        repeats=args.repeats,
        warmup=args.warmup,
        device=device,
        min_seconds=args.min_seconds,
        log=log if args.verbose else None,
    )
    lim.update(stats)  # the limit from the same interleaved rounds as the contenders
    lim.release()
    stats = {k: v for k, v in stats.items() if not k.startswith("limit:")}
    bytes_per_step = x.nbytes  # one read of x; y (N*O) and the parameters are not counted
    flops_per_step = 4 * case.n * case.d * case.o  # forward x @ W^T and dW = r^T @ x
    limit = steps * lim.limit_seconds(bytes_per_step, flops_per_step)
    for name, m in models.items():  # every contender must still hold finite parameters
        for p in m.parameters():
            if not torch.isfinite(p).all():
                raise RuntimeError(f"[{case.name}] {name} ended with non-finite parameters")
    memory = {}
    if not args.no_memory:
        try:
            memory = measure_memory(case, device, args.backend, min(steps, 3))
        except (RuntimeError, OSError) as e:  # e.g. no /proc: say so, keep the timings
            log(f"[{case.name}] memory probe failed: {e}")
    return {
        "case": case.name,
        "shape": case.shape,
        "n": case.n,
        "d": case.d,
        "o": case.o,
        "dtype": str(case.dtype).replace("torch.", ""),
        "steps_per_run": steps,
        "input_copies": k,
        "x_bytes": x.nbytes,
        "x_in_cache": x.nbytes < cache_bytes() if device.type == "cpu" else None,
        "limits": lim.as_dict(),
        "limit_read_s": steps * bytes_per_step / lim.read_bandwidth,
        "limit_flops_s": steps * flops_per_step / lim.gemm_rate,
        "limit_s": limit,
        "stats": {n: (s.as_dict() if s else None) for n, s in stats.items()},
        "skipped": {c.name: c.skip for c in contenders if c.skip},
        "peak_extra_memory": memory,
    }


def case_table(res: dict) -> str:
    stock = res["stats"]["stock eager"]["median"]
    steps = res["steps_per_run"]
    rows = []
    for name in CONTENDERS:
        s = res["stats"].get(name)
        if s is None:
            rows.append([name, "n/a", "", "", "", "", "", res["skipped"].get(name, "")])
            continue
        mem = res["peak_extra_memory"].get(name)
        rows.append(
            [
                name,
                fmt_seconds(s["median"]),
                fmt_seconds(s["median"] / steps),
                fmt_seconds(s["min"]),
                fmt_seconds(s["max"]),
                f"{stock / s['median']:.3g}x",
                f"{s['median'] / res['limit_s']:.3g}x",
                fmt_bytes(mem) if mem is not None else "",
            ]
        )
    lim = res["limit_s"]
    rows.append(
        ["limit", fmt_seconds(lim), fmt_seconds(lim / steps), "", "", f"{stock / lim:.3g}x", "1x", ""]
    )
    head = [
        "contender",
        f"median/{steps} steps",
        "per step",
        "min",
        "max",
        "speed-up",
        "x limit",
        "peak extra mem",
    ]
    L = res["limits"]
    title = (
        f"{res['case']}: {res['shape']} (N x D x O) {res['dtype']}, {steps} steps per run, "
        f"{len(res['stats']['stock eager']['samples'])} rounds; x {fmt_bytes(res['x_bytes'])}\n"
        f"limit per step: read of x {fmt_seconds(res['limit_read_s'] / steps)} at "
        f"{L['read_bandwidth'] / 1e9:.3g} GB/s [{L['read_method']}], "
        f"{fmt_seconds(res['limit_flops_s'] / steps)} at {L['gemm_rate'] / 1e9:.3g} GFLOP/s "
        f"[{L['gemm_method']}]; both from the interleaved rounds"
    )
    xr = L["details"].get("read of x (interleaved median)")
    if xr:  # the read of x was timed beside the first timings' fastest read: say what the other gave
        x_won = L["read_method"].startswith("torch.sum(x ")
        other = L["details"]["read (interleaved median)"] if x_won else xr
        what = "the first timings' fastest read" if x_won else "torch.sum of x itself"
        title += f"\n({what} in the same rounds: {other / 1e9:.3g} GB/s)"
    if res.get("x_in_cache"):
        title += "\n(x fits in the last-level cache: the DRAM-read limit is a loose lower bound here)"
    return title + "\n" + format_table(head, rows)


def summary_table(results: list[dict]) -> str:
    head = ["case"] + [f"{c}" for c in CONTENDERS] + ["limit"]
    rows = []
    for res in results:
        stock = res["stats"]["stock eager"]["median"]
        row = [res["case"]]
        for c in CONTENDERS:
            s = res["stats"].get(c)
            row.append(
                "n/a" if s is None else f"{stock / s['median']:.3g}x / {s['median'] / res['limit_s']:.3g}L"
            )
        row.append(fmt_seconds(res["limit_s"] / res["steps_per_run"]) + "/step")
        rows.append(row)
    return "speed-up vs stock eager / time in multiples of the limit (L), medians:\n" + format_table(
        head, rows
    )


def chart(results: list[dict], path: str) -> str | None:
    """Two panels: speed-up over stock eager (higher is better) and median / limit (lower is better)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'): no chart"
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / len(CONTENDERS)
    labels = [f"{r['case']}\n{r['dtype']}" for r in results]
    for ax, kind in zip(axes, ("speed-up", "limit")):
        for j, c in enumerate(CONTENDERS):
            vals = []
            for r in results:
                s = r["stats"].get(c)
                if s is None:
                    vals.append(float("nan"))
                elif kind == "speed-up":
                    vals.append(r["stats"]["stock eager"]["median"] / s["median"])
                else:
                    vals.append(s["median"] / r["limit_s"])
            ax.bar(
                [i + (j - (len(CONTENDERS) - 1) / 2) * width for i in range(len(results))],
                vals,
                width,
                label=c,
            )
        ax.axhline(1.0, color="k", lw=1, ls="--")
        ax.set_yscale("log")
        ax.set_xticks(range(len(results)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        if kind == "speed-up":
            ax.set_ylabel("stock eager median / contender median")
            ax.set_title("speed-up over stock PyTorch (higher is better)")
            ax.legend(fontsize=7)
        else:
            ax.set_ylabel("contender median / limit")
            ax.set_title("time in multiples of the limit (lower is better; 1 = limit)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def _load(v) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def results_md(results, info, command, started, elapsed, tables, chart_name) -> str:
    lines = [
        "# fastlin benchmark results",
        "",
        f"- command: `{command}`",
        f"- date: {started} (took {elapsed:.0f} s)",
        f"- machine: {info['cpu']}, {info['threads']} torch threads ({info['logical_cpus']} logical CPUs), "
        f"LLC {fmt_bytes(info['llc_bytes'])}" + (f", GPU {info['gpu']}" if "gpu" in info else ""),
        f"- torch {info['torch']}, python {info['python']}, fastlin backend `{info['backend']}`",
        "- the machine is shared with other jobs: read the ratios (one run, interleaved rounds), "
        f"not the absolute times; 1-minute load average {_load(info.get('load_average'))} at the start, "
        f"{_load(info.get('load_average_end'))} at the end, on {info['logical_cpus']} CPUs",
        "",
        "Medians of interleaved rounds; each run does the case's steps and continues training. "
        "speed-up = stock eager / contender; x limit = contender / limit, the limit being one read of x "
        "per step at the measured read bandwidth or 4*N*D*O flops per step at the measured GEMM rate, "
        "whichever is slower. Peak extra memory: peak resident set during one run minus before "
        "(a process with MALLOC_MMAP_THRESHOLD_=65536, so C++ temporaries are seen; resolution ~64 KiB).",
        "",
        "```",
        tables,
        "```",
    ]
    if chart_name:
        lines += ["", f"![medians in multiples of the limit]({chart_name})"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="< 2 minutes: 3 rounds, few steps on the big cases")
    p.add_argument("--cases", nargs="+", choices=[c.name for c in CASES], help="run only these cases")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto", help="fastlin backend for the fastlin contenders")
    p.add_argument("--repeats", type=int, help="timed rounds (default 7, --quick 3)")
    p.add_argument("--warmup", type=int, help="untimed runs per contender first (default 2, --quick 1)")
    p.add_argument("--steps", type=int, help="steps per timed run on the big cases (default per case)")
    p.add_argument("--seed-epochs", type=int, help="epochs per run of the seed case (default 1000)")
    p.add_argument(
        "--min-seconds",
        type=float,
        default=0.0,
        help="add rounds until every contender has this much timed in total (default 0)",
    )
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile contender")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    p.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "out"), help="JSON and PNG go here"
    )
    p.add_argument(
        "--results",
        default=None,
        help="write a RESULTS.md here (default: bench/RESULTS.md for a full run, none for --quick)",
    )
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.memory_probe:
        case = next(c for c in CASES if c.name == args.memory_probe)
        print(json.dumps(memory_probe(case, torch.device(args.device), args.backend, args.steps or 3)))
        return 0

    args.repeats = args.repeats or (3 if args.quick else 7)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    full = not args.quick and not args.cases and not args.steps and not args.seed_epochs
    if args.results is None and full:
        args.results = os.path.join(os.path.dirname(__file__), "RESULTS.md")

    import fastlin

    started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    t0 = datetime.datetime.now()
    info = machine_info(args.device)
    info["backend"] = fastlin.backends.resolve(
        None if args.backend == "auto" else args.backend, torch.device(args.device)
    )
    command = "python -m bench.bench " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    print(
        f"{command.strip()}\n{info['cpu']}, {info['threads']} threads, torch {info['torch']}, "
        f"fastlin backend {info['backend']}, device {args.device}\n",
        flush=True,
    )

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    results = []
    for case in CASES:
        if args.cases and case.name not in args.cases:
            continue
        res = run_case(case, args, log)
        results.append(res)
        print(case_table(res) + "\n", flush=True)
    tables = "\n\n".join(case_table(r) for r in results) + "\n\n" + summary_table(results)
    print(summary_table(results))

    os.makedirs(args.out, exist_ok=True)
    info["load_average_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    elapsed = (datetime.datetime.now() - t0).total_seconds()
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(
            {"command": command, "date": started, "elapsed_s": elapsed, "machine": info, "results": results},
            f,
            indent=1,
        )
    png = os.path.join(args.out, "bench.png")
    note = chart(results, png)
    print(f"\nwrote {os.path.join(args.out, 'bench.json')}" + (f"; {note}" if note else f" and {png}"))
    if args.results:
        chart_name = None
        if note is None:
            chart_name = os.path.splitext(os.path.basename(args.results))[0] + ".png"
            chart(results, os.path.join(os.path.dirname(os.path.abspath(args.results)), chart_name))
        with open(args.results, "w") as f:
            f.write(results_md(results, info, command.strip(), started, elapsed, tables, chart_name))
        print(f"wrote {args.results}")
    print(f"total {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
