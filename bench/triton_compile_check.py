"""Compile fastlin's Triton kernels for an NVIDIA target without a GPU, and report registers/spills.

    python bench/triton_compile_check.py                 # sm_90a (H100), the shapes of the GPU bench
    python bench/triton_compile_check.py --all           # also the odd shapes of the tests

The interpreter tests (tests/test_triton.py) run the kernels' logic on the CPU but never compile
them; this runs the real compiler (Triton -> PTX, then the bundled ptxas) on the exact
specialisations a launch would produce: the ops are called on CPU tensors with the launch replaced
by a recorder, and every recorded launch is compiled for each config the autotuner would try.
Exit status 1 on a compile error, on register spills in the train_step / linear_mse_loss kernels
of the bench shapes (the hot path must not spill), on a pipelined one-pass config of those kernels
(NUM_STAGES > 1) whose PTX has no cp.async (Triton's software pipeliner declined the loop), or on a
one-pass config whose shared memory keeps PROGRAMS_PER_SM programs from sharing an SM. Needs no GPU
and no CUDA driver.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: real JIT functions

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402

import fastlin.triton as FT  # noqa: E402
from fastlin.triton import _common as K  # noqa: E402

TY = {
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int32: "i32",
    torch.int64: "i64",
}
RECORDED: list = []


def _record(kernel, grid, *args, **kwargs):
    RECORDED.append((kernel, args, kwargs))


def _patch() -> None:
    K.launch = _record  # every module calls K.launch(...) through the module attribute
    K.check_devices = lambda *a, **k: None  # CPU tensors stand in for CUDA ones
    K.persistent_programs = lambda device, n: max(1, min(264, int(n)))  # an H100's 132 SMs x 2


def _signature(fn, args, kwargs):
    """Signature, constants and attributes as the JIT specialises them: ints equal to 1 become
    constants, multiples of 16 and 16-byte aligned pointers get tt.divisibility = 16."""
    sig, consts, attrs = {}, {}, {}
    for i, (name, p) in enumerate(zip(fn.arg_names, fn.params)):
        v = kwargs[name] if name in kwargs else args[i] if i < len(args) else p.default
        if p.is_constexpr:
            sig[name], consts[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + TY[v.dtype]
            if v.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            if v == 1:
                sig[name], consts[name] = "constexpr", 1
                continue
            sig[name] = "i64" if abs(v) >= 2**31 else "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = p.annotation_type or "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(v).__name__}")
    return sig, consts, attrs


def _ptxas(ptx: str, arch: str) -> tuple[int, int, str]:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        r = subprocess.run(
            [ptxas, "-v", f"-arch={arch}", f.name, "-o", os.devnull], capture_output=True, text=True
        )
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spill = re.search(r"(\d+) bytes spill stores", r.stderr)
    return (
        int(regs.group(1)) if regs else -1,
        int(spill.group(1)) if spill else -1,
        r.stderr if r.returncode else "",
    )


SMEM_PER_SM = 227 * 1024  # H100/H200: shared memory an SM's resident blocks can share


def compile_all(label: str, fn_call, target: GPUTarget, arch: str, hot: bool) -> list[str]:
    RECORDED.clear()
    fn_call()
    problems = []
    seen = set()
    for kernel, args, kwargs in RECORDED:
        configs, jit = [None], kernel
        if isinstance(kernel, Autotuner):
            jit = kernel.fn
            kernel.nargs = dict(zip(kernel.arg_names, args))
            configs = kernel.prune_configs(kwargs)
        for cfg in configs:
            kw = dict(kwargs)
            num_warps = kw.pop("num_warps", 4)
            if cfg is not None:
                kw.update(cfg.kwargs)
                num_warps = cfg.num_warps
            sig, consts, attrs = _signature(jit, args, kw)
            key = (jit.__name__, num_warps, str(sorted(sig.items())), str(sorted(consts.items())), str(attrs))
            if key in seen:  # the same specialisation again (fit's later steps)
                continue
            seen.add(key)
            t = time.time()
            try:
                ck = triton.compile(
                    ASTSource(jit, sig, constexprs=consts, attrs=attrs),
                    target=target,
                    options={"num_warps": num_warps, "num_stages": 3},
                )
            except Exception as e:  # a kernel that does not compile for the target
                problems.append(f"{label}: {jit.__name__} {cfg}: COMPILE ERROR {type(e).__name__}: {e}")
                print(problems[-1], flush=True)
                continue
            regs, spill, err = _ptxas(ck.asm["ptx"], arch)
            desc = "" if cfg is None else " ".join(f"{k}={v}" for k, v in cfg.kwargs.items())
            print(
                f"{label:<34} {jit.__name__:<16} {desc:<24} warps={num_warps} regs={regs:>3} "
                f"spill={spill:>5}B "
                f"smem={ck.metadata.shared:>6}B  {time.time() - t:.1f}s",
                flush=True,
            )
            if err:
                problems.append(f"{label}: {jit.__name__}: ptxas failed: {err[-300:]}")
            elif hot and spill > 0 and jit.__name__ == "_onepass_kernel":
                problems.append(
                    f"{label}: {jit.__name__} {desc} warps={num_warps}: "
                    f"{spill} bytes of spills on the hot path"
                )
            if (
                hot
                and jit.__name__ == "_onepass_kernel"
                and kw.get("NUM_STAGES", 1) > 1
                and "cp.async" not in ck.asm["ptx"]
            ):
                # the tile loop asked for NUM_STAGES stages but Triton's software pipeliner declined
                # (x then arrives by synchronous loads in every tile); e.g. y carried two tiles ahead
                # in registers made it drop the x prefetch of the O = 1 loop (sm_90a, Triton 3.6)
                problems.append(
                    f"{label}: {jit.__name__} {desc} warps={num_warps}: NUM_STAGES="
                    f"{kw['NUM_STAGES']} but no cp.async in the PTX (the tile loop is not pipelined)"
                )
            if jit.__name__ == "_onepass_kernel" and ck.metadata.shared * K.PROGRAMS_PER_SM > SMEM_PER_SM:
                # the persistent grid assumes PROGRAMS_PER_SM resident programs per SM
                problems.append(
                    f"{label}: {jit.__name__} {desc} warps={num_warps}: {ck.metadata.shared} B of shared "
                    f"memory; {K.PROGRAMS_PER_SM} programs per SM need <= {SMEM_PER_SM} B each"
                )
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="90", help="compute capability, e.g. 90 (H100) or 80 (A100)")
    ap.add_argument("--all", action="store_true", help="also the odd test shapes (slower)")
    a = ap.parse_args()
    cap = int(a.arch)
    target = GPUTarget("cuda", cap, 32)
    arch = f"sm_{cap}a" if cap >= 90 else f"sm_{cap}"
    _patch()
    K.device_capability = lambda device: divmod(cap, 10)  # the target's, for the CPU stand-ins
    T = FT
    problems = []
    N, D = 4096, 256  # N only sets how many programs; the tiles are those of N = 4M
    for O in (1, 16):
        # (fp16 at O = 16: the two-piece split on the bf16 dots; at O = 1 the FMA path, as fp32's)
        for dt in (torch.float32, torch.bfloat16) + ((torch.float16,) if O > 1 else ()):
            x, y = torch.randn(N, D).to(dt), torch.randn(N, O).to(dt)
            w, b = torch.randn(O, D), torch.randn(O)
            tag = f"O={O} {str(dt).split('.')[1]}"
            problems += compile_all(
                f"train_step {tag}",
                lambda x=x, y=y, w=w, b=b: T.train_step(
                    x, y, w, b, None, None, None, 0.1, 0.0, 0.0, 0.0, False, False, False
                ),
                target,
                arch,
                True,
            )
            wd, bd = w.to(dt), b.to(dt)
            problems += compile_all(
                f"linear_mse_loss {tag}",
                lambda x=x, y=y, wd=wd, bd=bd: T.linear_mse_loss(
                    x, wd, bd, y, "mean", [False, True, True, False]
                ),
                target,
                arch,
                True,
            )
    x, y, w, b = torch.randn(N, D), torch.randn(N, 1), torch.randn(1, D), torch.randn(1)
    problems += compile_all(
        "fit O=1 fp32 shuffled",
        lambda: T.fit(
            x, y, w, b, None, None, None, 1, 1024, True, 0, 0.1, 0.0, 0.0, 0.0, False, False, False
        ),
        target,
        arch,
        True,
    )
    ps = [torch.randn(4096, 4096), torch.randn(4096)]
    problems += compile_all(
        "sgd_update_ momentum",
        lambda: T.sgd_update_(ps, ps, [p.clone() for p in ps], 0.1, 0.9, 0.0, 1e-4, False, False, False),
        target,
        arch,
        False,
    )
    problems += compile_all("mse_loss mean", lambda: T.mse_loss(x, x, "mean"), target, arch, False)
    problems += compile_all("linear O=1", lambda: T.linear(x, w, b), target, arch, False)
    if a.all:
        x, w, b, y = torch.randn(33, 257), torch.randn(17, 257), torch.randn(17), torch.randn(33, 17)
        problems += compile_all("linear O=17 D=257", lambda: T.linear(x, w, b), target, arch, False)
        problems += compile_all(
            "linear_backward", lambda: T.linear_backward(y, x, w, [True, True, True]), target, arch, False
        )
        problems += compile_all(
            "linear_mse_loss all grads",
            lambda: T.linear_mse_loss(x, w, b, y, "sum", [True] * 4),
            target,
            arch,
            False,
        )
        problems += compile_all(
            "mse_loss none / backward",
            lambda: (T.mse_loss(x, x, "none"), T.mse_loss_backward(torch.tensor(1.0), x, x, "mean")),
            target,
            arch,
            False,
        )
        problems += compile_all(
            "fit O=17 D=257 sample weights",
            lambda: T.fit(
                x, y, w, b, None, None, torch.rand(33), 1, 8, True, 0, 0.1, 0.0, 0.0, 0.0, False, False, False
            ),
            target,
            arch,
            False,
        )
        x64, w64, b64, y64 = x.double(), w.double(), b.double(), y.double()
        problems += compile_all(
            "train_step fp64",
            lambda: T.train_step(
                x64, y64, w64, b64, None, None, None, 0.1, 0.0, 0.0, 0.0, False, False, False
            ),
            target,
            arch,
            False,
        )
    print()
    if problems:
        print("PROBLEMS:\n  " + "\n  ".join(problems))
        return 1
    print(f"all kernels compile for {arch}; no spills on the hot path")
    return 0


if __name__ == "__main__":
    sys.exit(main())
