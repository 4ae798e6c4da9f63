"""linear_mse_loss: loss and gradients in one pass, against fastlin.reference in float64.

Outputs the op allocates are poisoned with NaN before the kernel writes them
(FASTLIN_DEBUG_POISON, read by the C++ op at each call), so an element left unwritten fails."""

import itertools
import os

import pytest
import torch
from conftest import REL_TOL, SUM_TOL, assert_rel_close, norm64, rel_error, run_under_isa

import fastlin
from fastlin import ops, reference

SHAPES = list(itertools.product((1, 7, 4097), (1, 3, 257), (1, 3, 17)))
MASKS = [
    (True, True, True, True),
    (False, True, True, False),
    (True, False, False, True),
    (False, False, False, False),
]
NAMES = ("loss", "grad_input", "grad_weight", "grad_bias", "grad_target")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("FASTLIN_DEBUG_POISON", "1")


def reference64(x, w, b, y, reduction, mask):
    """-> (fastlin.reference.linear_mse_loss in float64, the same at the kernel's precision, each
    output's terms summed in absolute value in float64)."""
    d = [None if t is None else t.detach().to(torch.float64) for t in (x, w, b, y)]
    return (
        reference.linear_mse_loss(d[0], d[1], d[2], d[3], reduction, mask),
        reference.linear_mse_loss(x, w, b, y, reduction, mask),
        magnitudes64(*d, reduction),
    )


def magnitudes64(x, w, b, y, reduction):
    """The sums behind each output (loss, grad_input, grad_weight, grad_bias, grad_target) taken over
    absolute values: |r| |w|, |r|^T |x|, sum |r| with r = x w^T + b - y. Rounding in any summation
    order is a multiple of the unit roundoff times these, not times the result, which cancellation
    can make far smaller (grad_weight sums r x over x of random signs)."""
    r = x @ w.T - y + (0 if b is None else b)
    scale = 1.0 / max(r.numel(), 1) if reduction == "mean" else 1.0
    a = r.abs() * (2.0 * scale)
    return (r.square().sum() * scale, a @ w.abs(), a.T @ x.abs(), a.sum(0), a)


def check(out, refs, dtype, mask, what=""):
    """Error vs float64 within the largest of: REL_TOL; 2x the error of the reference computed at the
    kernel's precision (DESIGN.md's rule); SUM_TOL times the output's condition, ||sum of |terms|||
    / ||sum of terms||: a gradient that is a sum of cancelling terms carries rounding far above
    1e-5 relative in any float32 implementation, and which of two summation orders (the kernel's,
    stock torch's) lands closer on one draw is chance."""
    for i, (name, a, r, n, m) in enumerate(zip(NAMES, out, *refs)):
        if i > 0 and not mask[i - 1]:
            assert a.shape == (0,), f"{what} {name}: masked off, expected an empty tensor"
            continue
        assert a.dtype == dtype, f"{what} {name}: dtype {a.dtype}"
        assert not torch.isnan(a).any() or torch.isnan(r).any(), f"{what} {name}: NaN (an unwritten element?)"
        cond = norm64(m) / max(norm64(r), 1e-300)
        err = rel_error(a, r)
        tol = max(REL_TOL[dtype], 2 * rel_error(n, r), SUM_TOL[dtype] * cond)
        assert err <= tol, f"{what} {name}: relative error {err:.3e} > {tol:.1e} ({dtype}, cond {cond:.0f})"


def away_from(pred):
    """A target whose residuals pred - target are all -1..-2. Residuals near zero would make the
    loss a cancellation (x w ~ y), and residuals of mixed signs make db = sum r a cancelling sum
    that amplifies the rounding of every r (by N / sqrt(N)) in any float32 implementation; the
    kernels are judged on well-conditioned data (dW still sums terms of random signs through x)."""
    return pred + 1 + torch.rand(pred.shape, device=pred.device)


