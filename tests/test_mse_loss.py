"""fastlin.mse_loss / mse_loss_backward (the ops, and the C++ autograd of the native backends)
against fastlin.reference in float64: any shape (0-d, empty), all reductions, every dtype,
non-contiguous and expanded inputs, scalar and elementwise grad_output, every CPU ISA,
NaN-poisoned outputs, determinism."""

import math

import pytest
import torch
from conftest import REL_TOL, assert_rel_close, rel_error

import fastlin
from fastlin import ops, reference

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
REDUCTIONS = ["none", "mean", "sum"]
SHAPES = [(), (1,), (7,), (4097,), (7, 3), (4097, 17), (3, 257, 2), (1, 1, 1, 5), (100, 1), (100, 16)]


@pytest.fixture(autouse=True)
def poison():
    """Outputs of at::empty come back NaN-filled, so an unwritten element fails."""
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    assert torch.isnan(torch.empty(4)).all()
    yield
    torch.use_deterministic_algorithms(prev_det)
    torch.utils.deterministic.fill_uninitialized_memory = prev_fill


def _d(t):
    return t.detach().to(torch.float64).cpu()


def _rand(shape, dtype, device):
    return torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype)


def _close(out, ref64, ref_lowp, dtype, what):
    """REL_TOL against float64, or for 16-bit outputs at most 2x the error that rounding the exact
    result to the output format has (fp16 mean gradients of a large tensor are subnormal:
    ~1e-6 with a 6e-8 step), DESIGN.md's 2x rule."""
    if dtype == torch.float16 and ref64.abs().max() > torch.finfo(torch.float16).max:
        assert torch.isinf(out).any(), f"{what}: float16 past 65504 must overflow to inf, like torch"
        return
    factor = 1.0
    if dtype in (torch.float16, torch.bfloat16):
        factor = max(1.0, 2 * rel_error(ref_lowp, ref64) / REL_TOL[dtype])
    assert_rel_close(out, ref64, dtype, factor=factor, what=what)


