"""The CUDA C++ backend (backend="cuda", csrc/cuda/) against the float64 reference.

GPU only: skipped (with the reason) where there is no CUDA device or fastlin._C was built without
the CUDA kernels. Runs in well under a minute on one GPU.

Shapes cover the odd ones (N = 1, 7, 4097; D = 1, 3, 257; O = 1, 3, 17) and the ones that pick
each kernel family of the row pass (csrc/cuda/rowpass.cuh): 16-byte loads with one row per warp
(D = 256, 1024) or several rows per warp (D = 4, 64), element loads (odd D or misaligned rows),
O padded to 4 and 16, O = 16, and O = 17 (ATen/cuBLAS path). Outputs are poisoned: before each op
the caching allocator's free blocks are filled with 0xFF bytes (NaN in every float dtype), so an
output element the kernel does not write reads as NaN.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import REL_TOL, assert_rel_close, rel_error

import fastlin
from fastlin import autograd as FA
from fastlin import ops, reference

_ok, _why = fastlin.backends.status().get("cuda", (False, "unknown"))
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(torch.cuda.is_available() and not _ok, reason=f"backend cuda unavailable: {_why}"),
]

B = "cuda"
DEV = "cuda"
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DT_IDS = ["f32", "f64", "bf16", "f16"]

# (N, D, O): odd shapes and one per kernel family.
SHAPES = [
    (1, 1, 1),
    (7, 3, 3),
    (4097, 257, 1),
    (7, 257, 17),
    (4097, 3, 17),
    (300, 4, 1),  # 16-byte loads, one vector per row: 1 lane per row (f32)
    (513, 64, 5),  # several rows per warp; O padded to 16
    (2000, 256, 1),  # one row per warp, 2 vectors per lane (f32): the train_step bench shape, smaller
    (257, 256, 16),  # O = 16
    (130, 1024, 3),  # long rows (f32: 8 vectors per lane)
]
SHAPE_IDS = [f"N{n}-D{d}-O{o}" for n, d, o in SHAPES]


def _poison():
    """Fill free blocks of the CUDA caching allocator with 0xFF bytes (NaN in every float dtype)."""
    for n in (1 << 10, 1 << 14, 1 << 18, 1 << 21, 1 << 24):
        t = torch.empty(n, dtype=torch.uint8, device=DEV)
        t.fill_(255)
        del t


def _randn(*shape, dtype, scale=1.0, shift=0.0):
    return (torch.randn(shape, device=DEV, dtype=torch.float64) * scale + shift).to(dtype)


def _layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as t in another memory layout: "contig", "t" (transposed storage),
    "pad" (rows padded by 16 elements, 16-byte aligned), "odd" (rows padded by 1 element: misaligned
    rows), "cols" (every other column of a wider tensor: non-unit column stride)."""
    if kind == "contig":
        return t.contiguous()
    n, d = t.shape
    if kind == "t":
        return t.t().contiguous().t()
    if kind == "cols":
        big = torch.empty(n, 2 * d, dtype=t.dtype, device=t.device)
        big[:, ::2] = t
        return big[:, ::2]
    pad = 16 if kind == "pad" else 1
    big = torch.empty(n, d + pad, dtype=t.dtype, device=t.device)
    big[:, :d] = t
    return big[:, :d]


def _check(got, want64, stock, dtype, what=""):
    """got within max(REL_TOL[dtype], 2 x stock torch's own error) of the float64 reference
    (DESIGN.md "Numerics"); `stock` is fastlin.reference run at the kernel's precision. A true
    value beyond dtype's range must come out infinite."""
    assert got.shape == want64.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want64.shape)}"
    big = want64.abs() > torch.finfo(dtype).max
    if big.any():
        assert torch.isinf(got[big]).all(), f"{what}: a value past the {dtype} range is not inf"
        got, want64, stock = got[~big], want64[~big], stock[~big]
    err_stock = rel_error(stock, want64)
    factor = max(1.0, 2.0 * err_stock / REL_TOL[dtype]) if math.isfinite(err_stock) else 1.0
    assert_rel_close(got, want64, dtype, factor=factor, what=what)


