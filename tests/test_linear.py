"""fastlin.linear / linear_backward (the ops, and the C++ autograd of the native backends) against
fastlin.reference in float64, over the odd-shape grid, every dtype, bias on/off, non-contiguous
and expanded inputs, every CPU ISA, with NaN-poisoned outputs."""

import itertools

import pytest
import torch
from conftest import REL_TOL, assert_rel_close, rel_error

import fastlin
from fastlin import ops, reference

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
GRID = list(itertools.product([1, 7, 4097], [1, 3, 257], [1, 3, 17]))
# Shapes that reach every kernel form: dot (O < lanes), axpy (O >= lanes, 1..4+ chunks), outer
# (D == 1), the transposed grad_weight (D < lanes <= O), the bench shapes, and ATen's GEMM range.
FORMS = [
    (100, 1, 1),
    (100, 1, 16),
    (33, 2, 40),
    (100, 64, 1),
    (100, 64, 16),
    (70, 256, 16),
    (5, 20, 70),
    (9, 8, 8),
    (300, 15, 33),
    (4, 300, 200),
    (130, 129, 130),
    (130, 300, 1),  # one output, rows wider than a grad_weight tile: whole tiles + a remainder on every ISA
    (50, 1, 300),  # the transposed grad_weight with one input column and many tiles
]


@pytest.fixture(autouse=True)
def poison():
    """Outputs of at::empty come back NaN-filled (deterministic mode's fill of uninitialised
    memory), so an element a kernel fails to write fails the comparison."""
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    assert torch.isnan(torch.empty(4)).all()
    yield
    torch.use_deterministic_algorithms(prev_det)
    torch.utils.deterministic.fill_uninitialized_memory = prev_fill


def _interp_skip(backend, n):
    if backend == "triton" and n > 64:
        pytest.skip("triton on CPU runs in the interpreter: large shapes are left to the GPU check")


def _data(n, d, o, dtype, device, bias=True):
    x = torch.randn(n, d, dtype=torch.float64).to(device=device, dtype=dtype)
    w = (torch.randn(o, d, dtype=torch.float64) / max(d, 1) ** 0.5).to(device=device, dtype=dtype)
    b = torch.randn(o, dtype=torch.float64).to(device=device, dtype=dtype) if bias else None
    g = torch.randn(n, o, dtype=torch.float64).to(device=device, dtype=dtype)
    return x, w, b, g


def _d(t):
    return None if t is None else t.detach().to(torch.float64).cpu()


def _check_forward(backend, x, w, b, dtype):
    y = ops.linear(x, w, b, backend=backend)
    assert y.dtype == dtype and y.shape == (x.shape[0], w.shape[0])
    assert_rel_close(y, reference.linear(_d(x), _d(w), _d(b)), dtype, what="linear")


def _check_backward(backend, g, x, w, dtype, mask=(True, True, True)):
    # A masked-off input is a NaN stand-in without storage: a kernel that read it would fail.
    xs = x if mask[1] else torch.full((), float("nan"), dtype=dtype, device=x.device).expand(x.shape)
    ws = w if mask[0] else torch.full((), float("nan"), dtype=dtype, device=w.device).expand(w.shape)
    gi, gw, gb = ops.linear_backward(g, xs, ws, mask, backend=backend)
    ri, rw, rb = reference.linear_backward(_d(g), _d(x), _d(w), (True, True, True))
    # Stock torch at the same precision: a reduction over N rows that cancels (grad_bias with
    # O = 1 is one sum of N signed terms) has a large relative error for anyone; DESIGN.md's rule
    # allows 2x the error stock torch makes there.
    stock = (g @ w, g.T @ x, g.sum(0)) if dtype == torch.float32 else (None, None, None)
    for m, out, ref, st, name in (
        (mask[0], gi, ri, stock[0], "grad_input"),
        (mask[1], gw, rw, stock[1], "grad_weight"),
        (mask[2], gb, rb, stock[2], "grad_bias"),
    ):
        if m:
            assert out.dtype == dtype
            factor = 1.0 if st is None else max(1.0, 2 * rel_error(st, ref) / REL_TOL[dtype])
            assert_rel_close(out, ref, dtype, factor=factor, what=name)
        else:
            assert out.shape == (0,), f"{name} masked off must be empty, got {tuple(out.shape)}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("n,d,o", GRID)