def _check(backend, a, b, reduction, dtype, g=None, what=""):
    out = ops.mse_loss(a, b, reduction, backend=backend)
    ref = reference.mse_loss(_d(a), _d(b), reduction)
    assert out.dtype == dtype and out.shape == ref.shape
    _close(out, ref, reference.mse_loss(a, b, reduction), dtype, f"mse_loss {reduction} {what}")
    if g is None:
        g = _rand(out.shape, dtype, a.device)
    gi = ops.mse_loss_backward(g, a, b, reduction, backend=backend)
    rgi = reference.mse_loss_backward(_d(g), _d(a), _d(b), reduction)
    assert gi.dtype == dtype and gi.shape == a.shape
    _close(
        gi,
        rgi,
        reference.mse_loss_backward(g, a, b, reduction),
        dtype,
        f"mse_loss_backward {reduction} {what}",
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_mse_grid(kernel_backend_device, shape, reduction, dtype):
    backend, device = kernel_backend_device
    if backend == "triton" and math.prod(shape) > 4096:
        pytest.skip("triton on CPU runs in the interpreter: large shapes are left to the GPU check")
    _check(backend, _rand(shape, dtype, device), _rand(shape, dtype, device), reduction, dtype)


def _layouts(device):
    a = torch.randn(300, 70, device=device)
    big = torch.randn(600, 140, device=device)
    yield "rows strided", big[::2, :70], a
    yield "columns strided", big[:300, ::2], a
    yield "transposed", torch.randn(70, 300, device=device).t(), a
    yield "expanded rows", torch.randn(1, 70, device=device).expand(300, 70), a
    yield "expanded scalar", a, torch.randn((), device=device).expand(300, 70)
    yield "both strided", big[::2, 1:71], big[1::2, ::2]
    yield (
        "3-D permuted",
        torch.randn(5, 7, 9, device=device).permute(2, 0, 1),
        torch.randn(9, 5, 7, device=device),
    )


def test_mse_layouts(kernel_backend_device):
    backend, device = kernel_backend_device
    for name, a, b in _layouts(device):
        for reduction in REDUCTIONS:
            _check(backend, a, b, reduction, torch.float32, what=name)
            _check(backend, b, a, reduction, torch.float32, what=name + " (swapped)")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mse_backward_grad_output(kernel_backend_device, reduction):
    """grad_output: 0-d, an expanded scalar (what sum().backward() sends for "none"), elementwise
    strided, or a smaller tensor that broadcasts to input's shape (torch's rule); the result always
    has input's shape."""
    backend, device = kernel_backend_device
    a, b = torch.randn(50, 33, device=device), torch.randn(50, 33, device=device)
    cases = [("0-d", torch.randn((), device=device))]
    if reduction == "none":
        cases += [
            ("expanded scalar", torch.randn((), device=device).expand(50, 33)),
            ("expanded row", torch.randn(1, 33, device=device).expand(50, 33)),
            ("row to broadcast", torch.randn(1, 33, device=device)),
            ("1-D row to broadcast", torch.randn(33, device=device)),
            ("column to broadcast", torch.randn(50, 1, device=device)),
            ("transposed", torch.randn(33, 50, device=device).t()),
            ("contiguous", torch.randn(50, 33, device=device)),
        ]
    for name, g in cases:
        _check(backend, a, b, reduction, torch.float32, g=g, what=f"grad_output {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_mse_empty(kernel_backend_device, dtype):
    """Empty input: mean is NaN (like torch), sum is 0, none is empty; backward is empty."""
    backend, device = kernel_backend_device
    for shape in [(0,), (0, 3), (4, 0, 2)]:
        a, b = torch.randn(shape, dtype=dtype, device=device), torch.randn(shape, dtype=dtype, device=device)
        assert torch.isnan(ops.mse_loss(a, b, "mean", backend=backend))
        assert torch.isnan(torch.nn.functional.mse_loss(a, b, reduction="mean"))
        assert ops.mse_loss(a, b, "sum", backend=backend).item() == 0.0
        assert ops.mse_loss(a, b, "none", backend=backend).shape == shape
        assert (
            ops.mse_loss_backward(
                torch.ones((), dtype=dtype, device=device), a, b, "mean", backend=backend
            ).shape
            == shape
        )


def test_mse_large_accuracy():
    """Float32 sums over 2^22 elements (many chunks, threads) stay far under 1e-5 of float64."""
    a, b = torch.randn(1 << 22), torch.randn(1 << 22)
    for reduction in ("mean", "sum"):
        out = ops.mse_loss(a, b, reduction, backend="cpp")
        ref = reference.mse_loss(_d(a), _d(b), reduction)
        assert abs(out.item() - ref.item()) / abs(ref.item()) < 1e-6


def test_mse_deterministic():
    a, b = torch.randn(3000, 700), torch.randn(3000, 700)
    prev = torch.get_num_threads()
    outs = []
    try:
        for nt in (prev, 1, prev):
            torch.set_num_threads(nt)
            outs.append(
                [ops.mse_loss(a, b, r, backend="cpp") for r in REDUCTIONS]
                + [ops.mse_loss_backward(torch.tensor(0.7), a, b, "mean", backend="cpp")]
            )
    finally:
        torch.set_num_threads(prev)
    for other in outs[1:]:
        for x, y in zip(outs[0], other):
            assert torch.equal(x, y)


def test_mse_nonfinite():
    """NaN/inf propagate like torch."""
    a, b = torch.randn(40), torch.randn(40)
    a[3] = float("nan")
    assert torch.isnan(ops.mse_loss(a, b, "mean", backend="cpp"))
    a[3] = float("inf")
    assert ops.mse_loss(a, b, "sum", backend="cpp").item() == float("inf")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mse_autograd_native(reduction):
    """The C++ autograd kernel (fastlin.functional.mse_loss on cpp): gradients for input and
    target against torch; float64 gradcheck."""
    for shape in [(), (7,), (5, 3)]:
        a = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        b = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        out = fastlin.functional.mse_loss(a, b, reduction=reduction, backend="cpp")
        ar, br = a.detach().requires_grad_(), b.detach().requires_grad_()
        ref = torch.nn.functional.mse_loss(ar, br, reduction=reduction)
        assert_rel_close(out, ref, torch.float64, what="forward")
        go = torch.randn_like(out)
        out.backward(go)
        ref.backward(go)
        assert_rel_close(a.grad, ar.grad, torch.float64, what="grad input")
        assert_rel_close(b.grad, br.grad, torch.float64, what="grad target")
        assert torch.autograd.gradcheck(
            lambda x, y: torch.ops.fastlin.mse_loss(x, y, reduction),
            (a.detach().requires_grad_(), b.detach().requires_grad_()),
        )
    # only the target requires grad
    a = torch.randn(6, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    fastlin.functional.mse_loss(a, b, reduction=reduction, backend="cpp").sum().backward()
    bt = b.detach().requires_grad_()
    torch.nn.functional.mse_loss(a, bt, reduction=reduction).sum().backward()
    assert_rel_close(b.grad, bt.grad, torch.float64, what="grad target only")


def test_mse_opcheck():
    for shape in [(), (7,), (5, 3), (0, 2)]:
        for reduction in REDUCTIONS:
            for rg in (False, True):
                if shape == (0, 2) and reduction == "mean":
                    continue  # NaN: opcheck's AOT comparison has no equal_nan (test_mse_empty covers it)
                a, b = torch.randn(shape, requires_grad=rg), torch.randn(shape, requires_grad=rg)
                torch.library.opcheck(torch.ops.fastlin.mse_loss.default, (a, b, reduction))
            g = torch.randn(shape) if reduction == "none" else torch.randn(())
            torch.library.opcheck(
                torch.ops.fastlin.mse_loss_backward.default,
                (g, torch.randn(shape), torch.randn(shape), reduction),
            )
