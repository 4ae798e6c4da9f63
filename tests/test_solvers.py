"""Exact solvers (fastlin.solvers, FusedLinearRegressor(solver="normal" | "lstsq")), ridge_path and
streaming (partial_fit, fit on batches), checked against scikit-learn (a test-only dependency).

Tolerances. float64 data: 1e-6 relative against sklearn (the issue's target); our solve itself is
far closer on these well-conditioned designs (cond(Sxx) < ~50), which the lstsq-vs-normal test pins at
1e-10. float32 data: compared with the float64 solution of the *same* (float32-representable) data.
The Gram is accumulated in float64, so the only float32 rounding is (a) products of float32 values if
a kernel forms them in float32 (<= 6e-8 relative each, averaging out over N rows), times cond(Sxx) < 10
here, and (b) the final rounding of weight/bias to float32 (6e-8): 1e-6 leaves a 10x margin.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest
import torch

import fastlin
from fastlin import solvers
from fastlin.solvers import IllConditionedWarning
from tests.conftest import STATUS, rel_error

lm = pytest.importorskip("sklearn.linear_model")

CPU_BACKENDS = [
    pytest.param(
        b, marks=[] if STATUS[b][0] else [pytest.mark.skip(reason=f"backend {b} unavailable: {STATUS[b][1]}")]
    )
    for b in ("reference", "cpp")
]


def make_data(n=300, d=5, o=1, *, dtype=torch.float64, weights=False, offset=True, noise=0.3):
    """Features with different scales and non-zero means (so centring matters), y = x W^T + b + noise."""
    scale = torch.logspace(-1, 1, d, dtype=torch.float64)
    x = torch.randn(n, d, dtype=torch.float64) * scale + (
        torch.randn(d, dtype=torch.float64) * 3 if offset else 0
    )
    W = torch.randn(o, d, dtype=torch.float64)
    y = x @ W.T + torch.randn(o, dtype=torch.float64) * 2 + noise * torch.randn(n, o, dtype=torch.float64)
    sw = (torch.rand(n, dtype=torch.float64) * 2 + 0.1) if weights else None
    x, y = x.to(dtype), y.to(dtype)
    return x, (y.reshape(-1) if o == 1 else y), (None if sw is None else sw.to(dtype))


def sk_fit(x, y, sw=None, *, alpha=0.0, fit_intercept=True):
    """sklearn's (coef (O, D), intercept (O,)) as float64 tensors; alpha 0 -> LinearRegression."""
    est = (
        lm.LinearRegression(fit_intercept=fit_intercept)
        if alpha == 0
        else lm.Ridge(alpha=alpha, fit_intercept=fit_intercept)
    )
    est.fit(x.double().numpy(), y.double().numpy(), sample_weight=None if sw is None else sw.double().numpy())
    coef = torch.as_tensor(np.atleast_2d(est.coef_), dtype=torch.float64)
    intercept = np.broadcast_to(np.asarray(est.intercept_, dtype=np.float64), (coef.shape[0],)).copy()
    return coef, torch.as_tensor(intercept)


def params(reg):
    b = (
        reg.bias.detach().double()
        if reg.bias is not None
        else torch.zeros(reg.out_features, dtype=torch.float64)
    )
    return reg.weight.detach().double(), b


