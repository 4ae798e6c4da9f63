"""GPU bench of the fused train step (issues 4 and 5): stock eager, torch.compile, fastlin triton,
fastlin cuda, and the limit, for N = 4M, D = 256, O in {1, 16}, fp32 and bf16 x.

    python bench/gpu_bench.py                      # on a CUDA machine; table last, JSON with --json
    python bench/gpu_bench.py --dry-run            # CPU: tiny sizes, Triton interpreter (tests the logic)

Contenders, one training step each (forward, MSE, backward, SGD update):
  eager     nn.Linear + nn.MSELoss + backward + torch.optim.SGD.step (foreach); for bf16 x the model
            and optimizer are bf16 too (stock torch's own bf16 training; fastlin keeps fp32 weights).
  compile   the same step under torch.compile (forward + loss + backward + optimizer step).
  triton    fastlin.ops.train_step(..., backend="triton"): one pass over x + a reduce/update kernel.
  cuda      the same with backend="cuda", when fastlin._C was built with CUDA kernels.
  limit     one read of x at the device-to-device copy bandwidth measured in this run
            (bandwidth = bytes read + written / time of a large copy).
Timing: CUDA events around `inner` back-to-back steps, median over `repeats`, contenders interleaved
within each repeat so drift hits them all; first calls (autotuning, compilation) are warm-up.
Also timed briefly: linear_mse_loss (loss + dW + db) and sgd_update_ (a 4096 x 4096 layer + bias with
momentum) against stock torch.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from unittest import mock


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4 * 1024 * 1024)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--outs", default="1,16", help="comma-separated O values")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument(
        "--no-fp16-wide",
        action="store_true",
        help="skip the fp16 case at the widest O > 4 (which backend auto should take there)",
    )
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--inner", type=int, default=5, help="steps per timed sample")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile contender")
    p.add_argument("--no-extras", action="store_true", help="skip the linear_mse_loss / sgd_update_ timings")
    p.add_argument(
        "--json", default=None, help="write results here (default $OUT/gpu_bench.json when OUT is set)"
    )
    p.add_argument(
        "--table", default=None, help="also write the table here (default $OUT/gpu_bench_table.txt)"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU tensors through the Triton interpreter, tiny sizes: exercises the script's logic",
    )
    args = p.parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        args.n, args.d, args.outs, args.repeats, args.inner = 4096, 32, "1,8", 3, 1
    return args


ARGS = parse()

import torch  # noqa: E402

import fastlin  # noqa: E402
from fastlin import ops  # noqa: E402

T0 = time.time()


def log(msg: str) -> None:
    print(f"[gpu_bench +{time.time() - T0:6.1f}s] {msg}", flush=True)


DEV = "cpu" if ARGS.dry_run else "cuda"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Timer:
    """ms per call of fn: CUDA events on the GPU, perf_counter on the CPU (dry run)."""

    def __init__(self, inner: int):
        self.inner = inner

    def __call__(self, fn) -> float:
        if DEV == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(self.inner):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / self.inner
        t = time.perf_counter()
        for _ in range(self.inner):
            fn()
        return (time.perf_counter() - t) * 1e3 / self.inner


@dataclass
class InSetting:
    """A contender that runs under a setting (a launch shape, a precision): the context is entered
    around each timed block of calls, not around every call, so switching settings costs the
    measurement nothing (os.environ patched per call cost ~0.7 ms of host time, 5x the kernel)."""

    setting: Callable[[], ContextManager]
    fn: Callable

    def __call__(self):  # one call, setting included (warm-up, error checks)
        with self.setting():
            return self.fn()


def measure(contenders: dict, repeats: int, inner: int) -> dict:
    """{name: {"median": ms, "min": ms, "max": ms}}; contenders interleaved in every repeat."""
    timer = Timer(inner)
    samples = {k: [] for k in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            if fn is None:
                continue
            try:
                if isinstance(fn, InSetting):
                    with fn.setting():
                        samples[name].append(timer(fn.fn))
                else:
                    samples[name].append(timer(fn))
            except Exception as e:  # a contender that fails at run time is dropped, with the reason
                log(f"{name}: failed while timing: {type(e).__name__}: {e}")
                contenders[name] = None
    return {
        k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in samples.items() if v
    }


def copy_bandwidth() -> float:
    """Bytes read + written per second of a large device-to-device copy (GB/s)."""
    nbytes = (1 << 30) if DEV == "cuda" else (64 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=DEV).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    ms = measure({"copy": lambda: dst.copy_(src)}, 10 if DEV == "cuda" else 5, 5 if DEV == "cuda" else 1)[
        "copy"
    ]
    return 2 * nbytes / (ms["median"] * 1e-3) / 1e9


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def step_contenders(N, D, O, dtype, backends):
    """The train-step contenders for one case; each a zero-argument callable doing one step."""
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn((N, D), generator=g, device=DEV).to(dtype)
    w_true = torch.randn((O, D), generator=g, device=DEV) / D**0.5
    y = (x.float() @ w_true.T + 0.1 * torch.randn((N, O), generator=g, device=DEV)).to(dtype)
    lr = 1e-3
    out = {}

    # stock eager: the model in x's dtype
    model = torch.nn.Linear(D, O, device=DEV, dtype=dtype)
    loss_fn = torch.nn.MSELoss()
    opt = torch.optim.SGD(model.parameters(), lr=lr)

    def eager():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss

    out["eager"] = eager

    if not ARGS.no_compile:
        cmodel = torch.nn.Linear(D, O, device=DEV, dtype=dtype)
        copt = torch.optim.SGD(cmodel.parameters(), lr=lr)

        @torch.compile
        def compiled_step():
            copt.zero_grad(set_to_none=True)
            loss = loss_fn(cmodel(x), y)
            loss.backward()
            copt.step()
            return loss

        out["compile"] = compiled_step

    # fastlin: float32 parameters whatever x's dtype (train_step accumulates in fp32)
    for be in backends:
        w = (torch.randn((O, D), generator=g, device=DEV) / D**0.5).float()
        b = torch.zeros((O,), device=DEV)

        def fused(w=w, b=b, be=be):
            return ops.train_step(x, y, w, b, lr=lr, backend=be)

        out[be] = fused
        if be == "triton" and O <= 4:
            # the persistent grid: PROGRAMS_PER_SM programs per SM (default 2), a few others beside it
            for v in ("pps1", "pps3", "pps4"):
                out[f"triton:{v}"] = InSetting(functools.partial(_setting, v), fused)
        if be == "triton" and O == 1 and dtype == torch.bfloat16:
            # the two paths the autotuner chooses between (fastlin.triton._common.PACK_ONE_OUTPUT):
            # one output on the tensor cores, and the FMA path; and PACK with PACK_DEFER (not yet measured)
            for v in ("pack", "fma", "packdefer"):
                out[f"triton:{v}"] = InSetting(functools.partial(_setting, v), fused)
        if be == "triton" and O > 4:
            # the tl.dot path: the default "ieee" fp32 and the tensor-core precisions, side by side
            for prec in ("tf32x3", "tf32"):
                out[f"triton:{prec}"] = InSetting(functools.partial(_setting, prec), fused)
    return x, y, out


def _setting(variant: str):
    """The context a contender variant runs in: "pps<k>" programs per SM, "pack" / "fma" the one-
    output path forced, "packdefer" PACK with PACK_DEFER, else a tl.dot input precision."""
    from fastlin.triton import _common

    if variant.startswith("pps"):
        return mock.patch.object(_common, "PROGRAMS_PER_SM", int(variant[3:]))
    if variant in ("pack", "fma"):
        return mock.patch.object(_common, "PACK_ONE_OUTPUT", variant == "pack")
    if variant == "packdefer":
        return mock.patch.multiple(_common, PACK_ONE_OUTPUT=True, PACK_DEFER=True)
    return _precision(variant)


@contextlib.contextmanager
def _precision(prec):
    fastlin.triton.set_input_precision(prec)
    try:
        yield
    finally:
        fastlin.triton.set_input_precision(None)  # back to following torch's setting


def update_errors(x, y, names) -> dict:
    """Fast and right: the relative error (norm) of one SGD step's update of W and b, lr = 1, from
    the same start, against a float64 reference (chunked over rows), for eager and every fastlin
    contender. eager's bf16 row uses bf16 weights, as stock bf16 training does."""
    N, D = x.shape
    O = y.shape[1]
    g = torch.Generator(device=DEV).manual_seed(2)
    w0 = torch.randn((O, D), generator=g, device=DEV) / D**0.5
    b0 = 0.1 * torch.randn((O,), generator=g, device=DEV)
    gw = torch.zeros((O, D), dtype=torch.float64, device=DEV)
    gb = torch.zeros((O,), dtype=torch.float64, device=DEV)
    w64, b64 = w0.double(), b0.double()
    for i in range(0, N, 1 << 19):
        xc = x[i : i + (1 << 19)].double()
        r = xc @ w64.T + b64 - y[i : i + (1 << 19)].double()
        gw += r.T @ xc
        gb += r.sum(0)
    scale = 2.0 / (N * O)  # MSELoss(reduction="mean") over N * O elements
    ref_w, ref_b = -scale * gw, -scale * gb

    def err(w, b):
        dw, db = w.double() - w64, b.double() - b64
        return max(
            float(torch.linalg.vector_norm(dw - ref_w) / torch.linalg.vector_norm(ref_w)),
            float(torch.linalg.vector_norm(db - ref_b) / torch.linalg.vector_norm(ref_b)),
        )

    out = {}
    model = torch.nn.Linear(D, O, device=DEV, dtype=x.dtype)
    with torch.no_grad():
        model.weight.copy_(w0)
        model.bias.copy_(b0)
    torch.nn.functional.mse_loss(model(x), y).backward()
    with torch.no_grad():
        out["eager"] = err(model.weight - model.weight.grad, model.bias - model.bias.grad)
    del model
    for name in names:
        be, _, variant = name.partition(":")
        if be not in ("triton", "cuda", "cpp"):
            continue
        w, b = w0.clone(), b0.clone()
        step = functools.partial(ops.train_step, x, y, w, b, lr=1.0, backend=be)
        try:
            with _setting(variant) if variant else contextlib.nullcontext():
                step()
            out[name] = err(w, b)
        except Exception as e:
            log(f"update check {name}: {type(e).__name__}: {e}")
    return out