def test_linear_grid(kernel_backend_device, n, d, o, bias, dtype):
    backend, device = kernel_backend_device
    _interp_skip(backend, n)
    x, w, b, g = _data(n, d, o, dtype, device, bias)
    _check_forward(backend, x, w, b, dtype)
    _check_backward(backend, g, x, w, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,d,o", FORMS)
def test_linear_forms(kernel_backend_device, n, d, o, dtype):
    backend, device = kernel_backend_device
    _interp_skip(backend, n * d * o // 64)
    x, w, b, g = _data(n, d, o, dtype, device)
    _check_forward(backend, x, w, b, dtype)
    _check_forward(backend, x, w, None, dtype)
    _check_backward(backend, g, x, w, dtype)


@pytest.mark.parametrize("mask", [m for m in itertools.product([False, True], repeat=3) if any(m)], ids=str)
@pytest.mark.parametrize("n,d,o", [(7, 3, 17), (100, 1, 1), (33, 257, 3), (40, 2, 20)])
def test_linear_backward_masks(kernel_backend_device, n, d, o, mask):
    backend, device = kernel_backend_device
    x, w, _, g = _data(n, d, o, torch.float32, device)
    _check_backward(backend, g, x, w, torch.float32, mask)


def _layouts(n, d, o, device):
    """(name, x, w, b, g) with non-contiguous and expanded inputs of the given shapes."""
    x, w, b, g = _data(n, d, o, torch.float32, device)
    big = torch.randn(2 * n, 2 * d, device=device)
    yield "x rows strided", big[::2, :d], w, b, g
    yield "x columns strided", big[:n, ::2], w, b, g
    yield "x transposed", torch.randn(d, n, device=device).t(), w, b, g
    yield "x expanded rows", torch.randn(1, d, device=device).expand(n, d), w, b, g
    yield "x expanded scalar", torch.randn((), device=device).expand(n, d), w, b, g
    yield (
        "w transposed, b strided",
        x,
        torch.randn(d, o, device=device).t(),
        torch.randn(2 * o, device=device)[::2],
        g,
    )
    yield "g transposed", x, w, b, torch.randn(o, n, device=device).t()
    yield "g expanded", x, w, b, torch.randn(1, o, device=device).expand(n, o)


@pytest.mark.parametrize("n,d,o", [(7, 3, 17), (4097, 257, 3), (100, 1, 1), (300, 64, 16), (50, 2, 40)])
def test_linear_layouts(kernel_backend_device, n, d, o):
    backend, device = kernel_backend_device
    _interp_skip(backend, n)
    for name, x, w, b, g in _layouts(n, d, o, device):
        y = ops.linear(x, w, b, backend=backend)
        assert_rel_close(y, reference.linear(_d(x), _d(w), _d(b)), torch.float32, what=f"linear, {name}")
        gi, gw, gb = ops.linear_backward(g, x, w, (True, True, True), backend=backend)
        ri, rw, rb = reference.linear_backward(_d(g), _d(x), _d(w), (True, True, True))
        assert_rel_close(gi, ri, torch.float32, what=f"grad_input, {name}")
        assert_rel_close(gw, rw, torch.float32, what=f"grad_weight, {name}")
        assert_rel_close(gb, rb, torch.float32, what=f"grad_bias, {name}")


@pytest.mark.parametrize("d,o", [(3, 2), (1, 1), (0, 3), (4, 0)])
def test_linear_empty(kernel_backend_device, d, o):
    """N = 0 (and zero features / outputs): right shapes, no NaN, gradients of an empty sum are 0."""
    backend, device = kernel_backend_device
    x, w, b, _ = _data(0, d, o, torch.float32, device)
    g = torch.randn(0, o, device=device)
    y = ops.linear(x, w, b, backend=backend)
    assert y.shape == (0, o)
    gi, gw, gb = ops.linear_backward(g, x, w, (True, True, True), backend=backend)
    assert gi.shape == (0, d) and gw.shape == (o, d) and gb.shape == (o,)
    assert (gw == 0).all() and (gb == 0).all()
    if d == 0:  # no features: y = bias
        x1 = torch.randn(5, 0, device=device)
        assert torch.equal(ops.linear(x1, w, b, backend=backend), b.expand(5, o))


@pytest.mark.parametrize("n,d,o", [(20000, 64, 16), (9000, 257, 3), (50000, 2, 17), (262144, 1, 1)])
def test_linear_deterministic(n, d, o):
    """cpp: bit-identical across runs and across thread counts (fixed row chunks, fixed-order
    reduction), on shapes large enough to fork threads."""
    x, w, b, g = _data(n, d, o, torch.float32, "cpu")
    prev = torch.get_num_threads()
    outs = []
    try:
        for nt in (prev, 1, prev):
            torch.set_num_threads(nt)
            y = ops.linear(x, w, b, backend="cpp")
            outs.append((y, *ops.linear_backward(g, x, w, (True, True, True), backend="cpp")))
    finally:
        torch.set_num_threads(prev)
    for other in outs[1:]:
        for a, c in zip(outs[0], other):
            assert torch.equal(a, c)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", [(7, 3), (3, 4, 5), (5,)], ids=str)
def test_linear_autograd_native(shape, bias):
    """The C++ autograd kernel (what fastlin.functional.linear runs on cpp): gradients against
    the reference, for every subset of inputs requiring grad; float64 gradcheck."""
    d, o = shape[-1], 4
    for need in itertools.product([False, True], repeat=3 if bias else 2):
        if not any(need):
            continue
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=need[0])
        w = torch.randn(o, d, dtype=torch.float64, requires_grad=need[1])
        b = torch.randn(o, dtype=torch.float64, requires_grad=need[2]) if bias else None
        y = fastlin.functional.linear(x, w, b, backend="cpp")
        if len(shape) == 2:  # the C++ node, not a Python Function (other ranks add a reshape)
            assert y.grad_fn.name() == "fastlin::LinearBackward", y.grad_fn.name()
        gy = torch.randn_like(y)
        y.backward(gy)
        xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
        br = b.detach().requires_grad_() if bias else None
        torch.nn.functional.linear(xr, wr, br).backward(gy)
        for t, r in ((x, xr), (w, wr), (b, br)):
            if t is not None and t.requires_grad:
                assert_rel_close(t.grad, r.grad, torch.float64, what="autograd")
            elif t is not None:
                assert t.grad is None
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True) if bias else None
    assert torch.autograd.gradcheck(lambda *a: torch.ops.fastlin.linear(*a), (x, w, b))


def test_linear_opcheck():
    for n, d, o, bias in ((7, 3, 5, True), (4, 1, 1, False), (0, 3, 2, True)):
        for rg in (False, True):
            x = torch.randn(n, d, requires_grad=rg)
            w = torch.randn(o, d, requires_grad=rg)
            b = torch.randn(o, requires_grad=rg) if bias else None
            torch.library.opcheck(torch.ops.fastlin.linear.default, (x, w, b))
        g = torch.randn(n, o)
        for mask in ([True, True, True], [False, True, False], [True, False, True]):
            torch.library.opcheck(
                torch.ops.fastlin.linear_backward.default, (g, torch.randn(n, d), torch.randn(o, d), mask)
            )