def assert_close(out, ref, tol, what):
    err = rel_error(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("o", [1, 3])
@pytest.mark.parametrize("weights", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("fit_intercept", [True, False], ids=["intercept", "no-intercept"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 30.0])
def test_normal_matches_sklearn(backend, o, weights, fit_intercept, alpha):
    x, y, sw = make_data(257, 7, o, weights=weights)
    reg = fastlin.FusedLinearRegressor(
        7, o, bias=fit_intercept, solver="normal", alpha=alpha, backend=backend, dtype=torch.float64
    )
    w0 = reg.weight.detach().clone()
    reg.fit(x, y, sample_weight=sw, epochs=5)  # epochs ignored
    assert not torch.equal(reg.weight, w0)
    W, b = params(reg)
    W_ref, b_ref = sk_fit(x, y, sw, alpha=alpha, fit_intercept=fit_intercept)
    assert_close(W, W_ref, 1e-6, "weight")
    assert_close(b, b_ref, 1e-6, "bias")
    assert reg.solve_info_["method"] == "cholesky"
    # loss_history_ is the training MSE of the written parameters, from the Gram matrix alone
    assert reg.loss_history_.shape == (1,) and reg.n_iter_ == 1
    mse = reg.evaluate(x, y, sample_weight=sw)["mse"]
    assert math.isclose(float(reg.loss_history_[0]), mse, rel_tol=1e-9)
    assert reg.predict(x[:4]).shape == ((4,) if o == 1 else (4, o))


@pytest.mark.parametrize("o", [1, 3])
@pytest.mark.parametrize("weights", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("fit_intercept", [True, False], ids=["intercept", "no-intercept"])
@pytest.mark.parametrize("alpha", [0.0, 2.0])
def test_lstsq_matches_sklearn_and_normal(o, weights, fit_intercept, alpha):
    x, y, sw = make_data(200, 6, o, weights=weights)
    kw = dict(bias=fit_intercept, alpha=alpha, dtype=torch.float64)
    reg = fastlin.FusedLinearRegressor(6, o, solver="lstsq", **kw).fit(x, y, sample_weight=sw)
    W_ref, b_ref = sk_fit(x, y, sw, alpha=alpha, fit_intercept=fit_intercept)
    W, b = params(reg)
    assert_close(W, W_ref, 1e-6, "lstsq weight")
    assert_close(b, b_ref, 1e-6, "lstsq bias")
    mse = reg.evaluate(x, y, sample_weight=sw)["mse"]
    assert math.isclose(float(reg.loss_history_[0]), mse, rel_tol=1e-9)
    # normal vs lstsq: cond(Sxx) ~ 1e4 here (feature scales 0.1..10), so the normal equations lose
    # ~4 digits of float64: 1e-10 is their claim.
    Wn, bn, _ = solvers.solve_normal(x, y, sample_weight=sw, alpha=alpha, fit_intercept=fit_intercept)
    assert_close(Wn, W, 1e-10, "normal vs lstsq weight")
    assert_close(bn, b, 1e-10, "normal vs lstsq bias")


# float32 tolerances per Gram backend, on [W, b] jointly (b alone is b = ym - W xm, a difference of
# larger terms: its relative error is amplified by |W xm| / |b|, ~10x here, for every float32 solver):
# - reference: products of float32 values are exact in float64 and summed in float64, so only the
#   final rounding to float32 (6e-8) and cond(Sxx) x eps64 remain: 1e-6.
# - cpp: the Gram kernel sums float32 products in float32 over blocks of 128 rows before adding the
#   blocks in float64 (csrc/cpu/kernels/gram_impl.h): <= 128 * eps32 = 7.6e-6 of a block's sum worst
#   case, ~sqrt(128) * eps32 = 7e-7 typical. Measured on this data (8 seeds): 2.7e-7..7.2e-7 joint,
#   the same as stock torch.linalg.lstsq in float32 on [x, 1] (1.8e-7..7.7e-7); 5e-6 is the bound.
F32_TOL = {"reference": 1e-6, "cpp": 5e-6}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("weights", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_float32_data(backend, weights, alpha):
    # Well-conditioned float32 data; the reference is the float64 solution of the same float32 values.
    x = torch.randn(1000, 9) + torch.randn(9)
    y = x @ torch.randn(3, 9).T + 0.5 + 0.1 * torch.randn(1000, 3)
    sw = torch.rand(1000) + 0.5 if weights else None
    reg = fastlin.FusedLinearRegressor(9, 3, solver="normal", alpha=alpha, backend=backend)
    reg.fit(x, y, sample_weight=sw)
    assert reg.weight.dtype == torch.float32 and reg.loss_history_.dtype == torch.float32
    W_ref, b_ref = sk_fit(x.double(), y.double(), None if sw is None else sw.double(), alpha=alpha)
    W, b = params(reg)
    joint, joint_ref = torch.cat([W.reshape(-1), b]), torch.cat([W_ref.reshape(-1), b_ref])
    assert_close(joint, joint_ref, F32_TOL[backend], f"float32 [weight, bias] ({backend} gram)")
    assert_close(W, W_ref, F32_TOL[backend], f"float32 weight ({backend} gram)")


@pytest.mark.parametrize("fit_intercept", [True, False], ids=["intercept", "no-intercept"])
@pytest.mark.parametrize("weights", [False, True], ids=["unweighted", "weighted"])
def test_ridge_path_matches_ridge(fit_intercept, weights):
    x, y, sw = make_data(400, 8, 4, weights=weights)
    alphas = [0.0, 1e-3, 0.3, 7.0, 1e3]
    calls = []
    real_gram = fastlin.ops.gram
    try:  # one Gram pass for every alpha
        fastlin.ops.gram = lambda *a, **k: calls.append(1) or real_gram(*a, **k)
        Ws, bs = fastlin.ridge_path(x, y, alphas, sample_weight=sw, fit_intercept=fit_intercept)
    finally:
        fastlin.ops.gram = real_gram
    assert len(calls) == 1
    assert Ws.shape == (5, 4, 8) and bs.shape == (5, 4) and Ws.dtype == torch.float64
    for k, a in enumerate(alphas):
        W_ref, b_ref = sk_fit(x, y, sw, alpha=a, fit_intercept=fit_intercept)
        assert_close(Ws[k], W_ref, 1e-6, f"ridge_path weight alpha={a}")
        assert_close(bs[k], b_ref, 1e-6, f"ridge_path bias alpha={a}")
        Wg, bg, _ = solvers.solve_normal(x, y, sample_weight=sw, alpha=a, fit_intercept=fit_intercept)
        assert_close(Ws[k], Wg, 1e-9, f"ridge_path vs solve_normal alpha={a}")


def test_ridge_path_shapes_and_bad_alphas():
    x, y, _ = make_data(50, 3, 1)
    Ws, bs = fastlin.ridge_path(x, y, torch.tensor([1.0]))
    assert Ws.shape == (1, 1, 3) and bs.shape == (1, 1)
    for bad, exc in (
        ([], ValueError),
        ([1.0, -1.0], ValueError),
        ([math.nan], ValueError),
        (torch.ones(2, 2), ValueError),
        ("a", TypeError),
        ([True], TypeError),
    ):
        with pytest.raises(exc, match="alphas"):
            fastlin.ridge_path(x, y, bad)
    with pytest.raises(ValueError, match="y must have shape"):
        fastlin.ridge_path(x, y[:-1], [1.0])


def test_rank_deficient_min_norm():
    # A duplicated column and (with intercept) a constant one: singular. sklearn's LinearRegression
    # (scipy lstsq) returns the minimum-norm solution; so must every path here, with a warning.
    x, y, sw = make_data(300, 4, 2, weights=True)
    x = torch.cat([x, x[:, 1:2], torch.full((300, 1), 3.0, dtype=torch.float64)], dim=1)  # D = 6
    W_ref, b_ref = sk_fit(x, y, sw)
    reg = fastlin.FusedLinearRegressor(6, 2, solver="normal", dtype=torch.float64)
    with pytest.warns(IllConditionedWarning, match="condition number"):
        reg.fit(x, y, sample_weight=sw)
    assert reg.solve_info_["method"] == "eigh" and reg.solve_info_["rank"] == 4
    W, b = params(reg)
    assert_close(W, W_ref, 1e-6, "normal min-norm weight")
    assert_close(b, b_ref, 1e-6, "normal min-norm bias")
    assert torch.allclose(W[:, 1], W[:, 4]) and W[:, 5].abs().max() < 1e-9
    with pytest.warns(IllConditionedWarning):
        Ws, bs = fastlin.ridge_path(x, y, [0.0, 1.0], sample_weight=sw)
    assert_close(Ws[0], W_ref, 1e-6, "ridge_path alpha=0 min-norm")
    assert_close(Ws[1], sk_fit(x, y, sw, alpha=1.0)[0], 1e-6, "ridge_path alpha=1 (regular)")
    with pytest.warns(IllConditionedWarning, match="rank-deficient"):
        reg_l = fastlin.FusedLinearRegressor(6, 2, solver="lstsq", dtype=torch.float64).fit(
            x, y, sample_weight=sw
        )
    assert_close(params(reg_l)[0], W_ref, 1e-6, "lstsq min-norm weight")
    # ridge (alpha > 0) makes it regular again: Cholesky, no warning (constant column: alpha on diag)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reg_r = fastlin.FusedLinearRegressor(6, 2, solver="normal", alpha=0.5, dtype=torch.float64)
        reg_r.fit(x, y, sample_weight=sw)
    assert_close(params(reg_r)[0], sk_fit(x, y, sw, alpha=0.5)[0], 1e-6, "ridge on singular design")


def test_solve_gram_direct_and_checks():
    x, y, _ = make_data(100, 3, 2)
    G = fastlin.ops.gram(x, y)
    assert G.shape == (6, 6)
    W, b, info = solvers.solve_gram(G, 3)
    assert info["method"] == "cholesky" and 0 < info["rcond_est"] <= 1
    assert_close(W, sk_fit(x, y)[0], 1e-6, "solve_gram")
    with pytest.raises(ValueError, match="gram must be square"):
        solvers.solve_gram(G[:5], 3)
    with pytest.raises(ValueError, match="alpha"):
        solvers.solve_gram(G, 3, alpha=-1.0)
    Gn = G.clone()
    Gn[0, 0] = math.nan
    with pytest.raises(ValueError, match="non-finite"):
        solvers.solve_gram(Gn, 3)


def _chunks(x, y, sw, sizes):
    out, i = [], 0
    for s in sizes:
        out.append((x[i : i + s], y[i : i + s]) + (() if sw is None else (sw[i : i + s],)))
        i += s
    assert i == x.shape[0]
    return out


@pytest.mark.parametrize("weights", [False, True], ids=["unweighted", "weighted"])
def test_partial_fit_equals_fit(weights):
    x, y, sw = make_data(500, 6, 3, weights=weights)
    full = fastlin.FusedLinearRegressor(6, 3, solver="normal", alpha=0.1, dtype=torch.float64).fit(
        x, y, sample_weight=sw
    )
    reg = fastlin.FusedLinearRegressor(6, 3, solver="normal", alpha=0.1, dtype=torch.float64)
    for c in _chunks(x, y, sw, [1, 7, 250, 242]):
        reg.partial_fit(*c)
    assert reg.n_samples_seen_ == 500
    assert_close(reg.weight, full.weight, 1e-12, "streamed weight")
    assert_close(reg.bias, full.bias, 1e-12, "streamed bias")
    assert math.isclose(float(reg.loss_history_[0]), float(full.loss_history_[0]), rel_tol=1e-10)
    # fit starts afresh (forgets the stream); partial_fit then continues from that fit's data
    reg.fit(x[:250], y[:250], sample_weight=None if sw is None else sw[:250])
    reg.partial_fit(x[250:], y[250:], None if sw is None else sw[250:])
    assert_close(reg.weight, full.weight, 1e-12, "fit + partial_fit weight")


def test_state_dict_round_trip_mid_stream():
    x, y, sw = make_data(400, 5, 2, weights=True)
    chunks = _chunks(x, y, sw, [100, 100, 100, 100])
    a = fastlin.FusedLinearRegressor(5, 2, solver="normal", dtype=torch.float64)
    for c in chunks[:2]:
        a.partial_fit(*c)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = fastlin.FusedLinearRegressor(5, 2, solver="normal", dtype=torch.float64)
    b.load_state_dict(torch.load(buf))  # weights_only=True (the default) loads it
    for c in chunks[2:]:
        a.partial_fit(*c)
        b.partial_fit(*c)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    full = fastlin.FusedLinearRegressor(5, 2, solver="normal", dtype=torch.float64).fit(
        x, y, sample_weight=sw
    )
    assert_close(b.weight, full.weight, 1e-12, "resumed stream vs fit")
    # sgd models' state_dict is unchanged by the solver state (same keys as before)
    keys = set(fastlin.FusedLinearRegressor(5, 2).state_dict())
    assert keys == {"weight", "bias", "_extra_state"}
    with pytest.raises(ValueError, match="saved Gram matrix"):
        fastlin.FusedLinearRegressor(4, 2, solver="normal", dtype=torch.float64).load_state_dict(
            {**a.state_dict(), "weight": torch.zeros(2, 4, dtype=torch.float64)}
        )


def test_dataloader_fit():
    from torch.utils.data import DataLoader, TensorDataset

    x, y, sw = make_data(300, 4, 2, weights=True)
    full = fastlin.FusedLinearRegressor(4, 2, solver="normal", dtype=torch.float64).fit(
        x, y, sample_weight=sw
    )
    dl = DataLoader(TensorDataset(x, y, sw), batch_size=64, shuffle=True)
    reg = fastlin.FusedLinearRegressor(4, 2, solver="normal", dtype=torch.float64).fit(dl, epochs=10)
    assert_close(reg.weight, full.weight, 1e-12, "DataLoader normal fit")
    assert reg.n_samples_seen_ == 300
    # a generator (one-shot) is fine for the normal solver (one pass)
    gen = (c for c in _chunks(x, y, sw, [150, 150]))
    reg2 = fastlin.FusedLinearRegressor(4, 2, solver="normal", dtype=torch.float64).fit(gen)
    assert_close(reg2.weight, full.weight, 1e-12, "generator normal fit")

    # sgd: epochs passes of one fused step per batch == the same steps taken by hand
    dl = DataLoader(TensorDataset(x, y), batch_size=100, shuffle=False)
    torch.manual_seed(0)
    s1 = fastlin.FusedLinearRegressor(4, 2, lr=0.01, momentum=0.9, dtype=torch.float64).fit(dl, epochs=3)
    torch.manual_seed(0)
    s2 = fastlin.FusedLinearRegressor(4, 2, lr=0.01, momentum=0.9, dtype=torch.float64)
    losses = []
    for _ in range(3):
        losses.append(sum(float(s2.step(bx, by)) * 100 for bx, by in dl) / 300)
    assert torch.equal(s1.weight, s2.weight) and torch.equal(s1.bias, s2.bias)
    assert s1.loss_history_.shape == (3,) and s1.n_iter_ == 3
    assert torch.allclose(s1.loss_history_, torch.tensor(losses, dtype=torch.float64), rtol=1e-12)
    with pytest.raises(ValueError, match="one-shot iterator"):
        s1.fit(iter(list(dl)), epochs=2)
    # sgd partial_fit == one step
    s3 = fastlin.FusedLinearRegressor(4, 2, lr=0.01, dtype=torch.float64)
    s4 = fastlin.FusedLinearRegressor(4, 2, lr=0.01, dtype=torch.float64)
    s4.load_state_dict(s3.state_dict())
    s3.partial_fit(x, y)
    s4.step(x, y)
    assert torch.equal(s3.weight, s4.weight)


def _snapshot(reg):
    sd = reg.state_dict()
    return {
        k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in sd.items() if k != "_extra_state"
    }, (None if reg._gram is None else reg._gram.clone())


def _assert_unchanged(reg, snap):
    tensors, gram = snap
    for k, v in reg.state_dict().items():
        if k != "_extra_state":
            assert torch.equal(v, tensors[k]), f"{k} changed"
    assert (reg._gram is None and gram is None) or torch.equal(reg._gram, gram), "Gram changed"


def test_bad_input_leaves_model_unchanged():
    x, y, sw = make_data(200, 4, 2, weights=True)
    reg = fastlin.FusedLinearRegressor(4, 2, solver="normal", dtype=torch.float64)
    reg.partial_fit(x[:100], y[:100], sw[:100])
    snap = _snapshot(reg)
    xn = x[100:].clone()
    xn[5, 2] = math.nan
    bad_calls = [
        (lambda: reg.partial_fit(x[100:, :3], y[100:]), ValueError, r"x must have shape \(N, 4\)"),
        (lambda: reg.partial_fit(x[100:].float(), y[100:]), TypeError, "same dtype"),
        (lambda: reg.partial_fit(x[100:], y[100:, :1]), ValueError, "y must have shape"),
        (lambda: reg.partial_fit(x[100:], y[100:], sw[:5]), ValueError, "sample_weight must have shape"),
        (lambda: reg.partial_fit(xn, y[100:]), ValueError, "non-finite"),
        (lambda: reg.fit([(x[:50], y[:50]), (x[50:100, :3], y[50:100])]), ValueError, r"batch 1"),
        (
            lambda: reg.fit([(x[:50], y[:50]), (x[50:100].float(), y[50:100])]),
            TypeError,
            "batch 1 .*dtype|dtype",
        ),
        (lambda: reg.fit([(x[:50], y[:50]), x[50:100]]), TypeError, "batch 1"),
        (lambda: reg.fit([]), ValueError, "empty"),
        (lambda: reg.fit(x), ValueError, "y is required"),
        (lambda: reg.fit([(x, y)], sample_weight=sw), ValueError, "inside them"),
    ]
    for call, exc, match in bad_calls:
        with pytest.raises(exc, match=match):
            call()
        _assert_unchanged(reg, snap)
    reg.partial_fit(x[100:], y[100:], sw[100:])  # the stream still continues where it was
    full = fastlin.FusedLinearRegressor(4, 2, solver="normal", dtype=torch.float64).fit(
        x, y, sample_weight=sw
    )
    assert_close(reg.weight, full.weight, 1e-12, "stream after rejected chunks")

    lst = fastlin.FusedLinearRegressor(4, 2, solver="lstsq", dtype=torch.float64)
    snap = _snapshot(lst)
    with pytest.raises(ValueError, match="lstsq.*all the data"):
        lst.partial_fit(x, y)
    with pytest.raises(ValueError, match="lstsq"):
        lst.fit([(x, y)])
    _assert_unchanged(lst, snap)

    sgd = fastlin.FusedLinearRegressor(4, 2, momentum=0.9, dtype=torch.float64)
    sgd.partial_fit(x[:100], y[:100])
    snap = (sgd.weight.clone(), sgd.bias.clone(), sgd.weight_momentum.clone())
    with pytest.raises(FloatingPointError, match=r"x\[5\]"):
        sgd.partial_fit(xn, y[100:])
    assert torch.equal(sgd.weight, snap[0]) and torch.equal(sgd.bias, snap[1])
    assert torch.equal(sgd.weight_momentum, snap[2])

    for kw, match in (
        ({"solver": "qr"}, "solver must be one of"),
        ({"alpha": -1.0}, "alpha"),
        ({"alpha": math.inf}, "alpha"),
    ):
        with pytest.raises(ValueError, match=match):
            fastlin.FusedLinearRegressor(4, 2, **kw)


def test_low_precision_parameters():
    # bf16 parameters: solved in float64, written rounded to bf16 (relative rounding 2^-9).
    x, y, _ = make_data(300, 3, 1, offset=False)
    reg = fastlin.FusedLinearRegressor(3, 1, solver="normal", dtype=torch.bfloat16).fit(x, y)
    assert reg.weight.dtype == torch.bfloat16
    W_ref, b_ref = sk_fit(x.to(torch.bfloat16).double(), y.to(torch.bfloat16).double())
    assert_close(params(reg)[0], W_ref, 4e-3, "bf16 weight")
