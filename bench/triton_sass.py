"""Instruction counts of the Triton one-pass kernel's tile loop, from its SASS, without a GPU.

    python bench/triton_sass.py                          # train_step bf16, O = 1, D = 256, sm_90a
    python bench/triton_sass.py --dtype fp32 --outs 16 --pack off --arch 90

For each config the autotuner would try (bench/triton_compile_check.py records the launch on CPU
stand-ins and compiles it with Triton and the bundled ptxas), the kernel's SASS (cuobjdump) is
searched for its largest loop, the tile loop, and its instructions are counted. A warp runs that
body once per tile of BLOCK_N rows, so

    warp instructions per byte of x = loop instructions x num_warps / (BLOCK_N x D x element size)

is what the SMs must issue to stream x; at an H200's ~4.2 TB/s that is ~16 bytes per SM per cycle
against 4 warp instructions an SM can issue per cycle. (bench/RESULTS.md, "### Session 10": the
bf16 FMA path's 0.135-0.147 per byte, the tensor-core PACK path's 0.040.) Counts, not timings: a
loop's latencies and stalls need a GPU profile (bench/gpu_profile.py).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# first: it sets TRITON_INTERPRET=0 before triton is imported
import triton_compile_check as TCC  # noqa: E402, I001

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402

import fastlin.triton as FT  # noqa: E402
from fastlin.triton import _common as K  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_INSTR = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"BRA\b.*?0x([0-9a-f]+)")


def tile_loop(sass: str) -> list[str]:
    """The instructions of the largest loop (a backward branch's span) in the SASS text."""
    ins = [(int(m.group(1), 16), m.group(2)) for m in map(_INSTR.match, sass.splitlines()) if m]
    best: list[str] = []
    for addr, text in ins:
        m = _BRANCH.search(text)
        if m and int(m.group(1), 16) < addr:
            body = [t for a, t in ins if int(m.group(1), 16) <= a <= addr]
            if len(body) > len(best):
                best = body
    return best


def opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]


def _sass(ptx: str, arch: str) -> str:
    nv = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as d:
        src, cubin = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        subprocess.run([os.path.join(nv, "ptxas"), f"-arch={arch}", src, "-o", cubin], check=True)
        return subprocess.run(
            [os.path.join(nv, "cuobjdump"), "-sass", cubin], check=True, capture_output=True, text=True
        ).stdout


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--outs", type=int, default=1)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--pack", default="auto", choices=("auto", "on", "off"), help="PACK_ONE_OUTPUT")
    ap.add_argument("--arch", default="90", help="compute capability, e.g. 90 (H100 / H200)")
    ap.add_argument("--defer", action="store_true", help="PACK_DEFER (PACK's deferred dW subtraction)")
    a = ap.parse_args(argv)
    cap = int(a.arch)
    target, arch = GPUTarget("cuda", cap, 32), f"sm_{cap}a" if cap >= 90 else f"sm_{cap}"
    TCC._patch()
    K.device_capability = lambda device: divmod(cap, 10)
    K.PACK_ONE_OUTPUT = {"auto": None, "on": True, "off": False}[a.pack]
    K.PACK_DEFER = a.defer
    dt, N, D, O = DTYPES[a.dtype], 4096, a.d, a.outs
    x, y = torch.randn(N, D).to(dt), torch.randn(N, O).to(dt)
    TCC.RECORDED.clear()
    w, b = torch.randn(O, D), torch.zeros(O)
    FT.train_step(x, y, w, b, None, None, None, 0.1, 0.0, 0.0, 0.0, False, False, True)
    print(
        f"train_step {a.dtype} N x {D} O = {O}, {arch}, PACK_ONE_OUTPUT={a.pack}"
        f"{', PACK_DEFER' if a.defer else ''}: the tile loop per config"
    )
    n = 0
    for kernel, args, kwargs in TCC.RECORDED:
        if not isinstance(kernel, Autotuner) or kernel.fn.__name__ != "_onepass_kernel":
            continue
        jit = kernel.fn
        kernel.nargs = dict(zip(kernel.arg_names, args))
        for cfg in kernel.prune_configs(kwargs):
            kw = {**kwargs, **cfg.kwargs}
            sig, consts, attrs = TCC._signature(jit, args, kw)
            ck = triton.compile(
                ASTSource(jit, sig, constexprs=consts, attrs=attrs),
                target=target,
                options={"num_warps": cfg.num_warps, "num_stages": 3},
            )
            regs, spill, _ = TCC._ptxas(ck.asm["ptx"], arch)
            body = tile_loop(_sass(ck.asm["ptx"], arch))
            ops = collections.Counter(opcode(t) for t in body)
            tile_bytes = cfg.kwargs["BLOCK_N"] * D * x.element_size()
            per_byte = len(body) * cfg.num_warps / tile_bytes
            top = ", ".join(f"{k} {v}" for k, v in ops.most_common(8))
            print(
                f"  BLOCK_N={cfg.kwargs['BLOCK_N']:<3} warps={cfg.num_warps} "
                f"stages={cfg.kwargs['NUM_STAGES']} PACK={int(bool(cfg.kwargs.get('PACK')))}: "
                f"regs {regs}, spills {spill} B, smem "
                f"{ck.metadata.shared} B, loop {len(body)} instructions, {per_byte:.3f} warp instructions "
                f"per byte of x ({top})"
            )
            n += 1
    return 0 if n else 1


if __name__ == "__main__":
    sys.exit(main())
