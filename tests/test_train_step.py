"""train_step: one fused SGD step on the MSE, against fastlin.reference run in float64.

The step is checked through what it changes: the returned loss, the parameter step
(new - old, so that the gradient is tested, not the unchanged bulk of the weights) and the
momentum buffers. Tolerances are conftest.REL_TOL; bfloat16 and float16 inputs are compared with the
float32 tolerance because the reference sees the same 16-bit values and the parameters are float32,
so the only error is the kernel's float32 accumulation.
"""

import itertools
import os

import pytest
import torch
from conftest import REL_TOL, rel_error, run_under_isa

import fastlin
from fastlin import ops, reference

SHAPES = list(itertools.product((1, 7, 4097), (1, 3, 257), (1, 3, 17)))
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# (momentum, dampening, weight_decay, nesterov, maximize); nesterov needs momentum > 0, dampening 0.
SGD_OPTIONS = [
    o
    for o in itertools.product((0.0, 0.9), (0.0, 0.3), (0.0, 0.05), (False, True), (False, True))
    if not (o[3] and (o[0] == 0 or o[1] != 0)) and not (o[0] == 0 and o[1] != 0)
]


def param_dtype(dtype):
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def tol_dtype(dtype):
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def away_from(pred):
    """A target whose residuals pred - target are all -1..-2. Residuals near zero would make the
    loss a cancellation (x w ~ y), and residuals of mixed signs make db = sum r a cancelling sum
    that amplifies the rounding of every r (by N / sqrt(N)) in any float32 implementation; the
    kernels are judged on well-conditioned data (dW still sums terms of random signs through x)."""
    return pred + 1 + torch.rand(pred.shape, device=pred.device)


def make_problem(N, D, O, dtype, bias=True, momentum=0.0, sample_weight=False, device="cpu"):
    pt = param_dtype(dtype)
    x = torch.randn(N, D, device=device).to(dtype)
    w = (torch.randn(O, D, device=device) / max(D, 1) ** 0.5).to(pt)
    b = torch.randn(O, device=device).to(pt) if bias else None
    pred = x.double() @ w.double().T + (0 if b is None else b.double())
    y = away_from(pred).to(dtype)
    wm = torch.randn(O, D, device=device).to(pt) if momentum else None
    bm = torch.randn(O, device=device).to(pt) if momentum and bias else None
    sw = torch.rand(N, device=device) + 0.1 if sample_weight else None
    return x, y, w, b, wm, bm, sw


def clone(t):
    return None if t is None else t.clone()


def reference_step(x, y, w, b, wm, bm, sw, **opts):
    """fastlin.reference.train_step on copies -> ((loss, w, b, wm, bm) in float64,
    the same at the kernel's precision)."""
    out = []
    for cast in (lambda t: t.to(torch.float64), lambda t: t):
        d = [None if t is None else cast(t.detach()).clone() for t in (x, y, w, b, wm, bm, sw)]
        loss = reference.train_step(*d, **opts)
        out.append((loss, d[2], d[3], d[4], d[5]))
    return tuple(out)


def run_step(backend, x, y, w, b, wm, bm, sw, **opts):
    """ops.train_step on copies of the parameters -> (loss, w, b, wm, bm)."""
    w, b, wm, bm = clone(w), clone(b), clone(wm), clone(bm)
    loss = ops.train_step(x, y, w, b, wm, bm, sw, backend=backend, **opts)
    return loss, w, b, wm, bm


def identical(a, c):
    """Two step results (tuples of tensors or None) are bit-identical."""
    return all(
        (u is None and v is None) or (u is not None and v is not None and torch.equal(u, v))
        for u, v in zip(a, c)
    )


def assert_close(out, ref64, ref_native, dtype, what):
    """DESIGN.md's rule: error vs float64 within REL_TOL, or within 2x the error of the reference
    computed at the kernel's precision (a momentum buffer m * buf + g that nearly cancels, say, has
    float32 rounding error far above 1e-5 relative in torch too)."""
    assert not torch.isnan(out).any() or torch.isnan(ref64).any(), f"{what}: NaN in output"
    err = rel_error(out, ref64)
    tol = max(REL_TOL[dtype], 2 * rel_error(ref_native, ref64))
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e} ({dtype})"


