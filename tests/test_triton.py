"""The Triton backend (fastlin/triton/): every kernel against fastlin.reference (float64) over odd
shapes and tails, the paths chosen by shape (O = 1, O <= 4, tl.dot; one tile per row or chunked
rows; outputs split over programs), SGD options, sample weights, fit's non-finite rule, gradcheck,
opcheck, bad input.

Runs on CPU tensors through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before
triton is imported when there is no GPU) and, unchanged, on CUDA tensors (bench/gpu_check.sh runs it
with TRITON_INTERPRET=0). Every allocation inside the ops is poisoned: with deterministic algorithms
on, torch.empty fills floats with NaN, so an output or workspace element a kernel forgets to write
fails the comparison.

Tolerances: conftest.REL_TOL per dtype (relative 2-norm against float64), for outputs in that dtype.
Parameters updated in float32 from bf16/fp16 inputs are held to the float32 tolerance, since the
kernels compute in fp32 from the exact low-precision values.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from conftest import REL_TOL, backend_params, rel_error  # noqa: E402

import fastlin  # noqa: E402
import fastlin.triton  # noqa: E402,F401  (registers torch.ops.fastlin_triton.*)
from fastlin import autograd as A  # noqa: E402
from fastlin import reference as R  # noqa: E402
from fastlin.triton import _common as K  # noqa: E402
from fastlin.triton import _onepass as OP  # noqa: E402

T = torch.ops.fastlin_triton
f64 = torch.float64
f32 = torch.float32
LOW = (torch.bfloat16, torch.float16)

DEVICES = [
    pytest.param(p.values[0][1], id=p.id, marks=p.marks)
    for p in backend_params(include_reference=False)
    if p.values[0][0] == "triton"
]

# (N, D, O): every path of the one-pass kernel. D = 257 rows are walked in chunks on the tl.dot
# path (O = 17) and by the (rows, BLOCK_O, BLOCK_D) path (O = 3); O = 1 is the 2-D path; N = 4097
# is many tiles with a tail; N = 1 a single partial tile; D = 1 with O = 1 and O = 3 has BLOCK_D = 1
# (no reduction over a size-1 axis: see fastlin/triton/_onepass.py).
SHAPES = [(1, 1, 1), (7, 3, 3), (7, 257, 1), (33, 257, 17), (65, 1, 17), (4097, 3, 1), (5, 257, 3), (9, 1, 3)]
# bench/gpu_check.sh: on a GPU the time goes into compiling each new specialisation (~0.3-2 s each);
# five shapes still reach the O = 1, O <= 4 and tl.dot paths, one-tile and chunked rows, D = 1, tails.
QUICK = os.environ.get("FASTLIN_GPU_QUICK") == "1"
if QUICK:
    SHAPES = [(7, 257, 1), (33, 257, 17), (4097, 3, 3), (1, 1, 1), (9, 1, 3)]
SHAPE_IDS = [f"N{n}-D{d}-O{o}" for n, d, o in SHAPES]

SGD_OPTS = [
    dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
    dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False, maximize=True),
    dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=True, maximize=False),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _poison_allocations():
    """Every torch.empty inside the ops returns NaN (floats) while a test runs."""
    was_det = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(was_det, warn_only=was_warn)
    torch.utils.deterministic.fill_uninitialized_memory = was_fill


def rand(*shape, dtype=f32, device="cpu"):
    return torch.randn(shape, dtype=torch.float32, device=device).to(dtype)


def d64(t):
    """A float64 copy (always a copy: the reference must never share storage with a kernel's operand)."""
    return None if t is None else t.detach().to(f64, copy=True)


def noncontig(t):
    """t's values in a column-major (non-contiguous) 2-D layout."""
    out = t.t().contiguous().t()
    assert not out.is_contiguous() or min(t.shape) <= 1
    return out


def check(out, ref, dtype, what, factor=1.0):
    """out (in dtype) within REL_TOL[dtype] * factor of the float64 reference ref."""
    assert out.dtype == dtype, f"{what}: dtype {out.dtype}, expected {dtype}"
    _close(out, ref, dtype, what, factor)


def check_update(new, old, ref_new, dtype, what, factor=1.0):
    """The change new - old of an updated tensor against the reference's change: a much stricter
    test of the gradient than comparing the parameters themselves. The update rounds in the
    tensor's dtype, like torch's (momentum * buf, then + g, then the store), so the change carries
    those roundings too: at most eps * (|old| + |new|) per element, on top of REL_TOL of the change."""
    d = new.detach().to(f64) - old.detach().to(f64)
    dr = ref_new.detach().to(f64).cpu() - old.detach().to(f64).cpu()
    err = torch.linalg.vector_norm(d.cpu() - dr).item()
    allowed = REL_TOL[dtype] * factor * torch.linalg.vector_norm(dr).item() + torch.finfo(new.dtype).eps * (
        torch.linalg.vector_norm(new.detach().to(f64)).item()
        + torch.linalg.vector_norm(old.detach().to(f64)).item()
    )
    assert err <= allowed, f"{what}: change off by {err:.3e} > {allowed:.3e} ({dtype})"


def _close(out, ref, dtype, what, factor):
    assert torch.isfinite(out).all() or not torch.isfinite(ref).all(), f"{what}: non-finite output"
    err = rel_error(out, ref)
    tol = REL_TOL[dtype] * factor
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e} ({dtype})"


# ---------------------------------------------------------------------------------------------
# registration


def test_schemas_match_csrc_ops():
    """Same arguments, types, mutation and returns as csrc/ops.cpp. triton_op infers the schema, so
    `int` reads SymInt, `bool[3]` reads bool[], alias sets are numbered and returns are unnamed."""
    if not fastlin.backends.extension_loaded():
        pytest.skip("fastlin._C (the reference schemas) is not built")

    def norm(s):
        s = str(s).split("::", 1)[1]
        s = re.sub(r"\(a\d*!\)|\([a-z]!\)", "(!)", s)
        s = s.replace("SymInt", "int")
        s = re.sub(r"bool\[\d+\]", "bool[]", s)
        args, ret = s.split(" -> ")
        ret = re.sub(r"Tensor [a-z_]+", "Tensor", ret)
        return args, ret

    for name in (
        "linear",
        "linear_backward",
        "mse_loss",
        "mse_loss_backward",
        "linear_mse_loss",
        "sgd_update_",
        "train_step",
        "fit",
    ):
        assert norm(getattr(T, name).default._schema) == norm(
            getattr(torch.ops.fastlin, name).default._schema
        ), name


# ---------------------------------------------------------------------------------------------
# linear, linear_backward


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", [f32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear(device, shape, dtype, bias):
    N, D, O = shape
    x, w = rand(N, D, dtype=dtype, device=device), rand(O, D, dtype=dtype, device=device)
    b = rand(O, dtype=dtype, device=device) if bias else None
    check(T.linear(x, w, b), R.linear(d64(x), d64(w), d64(b)), dtype, "linear")