def problem(N, D, O, dtype, bias, device="cpu"):
    """Drawn on the CPU (the same numbers on every device), then moved to `device`."""
    x = torch.randn(N, D).to(dtype)
    w = (torch.randn(O, D) / max(D, 1) ** 0.5).to(dtype)
    b = torch.randn(O).to(dtype) if bias else None
    y = away_from(x.double() @ w.double().T + (0 if b is None else b.double())).to(dtype)
    return tuple(None if t is None else t.to(device) for t in (x, w, b, y))


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("bias", (True, False), ids=("bias", "nobias"))
@pytest.mark.parametrize("N,D,O", SHAPES)
def test_grid(kernel_backend_device, N, D, O, bias, dtype):
    backend, device = kernel_backend_device
    x, w, b, y = problem(N, D, O, dtype, bias, device=device)
    for reduction in ("mean", "sum"):
        mask = (True, True, bias, True)
        out = ops.linear_mse_loss(x, w, b, y, reduction, mask, backend=backend)
        check(out, reference64(x, w, b, y, reduction, mask), dtype, mask, f"{N}x{D}x{O} {reduction}")


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("1" if v else "0" for v in m))
@pytest.mark.parametrize("N,D,O", ((7, 3, 1), (300, 40, 17), (4097, 257, 3), (4097, 1, 1)))
def test_masks(kernel_backend_device, N, D, O, mask):
    backend, device = kernel_backend_device
    x, w, b, y = problem(N, D, O, torch.float32, True, device=device)
    out = ops.linear_mse_loss(x, w, b, y, "mean", mask, backend=backend)
    check(out, reference64(x, w, b, y, "mean", mask), torch.float32, mask, str(mask))


@pytest.mark.parametrize("N,D,O", ((7, 3, 3), (4097, 257, 1), (300, 64, 17)))
def test_non_contiguous(kernel_backend_device, N, D, O):
    backend, device = kernel_backend_device
    x, w, b, y = problem(N, D, O, torch.float32, True, device=device)
    wide = torch.full((N, D + 3), float("nan"), device=device)
    wide[:, 1 : 1 + D] = x
    every_other = torch.full((2 * N, D), float("nan"), device=device)
    every_other[::2] = x
    layouts = [
        ("row-strided", wide[:, 1 : 1 + D], y, w),
        ("row-slice", every_other[::2], y, w),
        ("transposed", x.t().contiguous().t(), y.t().contiguous().t(), w.t().contiguous().t()),
        (
            "expanded",
            x[:1].expand(N, D),
            away_from((x[:1].double() @ w.double().T + b.double()).expand(N, O)).float(),
            w,
        ),
    ]
    mask = (True, True, True, True)
    for name, xv, yv, wv in layouts:
        out = ops.linear_mse_loss(xv, wv, b, yv, "mean", mask, backend=backend)
        check(out, reference64(xv, wv, b, yv, "mean", mask), torch.float32, mask, name)
        if backend != "cpp":
            # The GPU backends read strided inputs in place; the tile layout the compiler (Triton) or
            # the library (cuBLAS, O > 16) picks follows the strides, and so does the summation
            # order: they are held to the tolerance above, not to bit equality across layouts.
            continue
        # The C++ backend packs every layout the same way: bit for bit what contiguous inputs give.
        same = ops.linear_mse_loss(
            xv.contiguous(), wv.contiguous(), b, yv.contiguous(), "mean", mask, backend=backend
        )
        assert all(torch.equal(a, c) for a, c in zip(out, same)), name


@pytest.mark.parametrize("path", ("dot", "outer"))
@pytest.mark.parametrize("N,D,O", ((7, 3, 1), (1000, 20, 3), (61, 257, 7), (33, 17, 17)))
def test_forced_kernel_path(kernel_backend_device, monkeypatch, path, N, D, O):
    backend, device = kernel_backend_device
    if backend != "cpp":
        pytest.skip("FASTLIN_FUSED_PATH selects among the C++ CPU kernels")
    monkeypatch.setenv("FASTLIN_FUSED_PATH", path)
    monkeypatch.setenv("FASTLIN_FUSED_TILE_ROWS", "5")
    mask = (True, True, True, True)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x, w, b, y = problem(N, D, O, dtype, True, device=device)
        out = ops.linear_mse_loss(x, w, b, y, "sum", mask, backend=backend)
        check(out, reference64(x, w, b, y, "sum", mask), dtype, mask, f"{path} {dtype}")