def warm(contenders: dict, what: str) -> None:
    for name, fn in list(contenders.items()):
        t = time.time()
        try:
            for _ in range(3):
                fn()
            sync()
            log(f"{what}: {name} warm ({time.time() - t:.1f}s incl. compile/autotune)")
        except Exception as e:
            log(f"{what}: {name} FAILED to run: {type(e).__name__}: {e}")
            traceback.print_exc(limit=3)
            contenders[name] = None


def bench_train_step(bw_gbs: float, backends: list, save) -> list:
    """The train-step cases, most important first (O = 1 fp32 is the target); save(rows) after each."""
    rows = []
    outs, dnames = [int(o) for o in ARGS.outs.split(",")], ARGS.dtypes.split(",")
    cases = [(O, d) for O in outs for d in dnames]
    if not ARGS.no_fp16_wide and "fp16" not in dnames and max(outs) > 4:
        # last: fp16 with many outputs, behind auto's order for fp16 (CUDA C++ first: 9.5 vs 10.6 ms)
        cases.append((max(outs), "fp16"))
    for O, dname in cases:
        dtype = DTYPES[dname]
        N, D = ARGS.n, ARGS.d
        case = f"train_step N={N} D={D} O={O} {dname}"
        log(f"case {case}")
        try:
            x, y, cont = step_contenders(N, D, O, dtype, backends)
        except Exception as e:
            log(f"{case}: setup failed: {type(e).__name__}: {e}")
            continue
        try:
            errors = update_errors(x, y, list(cont))
            log(f"{case}: update error vs float64: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
        except Exception as e:
            errors = {}
            log(f"{case}: update check failed: {type(e).__name__}: {e}")
        warm(cont, case)
        res = measure(cont, ARGS.repeats, ARGS.inner)
        tuned = triton_tuned()
        if tuned:
            log(f"{case}: Triton one-pass autotune picks: {tuned}")
        x_bytes = x.numel() * x.element_size()
        limit = x_bytes / (bw_gbs * 1e9) * 1e3
        rows.append(
            {
                "case": case,
                "N": N,
                "D": D,
                "O": O,
                "dtype": dname,
                "x_bytes": x_bytes,
                "limit_ms": limit,
                "results": res,
                "update_error": errors,
                "triton_tuned": tuned,
            }
        )
        log(
            f"{case}: "
            + ", ".join(f"{k} {v['median']:.3f} ms" for k, v in res.items())
            + f", limit {limit:.3f} ms"
        )
        save(rows)  # a run cut short still leaves every finished case behind
        del x, y, cont
        if DEV == "cuda":
            torch.cuda.empty_cache()
    return rows


def triton_tuned() -> dict:
    """{autotune key: chosen config} of the Triton one-pass kernel so far (what the timings ran)."""
    try:
        from fastlin.triton import _onepass

        return {str(k): str(v) for k, v in getattr(_onepass._onepass_kernel, "cache", {}).items()}
    except Exception as e:  # the bench must not fail on a Triton internals change
        return {"error": f"{type(e).__name__}: {e}"}


def bench_extras(bw_gbs: float, backends: list) -> list:
    """linear_mse_loss (loss + grad_weight + grad_bias) and sgd_update_, briefly. linear_mse_loss
    bf16 with 16 outputs checks auto's per-dtype order (backends._AUTO_CUDA_CASES: Triton first
    there, from the train_step figure alone)."""
    return [
        bench_linear_mse_loss(bw_gbs, backends, 1, torch.float32),
        bench_linear_mse_loss(bw_gbs, backends, 16, torch.bfloat16),
        bench_sgd_update(bw_gbs, backends),
    ]


def bench_linear_mse_loss(bw_gbs: float, backends: list, O: int, dtype: torch.dtype) -> dict:
    N, D = ARGS.n, ARGS.d
    g = torch.Generator(device=DEV).manual_seed(1)
    x = torch.randn((N, D), generator=g, device=DEV).to(dtype)
    y = torch.randn((N, O), generator=g, device=DEV).to(dtype)
    w = torch.randn((O, D), generator=g, device=DEV).to(dtype).requires_grad_(True)
    b = torch.zeros((O,), device=DEV, dtype=dtype, requires_grad=True)

    def stock_lmse():
        loss = torch.nn.functional.mse_loss(torch.nn.functional.linear(x, w, b), y)
        return torch.autograd.grad(loss, (w, b))

    cont = {"eager": stock_lmse}
    for be in backends:
        cont[be] = lambda be=be: ops.linear_mse_loss(
            x, w.detach(), b.detach(), y, "mean", (False, True, True, False), backend=be
        )
    warm(cont, "linear_mse_loss")
    res = measure(cont, max(3, ARGS.repeats // 3), ARGS.inner)
    x_bytes = x.numel() * x.element_size()
    dname = next(k for k, v in DTYPES.items() if v == dtype)
    return {
        "case": f"linear_mse_loss N={N} D={D} O={O} {dname} (loss+dW+db)",
        "x_bytes": x_bytes,
        "limit_ms": x_bytes / (bw_gbs * 1e9) * 1e3,
        "results": res,
    }


def bench_sgd_update(bw_gbs: float, backends: list) -> dict:
    n = 4096 * 4096 if DEV == "cuda" else 256 * 256
    side = int(n**0.5)
    ps = [torch.randn((side, side), device=DEV), torch.randn((side,), device=DEV)]
    gs = [torch.randn_like(p) for p in ps]
    bufs = [torch.randn_like(p) for p in ps]
    tp = [p.clone().requires_grad_(True) for p in ps]
    for p, gg in zip(tp, gs):
        p.grad = gg.clone()
    topt = torch.optim.SGD(tp, lr=1e-3, momentum=0.9, weight_decay=1e-4)
    topt.step()  # creates the momentum buffers
    cont = {"eager": topt.step}
    try:
        fopt = torch.optim.SGD(
            [p.detach().clone().requires_grad_(True) for p in ps],
            lr=1e-3,
            momentum=0.9,
            weight_decay=1e-4,
            fused=True,
        )
        for p, gg in zip(fopt.param_groups[0]["params"], gs):
            p.grad = gg.clone()
        fopt.step()
        cont["torch fused"] = fopt.step
    except Exception as e:
        log(f"sgd_update_: torch fused SGD unavailable: {e}")
    for be in backends:
        cont[be] = lambda be=be: ops.sgd_update_(ps, gs, bufs, 1e-3, 0.9, 0.0, 1e-4, backend=be)
    warm(cont, "sgd_update_")
    res = measure(cont, max(3, ARGS.repeats // 3), ARGS.inner)
    moved = sum(p.numel() for p in ps) * 4 * 5  # read p, g, buf; write p, buf
    row = {
        "case": f"sgd_update_ {side}x{side} + {side} fp32 momentum (5 passes)",
        "x_bytes": moved,
        "limit_ms": moved / (bw_gbs * 1e9) * 1e3,
        "results": res,
    }
    try:
        row["launch_shapes"] = sgd_launch_shapes(ps, gs, bufs, backends)
    except Exception as e:
        log(f"sgd_update_ launch shapes failed: {type(e).__name__}: {e}")
    return row


# Launch shapes of the two sgd_update_ kernels, timed side by side (the first of each is the default):
# cuda: (FASTLIN_CUDA_SGD_CHUNK, FASTLIN_CUDA_SGD_BLOCKS_PER_SM), 0 = even split / one full wave;
# triton: (sgd_update.BLOCK, sgd_update.NUM_WARPS).
CUDA_SGD_SHAPES = [(16384, 8), (65536, 8), (4096, 8), (0, 0), (16384, 0), (65536, 0), (0, 2)]
TRITON_SGD_SHAPES = [(4096, 4), (1024, 4), (2048, 4), (4096, 8), (8192, 8)]


def _sgd_shape(be: str, shape):
    """A context in which backend ``be``'s sgd_update_ kernel launches with ``shape``."""
    if be == "cuda":
        a, b = shape
        return mock.patch.dict(
            os.environ, {"FASTLIN_CUDA_SGD_CHUNK": str(a), "FASTLIN_CUDA_SGD_BLOCKS_PER_SM": str(b)}
        )
    from fastlin.triton import sgd_update as TS

    return mock.patch.multiple(TS, BLOCK=shape[0], NUM_WARPS=shape[1])


def sgd_launch_shapes(ps, gs, bufs, backends) -> dict:
    """{"<backend> <a>/<b>": ms}: sgd_update_ under each launch shape (kernels' results do not
    depend on it), interleaved like the other contenders."""
    cont = {}
    for be, shapes in (("cuda", CUDA_SGD_SHAPES), ("triton", TRITON_SGD_SHAPES)):
        if be not in backends:
            continue
        for shape in shapes:
            cont[f"{be} {shape[0]}/{shape[1]}"] = InSetting(
                functools.partial(_sgd_shape, be, shape),
                functools.partial(ops.sgd_update_, ps, gs, bufs, 1e-3, 0.9, 0.0, 1e-4, backend=be),
            )
    if not cont:
        return {}
    warm(cont, "sgd_update_ launch shapes")
    res = measure(cont, max(3, ARGS.repeats // 3), ARGS.inner)
    log("sgd_update_ launch shapes: " + ", ".join(f"{k} {v['median']:.3f} ms" for k, v in res.items()))
    return {k: v["median"] for k, v in res.items()}


def variant_names(rows: list) -> list:
    """Result names that are variants of a contender listed under the table, not as columns."""
    return sorted({n for r in rows for n in r["results"] if ":pps" in n or ":pack" in n or ":fma" in n})


def table(rows: list, bw_gbs: float, names: list) -> str:
    """One line per case: each contender's ms, % of copy bandwidth (limit / time), speed-ups."""
    wid = {n: max(10, len(n) + 2) for n in names}
    head = f"{'case':<44}" + "".join(f"{n:>{wid[n]}}" for n in names) + f"{'limit':>9}"
    for be in ("triton", "cuda"):
        if be in names:
            head += f"{be + ' %BW':>11}{be + '/eager':>13}{be + '/comp':>12}"
    lines = [
        f"ms per call (median); copy bandwidth {bw_gbs:.0f} GB/s (read + write); "
        "limit = one read of x (or the "
        f"bytes an update must move) at that rate; %BW = limit / time",
        head,
        "-" * len(head),
    ]
    for r in rows:
        res, limit = r["results"], r["limit_ms"]
        line = f"{r['case'][:44]:<44}"
        for n in names:
            line += f"{res[n]['median']:>{wid[n]}.3f}" if n in res else f"{'-':>{wid[n]}}"
        line += f"{limit:>9.3f}"
        for be in ("triton", "cuda"):
            if be not in names:
                continue
            if be in res:
                t = res[be]["median"]
                eager = res.get("eager", {}).get("median")
                comp = res.get("compile", {}).get("median")
                line += f"{100 * limit / t:>10.0f}%"
                line += f"{eager / t:>12.2f}x" if eager else f"{'-':>13}"
                line += f"{comp / t:>11.2f}x" if comp else f"{'-':>12}"
            else:
                line += f"{'-':>11}{'-':>13}{'-':>12}"
        lines.append(line)
    variants = variant_names(rows)
    for r in rows:
        vs = [v for v in variants if v in r["results"]]
        if vs:
            base = r["results"].get(vs[0].split(":")[0], {}).get("median")
            medians = [(v, r["results"][v]["median"]) for v in vs]
            lines.append(
                f"  {r['case'][:44]} variants, ms (%BW): "
                + ", ".join(f"{v} {ms:.3f} ({100 * r['limit_ms'] / ms:.0f}%)" for v, ms in medians)
                + (f"; default {base:.3f}" if base else "")
            )
    for r in rows:
        if r.get("launch_shapes"):
            lines.append("")
            lines.append(
                f"{r['case'][:44]}: launch shapes, ms (%BW); cuda chunk/blocks-per-SM (0: even split / "
                "one wave), triton BLOCK/warps"
            )
            lines.append(
                "  "
                + ", ".join(
                    f"{k} {v:.3f} ({100 * r['limit_ms'] / v:.0f}%)" for k, v in r["launch_shapes"].items()
                )
            )
    errs = [r for r in rows if r.get("update_error")]
    if errs:
        lines.append("")
        lines.append("one step's update (lr = 1) vs float64, relative error (eager bf16: bf16 weights)")
        for r in errs:
            e = r["update_error"]
            lines.append(f"{r['case'][:44]:<44}" + "".join(f"  {k} {v:.1e}" for k, v in e.items()))
    return "\n".join(lines)


def main() -> int:
    if DEV == "cuda" and not torch.cuda.is_available():
        log(f"torch {torch.__version__}: no CUDA device, nothing to bench (use --dry-run on a CPU)")
        return 2
    log(
        f"torch {torch.__version__}, triton {_triton_version()}, device {DEV}"
        + (f" ({torch.cuda.get_device_name()})" if DEV == "cuda" else " (dry run: Triton interpreter)")
    )
    status = fastlin.backends.status()
    backends = []
    for be in ("triton", "cuda") if DEV == "cuda" else ("triton", "cpp"):
        ok, why = status[be]
        log(f"backend {be}: {'available' if ok else 'unavailable: ' + why}")
        if ok:
            backends.append(be)
    log(f"triton tl.dot input_precision: {fastlin.triton.input_precision() if 'triton' in backends else '-'}")
    bw = copy_bandwidth()
    log(f"copy bandwidth: {bw:.1f} GB/s (read + write)")
    names = ["eager"] + ([] if ARGS.no_compile else ["compile"]) + backends
    out_dir = os.environ.get("OUT")
    jpath = ARGS.json or (os.path.join(out_dir, "gpu_bench.json") if out_dir else None)
    tpath = ARGS.table or (os.path.join(out_dir, "gpu_bench_table.txt") if out_dir else None)
    meta = {
        "torch": torch.__version__,
        "triton": _triton_version(),
        "device": DEV,
        "gpu": torch.cuda.get_device_name() if DEV == "cuda" else None,
        "copy_bandwidth_gbs": bw,
        "input_precision": fastlin.triton.input_precision() if "triton" in backends else None,
        "repeats": ARGS.repeats,
        "inner": ARGS.inner,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv),
    }

    def save(rows) -> str:
        # columns: the contenders, torch's fused SGD and the tl.dot precisions; other variants
        # (e.g. triton:pps3) are listed under the table
        extra = sorted({n for r in rows for n in r["results"]} - set(names) - set(variant_names(rows)))
        text = table(rows, bw, names + extra)
        if jpath:
            with open(jpath, "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=1)
        if tpath:
            with open(tpath, "w") as f:
                f.write(text + "\n")
        return text

    rows = bench_train_step(bw, backends, save)
    if not ARGS.no_extras:
        try:
            rows += bench_extras(bw, backends)
        except Exception as e:
            log(f"extras failed: {type(e).__name__}: {e}")
            traceback.print_exc(limit=3)
    text = save(rows)
    if jpath:
        log(f"wrote {jpath}" + (f" and {tpath}" if tpath else ""))
    print("\n" + text, flush=True)
    return 0


def _triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    sys.exit(main())