# ---------------------------------------------------------------------------------------------
def test_auto_picks_cuda():
    assert fastlin.backends.resolve("auto", torch.device(DEV)) == "cuda"


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear(dtype, shape, bias):
    n, d, o = shape
    x = _randn(n, d, dtype=dtype)
    w = _randn(o, d, dtype=dtype, scale=d**-0.5)
    b = _randn(o, dtype=dtype) if bias else None
    ref = reference.linear(x.double(), w.double(), None if b is None else b.double())
    stock = reference.linear(x, w, b)
    for kind in ("contig", "pad", "odd") if n > 1 else ("contig",):
        xl = _layout(x, kind)
        _poison()
        out = ops.linear(xl, _layout(w, "t") if kind == "odd" else w, b, backend=B)
        assert out.dtype == dtype and out.shape == (n, o)
        _check(out, ref, stock, dtype, what=f"linear {kind}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize(
    "mask",
    [(True, True, True), (True, False, False), (False, True, False), (False, False, True)],
    ids=["all", "input", "weight", "bias"],
)
def test_linear_backward(dtype, shape, mask):
    n, d, o = shape
    x = _randn(n, d, dtype=dtype)
    w = _randn(o, d, dtype=dtype, scale=d**-0.5)
    g = _randn(n, o, dtype=dtype)
    ref = reference.linear_backward(g.double(), x.double(), w.double(), mask)
    stock = reference.linear_backward(g, x, w, mask)
    for kind in ("contig", "t") if n > 1 else ("contig",):
        _poison()
        out = ops.linear_backward(
            _layout(g, kind), _layout(x, "pad" if kind == "t" else "contig"), w, mask, backend=B
        )
        for name, got, want, st, m in zip(("grad_input", "grad_weight", "grad_bias"), out, ref, stock, mask):
            if m:
                assert got.dtype == dtype
                _check(got, want, st, dtype, what=f"{name} {kind}")
            else:
                assert got.numel() == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", [(1,), (7,), (4097,), (3, 257), (17, 5, 9)], ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_mse_loss(dtype, shape, reduction):
    x = _randn(*shape, dtype=dtype)
    y = _randn(*shape, dtype=dtype)
    ref = reference.mse_loss(x.double(), y.double(), reduction)
    stock = reference.mse_loss(x, y, reduction)
    _poison()
    out = ops.mse_loss(x, y, reduction, backend=B)
    assert out.dtype == dtype and out.shape == ref.shape
    _check(out, ref, stock, dtype, what="mse_loss")
    go = _randn(*shape, dtype=dtype) if reduction == "none" else _randn(dtype=dtype)
    gref = reference.mse_loss_backward(go.double(), x.double(), y.double(), reduction)
    _poison()
    gout = ops.mse_loss_backward(go, x, y, reduction, backend=B)
    _check(gout, gref, reference.mse_loss_backward(go, x, y, reduction), dtype, what="mse_loss_backward")
    if len(shape) >= 2:  # non-contiguous inputs
        xt, yt = x.transpose(0, 1), y.transpose(0, 1)
        out_t = ops.mse_loss(xt, yt, reduction, backend=B)
        _check(
            out_t,
            reference.mse_loss(xt.double(), yt.double(), reduction),
            reference.mse_loss(xt, yt, reduction),
            dtype,
            what="mse_loss T",
        )


def test_mse_loss_empty():
    x = torch.empty(0, 3, device=DEV)
    assert math.isnan(ops.mse_loss(x, x, "mean", backend=B).item())
    assert ops.mse_loss(x, x, "sum", backend=B).item() == 0.0
    assert ops.mse_loss(x, x, "none", backend=B).shape == (0, 3)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_mse_loss(dtype, shape, bias, reduction):
    n, d, o = shape
    x = _randn(n, d, dtype=dtype)
    w = _randn(o, d, dtype=dtype, scale=d**-0.5)
    b = _randn(o, dtype=dtype) if bias else None
    y = _randn(n, o, dtype=dtype, shift=0.5)
    for mask in [(True, True, bias, True), (False, True, False, False), (True, False, bias, False)]:
        ref = reference.linear_mse_loss(
            x.double(), w.double(), None if b is None else b.double(), y.double(), reduction, mask
        )
        stock = reference.linear_mse_loss(x, w, b, y, reduction, mask)
        kind = "odd" if mask[0] and n > 1 else "contig"
        _poison()
        out = ops.linear_mse_loss(
            _layout(x, kind), w, b, _layout(y, "t") if n > 1 else y, reduction, mask, backend=B
        )
        names = ("loss", "grad_input", "grad_weight", "grad_bias", "grad_target")
        for name, got, want, st, m in zip(names, out, ref, stock, (True, *mask)):
            if m:
                assert got.dtype == dtype
                _check(got, want, st, dtype, what=f"{name} mask={mask}")
            else:
                assert got.numel() == 0