@pytest.mark.parametrize("dtype", [f32, torch.float16, f64])
def test_linear_noncontiguous_and_fp16(device, dtype):
    x, w, b = rand(9, 257, dtype=dtype, device=device), rand(17, 257, dtype=dtype, device=device), None
    check(
        T.linear(noncontig(x), noncontig(w), b),
        R.linear(d64(x), d64(w), None),
        dtype,
        "linear non-contiguous",
    )
    x, w, b = (
        rand(5, 3, dtype=dtype, device=device),
        rand(2, 3, dtype=dtype, device=device),
        rand(2, dtype=dtype, device=device),
    )
    check(T.linear(x, w, b), R.linear(d64(x), d64(w), d64(b)), dtype, "linear O=2")


def test_linear_empty(device):
    x, w, b = rand(0, 3, device=device), rand(5, 3, device=device), rand(5, device=device)
    assert T.linear(x, w, b).shape == (0, 5)
    gi, gw, gb = T.linear_backward(rand(0, 5, device=device), x, w, [True, True, True])
    assert gi.shape == (0, 3) and (gw == 0).all() and (gb == 0).all()


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", [f32, torch.bfloat16])
@pytest.mark.parametrize(
    "mask", [(True, True, True), (True, False, False), (False, True, True)], ids=["all", "input", "params"]
)
def test_linear_backward(device, shape, dtype, mask):
    N, D, O = shape
    g, x, w = (
        rand(N, O, dtype=dtype, device=device),
        rand(N, D, dtype=dtype, device=device),
        rand(O, D, dtype=dtype, device=device),
    )
    out = T.linear_backward(g, x, w, list(mask))
    ref = R.linear_backward(d64(g), d64(x), d64(w), list(mask))
    for name, o, r, m in zip(("grad_input", "grad_weight", "grad_bias"), out, ref, mask):
        if m:
            check(o, r, dtype, name)
        else:
            assert o.shape == (0,), f"{name}: masked off, got shape {tuple(o.shape)}"


def test_linear_backward_noncontiguous(device):
    g, x, w = rand(9, 17, device=device), rand(9, 257, device=device), rand(17, 257, device=device)
    out = T.linear_backward(noncontig(g), noncontig(x), w, [True, True, True])
    for name, o, r in zip(
        ("grad_input", "grad_weight", "grad_bias"), out, R.linear_backward(d64(g), d64(x), d64(w), [True] * 3)
    ):
        check(o, r, f32, name)


# ---------------------------------------------------------------------------------------------
# mse_loss


MSE_SHAPES = [(), (1,), (7, 3), (4097, 3), (2, 3, 5), (0, 3)]
if QUICK:
    MSE_SHAPES = [(), (4097, 3), (2, 3, 5)]


@pytest.mark.parametrize("shape", MSE_SHAPES, ids=[str(s) for s in MSE_SHAPES])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", [f32, torch.bfloat16, f64])
def test_mse_loss(device, shape, reduction, dtype):
    x, t = rand(*shape, dtype=dtype, device=device), rand(*shape, dtype=dtype, device=device)
    out = T.mse_loss(x, t, reduction)
    ref = R.mse_loss(d64(x), d64(t), reduction)
    assert out.shape == ref.shape
    if reduction == "mean" and x.numel() == 0:
        assert torch.isnan(out), "mean of nothing is NaN, like torch"
    else:
        check(out, ref, dtype, f"mse_loss {reduction}")


@pytest.mark.parametrize("shape", [(7, 3), (4097, 3), (2, 3, 5)], ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", [f32, torch.bfloat16])
def test_mse_loss_backward(device, shape, reduction, dtype):
    x, t = rand(*shape, dtype=dtype, device=device), rand(*shape, dtype=dtype, device=device)
    go = rand(*shape, dtype=dtype, device=device) if reduction == "none" else rand(dtype=dtype, device=device)
    check(
        T.mse_loss_backward(go, x, t, reduction),
        R.mse_loss_backward(d64(go), d64(x), d64(t), reduction),
        dtype,
        "mse_loss_backward",
    )


def test_mse_noncontiguous(device):
    # every-other-column view: flattens to a stride-2 view, not a contiguous one
    s = rand(257, 6, device=device)[:, ::2]
    x = rand(257, 3, device=device)
    check(T.mse_loss(s, noncontig(x), "none"), R.mse_loss(d64(s), d64(x), "none"), f32, "mse none, stride 2")
    check(T.mse_loss(noncontig(x), s, "mean"), R.mse_loss(d64(x), d64(s), "mean"), f32, "mse mean, stride 2")
    go = rand(257, 3, device=device)[:, :]
    check(
        T.mse_loss_backward(noncontig(go), s, x, "none"),
        R.mse_loss_backward(d64(go), d64(s), d64(x), "none"),
        f32,
        "mse backward, stride 2",
    )
    x, t = rand(257, 3, device=device), rand(257, 3, device=device)
    check(T.mse_loss(noncontig(x), t, "sum"), R.mse_loss(d64(x), d64(t), "sum"), f32, "mse sum")
    out = T.mse_loss(noncontig(x), t, "none")
    assert out.is_contiguous()
    check(out, R.mse_loss(d64(x), d64(t), "none"), f32, "mse none")
    go = rand(device=device)
    check(
        T.mse_loss_backward(go, noncontig(x), t, "mean"),
        R.mse_loss_backward(d64(go), d64(x), d64(t), "mean"),
        f32,
        "mse backward",
    )


# ---------------------------------------------------------------------------------------------
# linear_mse_loss


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear_mse_loss(device, shape, reduction, bias):
    N, D, O = shape
    x, w, t = rand(N, D, device=device), rand(O, D, device=device), rand(N, O, device=device)
    b = rand(O, device=device) if bias else None
    out = T.linear_mse_loss(x, w, b, t, reduction, [True] * 4)
    ref = R.linear_mse_loss(d64(x), d64(w), d64(b), d64(t), reduction, [True] * 4)
    for name, o, r in zip(("loss", "grad_input", "grad_weight", "grad_bias", "grad_target"), out, ref):
        check(o, r, f32, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(7, 3, 1), (33, 257, 17)], ids=["O1", "O17"])
def test_linear_mse_loss_low_precision(device, dtype, shape):
    N, D, O = shape
    x, w, b, t = (
        rand(N, D, dtype=dtype, device=device),
        rand(O, D, dtype=dtype, device=device),
        rand(O, dtype=dtype, device=device),
        rand(N, O, dtype=dtype, device=device),
    )
    out = T.linear_mse_loss(x, w, b, t, "mean", [True] * 4)
    ref = R.linear_mse_loss(d64(x), d64(w), d64(b), d64(t), "mean", [True] * 4)
    for name, o, r in zip(("loss", "grad_input", "grad_weight", "grad_bias", "grad_target"), out, ref):
        check(o, r, dtype, name)


PACK_SHAPES = [(1, 17), (7, 32), (4097, 20), (65, 256), (130, 200)]  # (PACK needs 16 <= BLOCK_D <= 256)


