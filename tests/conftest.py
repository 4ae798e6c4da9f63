"""Shared test configuration: which (backend, device) pairs run here, fresh seeds, tolerances.

Triton runs on CPU tensors through its interpreter when there is no GPU: TRITON_INTERPRET must be
set before triton is first imported, so it is set here, before anything imports it, unless the
caller chose (the GPU check sets TRITON_INTERPRET=0)."""

import os
import subprocess
import sys
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastlin  # noqa: E402

STATUS = fastlin.backends.status()


def _pairs():
    pairs = [("reference", "cpu"), ("cpp", "cpu")]
    if torch.cuda.is_available():
        pairs += [("reference", "cuda"), ("cuda", "cuda"), ("triton", "cuda")]
    else:
        pairs += [("triton", "cpu")]
    return pairs


def backend_params(include_reference: bool = True):
    """pytest params of (backend, device); unavailable backends are skipped with their reason."""
    out = []
    for b, d in _pairs():
        if b == "reference" and not include_reference:
            continue
        ok, why = STATUS[b]
        marks = [] if ok else [pytest.mark.skip(reason=f"backend {b} unavailable: {why}")]
        out.append(pytest.param((b, d), id=f"{b}-{d}", marks=marks))
    return out


@pytest.fixture(params=backend_params())
def backend_device(request):
    """(backend, device) for every backend that can run here (reference included)."""
    return request.param


@pytest.fixture(params=backend_params(include_reference=False))
def kernel_backend_device(request):
    """(backend, device) for the kernel backends (reference excluded: it is the oracle)."""
    return request.param


def run_under_isa(isa: str, args: list[str], timeout: float):
    """Runs ``python *args`` (cwd tests/) in a subprocess whose CPU kernels are capped at ``isa``
    (FASTLIN_CPU_ISA: the ISA is chosen once per process). Skips when the cpp backend is missing or
    this process is itself such a subprocess. Returns (returncode, stdout, a failure report with the
    tails of stdout and stderr)."""
    if os.environ.get("FASTLIN_CPU_ISA") is not None:
        pytest.skip("already inside an ISA subprocess")
    ok, why = STATUS["cpp"]
    if not ok:
        pytest.skip(f"backend cpp unavailable: {why}")
    r = subprocess.run(
        [sys.executable, *args],
        env=dict(os.environ, FASTLIN_CPU_ISA=isa),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=os.path.dirname(os.path.abspath(__file__)),
    )
    return r.returncode, r.stdout, f"FASTLIN_CPU_ISA={isa}:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different seed per test (stable across runs, so failures reproduce), never a shared stream.
    # (crc32, not hash(): str hashes are salted per process, so hash() gave a new seed every run)
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


# Relative error ||out - ref|| / ||ref|| allowed against a float64 reference, per input dtype.
# float32: fp32 accumulation of O(D) products plus a reduction over N; DESIGN.md puts float32
# kernels far under 1e-5. float64: the same in double. bf16/fp16: outputs rounded to 8/11-bit
# mantissas (relative rounding 2^-9 = 2e-3 for bf16, 2^-12 = 2.4e-4 for fp16) on top of input rounding.
REL_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# Rounding of a sum that cancels, relative to the sum of its terms' absolute values (the backward
# error of the summation): 2 unit roundoffs of the accumulation dtype (fp32 for bf16/fp16 inputs).
# The blocked and tree orders of these kernels and of BLAS land at 0.1-0.2 u (a 4097-term grad_weight
# with condition 2700 on an H200: fastlin cuda 0.08 u, stock torch on the CPU 0.2 u), while a row
# dropped or counted twice costs ~1/N of the magnitude, >> 2 u for N < 2^22. Tests multiply it by
# the output's condition ||sum |terms||| / ||sum terms||.
SUM_TOL = {
    torch.float64: 2 * 2.0**-53,
    torch.float32: 2 * 2.0**-24,
    torch.bfloat16: 2 * 2.0**-24,
    torch.float16: 2 * 2.0**-24,
}


def norm64(t: torch.Tensor) -> float:
    """The 2-norm of t, computed in float64 on the CPU."""
    return torch.linalg.vector_norm(t.detach().to(torch.float64).cpu()).item()


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    num = norm64(out - ref)
    den = norm64(ref)
    if den == 0.0:
        return num
    return num / den


def assert_rel_close(out, ref, dtype, factor: float = 1.0, what: str = ""):
    """out within REL_TOL[dtype] * factor of ref (relative 2-norm); NaN anywhere in out fails."""
    assert not torch.isnan(out.detach().cpu()).any() or torch.isnan(ref.detach().cpu()).any(), (
        f"{what}: NaN in output"
    )
    err = rel_error(out, ref)
    tol = REL_TOL[dtype] * factor
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e} ({dtype})"


# Triton on CPU tensors runs in its interpreter, one program after another in Python: thousands of
# times slower than a compiled kernel. tests/test_triton.py is the interpreter suite for every Triton
# kernel (shapes chosen to reach each tail and path cheaply, float64 gradcheck included). The tests
# below, written for the C++ kernels' paths or running whole training loops (10-80 s each in the
# interpreter), run the Triton backend on a GPU only; the other generic tests still run it here.
_INTERPRETER_HEAVY = (
    "test_train_step.py::",
    "test_fit.py::",
    "test_linear_mse_loss.py::",
    "test_seed.py::",
    "test_regressor.py::test_step_and_fit_match_torch_sgd",
    "test_regressor.py::test_seed_loop_parity",
    "test_regressor.py::test_chunked_progress_fit_is_identical_to_one_call",
    "test_regressor.py::test_divergence_raises_with_the_last_finite_parameters",
    "test_regressor.py::test_minibatch_fit_equals_train_steps_in_the_same_order",
    "test_autograd.py::test_gradcheck_linear_mse_loss",
    "test_autograd.py::test_gradcheck_functional_any_shape",
)


# The same for the odd-shape grids' biggest rows count (N = 4097: 10-35 s a case in the interpreter);
# N = 1 and 7 still run here, and tests/test_triton.py covers the N = 4097 tails.
_INTERPRETER_MAX_N = 1024


def pytest_collection_modifyitems(config, items):
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        triton_cpu = ("triton", "cpu") in (params.get("kernel_backend_device"), params.get("backend_device"))
        if not triton_cpu:
            continue
        heavy = f"{item.path.name}::{item.originalname}".startswith(_INTERPRETER_HEAVY)
        n = params.get("N")
        if heavy or (isinstance(n, int) and n > _INTERPRETER_MAX_N):
            item.add_marker(pytest.mark.skip(reason="Triton interpreter: covered by tests/test_triton.py"))


# FASTLIN_FAIL_LOG=<file>: each failure's test id and message appended to <file> as it happens (for
# bench/gpu_check.sh, whose time-boxed runs may be cut off before pytest prints its summary).
_FAIL_LOG = os.environ.get("FASTLIN_FAIL_LOG")


def pytest_runtest_logreport(report):
    # (under pytest-xdist the controller gets every worker's reports: write there only)
    if _FAIL_LOG and report.failed and not os.environ.get("PYTEST_XDIST_WORKER"):
        text = report.longreprtext.strip().splitlines()
        msg = [ln for ln in text if ln.startswith("E ")][:6] or text[-3:]
        with open(_FAIL_LOG, "a") as f:
            f.write(f"{report.nodeid} ({report.when})\n" + "".join(f"    {ln[:300]}\n" for ln in msg))