# ---------------------------------------------------------------------------------------------
SGD_OPTS = [
    dict(lr=0.1),
    dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01),
    dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True),
]


@pytest.mark.parametrize("opts", SGD_OPTS, ids=["plain", "momentum-wd", "nesterov-max"])
def test_sgd_update(opts):
    # several dtypes, sizes (one of 0 elements, one past a chunk), a transposed parameter, and more
    # tensors than one launch takes (70 > 64)
    specs = [
        (torch.float32, (5,)),
        (torch.float32, (300, 257)),
        (torch.float64, (7, 3)),
        (torch.bfloat16, (4097,)),
        (torch.float16, (33, 17)),
        (torch.float32, (0,)),
        (torch.float32, (40000,)),
    ]
    specs += [(torch.float32, (3,))] * 63
    params = [_randn(*s, dtype=dt) for dt, s in specs]
    params[1] = params[1].t().contiguous().t()  # non-contiguous parameter
    mom = opts.get("momentum", 0.0)
    bufs = [torch.full_like(p, float("nan")) for p in params] if mom else []
    args = (
        opts["lr"],
        mom,
        opts.get("dampening", 0.0),
        opts.get("weight_decay", 0.0),
        opts.get("nesterov", False),
        opts.get("maximize", False),
    )
    for step in range(3):
        grads = [_randn(*p.shape, dtype=p.dtype) for p in params]
        # float64 reference and stock torch at the parameters' precision, both from the current state
        r64, rb64 = [p.double() for p in params], [b.double() for b in bufs]
        st, stb = [p.clone() for p in params], [b.clone() for b in bufs]
        reference.sgd_update_(r64, [g.double() for g in grads], rb64, *args, step == 0)
        reference.sgd_update_(st, grads, stb, *args, step == 0)
        ops.sgd_update_(params, grads, bufs, first_step=step == 0, backend=B, **opts)
        for p, r, q in zip(params, r64, st):
            _check(p, r, q, p.dtype, what=f"param step {step}")
        for b, r, q in zip(bufs, rb64, stb):
            _check(b, r, q, b.dtype, what=f"buffer step {step}")
    assert params[1].stride() == (1, 300)  # updated in place, layout kept