def check_step(out, refs, w0, b0, dtype, what=""):
    t = tol_dtype(dtype)
    (rloss, rw, rb, rwm, rbm), (nloss, nw, nb, nwm, nbm) = refs
    loss, w, b, wm, bm = out
    assert loss.dim() == 0 and loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(loss, rloss, nloss, t, f"{what} loss")
    w0, b0 = w0.double(), None if b0 is None else b0.double()
    assert_close(w.double() - w0, rw - w0, nw.double() - w0, t, f"{what} weight step")
    if b is not None:
        assert_close(b.double() - b0, rb - b0, nb.double() - b0, t, f"{what} bias step")
    if wm is not None:
        assert_close(wm, rwm, nwm, t, f"{what} weight_momentum")
    if bm is not None:
        assert_close(bm, rbm, nbm, t, f"{what} bias_momentum")


STEP = dict(
    lr=0.5, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False, first_step=False
)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", (True, False), ids=("bias", "nobias"))
@pytest.mark.parametrize("N,D,O", SHAPES)
def test_grid(kernel_backend_device, N, D, O, bias, dtype):
    backend, device = kernel_backend_device
    x, y, w, b, _, _, _ = make_problem(N, D, O, dtype, bias, device=device)
    out = run_step(backend, x, y, w, b, None, None, None, **STEP)
    check_step(out, reference_step(x, y, w, b, None, None, None, **STEP), w, b, dtype, f"{N}x{D}x{O}")


@pytest.mark.parametrize("momentum,dampening,weight_decay,nesterov,maximize", SGD_OPTIONS)
@pytest.mark.parametrize("first_step", (False, True), ids=("later", "first"))
def test_sgd_options(
    kernel_backend_device, momentum, dampening, weight_decay, nesterov, maximize, first_step
):
    backend, device = kernel_backend_device
    opts = dict(
        lr=0.3,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
        maximize=maximize,
        first_step=first_step,
    )
    for N, D, O in ((7, 3, 1), (300, 20, 17)):
        x, y, w, b, wm, bm, _ = make_problem(N, D, O, torch.float32, True, momentum, device=device)
        if first_step and wm is not None:
            wm.fill_(float("nan"))  # written, never read, on the first step
            bm.fill_(float("nan"))
        out = run_step(backend, x, y, w, b, wm, bm, None, **opts)
        check_step(
            out, reference_step(x, y, w, b, wm, bm, None, **opts), w, b, torch.float32, f"{N}x{D}x{O} {opts}"
        )


@pytest.mark.parametrize("sw_dtype", (torch.float32, torch.float64, torch.bfloat16), ids=str)
@pytest.mark.parametrize("N,D,O", ((7, 3, 1), (4097, 33, 3), (513, 40, 17), (100, 1, 1)))
def test_sample_weight(kernel_backend_device, N, D, O, sw_dtype):
    backend, device = kernel_backend_device
    x, y, w, b, wm, bm, sw = make_problem(
        N, D, O, torch.float32, True, 0.9, sample_weight=True, device=device
    )
    sw = sw.to(sw_dtype)
    opts = dict(STEP, momentum=0.9)
    out = run_step(backend, x, y, w, b, wm, bm, sw, **opts)
    check_step(out, reference_step(x, y, w, b, wm, bm, sw, **opts), w, b, torch.float32, "sample_weight")
    # A strided sample_weight view reads the same values.
    sw2 = torch.stack([sw, torch.full_like(sw, float("nan"))], 1)[:, 0]
    assert identical(out, run_step(backend, x, y, w, b, wm, bm, sw2, **opts))


def _layouts(N, D, O, device):
    """(name, x, y) with the same values in different memory layouts."""
    x = torch.randn(N, D, device=device)
    y = away_from(torch.zeros(N, O, device=device))  # |y| in 1..2; the weights below are small
    wide = torch.full((N, D + 5), float("nan"), device=device)
    wide[:, 2 : 2 + D] = x
    every_other = torch.full((2 * N, D), float("nan"), device=device)
    every_other[::2] = x
    yt = y.t().contiguous().t()  # column-major target
    row = torch.randn(1, D, device=device)
    return [
        ("row-strided", wide[:, 2 : 2 + D], y),
        ("row-slice", every_other[::2], y),
        ("transposed", x.t().contiguous().t(), yt),
        ("expanded", row.expand(N, D), y),
    ]


