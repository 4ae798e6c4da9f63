"""The machine code of the CUDA kernels, checked without a GPU: csrc/cuda/sgd_update.cu and
mse_loss.cu compiled here by nvcc for sm_90 and disassembled by the cuobjdump that ships with
Triton (the CUDA toolkit here has none). One rule: a 16-byte vector access stays one 16-byte
instruction. On an H200 the CUDA sgd_update_ reached 63% of the copy bandwidth while torch's fused
SGD reached 79%; its SASS loaded each 16-byte vector as 16 single-byte loads (LDG.E.U8), because
csrc/cuda/common.cuh's ld_vec bound the global memory to unpack16's reference and the memcpy there
was lowered byte by byte. No fastlin kernel reads or writes 1-byte data, so any byte access is
such a split. (The row-pass sources take minutes to compile and are checked by hand: see
bench/RESULTS.md.)"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _nvcc():
    for cand in (os.environ.get("NVCC"), "/usr/local/cuda-13.0/bin/nvcc", shutil.which("nvcc")):
        if cand and os.path.exists(cand):
            return cand
    return None


def _cuobjdump():
    try:
        import triton
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else None


_CACHE: dict[str, dict[str, str]] = {}


def _sass_by_function(src: str) -> dict[str, str]:
    """{kernel name: its SASS} of one source, compiled once per session."""
    nvcc, objdump = _nvcc(), _cuobjdump()
    if nvcc is None or objdump is None:
        pytest.skip("needs nvcc and Triton's cuobjdump")
    if src in _CACHE:
        return _CACHE[src]
    cubin = os.path.join(tempfile.mkdtemp(), os.path.basename(src) + ".cubin")
    subprocess.run(
        [
            nvcc,
            "-std=c++17",
            "-O3",
            "-I",
            os.path.join(ROOT, "csrc", "cuda"),
            "-gencode",
            "arch=compute_90,code=sm_90",
        ]
        + ["-cubin", "-o", cubin, os.path.join(ROOT, src)],
        check=True,
        capture_output=True,
    )
    text = subprocess.run([objdump, "-sass", cubin], check=True, capture_output=True, text=True).stdout
    shutil.rmtree(os.path.dirname(cubin), ignore_errors=True)
    parts = re.split(r"\n\s*Function : (\S+)", text)
    _CACHE[src] = dict(zip(parts[1::2], parts[2::2]))
    return _CACHE[src]


@pytest.mark.parametrize("src", ["csrc/cuda/sgd_update.cu", "csrc/cuda/mse_loss.cu"])
def test_no_byte_wise_global_accesses(src):
    funcs = _sass_by_function(src)
    assert funcs, f"no kernels found in the SASS of {src}"
    for name, sass in funcs.items():
        split = re.findall(r"\b(?:LDG|STG)\.E(?:\.[A-Z0-9]+)*\.(?:U8|S8)\b", sass)
        assert not split, f"{src}: {name}: {len(split)} byte-wise global accesses (a split 16-byte vector?)"


def test_sgd_update_vectors_are_single_instructions():
    """Each dtype's multi-tensor kernel reads its aligned tensors with 16-byte loads and writes them
    with 16-byte stores."""
    funcs = _sass_by_function("csrc/cuda/sgd_update.cu")
    kernels = {n: s for n, s in funcs.items() if "sgd_multi_kernel" in n}
    assert len(kernels) == 4, sorted(funcs)  # float, double, bfloat16, half
    for name, sass in kernels.items():
        assert re.search(r"\bLDG\.E(?:\.[A-Z]+)*\.128\b", sass), f"{name}: no 16-byte loads"
        assert re.search(r"\bSTG\.E(?:\.[A-Z]+)*\.128\b", sass), f"{name}: no 16-byte stores"