def test_sgd_update_optimizer():
    """fastlin.optim.SGD on CUDA parameters, step for step against torch.optim.SGD."""
    torch.manual_seed(0)
    model = torch.nn.Linear(17, 3).to(DEV)
    ref = torch.nn.Linear(17, 3).to(DEV)
    ref.load_state_dict(model.state_dict())
    opt = fastlin.optim.SGD(
        model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, backend=B
    )
    ropt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    x, y = torch.randn(64, 17, device=DEV), torch.randn(64, 3, device=DEV)
    for _ in range(20):
        for m, o in ((model, opt), (ref, ropt)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
    for p, r in zip(model.parameters(), ref.parameters()):
        assert rel_error(p, r) < 1e-5


# ---------------------------------------------------------------------------------------------
TRAIN_OPTS = [
    dict(lr=0.3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
    dict(lr=0.2, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False, maximize=False),
    dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=True, maximize=True),
]
TRAIN_IDS = ["plain", "momentum-wd-sw", "nesterov-max-odd"]


def _state(o, d, pdtype, bias, momentum):
    w = _randn(o, d, dtype=pdtype, scale=d**-0.5)
    b = _randn(o, dtype=pdtype) if bias else None
    wm = torch.full_like(w, float("nan")) if momentum else None  # written, not read, on the first step
    bm = torch.full_like(b, float("nan")) if momentum and bias else None
    return w, b, wm, bm


def _clone(ts, dtype=None):
    return [None if t is None else (t.clone() if dtype is None else t.to(dtype).clone()) for t in ts]


def _ref_step(x, y, state, sw, opts, first, dtype):
    """reference.train_step from copies of the current state: in float64 (dtype=torch.float64) or at
    the inputs' own precision (dtype=None: stock torch)."""
    w, b, wm, bm = _clone(state, dtype)
    loss = reference.train_step(
        x if dtype is None else x.to(dtype),
        y if dtype is None else y.to(dtype),
        w,
        b,
        wm,
        bm,
        sw,
        opts["lr"],
        opts["momentum"],
        opts["dampening"],
        opts["weight_decay"],
        opts["nesterov"],
        opts["maximize"],
        first,
    )
    return loss, (w, b, wm, bm)


@pytest.mark.parametrize("dtype", DTYPES + ["bf16-f32"], ids=DT_IDS + ["bf16-f32params"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("which", range(3), ids=TRAIN_IDS)
def test_train_step(dtype, shape, bias, which):
    n, d, o = shape
    opts = TRAIN_OPTS[which]
    xdtype, pdtype = (torch.bfloat16, torch.float32) if dtype == "bf16-f32" else (dtype, dtype)
    x = _layout(_randn(n, d, dtype=xdtype), "odd" if which == 2 and n > 1 else "contig")
    y = _randn(n, o, dtype=xdtype, shift=0.5)
    sw = torch.rand(n, device=DEV, dtype=torch.float64) + 0.25 if which == 1 else None
    state = list(_state(o, d, pdtype, bias, opts["momentum"] != 0))
    if which == 2 and d > 1:  # a transposed (non-contiguous) weight, updated in place
        state[0] = state[0].t().contiguous().t()
    for step in range(2):
        rloss, rstate = _ref_step(x, y, state, sw, opts, step == 0, torch.float64)
        sloss, sstate = _ref_step(x, y, state, sw, opts, step == 0, None)  # stock torch, same precision
        _poison()
        loss = ops.train_step(x, y, *state, sw, first_step=step == 0, backend=B, **opts)
        assert loss.dtype == (torch.float64 if xdtype == torch.float64 else torch.float32) and loss.dim() == 0
        _check(loss, rloss, sloss, loss.dtype, what=f"loss step {step}")
        names = ("weight", "bias", "weight_momentum", "bias_momentum")
        for name, got, want, stock in zip(names, state, rstate, sstate):
            if got is not None:
                _check(got, want, stock, pdtype, what=f"{name} step {step}")


def test_train_step_deterministic():
    n, d, o = 4097, 256, 3
    x, y = _randn(n, d, dtype=torch.float32), _randn(n, o, dtype=torch.float32)
    s1 = list(_state(o, d, torch.float32, True, True))
    s2 = _clone(s1)
    l1 = ops.train_step(x, y, *s1, None, lr=0.1, momentum=0.9, first_step=True, backend=B)
    l2 = ops.train_step(x, y, *s2, None, lr=0.1, momentum=0.9, first_step=True, backend=B)
    assert torch.equal(l1, l2)
    for a, b in zip(s1, s2):
        assert torch.equal(a, b)


def _fit_by_train_steps(x, y, state, sw, *, epochs, batch_size, shuffle, seed, opts):
    """What ops.fit does, step by step: train_step on each batch in place on `state`, the rows of a
    shuffled epoch from torch.randperm on a CUDA generator seeded with `seed`. -> the per-epoch
    losses (sample-weighted means over the epoch's batches)."""
    n = x.shape[0]
    bs = n if batch_size <= 0 or batch_size >= n else batch_size
    gen = torch.Generator(device=DEV)
    gen.manual_seed(seed)
    first = True
    history = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen, device=DEV) if shuffle and bs < n else None
        total = weight = 0.0
        for start in range(0, n, bs):
            rows = perm[start : start + bs] if perm is not None else slice(start, start + bs)
            swr = None if sw is None else sw[rows]
            loss = ops.train_step(x[rows], y[rows], *state, swr, first_step=first, backend=B, **opts)
            first = False
            wsum = float(swr.double().sum()) if swr is not None else float(x[rows].shape[0])
            total += float(loss) * wsum
            weight += wsum
        history.append(total / weight)
    return history


@pytest.mark.parametrize(
    "o,dtype,pdtype",
    [
        (16, torch.float32, torch.float32),
        (16, torch.bfloat16, torch.float32),
        (17, torch.float64, torch.float64),
    ],
    ids=["O16-f32", "O16-bf16-f32params", "O17-f64"],
)
def test_train_step_and_fit_on_the_cublas_path(o, dtype, pdtype, monkeypatch):
    """O > 4 on batches of >= 2^19 elements, and O > 16, take the ATen/cuBLAS path of
    csrc/cuda/train_step_cuda.cpp, which walks a batch in row chunks whose temporaries (a bf16 x's
    products with the bf16 pieces included) stay under FASTLIN_CUDA_ATEN_CHUNK_ELEMS elements (2^26
    by default; 2^20 here: train_step's 140000 rows in 3 chunks of residuals, 18 of pieces and
    products for bf16, each gathered fit batch of 70000 rows in 6 chunks of rows + residuals, 13
    for bf16).
    train_step against the float64 reference; fit (shuffled batches of 70000 rows, gathered by
    index, with sample weights) against train_step on the same rows."""
    monkeypatch.setenv("FASTLIN_CUDA_ATEN_CHUNK_ELEMS", str(1 << 20))
    n, d = 140000, 64
    opts = dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=1e-3, nesterov=False, maximize=False)
    x, y = _randn(n, d, dtype=dtype), _randn(n, o, dtype=dtype, shift=0.5)
    sw = torch.rand(n, device=DEV, dtype=dtype) + 0.5
    state = list(_state(o, d, pdtype, True, True))
    rloss, rstate = _ref_step(x, y, state, sw, opts, True, torch.float64)
    sloss, sstate = _ref_step(x, y, state, sw, opts, True, None)
    loss = ops.train_step(x, y, *state, sw, first_step=True, backend=B, **opts)
    _check(loss, rloss, sloss, loss.dtype, what="loss")
    for name, got, want, stock in zip(("weight", "bias", "wm", "bm"), state, rstate, sstate):
        _check(got, want, stock, pdtype, what=name)

    s_fit = list(_state(o, d, pdtype, True, True))
    s_step = _clone(s_fit)
    bs, seed = n // 2, 7
    hist = ops.fit(
        x, y, *s_fit, sw, epochs=1, batch_size=bs, shuffle=True, seed=seed, first_step=True, backend=B, **opts
    )
    want = _fit_by_train_steps(x, y, s_step, sw, epochs=1, batch_size=bs, shuffle=True, seed=seed, opts=opts)
    # The dtype's tolerance rather than bit equality (as on the row pass): fit gathers each chunk's
    # rows by index, train_step gets a gathered copy, and cuBLAS may pick another algorithm for
    # another pointer alignment; the math is the same.
    # (in the accumulation dtype's tolerance: a bf16 x meets the float32 operands as exact bf16
    # pieces, the sums run in float32)
    for a, b in zip(s_fit, s_step):
        assert rel_error(a, b) <= REL_TOL[pdtype], "fit and train_step on the same rows differ"
    assert rel_error(hist, torch.tensor(want, dtype=torch.float64)) <= REL_TOL[pdtype]


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shuffle", [False, True], ids=["ordered", "shuffled"])
@pytest.mark.parametrize("batch_size", [0, 97], ids=["full", "bs97"])
@pytest.mark.parametrize("use_sw", [False, True], ids=["", "sw"])
def test_fit_matches_train_step(shuffle, batch_size, use_sw):
    """fit == train_step over the same rows, bit for bit (same kernels, same grid per batch size);
    the rows of a shuffled epoch come from torch.randperm on a CUDA generator seeded with `seed`."""
    n, d, o, epochs, seed = 1000, 64, 3, 3, 1234
    x, y = _randn(n, d, dtype=torch.float32), _randn(n, o, dtype=torch.float32, shift=1.0)
    sw = torch.rand(n, device=DEV) + 0.5 if use_sw else None
    opts = dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=1e-3, nesterov=True, maximize=False)
    s_fit = list(_state(o, d, torch.float32, True, True))
    s_step = _clone(s_fit)
    hist = ops.fit(
        x,
        y,
        *s_fit,
        sw,
        epochs=epochs,
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        first_step=True,
        backend=B,
        **opts,
    )
    assert hist.dtype == torch.float32 and hist.shape == (epochs,)

    want = _fit_by_train_steps(
        x, y, s_step, sw, epochs=epochs, batch_size=batch_size, shuffle=shuffle, seed=seed, opts=opts
    )
    for a, b in zip(s_fit, s_step):
        assert torch.equal(a, b), "fit and train_step on the same rows differ"
    assert rel_error(hist, torch.tensor(want)) < 1e-6


