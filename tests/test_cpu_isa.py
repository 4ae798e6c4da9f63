"""Every CPU instruction set: the kernels of linear, mse_loss and sgd_update_ are compiled once
per ISA (csrc/cpu/isa.h) and the process picks the best one the CPU has. This runs the core
parity tests of tests/test_linear.py, test_mse_loss.py and test_sgd_update.py again in one
subprocess per lower ISA, with FASTLIN_CPU_ISA capping the choice (the in-process run covers the
best ISA)."""

import os

import pytest
from conftest import run_under_isa

HERE = os.path.dirname(os.path.abspath(__file__))
FILES = [os.path.join(HERE, f) for f in ("test_linear.py", "test_mse_loss.py", "test_sgd_update.py")]
SUBSET = " or ".join(
    [
        "test_linear_forms and cpp",
        "test_linear_layouts and cpp",
        "test_linear_backward_masks and cpp",
        "test_mse_grid and cpp and bfloat16",
        "test_mse_layouts and cpp",
        "test_mse_backward_grad_output and cpp",
        "test_sgd_matches_torch and cpp",
        "test_sgd_dtypes and cpp",
        "test_sgd_non_contiguous and cpp",
    ]
)


# avx512 under avx512_bf16: the same tables without bfloat16 linear's pairs of products (isa.h).
@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_kernels_on_isa(isa):
    args = ["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *FILES, "-k", SUBSET]
    rc, out, report = run_under_isa(isa, args, timeout=900)
    assert rc == 0, report
    assert " passed" in out and " failed" not in out, report