def test_empty(kernel_backend_device):
    backend, device = kernel_backend_device
    mask = (True, True, True, True)
    for N, D, O in ((0, 3, 2), (4, 0, 2)):
        x, w, b, y = problem(N, D, O, torch.float32, True, device=device)
        for reduction in ("mean", "sum"):
            out = ops.linear_mse_loss(x, w, b, y, reduction, mask, backend=backend)
            ref = reference64(x, w, b, y, reduction, mask)[0]
            for name, a, r in zip(NAMES, out, ref):
                assert a.shape == r.shape, name
                assert torch.allclose(a.double(), r, equal_nan=True), f"{N}x{D}x{O} {reduction} {name}"


def test_deterministic(kernel_backend_device):
    backend, device = kernel_backend_device
    x, w, b, y = problem(20000, 65, 17, torch.float32, True, device=device)
    mask = (True, True, True, True)
    a = ops.linear_mse_loss(x, w, b, y, "mean", mask, backend=backend)
    c = ops.linear_mse_loss(x, w, b, y, "mean", mask, backend=backend)
    assert all(torch.equal(u, v) for u, v in zip(a, c))


def test_autograd_function_uses_it(kernel_backend_device):
    """The gradients through fastlin.functional.linear_mse_loss equal those of the plain-torch graph."""
    backend, device = kernel_backend_device
    x = torch.randn(50, 6, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(3, 6, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)
    y = torch.randn(50, 3, dtype=torch.float64, device=device, requires_grad=True)
    loss = fastlin.functional.linear_mse_loss(x, w, b, y, reduction="sum", backend=backend)
    (loss * 1.7).backward()
    got = [t.grad.clone() for t in (x, w, b, y)]
    for t in (x, w, b, y):
        t.grad = None
    (torch.nn.functional.mse_loss(torch.nn.functional.linear(x, w, b), y, reduction="sum") * 1.7).backward()
    for g, t in zip(got, (x, w, b, y)):
        assert_rel_close(g, t.grad, torch.float64)


def test_opcheck():
    ok, why = fastlin.backends.status()["cpp"]
    if not ok:
        pytest.skip(f"backend cpp unavailable: {why}")
    for N, D, O, bias in ((7, 3, 2, True), (20, 17, 17, False)):
        x, w, b, y = problem(N, D, O, torch.float32, bias)
        for mask in ((True, True, bias, True), (False, True, False, False)):
            torch.library.opcheck(torch.ops.fastlin.linear_mse_loss.default, (x, w, b, y, "mean", list(mask)))


ISA_SCRIPT = r"""
import os, sys, torch
sys.path.insert(0, {tests!r})
os.environ["FASTLIN_DEBUG_POISON"] = "1"
import test_linear_mse_loss as T
mask = (True, True, True, True)
for path in ("dot", "outer"):
    os.environ["FASTLIN_FUSED_PATH"] = path
    for (N, D, O) in ((7, 3, 1), (1000, 64, 17), (300, 40, 3)):
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            x, w, b, y = T.problem(N, D, O, dtype, True)
            out = T.ops.linear_mse_loss(x, w, b, y, "mean", mask, backend="cpp")
            T.check(out, T.reference64(x, w, b, y, "mean", mask), dtype, mask, f"{{path}} {{N}}x{{D}}x{{O}}")
print("ok")
"""


@pytest.mark.parametrize("isa", ("generic", "avx2"))
def test_other_isa(isa):
    tests = os.path.dirname(os.path.abspath(__file__))
    rc, out, report = run_under_isa(isa, ["-c", ISA_SCRIPT.format(tests=tests)], timeout=300)
    assert rc == 0 and out.strip().endswith("ok"), report