def test_fit_float64_vs_reference():
    n, d, o = 300, 7, 2
    x, y = _randn(n, d, dtype=torch.float64), _randn(n, o, dtype=torch.float64)
    opts = dict(lr=0.1, momentum=0.5, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)
    state = list(_state(o, d, torch.float64, True, True))
    rstate = _clone(state)
    hist = ops.fit(
        x, y, *state, None, epochs=4, batch_size=64, shuffle=True, seed=7, first_step=True, backend=B, **opts
    )
    rhist = reference.fit(
        x,
        y,
        *rstate,
        None,
        4,
        64,
        True,
        7,
        opts["lr"],
        opts["momentum"],
        opts["dampening"],
        opts["weight_decay"],
        opts["nesterov"],
        opts["maximize"],
        True,
    )
    # 20 float64 steps, each far below 1e-12 relative: the trajectories stay within 1e-10.
    assert rel_error(hist, rhist) < 1e-10
    for a, b in zip(state, rstate):
        assert rel_error(a, b) < 1e-10


def test_fit_nonfinite_stops():
    """A step whose loss or new parameters are non-finite is not applied and ends the loop."""
    n, d, o, bs = 300, 8, 2, 50
    x, y = _randn(n, d, dtype=torch.float32), _randn(n, o, dtype=torch.float32)
    x[170, 3] = float("inf")  # in batch 3 of the (ordered) first epoch
    opts = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)
    state = list(_state(o, d, torch.float32, True, True))
    good = _clone(state)
    first = True
    for start in range(0, 150, bs):  # the three good batches
        ops.train_step(
            x[start : start + bs], y[start : start + bs], *good, None, first_step=first, backend=B, **opts
        )
        first = False
    hist = ops.fit(
        x, y, *state, None, epochs=3, batch_size=bs, shuffle=False, seed=0, first_step=True, backend=B, **opts
    )
    assert torch.isnan(hist).all()
    for a, b in zip(state, good):
        assert torch.equal(a, b), "the non-finite step (or a later one) was applied"

    # an update that overflows (finite loss; lr is inf in float32): nothing is applied at all
    x2 = _randn(n, d, dtype=torch.float32)
    state = list(_state(o, d, torch.float32, True, False))
    before = _clone(state)
    hist = ops.fit(x2, y, *state, None, epochs=2, batch_size=0, shuffle=False, seed=0, lr=1e39, backend=B)
    assert torch.isnan(hist).all()
    for a, b in zip(state, before):
        assert a is None or torch.equal(a, b)

    # and a run that only goes bad in epoch 2: epoch 0 and 1 entries are finite
    x3 = _randn(n, d, dtype=torch.float32)
    y3 = _randn(n, o, dtype=torch.float32)
    state = list(_state(o, d, torch.float32, True, False))
    rstate = _clone(state)
    hist = ops.fit(x3, y3, *state, None, epochs=3, batch_size=0, shuffle=False, seed=0, lr=1.0, backend=B)
    rhist = reference.fit(x3, y3, *rstate, None, 3, 0, False, 0, 1.0, 0.0, 0.0, 0.0, False, False, False)
    assert torch.equal(torch.isnan(hist), torch.isnan(rhist.to(DEV)))