@pytest.mark.parametrize("N,D,O", ((7, 3, 3), (4097, 257, 1), (300, 64, 17)))
def test_non_contiguous(kernel_backend_device, N, D, O):
    backend, device = kernel_backend_device
    w = torch.randn(O, D, device=device) / D**0.5 * 0.1
    b = torch.randn(O, device=device) * 0.1
    for name, x, y in _layouts(N, D, O, device):
        out = run_step(backend, x, y, w, b, None, None, None, **STEP)
        ref = reference_step(x, y, w, b, None, None, None, **STEP)
        check_step(out, ref, w, b, torch.float32, name)
        if backend != "cpp":
            # GPU backends read strided inputs in place, with a tile layout (Triton) or GEMM
            # algorithm (cuBLAS) that follows the strides, and so a summation order that does: held
            # to the tolerance above, not to bit equality across layouts.
            continue
        # The C++ backend packs every layout the same way: bit-identical to contiguous inputs.
        out_c = run_step(backend, x.contiguous(), y.contiguous(), w, b, None, None, None, **STEP)
        assert identical(out, out_c), name


def test_non_contiguous_params(kernel_backend_device):
    """Parameters and buffers that are views (transposed weight, strided bias) are updated in place."""
    backend, device = kernel_backend_device
    N, D, O = 50, 6, 4
    x, y, _, _, _, _, _ = make_problem(N, D, O, torch.float32, device=device)
    wt = torch.randn(D, O, device=device)
    w = wt.t()  # (O, D), not contiguous
    bb = torch.randn(O, 2, device=device)
    b = bb[:, 0]
    wm = torch.randn(D, O, device=device).t()
    bm = torch.randn(O, 3, device=device)[:, 1]
    opts = dict(STEP, momentum=0.9)
    ref = reference_step(x, y, w, b, wm, bm, None, **opts)
    w0, b0 = w.clone(), b.clone()
    loss = ops.train_step(x, y, w, b, wm, bm, None, backend=backend, **opts)
    check_step((loss, w, b, wm, bm), ref, w0, b0, torch.float32, "views")
    assert w.data_ptr() == wt.data_ptr() and b.data_ptr() == bb.data_ptr()


@pytest.mark.parametrize("path", ("dot", "outer"))
@pytest.mark.parametrize("N,D,O", ((7, 3, 1), (4097, 20, 3), (61, 257, 7), (33, 17, 17)))
def test_forced_kernel_path(kernel_backend_device, monkeypatch, path, N, D, O):
    """Both CPU kernel shapes on shapes the automatic plan would give to the other (and odd tiles)."""
    backend, device = kernel_backend_device
    if backend != "cpp":
        pytest.skip("FASTLIN_FUSED_PATH selects among the C++ CPU kernels")
    monkeypatch.setenv("FASTLIN_FUSED_PATH", path)
    for tile in ("5", "64"):
        monkeypatch.setenv("FASTLIN_FUSED_TILE_ROWS", tile)
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            x, y, w, b, wm, bm, sw = make_problem(
                N, D, O, dtype, True, 0.9, sample_weight=True, device=device
            )
            opts = dict(STEP, momentum=0.9)
            out = run_step(backend, x, y, w, b, wm, bm, sw, **opts)
            check_step(
                out, reference_step(x, y, w, b, wm, bm, sw, **opts), w, b, dtype, f"{path} tile {tile}"
            )


@pytest.mark.parametrize("N,D,O", ((4097, 257, 17), (20000, 64, 1), (3000, 7, 3)))
def test_deterministic(kernel_backend_device, N, D, O):
    """Same inputs and thread count: bit-identical loss, parameters and buffers."""
    backend, device = kernel_backend_device
    x, y, w, b, wm, bm, sw = make_problem(
        N, D, O, torch.float32, True, 0.9, sample_weight=True, device=device
    )
    opts = dict(STEP, momentum=0.9)
    assert identical(
        run_step(backend, x, y, w, b, wm, bm, sw, **opts), run_step(backend, x, y, w, b, wm, bm, sw, **opts)
    )