@pytest.mark.parametrize("pack", [True, False], ids=["pack", "fma"])
@pytest.mark.parametrize("shape", PACK_SHAPES, ids=[f"N{n}-D{d}" for n, d in PACK_SHAPES])
def test_bf16_one_output_packed_dot(device, monkeypatch, shape, pack):
    """PACK_ONE_OUTPUT: bfloat16 x with one output on the tensor cores, the three bf16 pieces of w
    (and of the residuals) packed into one tl.dot operand (the default on sm_90 and later and under
    the interpreter), or the FMA path (PACK_ONE_OUTPUT = False, and before sm_90). Products stay
    exact, so a step meets the float32 tolerance against float64 math on the same bf16 values, with
    bias or sample weights and momentum; linear_mse_loss (bf16 weights) and linear_backward's
    grad_weight (the given-gradient form) meet the bf16 tolerance, and fit's shuffled batches
    (gathered rows) the float32 one."""
    N, D = shape
    cap = K.device_capability(torch.device(device))
    if pack and cap is not None and cap < (9, 0):
        pytest.skip(f"PACK runs on sm_90 or later (this GPU: sm_{cap[0]}{cap[1]})")
    monkeypatch.setattr(K, "PACK_ONE_OUTPUT", pack)
    bf = torch.bfloat16

    def packed():  # the config of the one-pass kernel's last launch
        return OP._onepass_kernel.best_config.kwargs["PACK"]

    x, y = rand(N, D, dtype=bf, device=device), rand(N, 1, dtype=bf, device=device)
    T.linear_mse_loss(
        rand(N, 257, dtype=bf, device=device),
        rand(1, 257, dtype=bf, device=device),
        None,
        y,
        "mean",
        [False, True, False, False],
    )
    assert not packed()  # rows wider than 256 columns: the FMA path whatever the setting
    sw = torch.rand(N, device=device) + 0.5
    for bias, use_sw, oi in ((True, False, 0), (False, True, 2)):
        opts = SGD_OPTS[oi]
        w, b, wm, bm = _params(1, D, f32, device, bias, opts["momentum"] != 0)
        ref = [d64(t) for t in (w, b, wm, bm)]
        old = [None if t is None else t.clone() for t in (w, b, wm, bm)]
        s_ = sw if use_sw else None
        loss = T.train_step(x, y, w, b, wm, bm, s_, *opts.values(), False)
        assert packed() == pack
        lref = R.train_step(d64(x), d64(y), *ref, d64(s_), *opts.values(), False)
        check(loss, lref, f32, "loss")
        for name, t, r, o in zip(("weight", "bias", "weight_momentum"), (w, b, wm), ref, old):
            if t is not None:
                check_update(t, o, r, f32, f"{name} update")
    # a column-major x (strided loads instead of 16-byte rows)
    w, b = rand(1, D, device=device), rand(1, device=device)
    ref = [d64(w), d64(b)]
    old = [w.clone(), b.clone()]
    loss = T.train_step(noncontig(x), y, w, b, None, None, None, 0.1, 0.0, 0.0, 0.0, False, False, False)
    assert packed() == pack
    lref = R.train_step(d64(x), d64(y), *ref, None, None, None, 0.1, 0.0, 0.0, 0.0, False, False, False)
    check(loss, lref, f32, "loss, column-major x")
    check_update(w, old[0], ref[0], f32, "weight update, column-major x")
    w16, b16 = rand(1, D, dtype=bf, device=device), rand(1, dtype=bf, device=device)
    out = T.linear_mse_loss(x, w16, b16, y, "mean", [True] * 4)
    ref = R.linear_mse_loss(d64(x), d64(w16), d64(b16), d64(y), "mean", [True] * 4)
    for name, o, r in zip(("loss", "grad_input", "grad_weight", "grad_bias", "grad_target"), out, ref):
        check(o, r, bf, name)
    _, gw, gb = T.linear_backward(y, x, w16, [False, True, True])
    _, gwr, gbr = R.linear_backward(d64(y), d64(x), d64(w16), [False, True, True])
    check(gw, gwr, bf, "grad_weight")
    check(gb, gbr, bf, "grad_bias")
    w, b, wm, bm = _params(1, D, f32, device, True, True)
    ref = [t.clone() for t in (w, b, wm, bm)]
    old = [t.clone() for t in (w, b, wm, bm)]
    args = (2, max(16, N // 3), True, 1234, 0.05, 0.9, 0.0, 0.01, True, False, True)  # a short last batch
    hist = T.fit(x, y, w, b, wm, bm, None, *args)
    href = R.fit(x, y, *ref, None, *args)
    check(hist, href.to(f64), f32, "history")
    for name, t, r, o in zip(("weight", "bias"), (w, b), ref, old):
        check_update(t, o, r, f32, f"fit {name} change", factor=10.0)


@pytest.mark.parametrize("shape", PACK_SHAPES, ids=[f"N{n}-D{d}" for n, d in PACK_SHAPES])
def test_bf16_one_output_pack_defer_is_bit_identical(device, monkeypatch, shape):
    """PACK_DEFER (an experiment for the GPU bench: each tile's dW product is subtracted at the next
    tile, the last one after the loop) sums the same products in the same order, so every result
    equals PACK's bit for bit: a step with sample weights, linear_mse_loss, and fit's shuffled
    batches. (A tile's product dropped or counted twice breaks equality.)"""
    N, D = shape
    cap = K.device_capability(torch.device(device))
    if cap is not None and cap < (9, 0):
        pytest.skip(f"PACK runs on sm_90 or later (this GPU: sm_{cap[0]}{cap[1]})")
    monkeypatch.setattr(K, "PACK_ONE_OUTPUT", True)
    bf = torch.bfloat16
    x, y = rand(N, D, dtype=bf, device=device), rand(N, 1, dtype=bf, device=device)
    sw = torch.rand(N, device=device) + 0.5
    w0, b0 = rand(1, D, device=device), rand(1, device=device)
    w16, b16 = w0.to(bf), b0.to(bf)
    fit_args = (2, max(16, N // 3), True, 1234, 0.05, 0.9, 0.0, 0.01, True, False, True)
    results = []
    for defer in (False, True):
        monkeypatch.setattr(K, "PACK_DEFER", defer)
        w, b = w0.clone(), b0.clone()
        loss = T.train_step(x, y, w, b, None, None, sw, 0.1, 0.0, 0.0, 0.0, False, False, False)
        assert OP._onepass_kernel.best_config.kwargs["PACK"]
        out = T.linear_mse_loss(x, w16, b16, y, "mean", [True] * 4)
        wf, bf_, wm, bm = w0.clone(), b0.clone(), torch.zeros_like(w0), torch.zeros_like(b0)
        hist = T.fit(x, y, wf, bf_, wm, bm, None, *fit_args)
        results.append((loss, w, b, *out, hist, wf, bf_))
    names = ("loss", "weight", "bias", "lml loss", "grad_input", "grad_weight", "grad_bias", "grad_target")
    for name, p, q in zip((*names, "fit history", "fit weight", "fit bias"), *results):
        assert torch.equal(p, q), f"{name}: PACK_DEFER differs from PACK"


def test_bf16_one_output_default_path(device, monkeypatch):
    """Without a setting, bf16 x with one output takes PACK on sm_90 and later (and under the
    interpreter) and the FMA path before: the pick without autotuning (the GPU tests run so), PACK
    being the faster on an H200 (bench/RESULTS.md, session 11)."""
    monkeypatch.setattr(K, "PACK_ONE_OUTPUT", None)
    monkeypatch.setattr(K, "AUTOTUNE", False)
    x, y = rand(65, 64, dtype=torch.bfloat16, device=device), rand(65, 1, dtype=torch.bfloat16, device=device)
    w, b = rand(1, 64, device=device), rand(1, device=device)
    T.train_step(x, y, w, b, None, None, None, 0.1, 0.0, 0.0, 0.0, False, False, False)
    cap = K.device_capability(torch.device(device))
    assert OP._onepass_kernel.best_config.kwargs["PACK"] == (cap is None or cap >= (9, 0))


LONG_SUMS = [  # (x dtype, outputs, PACK_ONE_OUTPUT, bound)
    pytest.param(torch.bfloat16, 1, True, 2e-6, id="bf16-O1-pack"),
    pytest.param(torch.bfloat16, 1, False, 2e-6, id="bf16-O1-fma"),
    pytest.param(torch.bfloat16, 16, None, 4e-6, id="bf16-O16"),
    pytest.param(torch.float16, 16, None, 4e-6, id="fp16-O16"),
]


@pytest.mark.parametrize("dtype, O, pack, bound", LONG_SUMS)
def test_low_precision_x_long_sums(device, monkeypatch, dtype, O, pack, bound):
    """One step over 4M rows of a bf16 / fp16 x (D = 256), the update against float64 math on the same
    values: each program sums ~16K rows, so a per-addition bias shows. The tiles' partial sums join
    in float32 with rounding to nearest, whose errors grow like sqrt(tiles per program) * 2^-24:
    about 16 * 6e-8 = 1e-6 for the 64-row tiles of O = 1 (the FMA path measured 5.7e-8 on an H200),
    32 * 6e-8 = 2e-6 for the 16-row tiles of the tl.dot path (fp32 O = 16 measured 2.5e-7); the
    bounds are twice those. A tensor core's accumulation (rounding toward zero) chained over all of
    a program's tiles made 1.7e-5 (PACK) and 3.4e-5 (bf16 O = 16). GPU only (4M rows through the
    interpreter would take minutes)."""
    if torch.device(device).type != "cuda":
        pytest.skip("4M rows: GPU only")
    cap = K.device_capability(torch.device(device))
    if pack and cap < (9, 0):
        pytest.skip(f"PACK runs on sm_90 or later (this GPU: sm_{cap[0]}{cap[1]})")
    monkeypatch.setattr(K, "PACK_ONE_OUTPUT", pack)
    N, D = 4 << 20, 256
    g = torch.Generator(device=device).manual_seed(5)
    x = torch.randn(N, D, generator=g, device=device).to(dtype)
    y = torch.randn(N, O, generator=g, device=device).to(dtype)
    w0 = torch.randn(O, D, generator=g, device=device) / D**0.5
    b0 = torch.randn(O, generator=g, device=device)
    w, b = w0.clone(), b0.clone()
    T.train_step(x, y, w, b, None, None, None, 1.0, 0.0, 0.0, 0.0, False, False, False)
    if pack is not None:
        assert OP._onepass_kernel.best_config.kwargs["PACK"] == pack
    # the reference's gradients of the summed loss in float64, over chunks of 1M rows (all of x in
    # float64 would be 8.6 GB, and the GPU tests run in parallel workers); lr = 1, mean over N * O
    gw = torch.zeros(O, D, dtype=f64, device=device)
    gb = torch.zeros(O, dtype=f64, device=device)
    for i in range(0, N, 1 << 20):
        _, _, cw, cb, _ = R.linear_mse_loss(
            d64(x[i : i + (1 << 20)]),
            d64(w0),
            d64(b0),
            d64(y[i : i + (1 << 20)]),
            "sum",
            [False, True, True, False],
        )
        gw += cw
        gb += cb
    for name, new, old, grad in (("weight", w, w0, gw), ("bias", b, b0, gb)):
        ref = -grad / (N * O)
        err = torch.linalg.vector_norm((new.to(f64) - old.to(f64)) - ref) / torch.linalg.vector_norm(ref)
        assert err <= bound, f"{name} update: relative error {err:.2e} > {bound:.0e}"


@triton.jit
def _fp16_pieces_kernel(x_ptr, hi_ptr, lo_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    hi, lo = OP._fp16_as_bf16_pieces(tl.load(x_ptr + offs, mask=m, other=0))
    tl.store(hi_ptr + offs, hi, mask=m)
    tl.store(lo_ptr + offs, lo, mask=m)


def test_fp16_as_two_bf16_pieces(device):
    """Every float16 value (all 65536 bit patterns) against the split the dot path uses for a float16
    x: two bfloat16 values summing to it exactly; inf gives (inf, 0), NaN a NaN sum."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16).to(device)
    hi, lo = (torch.empty(x.shape, dtype=torch.bfloat16, device=device) for _ in range(2))
    _fp16_pieces_kernel[(triton.cdiv(x.numel(), 4096),)](x, hi, lo, x.numel(), BLOCK=4096)
    fin, inf, nan = torch.isfinite(x), torch.isinf(x), torch.isnan(x)
    assert fin.sum() == 2**16 - 2048 and inf.sum() == 2 and nan.sum() == 2046
    assert torch.equal(hi[fin].double() + lo[fin].double(), x[fin].double())
    assert torch.equal(hi[inf].float(), x[inf].float()) and (lo[inf] == 0).all()
    # (the pieces' sum: the interpreter truncates fp32 -> bf16, which turns some NaNs into inf)
    assert torch.isnan(hi[nan].float() + lo[nan].float()).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("D", [64, 257], ids=["one-chunk", "chunked"])
def test_low_precision_x_on_the_dot_path_is_float32_exact(device, D, dtype):
    """bfloat16 (or float16) x and targets, float32 parameters, O > 4 (tl.dot): the kernel multiplies
    x by three bf16 pieces of W (and the residuals by x in three pieces; a float16 x goes in as two
    bf16 pieces), so every product is exact and the step must meet the float32 tolerance against
    float64 math on the same x values (one piece of W alone, or a float16 x rounded to bf16, would be
    ~1e-3 off)."""
    N, O = 37, 17
    pl = OP.plan(N, D, O, dtype, torch.device(device))
    assert pl.USE_DOT and pl.SPLIT and pl.ONE_CHUNK == (D == 64)
    x, t = rand(N, D, dtype=dtype, device=device), rand(N, O, dtype=dtype, device=device)
    w, b = rand(O, D, device=device) / 8, rand(O, device=device)
    wt, bt, wr, br = w.clone(), b.clone(), d64(w), d64(b)
    loss = T.train_step(x, t, wt, bt, None, None, None, 0.01, 0.0, 0.0, 0.0, False, False, False)
    lref = R.train_step(d64(x), d64(t), wr, br, None, None, None, 0.01, 0.0, 0.0, 0.0, False, False, False)
    check(loss, lref, f32, "loss")
    check_update(wt, w, wr, f32, "weight update")
    check_update(bt, b, br, f32, "bias update")


@pytest.mark.parametrize(
    "mask",
    [(False, True, True, False), (True, False, False, True), (False,) * 4, (False, False, True, False)],
)
def test_linear_mse_loss_masks(device, mask):
    x, w, t = rand(9, 5, device=device), rand(3, 5, device=device), rand(9, 3, device=device)
    out = T.linear_mse_loss(x, w, None, t, "mean", list(mask))
    ref = R.linear_mse_loss(d64(x), d64(w), None, d64(t), "mean", list(mask))
    check(out[0], ref[0], f32, "loss")
    for name, o, r, m in zip(
        ("grad_input", "grad_weight", "grad_bias", "grad_target"), out[1:], ref[1:], mask
    ):
        if m:
            check(o, r, f32, name)
        else:
            assert o.shape == (0,), name
    assert len({id(o) for o in out}) == 5, "outputs must be distinct tensors"


@pytest.mark.parametrize("path", ["split-outputs", "chunked-O1", "chunked-dot", "noncontiguous"])
def test_linear_mse_loss_paths(device, monkeypatch, path):
    """The rarer paths at small sizes: outputs split over programs (grad_input then from an (N, O)
    buffer), rows walked in chunks with O = 1, chunks on the tl.dot path, strided inputs."""
    N, D, O = 37, 257, 17
    if path == "split-outputs":
        monkeypatch.setattr(K, "MAX_BLOCK_O", 16)
        assert OP.plan(N, D, O, f32, torch.device(device)).NOB == 2
    elif path == "chunked-O1":
        O = 1
        monkeypatch.setattr(K, "MAX_BLOCK_D", 64)
        assert not OP.plan(N, D, O, f32, torch.device(device)).ONE_CHUNK
    elif path == "chunked-dot":
        assert not OP.plan(N, D, O, f32, torch.device(device)).ONE_CHUNK
    x, w, b, t = (
        rand(N, D, device=device),
        rand(O, D, device=device),
        rand(O, device=device),
        rand(N, O, device=device),
    )
    xa, ta = (noncontig(x), noncontig(t)) if path == "noncontiguous" else (x, t)
    out = T.linear_mse_loss(xa, w, b, ta, "sum", [True] * 4)
    ref = R.linear_mse_loss(d64(x), d64(w), d64(b), d64(t), "sum", [True] * 4)
    for name, o, r in zip(("loss", "grad_input", "grad_weight", "grad_bias", "grad_target"), out, ref):
        check(o, r, f32, f"{path}: {name}")
    # the same paths through train_step
    wt, bt = w.clone(), b.clone()
    wr, br = d64(w), d64(b)
    loss = T.train_step(xa, ta, wt, bt, None, None, None, 0.01, 0.0, 0.0, 0.0, False, False, False)
    lref = R.train_step(d64(x), d64(t), wr, br, None, None, None, 0.01, 0.0, 0.0, 0.0, False, False, False)
    check(loss, lref, f32, f"{path}: train_step loss")
    check_update(wt, w, wr, f32, f"{path}: train_step weight update")


def test_linear_mse_loss_empty(device):
    x, w, t = rand(0, 3, device=device), rand(2, 3, device=device), rand(0, 2, device=device)
    loss, gi, gw, gb, gt = T.linear_mse_loss(x, w, None, t, "mean", [True] * 4)
    assert (
        torch.isnan(loss)
        and gi.shape == (0, 3)
        and (gw == 0).all()
        and (gb == 0).all()
        and gt.shape == (0, 2)
    )


# ---------------------------------------------------------------------------------------------
# sgd_update_


@pytest.mark.parametrize("opts", SGD_OPTS, ids=["plain", "momentum-damp-wd-max", "nesterov"])
@pytest.mark.parametrize("first_step", [True, False], ids=["first", "later"])
@pytest.mark.parametrize("dtype", [f32, torch.bfloat16, f64])
def test_sgd_update(device, opts, first_step, dtype):
    shapes = [(5, 3), (7,), (3000,), (1,)]
    ps = [rand(*s, dtype=dtype, device=device) for s in shapes]
    gs = [torch.randn_like(p) for p in ps]
    ms = [torch.randn_like(p) for p in ps] if opts["momentum"] else []
    rp, rm = [d64(p) for p in ps], [d64(m) for m in ms]
    old = [p.clone() for p in ps]
    T.sgd_update_(ps, gs, ms, *opts.values(), first_step)
    R.sgd_update_(rp, [d64(g) for g in gs], rm, *opts.values(), first_step)
    # the kernel rounds once per element, like torch; compare the update and the new buffers
    for i, (p, r, o) in enumerate(zip(ps, rp, old)):
        check(p, r, dtype, f"param {i}")
        if dtype != torch.bfloat16:  # (a bf16 parameter's stored change is dominated by its own rounding)
            check_update(p, o, r, dtype, f"param {i} update")
    for i, (m, r) in enumerate(zip(ms, rm)):
        check(m, r, dtype, f"buffer {i}")


def test_sgd_update_matches_torch_optim(device):
    """Three steps against torch.optim.SGD itself, every option on."""
    p = rand(17, 3, device=device)
    q = p.clone().requires_grad_(True)
    opt = torch.optim.SGD(
        [q], lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=True, maximize=True
    )
    buf = torch.empty_like(p)
    for step in range(3):
        g = torch.randn_like(p)
        q.grad = g.clone()
        opt.step()
        T.sgd_update_([p], [g], [buf], 0.05, 0.9, 0.0, 0.01, True, True, step == 0)
        check(p, q.detach().to(f64), f32, f"step {step}")
        check(buf, opt.state[q]["momentum_buffer"].to(f64), f32, f"buffer step {step}")


def test_sgd_update_many_mixed(device):
    """11 parameters (two launches of 8 slots), mixed dtypes, a non-contiguous one, an empty one."""
    ps = [rand(3, 4, device=device) for _ in range(9)] + [
        rand(4, 3, dtype=f64, device=device).t(),
        rand(0, 3, device=device),
        rand(5, dtype=torch.bfloat16, device=device),
    ]
    gs = [torch.randn_like(p) for p in ps]
    ms = [torch.zeros_like(p) for p in ps]
    rp = [d64(p) for p in ps]
    rm = [d64(m) for m in ms]
    T.sgd_update_(ps, gs, ms, 0.1, 0.5, 0.0, 0.0, False, False, True)
    R.sgd_update_(rp, [d64(g) for g in gs], rm, 0.1, 0.5, 0.0, 0.0, False, False, True)
    for i, (p, r, m, rb) in enumerate(zip(ps, rp, ms, rm)):
        if p.numel():
            check(p, r, p.dtype, f"param {i}")
            check(m, rb, p.dtype, f"buffer {i}")


# ---------------------------------------------------------------------------------------------
# train_step


def _params(O, D, pdtype, device, bias, momentum):
    w = rand(O, D, dtype=pdtype, device=device)
    b = rand(O, dtype=pdtype, device=device) if bias else None
    wm = rand(O, D, dtype=pdtype, device=device) if momentum else None
    bm = rand(O, dtype=pdtype, device=device) if momentum and bias else None
    return w, b, wm, bm


TRAIN_CASES = [  # (bias, sample_weight, opts, first_step)
    (True, False, 0, False),
    (False, True, 1, True),
    (True, True, 2, False),
    (True, False, 1, False),
]


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", [f32, torch.bfloat16])
@pytest.mark.parametrize("case", TRAIN_CASES, ids=["bias", "sw-mom-first", "sw-nesterov", "mom"])
def test_train_step(device, shape, dtype, case):
    N, D, O = shape
    bias, use_sw, oi, first = case
    opts = SGD_OPTS[oi]
    pdtype = f32  # bf16 input trains float32 parameters
    x, y = rand(N, D, dtype=dtype, device=device), rand(N, O, dtype=dtype, device=device)
    sw = torch.rand(N, device=device) + 0.5 if use_sw else None
    w, b, wm, bm = _params(O, D, pdtype, device, bias, opts["momentum"] != 0)
    ref = [d64(t) for t in (w, b, wm, bm)]
    old = [None if t is None else t.clone() for t in (w, b, wm, bm)]
    loss = T.train_step(x, y, w, b, wm, bm, sw, *opts.values(), first)
    lref = R.train_step(d64(x), d64(y), *ref, d64(sw), *opts.values(), first)
    assert loss.dtype == f32 and loss.shape == ()
    check(loss, lref, f32, "loss")
    for name, t, r, o in zip(
        ("weight", "bias", "weight_momentum", "bias_momentum"), (w, b, wm, bm), ref, old
    ):
        if t is not None:
            check_update(t, o, r, f32, f"{name} update")


@pytest.mark.parametrize("dtype", [f64, torch.bfloat16, torch.float16])
def test_train_step_param_dtypes(device, dtype):
    """float64 end to end; bf16/fp16 parameters (updated in fp32, stored rounded)."""
    N, D, O = 37, 5, 3
    x, y = rand(N, D, dtype=dtype, device=device), rand(N, O, dtype=dtype, device=device)
    w, b, wm, bm = _params(O, D, dtype, device, True, True)
    ref = [d64(t) for t in (w, b, wm, bm)]
    loss = T.train_step(x, y, w, b, wm, bm, None, 0.1, 0.9, 0.0, 0.0, True, False, False)
    lref = R.train_step(d64(x), d64(y), *ref, None, 0.1, 0.9, 0.0, 0.0, True, False, False)
    assert loss.dtype == (f64 if dtype == f64 else f32)
    check(loss, lref, loss.dtype, "loss")
    for name, t, r in zip(("weight", "bias", "weight_momentum", "bias_momentum"), (w, b, wm, bm), ref):
        check(t, r, dtype, name)


def test_train_step_deterministic(device):
    x, y = rand(4097, 3, device=device), rand(4097, 1, device=device)
    w0, b0 = rand(1, 3, device=device), rand(1, device=device)
    results = []
    for _ in range(2):
        w, b = w0.clone(), b0.clone()
        loss = T.train_step(x, y, w, b, None, None, None, 0.1, 0.0, 0.0, 0.0, False, False, False)
        results.append((loss, w, b))
    for a, c in zip(*results):
        assert torch.equal(a, c), "fixed-order reductions: bit-identical results run to run"


def test_train_step_rows_and_mutation(device):
    """Only the declared arguments are written; a momentum buffer given with momentum == 0 is untouched."""
    x, y = rand(9, 3, device=device), rand(9, 2, device=device)
    w, b, wm, bm = _params(2, 3, f32, device, True, True)
    wm0, x0 = wm.clone(), x.clone()
    T.train_step(x, y, w, b, wm, bm, None, 0.1, 0.0, 0.0, 0.0, False, False, False)
    assert torch.equal(wm, wm0) and torch.equal(x, x0)


# ---------------------------------------------------------------------------------------------
# fit


FIT_CASES = [  # (N, D, O, batch_size, shuffle, sample_weight, momentum, bias)
    (37, 3, 1, 0, True, False, 0.0, True),
    (37, 3, 1, 10, False, True, 0.9, True),
    (37, 5, 3, 10, True, False, 0.9, False),
    (37, 5, 3, 10, True, True, 0.0, True),
    (20, 257, 17, 8, True, False, 0.0, True),
]


@pytest.mark.parametrize(
    "case",
    FIT_CASES,
    ids=["full", "batches-sw-mom", "shuffle-mom-nobias", "shuffle-sw", "shuffle-dot-chunked"],
)
@pytest.mark.parametrize("dtype", [f32, f64])
def test_fit(device, case, dtype):
    N, D, O, bs, shuffle, use_sw, momentum, bias = case
    if dtype == f64 and D > 100:  # fp64 has no tl.dot path; narrower rows keep the interpreter quick
        D = 9
    x, y = rand(N, D, dtype=dtype, device=device), rand(N, O, dtype=dtype, device=device)
    sw = (torch.rand(N, device=device) + 0.5).to(dtype) if use_sw else None
    w, b, wm, bm = _params(O, D, dtype, device, bias, momentum != 0)
    ref = [None if t is None else t.clone() for t in (w, b, wm, bm)]
    old = [None if t is None else t.clone() for t in (w, b, wm, bm)]
    epochs = 2 if D > 100 else 3
    args = (epochs, bs, shuffle, 1234, 0.05, momentum, 0.0, 0.01, momentum != 0, False, True)
    hist = T.fit(x, y, w, b, wm, bm, sw, *args)
    # the reference on the same device draws the same permutations from the same generator
    href = R.fit(x, y, *ref, sw, *args)
    assert hist.device == x.device and hist.dtype == dtype and hist.shape == (epochs,)
    check(hist, href.to(f64), dtype, "history")
    for name, t, r, o in zip(
        ("weight", "bias", "weight_momentum", "bias_momentum"), (w, b, wm, bm), ref, old
    ):
        if t is not None:
            check_update(t, o, r, dtype, f"{name} change", factor=10.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("D", [64, 257], ids=["one-chunk", "chunked"])
def test_fit_low_precision_x_on_the_dot_path(device, D, dtype):
    """fit with a bf16 / fp16 x and float32 parameters at O > 4: the split products on the tl.dot
    path over shuffled (gathered) batches with sample weights and momentum, held to the float32
    tolerance against the reference's float32 math on the same x values."""
    N, O = 37, 17
    assert OP.plan(N, D, O, dtype, torch.device(device)).SPLIT
    x, y = rand(N, D, dtype=dtype, device=device), rand(N, O, dtype=dtype, device=device)
    sw = torch.rand(N, device=device) + 0.5
    w, b, wm, bm = _params(O, D, f32, device, True, True)
    w = w / 8  # (residuals of order one)
    ref = [t.clone() for t in (w, b, wm, bm)]
    old = [t.clone() for t in (w, b, wm, bm)]
    args = (2, 10, True, 1234, 0.05, 0.9, 0.0, 0.01, True, False, True)
    hist = T.fit(x, y, w, b, wm, bm, sw, *args)
    href = R.fit(x, y, *ref, sw, *args)
    check(hist, href.to(f64), f32, "history")
    for name, t, r, o in zip(("weight", "bias", "weight_momentum"), (w, b, wm), ref, old):
        check_update(t, o, r, f32, f"{name} change", factor=10.0)


@pytest.mark.parametrize("lr", [5.0, 1e30], ids=["diverges", "inf-at-once"])
def test_fit_stops_at_first_nonfinite_step(device, lr):
    """The step whose loss or update is non-finite is not applied and ends the loop: parameters keep
    their last finite values, the history is NaN from that epoch on; decided on the device."""
    x, y = rand(50, 3, device=device), rand(50, 1, device=device)
    w, b = rand(1, 3, device=device), rand(1, device=device)
    wr, br = w.clone(), b.clone()
    hist = T.fit(x, y, w, b, None, None, None, 6, 16, True, 1, lr, 0.0, 0.0, 0.0, False, False, False)
    href = R.fit(x, y, wr, br, None, None, None, 6, 16, True, 1, lr, 0.0, 0.0, 0.0, False, False, False)
    assert torch.equal(torch.isnan(hist.cpu()), torch.isnan(href.cpu())), (hist, href)
    assert torch.isnan(hist).any(), "this lr must diverge"
    assert torch.isfinite(w).all() and torch.isfinite(b).all()
    finite = ~torch.isnan(href)
    if finite.any():
        check(hist[finite], href[finite].to(f64), f32, "history before the stop", factor=10.0)
    check(w, wr.to(f64), f32, "weight at the stop", factor=10.0)
    check(b, br.to(f64), f32, "bias at the stop", factor=10.0)


def test_fit_epochs_zero_and_bad(device):
    x, y = rand(5, 2, device=device), rand(5, 1, device=device)
    w = rand(1, 2, device=device)
    w0 = w.clone()
    h = T.fit(x, y, w, None, None, None, None, 0, 0, True, 0, 0.1, 0.0, 0.0, 0.0, False, False, False)
    assert h.shape == (0,) and torch.equal(w, w0)
    with pytest.raises(ValueError, match="epochs"):
        T.fit(x, y, w, None, None, None, None, -1, 0, True, 0, 0.1, 0.0, 0.0, 0.0, False, False, False)
    assert torch.equal(w, w0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs only exist with a CUDA device")
def test_no_host_sync_on_cuda():
    """train_step and fit launch without synchronising with the host (CUDA sync debug mode raises
    on any synchronising call). N = 40000 keeps randperm on its device path (older torch drew
    permutations of fewer than 30000 on the host)."""
    if not fastlin.backends.status()["triton"][0]:
        pytest.skip("triton backend unavailable")
    dev = "cuda"
    x, y = rand(40000, 8, device=dev), rand(40000, 1, device=dev)
    w, b = rand(1, 8, device=dev), rand(1, device=dev)
    args = (0.01, 0.0, 0.0, 0.0, False, False, False)

    def run():
        T.train_step(x, y, w, b, None, None, None, *args)
        T.fit(x, y, w, b, None, None, None, 2, 0, True, 0, *args)  # full batch
        T.fit(x, y, w, b, None, None, None, 2, 9000, False, 0, *args)  # batches in row order
        T.fit(x, y, w, b, None, None, None, 2, 9000, True, 0, *args)  # shuffled batches (randperm)

    run()  # first calls: autotuning synchronises
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---------------------------------------------------------------------------------------------
# autograd, opcheck, compile


def test_gradcheck(device):
    """float64 gradients through fastlin.autograd with backend="triton" (the interpreter runs fp64)."""
    kw = dict(dtype=f64, device=device)

    def leaf(*s):
        return torch.randn(*s, **kw, requires_grad=True)

    x, w, b, t = leaf(4, 3), leaf(2, 3), leaf(2), leaf(4, 2)
    assert torch.autograd.gradcheck(lambda x, w, b: A.LinearFunction.apply(x, w, b, "triton"), (x, w, b))
    for red in ("mean", "sum", "none"):
        assert torch.autograd.gradcheck(
            lambda x, t, red=red: A.MSELossFunction.apply(x, t, red, "triton"), (x, leaf(4, 3))
        )
        if red != "none":
            assert torch.autograd.gradcheck(
                lambda x, w, b, t, red=red: A.LinearMSELossFunction.apply(x, w, b, t, red, "triton"),
                (x, w, b, t),
            )


def _opcheck_samples(device):
    x, w, b, y = (
        rand(9, 3, device=device),
        rand(2, 3, device=device),
        rand(2, device=device),
        rand(9, 2, device=device),
    )
    return {
        "linear": (x, w, b),
        "linear_backward": (y, x, w, [True, False, True]),
        "mse_loss": (x, rand(9, 3, device=device), "mean"),
        "mse_loss_backward": (rand(device=device), x, rand(9, 3, device=device), "sum"),
        "linear_mse_loss": (x, w, None, y, "mean", [True, True, True, False]),
        "sgd_update_": (
            [w.clone(), b.clone()],
            [w, b],
            [w.clone(), b.clone()],
            0.1,
            0.9,
            0.0,
            0.0,
            False,
            False,
            False,
        ),
        "train_step": (
            x,
            y,
            w.clone(),
            b.clone(),
            w.clone(),
            b.clone(),
            None,
            0.1,
            0.9,
            0.0,
            0.0,
            False,
            False,
            True,
        ),
        "fit": (
            x,
            y,
            w.clone(),
            b.clone(),
            None,
            None,
            torch.rand(9, device=device),
            2,
            4,
            True,
            7,
            0.1,
            0.0,
            0.0,
            0.0,
            False,
            False,
            False,
        ),
    }


@pytest.mark.parametrize(
    "op",
    [
        "linear",
        "linear_backward",
        "mse_loss",
        "mse_loss_backward",
        "linear_mse_loss",
        "sgd_update_",
        "train_step",
        "fit",
    ],
)
def test_opcheck(device, op):
    torch.library.opcheck(getattr(T, op), _opcheck_samples(device)[op])


def test_compile_fullgraph(device):
    """torch.compile(fullgraph=True) over the Triton ops: on a GPU it traces into the kernels, under
    the interpreter it keeps them as opaque ops. Same results as eager."""
    torch._dynamo.reset()
    x, y = rand(33, 5, device=device), rand(33, 2, device=device)
    w0, b0 = rand(2, 5, device=device), rand(2, device=device)

    def step(x, y, w, b):
        loss = T.train_step(x, y, w, b, None, None, None, 0.1, 0.0, 0.0, 0.0, False, False, False)
        return loss, T.linear(x, w, b)

    we, be = w0.clone(), b0.clone()
    wc, bc = w0.clone(), b0.clone()
    eager = step(x, y, we, be)
    compiled = torch.compile(step, fullgraph=True)(x, y, wc, bc)
    for e, c in zip(eager + (we, be), compiled + (wc, bc)):
        assert torch.allclose(e, c, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# settings, 64-bit offsets


def test_input_precision_setting(device):
    assert fastlin.triton.input_precision() == "ieee", "default: true fp32 for tl.dot"
    with pytest.raises(ValueError, match="input_precision"):
        fastlin.triton.set_input_precision("fp8")
    # unset, it follows torch's float32 matmul precision; an explicit setting wins until reset
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert fastlin.triton.input_precision() == "tf32"
        fastlin.triton.set_input_precision("tf32x3")
        assert fastlin.triton.input_precision() == "tf32x3"
        fastlin.triton.set_input_precision(None)
        assert fastlin.triton.input_precision() == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)
        fastlin.triton.set_input_precision(None)
    assert fastlin.triton.input_precision() == "ieee"
    x, w = rand(33, 64, device=device), rand(17, 64, device=device)
    try:
        fastlin.triton.set_input_precision("tf32")
        out = T.linear(x, w, None)
    finally:
        fastlin.triton.set_input_precision(None)
    # TF32 keeps 10 mantissa bits: ~1e-3 relative on a dot of 64 terms (DESIGN.md puts it near 3e-4)
    check(out, R.linear(d64(x), d64(w), None), f32, "tf32 linear", factor=300)


def test_int64_offsets_decision():
    big = torch.empty((2**21 + 3, 1024), device="meta")
    assert OP._needs_int64(big)
    assert not OP._needs_int64(torch.empty((2**20, 1024), device="meta"))
    assert OP._needs_int64(torch.empty((2, 3), device="meta").as_strided((2, 3), (2**31, 1)))


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU with > 12 GiB free")
def test_int64_offsets_on_gpu():
    """N * D past 2^31 elements: bf16 x of 4.3 GB, one train_step against a chunked float64 reference."""
    if not fastlin.backends.status()["triton"][0]:
        pytest.skip("triton backend unavailable")
    N, D = 2**21 + 3, 1024
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn((N, D), device="cuda", dtype=torch.bfloat16, generator=g)
    y = torch.randn((N, 1), device="cuda", dtype=torch.bfloat16, generator=g)
    w, b = torch.randn(1, D, device="cuda") * 0.01, torch.zeros(1, device="cuda")
    w0, b0 = w.clone(), b.clone()
    loss = T.train_step(x, y, w, b, None, None, None, 0.1, 0.0, 0.0, 0.0, False, False, False)
    gw = torch.zeros(1, D, dtype=f64, device="cuda")
    gb = torch.zeros(1, dtype=f64, device="cuda")
    tot = torch.zeros((), dtype=f64, device="cuda")
    for s in range(0, N, 2**18):
        xs, ys = x[s : s + 2**18].to(f64), y[s : s + 2**18].to(f64)
        r = xs @ w0.to(f64).T + b0.to(f64) - ys
        tot += (r * r).sum()
        gw += r.T @ xs
        gb += r.sum(0)
    check(loss, tot / N, f32, "loss")
    check_update(w, w0, w0.to(f64) - 0.1 * 2 * gw / N, f32, "weight update")
    check_update(b, b0, b0.to(f64) - 0.1 * 2 * gb / N, f32, "bias update")


# ---------------------------------------------------------------------------------------------
# bad input: a clear error naming the argument, raised before anything is written


def test_cpu_tensors_outside_interpreter(monkeypatch):
    monkeypatch.setattr(K, "INTERPRET", False)
    x, w = torch.randn(3, 2), torch.randn(1, 2)
    with pytest.raises(RuntimeError, match=r"input is on cpu.*CUDA tensors.*TRITON_INTERPRET=1"):
        T.linear(x, w, None)
    w0 = w.clone()
    with pytest.raises(RuntimeError, match="input is on cpu"):
        T.train_step(x, torch.randn(3, 1), w, None, None, None, None, 0.1, 0.0, 0.0, 0.0, False, False, False)
    assert torch.equal(w, w0)


def test_bad_input(device):
    x, w, b, y = (
        rand(4, 3, device=device),
        rand(2, 3, device=device),
        rand(2, device=device),
        rand(4, 2, device=device),
    )
    other = "meta" if torch.device(device).type == "cpu" else "cpu"
    with pytest.raises(RuntimeError, match="weight must be on the device of input"):
        T.linear(x, w.to(other), b)
    with pytest.raises(RuntimeError, match="target must be on the device of input"):
        T.linear_mse_loss(x, w, b, y.to(other), "mean", [True] * 4)
    with pytest.raises(TypeError, match="input must be float32, float64, bfloat16 or float16"):
        T.linear(x.to(torch.int64), w, b)
    with pytest.raises(TypeError, match="bias must have the dtype of input"):
        T.linear(x, w, b.double())
    with pytest.raises(ValueError, match=r"target must have shape \(4, 2\)"):
        T.linear_mse_loss(x, w, b, y[:, 0], "mean", [True] * 4)
    with pytest.raises(ValueError, match="reduction"):
        T.mse_loss(x, x, "avg")
    with pytest.raises(ValueError, match="grad_output must be a scalar or broadcastable"):
        T.mse_loss_backward(rand(2, device=device), x, x, "mean")
    with pytest.raises(ValueError, match="momentum_buffers"):
        T.sgd_update_([w], [w], [], 0.1, 0.9, 0.0, 0.0, False, False, False)
    w0, b0 = w.clone(), b.clone()
    for bad, msg in [
        (dict(lr=-1.0), "lr must be >= 0"),
        (dict(nesterov=True), "nesterov requires momentum > 0"),
        (dict(momentum=0.9), "weight_momentum must be given"),
        (dict(sw=rand(3, device=device)), r"sample_weight must have shape \(4,\)"),
        (dict(y=rand(4, 3, device=device)), "target must have shape"),
        (dict(w=rand(2, 3, dtype=f64, device=device)), "weight must have input's dtype"),
        (dict(x=rand(0, 3, device=device), y=rand(0, 2, device=device)), "at least one row"),
    ]:
        a = dict(x=x, y=y, w=w, sw=None, lr=0.1, momentum=0.0, nesterov=False)
        a.update(bad)
        for op, extra in (("train_step", ()), ("fit", (2, 0, True, 0))):
            with pytest.raises((ValueError, TypeError), match=msg):
                if op == "train_step":
                    T.train_step(
                        a["x"],
                        a["y"],
                        a["w"],
                        b,
                        None,
                        None,
                        a["sw"],
                        a["lr"],
                        a["momentum"],
                        0.0,
                        0.0,
                        a["nesterov"],
                        False,
                        False,
                    )
                else:
                    T.fit(
                        a["x"],
                        a["y"],
                        a["w"],
                        b,
                        None,
                        None,
                        a["sw"],
                        *extra,
                        a["lr"],
                        a["momentum"],
                        0.0,
                        0.0,
                        a["nesterov"],
                        False,
                        False,
                    )
            assert torch.equal(w, w0) and torch.equal(b, b0), f"{op} wrote parameters before failing ({msg})"


# ---------------------------------------------------------------------------------------------
# the real compiler, without a GPU


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="on a GPU every test above compiles the kernels for real"
)
def test_kernels_compile_for_sm90():
    """The interpreter never compiles the kernels: bench/triton_compile_check.py compiles the bench
    shapes' kernels for sm_90a (Triton -> PTX -> the bundled ptxas) with every autotune config, and
    fails on a compile error or on register spills in the one-pass kernel."""
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run(
        [sys.executable, os.path.join(root, "bench", "triton_compile_check.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