# ---------------------------------------------------------------------------------------------
def test_train_step_cuda_graph():
    n, d, o = 4097, 256, 1
    x, y = _randn(n, d, dtype=torch.float32), _randn(n, o, dtype=torch.float32)
    opts = dict(lr=0.05, momentum=0.9)
    state = list(_state(o, d, torch.float32, True, True))
    eager = _clone(state)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (and initialise the buffers) outside the capture
        ops.train_step(x, y, *state, None, first_step=True, backend=B, **opts)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = ops.train_step(x, y, *state, None, backend=B, **opts)
    for _ in range(5):
        graph.replay()
    ops.train_step(x, y, *eager, None, first_step=True, backend=B, **opts)
    for _ in range(5):
        eloss = ops.train_step(x, y, *eager, None, backend=B, **opts)
    torch.cuda.synchronize()
    assert torch.equal(loss, eloss)
    for a, b in zip(state, eager):
        assert torch.equal(a, b)


def test_fit_cuda_graph():
    n, d, o = 1000, 16, 2
    x, y = _randn(n, d, dtype=torch.float32), _randn(n, o, dtype=torch.float32)
    kw = dict(epochs=3, batch_size=97, shuffle=False, seed=0, lr=0.05, momentum=0.9, backend=B)
    state = list(_state(o, d, torch.float32, True, True))
    ops.fit(x, y, *_clone(state), None, first_step=True, **kw)  # warm-up: kernels loaded, plans cached
    eager = _clone(state)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        hist = ops.fit(x, y, *state, None, first_step=True, **kw)
    graph.replay()
    ehist = ops.fit(x, y, *eager, None, first_step=True, **kw)
    torch.cuda.synchronize()
    assert torch.equal(hist, ehist)
    for a, b in zip(state, eager):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