def test_large_offsets(kernel_backend_device, tmp_path):
    """Rows more than 2^31 elements apart (N*D-scale offsets): 64-bit index arithmetic.

    x is a view with a row stride of 2^31 + 7 elements into a sparse memory-mapped file, so only the
    pages of the three rows are ever touched."""
    backend, device = kernel_backend_device
    if device != "cpu":
        pytest.skip("memory-mapped input is a CPU test")
    stride, N, D, O = 2**31 + 7, 3, 5, 2
    path = tmp_path / "big.bin"
    numel = stride * (N - 1) + D
    with open(path, "wb") as f:
        f.truncate(numel * 4)
    try:
        base = torch.from_file(str(path), shared=True, size=numel, dtype=torch.float32)
    except RuntimeError as e:  # pragma: no cover - filesystem without sparse files / mmap
        pytest.skip(f"cannot map a sparse file here: {e}")
    x = base.as_strided((N, D), (stride, 1))
    vals = torch.randn(N, D)
    x.copy_(vals)
    y = torch.randn(N, O)
    w = torch.randn(O, D)
    b = torch.randn(O)
    out = run_step(backend, x, y, w, b, None, None, None, **STEP)
    check_step(
        out, reference_step(vals, y, w, b, None, None, None, **STEP), w, b, torch.float32, "2^31 offsets"
    )
    del x, base


def test_zero_lr_leaves_parameters(kernel_backend_device):
    backend, device = kernel_backend_device
    x, y, w, b, _, _, _ = make_problem(100, 8, 2, torch.float32, device=device)
    out = run_step(backend, x, y, w, b, None, None, None, **dict(STEP, lr=0.0))
    assert torch.equal(out[1], w) and torch.equal(out[2], b)


def test_bad_input_leaves_parameters(kernel_backend_device):
    backend, device = kernel_backend_device
    x, y, w, b, wm, bm, _ = make_problem(10, 4, 2, torch.float32, True, 0.9, device=device)
    saved = [t.clone() for t in (w, b, wm, bm)]
    bad = [
        dict(target=torch.randn(10, 3, device=device)),  # wrong O
        dict(target=torch.randn(10, device=device)),  # would broadcast
        dict(sample_weight=torch.rand(9, device=device)),
        dict(lr=-1.0),
        dict(nesterov=True, dampening=0.5),
        dict(input=torch.randn(0, 4, device=device), target=torch.randn(0, 2, device=device)),
    ]
    for change in bad:
        args = dict(
            input=x, target=y, sample_weight=None, lr=0.1, momentum=0.9, dampening=0.0, nesterov=False
        )
        args.update(change)
        with pytest.raises((ValueError, RuntimeError, TypeError), match="fastlin.train_step"):
            ops.train_step(
                args["input"],
                args["target"],
                w,
                b,
                wm,
                bm,
                args["sample_weight"],
                lr=args["lr"],
                momentum=args["momentum"],
                dampening=args["dampening"],
                nesterov=args["nesterov"],
                backend=backend,
            )
        for s, t in zip(saved, (w, b, wm, bm)):
            assert torch.equal(s, t)


def test_opcheck():
    ok, why = fastlin.backends.status()["cpp"]
    if not ok:
        pytest.skip(f"backend cpp unavailable: {why}")
    x, y, w, b, wm, bm, sw = make_problem(7, 3, 2, torch.float32, True, 0.9, sample_weight=True)
    args = (x, y, w, b, wm, bm, sw, 0.1, 0.9, 0.0, 0.01, False, False, False)
    torch.library.opcheck(torch.ops.fastlin.train_step.default, args)


ISA_SCRIPT = r"""
import torch, sys
sys.path.insert(0, {tests!r})
import test_train_step as T
for path in ("dot", "outer"):
    import os
    os.environ["FASTLIN_FUSED_PATH"] = path
    for (N, D, O) in ((7, 3, 1), (1000, 64, 17), (300, 40, 3)):
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            x, y, w, b, wm, bm, sw = T.make_problem(N, D, O, dtype, True, 0.9, sample_weight=True)
            opts = dict(T.STEP, momentum=0.9)
            out = T.run_step("cpp", x, y, w, b, wm, bm, sw, **opts)
            ref = T.reference_step(x, y, w, b, wm, bm, sw, **opts)
            T.check_step(out, ref, w, b, dtype, f"{{path}} {{N}}x{{D}}x{{O}}")
print("ok")
"""


@pytest.mark.parametrize("isa", ("generic", "avx2"))
def test_other_isa(isa):
    """The kernels compiled for the other instruction sets (the ISA is fixed once per process)."""
    tests = os.path.dirname(os.path.abspath(__file__))
    rc, out, report = run_under_isa(isa, ["-c", ISA_SCRIPT.format(tests=tests)], timeout=300)
    assert rc == 0 and out.strip().endswith("ok"), report