def test_gradcheck_float64():
    def t(*shape):
        return torch.randn(*shape, dtype=torch.float64, device=DEV, requires_grad=True)

    for n, d, o in [(7, 5, 3), (5, 9, 17), (4, 3, 1)]:
        x, w, b, y = t(n, d), t(o, d), t(o), t(n, o)
        assert torch.autograd.gradcheck(lambda x, w, b: FA.LinearFunction.apply(x, w, b, B), (x, w, b))
        assert torch.autograd.gradcheck(lambda x, w: FA.LinearFunction.apply(x, w, None, B), (x, w))
        assert torch.autograd.gradcheck(lambda p, y: FA.MSELossFunction.apply(p, y, "mean", B), (t(n, o), y))
        assert torch.autograd.gradcheck(lambda p, y: FA.MSELossFunction.apply(p, y, "none", B), (t(n, o), y))
        for red in ("mean", "sum"):
            assert torch.autograd.gradcheck(
                lambda x, w, b, y, red=red: FA.LinearMSELossFunction.apply(x, w, b, y, red, B), (x, w, b, y)
            )


def test_opcheck():
    f = torch.float32
    x, w, b = _randn(33, 8, dtype=f), _randn(3, 8, dtype=f), _randn(3, dtype=f)
    y, g = _randn(33, 3, dtype=f), _randn(33, 3, dtype=f)
    F = torch.ops.fastlin
    torch.library.opcheck(F.linear.default, (x, w, b))
    torch.library.opcheck(F.linear_backward.default, (g, x, w, [True, True, True]))
    torch.library.opcheck(F.mse_loss.default, (x, x.flip(0), "mean"))
    torch.library.opcheck(F.mse_loss_backward.default, (_randn(dtype=f), x, x.flip(0), "sum"))
    torch.library.opcheck(F.linear_mse_loss.default, (x, w, b, y, "mean", [True, True, True, True]))
    p, pg, pb = [w.clone(), b.clone()], [_randn(3, 8, dtype=f), _randn(3, dtype=f)], [w.clone(), b.clone()]
    torch.library.opcheck(F.sgd_update_.default, (p, pg, pb, 0.1, 0.9, 0.0, 0.0, False, False, False))
    torch.library.opcheck(
        F.train_step.default,
        (x, y, w.clone(), b.clone(), w.clone(), b.clone(), None, 0.1, 0.9, 0.0, 0.0, False, False, True),
    )
    torch.library.opcheck(
        F.fit.default,
        (
            x,
            y,
            w.clone(),
            b.clone(),
            None,
            None,
            None,
            2,
            8,
            True,
            3,
            0.1,
            0.0,
            0.0,
            0.0,
            False,
            False,
            False,
        ),
    )


def test_opcheck_masked_outputs():
    """Masked-off gradients are distinct (0,) tensors: outputs of one call never alias (the fake
    impls in fastlin/ops.py must agree)."""
    f = torch.float32
    x, w, b = _randn(33, 8, dtype=f), _randn(3, 8, dtype=f), _randn(3, dtype=f)
    y, g = _randn(33, 3, dtype=f), _randn(33, 3, dtype=f)
    F = torch.ops.fastlin
    for mask in ([True, False, False], [False, False, True], [False, False, False]):
        outs = F.linear_backward(g, x, w, mask)
        assert len({id(o) for o in outs}) == 3  # one tensor (one Python object) per output
        torch.library.opcheck(F.linear_backward.default, (g, x, w, mask))
    w17, y17 = _randn(17, 8, dtype=f), _randn(33, 17, dtype=f)
    for mask in ([False, True, False, False], [False, False, False, False]):
        for args in ((x, w, b, y, "mean", mask), (x, w17, None, y17, "sum", mask)):  # row pass; ATen path
            outs = F.linear_mse_loss(*args)
            assert len({id(o) for o in outs}) == 5
            torch.library.opcheck(F.linear_mse_loss.default, args)


# ---------------------------------------------------------------------------------------------
def test_bad_input_raises_before_writing():
    n, d, o = 64, 8, 2
    x, y = _randn(n, d, dtype=torch.float32), _randn(n, o, dtype=torch.float32)
    state = list(_state(o, d, torch.float32, True, True))
    ops.train_step(x, y, *state, None, lr=0.1, momentum=0.9, first_step=True, backend=B)
    before = _clone(state)
    F = torch.ops.fastlin
    w, b, wm, bm = state
    bad = [
        (y[:-1], w, b, wm, bm, None, 0.1, 0.9),  # target rows
        (y.double(), w, b, wm, bm, None, 0.1, 0.9),  # target dtype
        (y, w, b[:1], wm, bm, None, 0.1, 0.9),  # bias shape
        (y, w, b, None, bm, None, 0.1, 0.9),  # momentum without a buffer
        (y, w, b, wm, bm, torch.ones(n - 1, device=DEV), 0.1, 0.9),  # sample weights
        (y, w, b, wm, bm, None, -1.0, 0.9),  # lr < 0
    ]
    if DEV == "cuda":
        bad.append((y.cpu(), w, b, wm, bm, None, 0.1, 0.9))  # target device
    for tgt, w_, b_, wm_, bm_, sw, lr, mom in bad:
        with pytest.raises((ValueError, TypeError, RuntimeError)):
            F.train_step(x, tgt, w_, b_, wm_, bm_, sw, lr, mom, 0.0, 0.0, False, False, False)
        with pytest.raises((ValueError, TypeError, RuntimeError)):
            F.fit(x, tgt, w_, b_, wm_, bm_, sw, 2, 8, True, 0, lr, mom, 0.0, 0.0, False, False, False)
    with pytest.raises(ValueError):
        F.fit(x, y, w, b, wm, bm, None, -1, 8, True, 0, 0.1, 0.9, 0.0, 0.0, False, False, False)
    with pytest.raises(ValueError):
        F.train_step(x[:0], y[:0], w, b, wm, bm, None, 0.1, 0.9, 0.0, 0.0, False, False, False)
    with pytest.raises(TypeError):
        F.train_step(x.double(), y.double(), w, b, wm, bm, None, 0.1, 0.9, 0.0, 0.0, False, False, False)
    for a, c in zip(state, before):
        assert torch.equal(a, c)
    # sgd_update_: the second parameter's gradient is wrong; the first parameter is not touched
    p1, p2 = w.clone(), b.clone()
    with pytest.raises(ValueError):
        F.sgd_update_([p1, p2], [w, b[:1]], [], 0.1, 0.0, 0.0, 0.0, False, False, False)
    if DEV == "cuda":
        with pytest.raises(RuntimeError):
            F.sgd_update_([p1, p2], [w, b.cpu()], [], 0.1, 0.0, 0.0, 0.0, False, False, False)
    assert torch.equal(p1, w) and torch.equal(p2, b)
    with pytest.raises(ValueError):
        F.linear(x, _randn(o, d + 1, dtype=torch.float32), None)
    if DEV == "cuda":
        with pytest.raises(RuntimeError):
            F.linear(x, w.cpu(), None)
    with pytest.raises(ValueError):
        F.linear_mse_loss(x, w, b, y.t(), "mean", [True] * 4)
    with pytest.raises(ValueError):
        F.mse_loss(x, x, "avg")


def test_index_past_2_31():
    """Row offsets past 2^31 elements (64-bit index arithmetic): N * D > 2^31 in bfloat16 (4.3 GB)."""
    d, o = 256, 2
    n = 2**31 // d + 4096
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2**30:
        pytest.skip(f"needs 12 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    x = torch.empty(n, d, dtype=torch.bfloat16, device=DEV).normal_()
    w, b = _randn(o, d, dtype=torch.bfloat16, scale=d**-0.5), _randn(o, dtype=torch.bfloat16)
    out = ops.linear(x, w, b, backend=B)
    tail = slice(n - 5000, n)
    assert_rel_close(
        out[tail],
        reference.linear(x[tail].double(), w.double(), b.double()),
        torch.bfloat16,
        what="rows past 2^31 elements",
    )
    y = _randn(n, o, dtype=torch.bfloat16)
    _, _, gw, gb, _ = ops.linear_mse_loss(x, w, b, y, "sum", (False, True, True, False), backend=B)
    # float64 reference of grad_weight, in chunks
    rgw = torch.zeros(o, d, dtype=torch.float64, device=DEV)
    rgb = torch.zeros(o, dtype=torch.float64, device=DEV)
    for s in range(0, n, 1 << 20):
        xs = x[s : s + (1 << 20)].double()
        r = xs @ w.double().t() + b.double() - y[s : s + (1 << 20)].double()
        rgw += 2 * r.t() @ xs
        rgb += 2 * r.sum(0)
    assert_rel_close(gw, rgw, torch.bfloat16, what="grad_weight over 2^31+ elements")
    assert_rel_close(gb, rgb, torch.bfloat16, what="grad_bias over 2^31+ elements")
