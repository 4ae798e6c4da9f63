"""fastlin.FusedLinearRegressor: initialisation, training parity with stock torch, the sklearn-style
API, chunked (progress) fits, state_dict round trips, bad input and non-finite data."""

import copy
import io
import math

import pytest
import torch
from conftest import assert_rel_close

import fastlin
from fastlin import FusedLinearRegressor, ops
from fastlin import regressor as R

SGD_OPTIONS = [
    {},
    {"momentum": 0.9},
    {"momentum": 0.5, "dampening": 0.3, "weight_decay": 0.01},
    {"momentum": 0.9, "nesterov": True},
    {"weight_decay": 0.1},
]


def _seed_data():
    torch.manual_seed(0)
    x = torch.randn(100, 1)
    y = 3 * x + 2 + torch.randn(100, 1)
    return x, y


def _data(n, d, o, device="cpu", dtype=torch.float32, noise=0.1):
    x = torch.randn(n, d, dtype=torch.float64)
    w = torch.randn(o, d, dtype=torch.float64) / math.sqrt(d)
    y = x @ w.T + 0.5 + noise * torch.randn(n, o, dtype=torch.float64)
    return x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)


def _state(m):
    """Everything training may change: parameters, momentum buffers, and first_step."""
    tensors = {k: v.detach().clone() for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}
    return tensors, m._first_step


def _assert_state_equal(a, b):
    ta, fa = a
    tb, fb = b
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{k} changed"
    assert fa == fb, "first_step changed"


def _stock(d, o, bias, seed, device="cpu", dtype=torch.float32, **opts):
    torch.manual_seed(seed)
    m = torch.nn.Linear(d, o, bias=bias, device=device, dtype=dtype)
    return m, torch.optim.SGD(m.parameters(), lr=opts.pop("lr", 0.01), **opts)


def _stock_steps(m, opt, x, y, steps, sample_weight=None):
    for _ in range(steps):
        if sample_weight is None:
            loss = torch.nn.functional.mse_loss(m(x), y)
        else:  # fastlin's weighted MSE: sum_i w_i sum_o r_io^2 / (O * sum_i w_i)
            loss = (sample_weight[:, None] * (m(x) - y) ** 2).sum() / (y.shape[1] * sample_weight.sum())
        opt.zero_grad()
        loss.backward()
        opt.step()


# ------------------------------------------------------------------------------------------------
# construction


@pytest.mark.parametrize("d,o,bias", [(1, 1, True), (3, 17, True), (257, 3, False), (7, 1, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_init_matches_nn_linear(d, o, bias, dtype):
    torch.manual_seed(123)
    ref = torch.nn.Linear(d, o, bias=bias, dtype=dtype)
    after_ref = torch.rand(3)
    torch.manual_seed(123)
    reg = FusedLinearRegressor(d, o, bias=bias, dtype=dtype)
    after_reg = torch.rand(3)
    assert torch.equal(reg.weight, ref.weight) and reg.weight.shape == (o, d) and reg.weight.dtype == dtype
    if bias:
        assert torch.equal(reg.bias, ref.bias)
    else:
        assert reg.bias is None
    assert torch.equal(after_ref, after_reg), "the constructor must make exactly nn.Linear's RNG draws"


def test_exported_and_repr():
    assert fastlin.FusedLinearRegressor is FusedLinearRegressor
    r = repr(FusedLinearRegressor(3, 2, lr=0.1, momentum=0.9, nesterov=True))
    assert "in_features=3" in r and "out_features=2" in r and "momentum=0.9" in r and "nesterov=True" in r


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lr": 0.0}, "lr must be > 0"),
        ({"lr": -0.1}, "lr must be > 0"),
        ({"lr": float("nan")}, "lr must be > 0"),
        ({"lr": float("inf")}, "finite"),
        ({"momentum": -0.1}, "momentum must be >= 0"),
        ({"weight_decay": -1.0}, "weight_decay must be >= 0"),
        ({"nesterov": True}, "nesterov requires momentum > 0 and dampening == 0"),
        ({"nesterov": True, "momentum": 0.9, "dampening": 0.1}, "nesterov requires"),
        ({"backend": "nope"}, "backend must be one of"),
        ({"in_features": 0}, "in_features must be a positive int"),
        ({"out_features": 0}, "out_features must be a positive int"),
        ({"dtype": torch.int32}, "dtype"),
    ],
)
def test_constructor_validation(kwargs, match):
    args = {"in_features": 2, **kwargs}
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        FusedLinearRegressor(**args)


# ------------------------------------------------------------------------------------------------
# training parity


def test_seed_loop_parity(backend_device):
    """The seed's stock loop (nn.Linear + MSELoss + SGD lr=0.01, 1000 full-batch steps) and
    FusedLinearRegressor(1, 1).fit(epochs=1000) from the same seed end at the same weight and bias."""
    backend, device = backend_device
    x, y = _seed_data()
    x, y = x.to(device), y.to(device)
    torch.manual_seed(42)
    model = torch.nn.Linear(1, 1).to(device)
    criterion = torch.nn.MSELoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(1000):
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.manual_seed(42)
    reg = FusedLinearRegressor(1, 1, backend=backend, device=device).fit(x, y, epochs=1000)
    # float32 rounding: each step's rounding (~1e-7 relative) is damped by the contracting
    # iteration, so the end points agree to a few float32 ulps, not bit for bit across backends.
    torch.testing.assert_close(reg.weight, model.weight, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(reg.bias, model.bias, rtol=1e-6, atol=1e-6)
    assert reg.loss_history_.shape == (1000,)
    assert abs(reg.loss_history_[-1].item() - loss.item()) <= 1e-6 * loss.item()
    assert reg.n_iter_ == 1000 and reg.n_features_in_ == 1


@pytest.mark.parametrize(
    "opts", SGD_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain"
)
@pytest.mark.parametrize(
    "n,d,o,bias", [(7, 3, 17, True), (4097, 257, 3, True), (1, 1, 1, False), (33, 3, 1, True)]
)
def test_step_and_fit_match_torch_sgd(backend_device, opts, n, d, o, bias):
    backend, device = backend_device
    x, y = _data(n, d, o, device, dtype=torch.float64)
    lr = 0.05
    m, opt = _stock(d, o, bias, 7, device, torch.float64, lr=lr, **opts)
    _stock_steps(m, opt, x, y, 6)
    torch.manual_seed(7)
    reg_step = FusedLinearRegressor(
        d, o, bias=bias, lr=lr, backend=backend, device=device, dtype=torch.float64, **opts
    )
    losses = [reg_step.step(x, y) for _ in range(6)]
    assert losses[0].shape == () and losses[0].dtype == torch.float64
    torch.manual_seed(7)
    reg_fit = FusedLinearRegressor(
        d, o, bias=bias, lr=lr, backend=backend, device=device, dtype=torch.float64, **opts
    )
    reg_fit.fit(x, y, epochs=6)
    for reg in (reg_step, reg_fit):
        assert_rel_close(reg.weight, m.weight, torch.float64, what="weight")
        if bias:
            assert_rel_close(reg.bias, m.bias, torch.float64, what="bias")
    torch.testing.assert_close(reg_fit.loss_history_, torch.stack(losses).cpu(), rtol=1e-12, atol=0)


def test_step_float32_odd_shapes_and_sample_weight(backend_device):
    backend, device = backend_device
    n, d, o = 4097, 3, 17
    x, y = _data(n, d, o, device)
    sw = torch.rand(n, device=device) + 0.1
    m, opt = _stock(d, o, True, 3, device, momentum=0.9, lr=0.02)
    _stock_steps(m, opt, x.double().float(), y, 5, sample_weight=sw)
    torch.manual_seed(3)
    reg = FusedLinearRegressor(d, o, lr=0.02, momentum=0.9, backend=backend, device=device)
    for _ in range(5):
        reg.step(x, y, sample_weight=sw)
    assert_rel_close(reg.weight, m.weight, torch.float32, what="weight")
    assert_rel_close(reg.bias, m.bias, torch.float32, what="bias")


def test_fit_sample_weight_matches_weighted_loop(backend_device):
    backend, device = backend_device
    x, y = _data(50, 4, 2, device, dtype=torch.float64)
    sw = torch.rand(50, device=device, dtype=torch.float64)
    m, opt = _stock(4, 2, True, 5, device, torch.float64, lr=0.1)
    _stock_steps(m, opt, x, y, 20, sample_weight=sw)
    torch.manual_seed(5)
    reg = FusedLinearRegressor(4, 2, lr=0.1, backend=backend, device=device, dtype=torch.float64)
    reg.fit(x, y, epochs=20, sample_weight=sw.cpu().numpy())
    assert_rel_close(reg.weight, m.weight, torch.float64)
    assert_rel_close(reg.bias, m.bias, torch.float64)


def _replay_minibatch(reg, x, y, epochs, bs, seed, shuffle=True):
    """Mini-batch fit as documented in fastlin.regressor: blocks of fit_block_epochs(N, D) epochs,
    block b drawing each epoch's torch.randperm from a generator seeded with block_seed(seed, b)."""
    n = x.shape[0]
    block = R.fit_block_epochs(n, x.shape[1])
    first = reg._first_step
    gen = None
    losses = []
    for e in range(epochs):
        if shuffle:
            if e % block == 0:
                gen = torch.Generator(device=x.device).manual_seed(R.block_seed(seed, e // block))
            order = torch.randperm(n, generator=gen, device=x.device)
        else:
            order = torch.arange(n, device=x.device)
        total = 0.0
        for start in range(0, n, bs):
            rows = order[start : start + bs]
            loss = ops.train_step(
                x[rows],
                y[rows],
                reg.weight.data,
                reg.bias.data,
                reg.weight_momentum,
                reg.bias_momentum,
                None,
                lr=reg.lr,
                momentum=reg.momentum,
                dampening=reg.dampening,
                weight_decay=reg.weight_decay,
                nesterov=reg.nesterov,
                first_step=first,
                backend=reg.backend,
            )
            first = False
            total += float(loss) * rows.numel()
        losses.append(total / n)
    return torch.tensor(losses, dtype=torch.float64)


@pytest.mark.parametrize("shuffle", [True, False])
def test_minibatch_fit_equals_train_steps_in_the_same_order(backend_device, shuffle):
    backend, device = backend_device
    n, d, o, bs = 300, 300, 2, 64  # block of 11 epochs: 13 epochs span two op calls
    x, y = _data(n, d, o, device)
    assert R.fit_block_epochs(n, d) == 11
    torch.manual_seed(11)
    a = FusedLinearRegressor(d, o, lr=0.01, momentum=0.9, backend=backend, device=device)
    b = copy.deepcopy(a)
    a.fit(x, y, epochs=13, batch_size=bs, shuffle=shuffle, seed=1234)
    hist = _replay_minibatch(b, x, y, 13, bs, 1234, shuffle)
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a.bias, b.bias, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a.weight_momentum, b.weight_momentum, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a.loss_history_.double(), hist, rtol=1e-5, atol=1e-7)
    assert a.seed_ == (1234 if shuffle else None)


@pytest.mark.parametrize("batch_size,shuffle", [(None, True), (100, True), (100, False)])
def test_chunked_progress_fit_is_identical_to_one_call(
    backend_device, monkeypatch, capsys, batch_size, shuffle
):
    backend, device = backend_device
    x, y = _data(1024, 256, 3, device)  # shuffled block: 4 epochs per op call
    torch.manual_seed(2)
    one = FusedLinearRegressor(256, 3, lr=0.01, momentum=0.5, backend=backend, device=device)
    chunked = copy.deepcopy(one)
    one.fit(x, y, epochs=11, batch_size=batch_size, shuffle=shuffle, seed=99, progress=False)
    monkeypatch.setattr(R, "_CHUNK_SECONDS", 1e-12)  # one block (or one epoch) per chunk
    monkeypatch.setattr(R, "_SMALL_FIT_WORK", 1)  # a first chunk of one epoch (one block if shuffled)
    calls = []
    real_fit = ops.fit
    monkeypatch.setattr(ops, "fit", lambda *a, **k: calls.append(k["epochs"]) or real_fit(*a, **k))
    chunked.fit(x, y, epochs=11, batch_size=batch_size, shuffle=shuffle, seed=99, progress=True)
    assert len(calls) > 2 and sum(calls) == 11, calls
    assert torch.equal(one.weight, chunked.weight) and torch.equal(one.bias, chunked.bias)
    assert torch.equal(one.weight_momentum, chunked.weight_momentum)
    assert torch.equal(one.loss_history_, chunked.loss_history_)
    assert "fastlin fit" in capsys.readouterr().err  # the tqdm bar


def test_progress_default_off_for_small_fits(monkeypatch):
    calls = []
    real_fit = ops.fit
    monkeypatch.setattr(ops, "fit", lambda *a, **k: calls.append(k["epochs"]) or real_fit(*a, **k))
    x, y = _seed_data()
    FusedLinearRegressor(1).fit(x, y, epochs=1000)
    assert calls == [1000], "a small fit is one op call"


def test_progress_default_on_when_estimated_long(monkeypatch, capsys):
    """progress=None times a first chunk and shows the bar when the rest is estimated > the threshold."""
    monkeypatch.setattr(R, "_SMALL_FIT_WORK", 1)
    monkeypatch.setattr(R, "_PROGRESS_SECONDS", 0.0)
    x, y = _seed_data()
    reg = FusedLinearRegressor(1).fit(x, y, epochs=50)
    assert "fastlin fit" in capsys.readouterr().err and reg.loss_history_.shape == (50,)
    monkeypatch.setattr(R, "_PROGRESS_SECONDS", 1e9)
    FusedLinearRegressor(1).fit(x, y, epochs=50)
    assert "fastlin fit" not in capsys.readouterr().err


def test_seed_none_follows_torch_manual_seed():
    x, y = _data(64, 3, 1)
    regs = []
    for _ in range(2):
        torch.manual_seed(5)
        regs.append(FusedLinearRegressor(3).fit(x, y, epochs=3, batch_size=8))
    assert regs[0].seed_ == regs[1].seed_ is not None
    assert torch.equal(regs[0].weight, regs[1].weight)


# ------------------------------------------------------------------------------------------------
# inputs and outputs


def test_numpy_inputs_match_tensors():
    x, y = _data(40, 3, 2)
    torch.manual_seed(0)
    a = FusedLinearRegressor(3, 2).fit(x, y, epochs=5)
    torch.manual_seed(0)
    b = FusedLinearRegressor(3, 2).fit(x.double().numpy(), y.double().numpy(), epochs=5)  # float64 -> float32
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    p = b.predict(x.numpy())
    assert isinstance(p, torch.Tensor) and p.shape == (40, 2) and p.dtype == torch.float32
    assert b.score(x.numpy(), y.numpy()) == pytest.approx(a.score(x, y), abs=1e-12)


def test_y_1d_and_column_train_alike_and_predict_follows_sklearn():
    x, y = _data(30, 2, 1)
    torch.manual_seed(0)
    a = FusedLinearRegressor(2).fit(x, y[:, 0], epochs=4)
    torch.manual_seed(0)
    b = FusedLinearRegressor(2).fit(x, y, epochs=4)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert a.predict(x).shape == (30,), "fit on a 1-D y predicts (N,) like sklearn"
    assert b.predict(x).shape == (30, 1)
    assert a(x).shape == (30, 1), "forward is nn.Linear's: always (N, out_features)"
    assert FusedLinearRegressor(2).predict(x).shape == (30, 1), "before any fit: (N, out_features)"
    a.step(x, y)
    assert a.predict(x).shape == (30, 1), "the last fit/step decides"


@pytest.mark.parametrize(
    "o,y_shape,match",
    [
        (1, (29,), r"y must have shape \(30,\) or \(30, 1\)"),
        (1, (30, 2), r"y must have shape \(30,\) or \(30, 1\)"),
        (1, (30, 1, 1), r"y must have shape \(30,\) or \(30, 1\)"),
        (3, (30,), r"y must have shape \(30, 3\)"),
        (3, (30, 1), r"y must have shape \(30, 3\)"),
        (3, (1, 3), r"y must have shape \(30, 3\)"),
    ],
)
def test_y_shape_mismatch_raises_and_changes_nothing(o, y_shape, match):
    x, _ = _data(30, 2, o)
    reg = FusedLinearRegressor(2, o, momentum=0.9)
    reg.fit(x, torch.zeros(30, o), epochs=2)
    before = _state(reg)
    for call in (
        lambda: reg.fit(x, torch.zeros(y_shape), epochs=2),
        lambda: reg.step(x, torch.zeros(y_shape)),
        lambda: reg.score(x, torch.zeros(y_shape)),
    ):
        with pytest.raises(ValueError, match=match):
            call()
    _assert_state_equal(before, _state(reg))


def test_bad_inputs_leave_parameters_and_momentum_unchanged():
    x, y = _data(20, 3, 2)
    reg = FusedLinearRegressor(3, 2, momentum=0.9, nesterov=True)
    fresh = _state(reg)
    bad_calls = [
        (lambda: reg.fit(x[:, :2], y), ValueError, r"x must have shape \(N, 3\)"),
        (lambda: reg.fit(x[:, 0], y), ValueError, "x must be 2-D"),
        (lambda: reg.fit(x[:0], y[:0]), ValueError, "at least one row"),
        (lambda: reg.fit(x, y, epochs=-1), ValueError, "epochs must be an int >= 0"),
        (lambda: reg.fit(x, y, epochs=2.5), ValueError, "epochs must be an int"),
        (lambda: reg.fit(x, y, batch_size=0), ValueError, "batch_size must be None or an int >= 1"),
        (lambda: reg.fit(x, y, seed="a"), TypeError, "seed must be None or an int"),
        (
            lambda: reg.fit(x, y, sample_weight=torch.ones(19)),
            ValueError,
            r"sample_weight must have shape \(20,\)",
        ),
        (lambda: reg.fit("abc", y), TypeError, "x must be a tensor or an array"),
        (lambda: reg.step(x[:0], y[:0]), ValueError, "at least one row"),
        (lambda: reg.step(x, y[:19]), ValueError, "y must have shape"),
        (lambda: reg.step(x, object()), TypeError, "y must be a tensor or an array"),
    ]
    for call, exc, match in bad_calls:
        with pytest.raises(exc, match=match):
            call()
        _assert_state_equal(fresh, _state(reg))
    reg.fit(x, y, epochs=3, batch_size=7, seed=0)  # now with live momentum and first_step False
    trained = _state(reg)
    assert trained[1] is False
    for call, exc, match in bad_calls:
        with pytest.raises(exc, match=match):
            call()
        _assert_state_equal(trained, _state(reg))


def test_dtype_and_device_conversion_and_bf16_input():
    x, y = _data(512, 8, 2)
    torch.manual_seed(0)
    ref = FusedLinearRegressor(8, 2, lr=0.05)
    dbl = copy.deepcopy(ref).double()  # Module.double() converts parameters (and buffers)
    ref.fit(x, y, epochs=30)
    torch.manual_seed(0)
    low = FusedLinearRegressor(8, 2, lr=0.05).fit(x.bfloat16(), y.bfloat16(), epochs=30)  # fp32 params
    assert low.weight.dtype == torch.float32
    # bf16 inputs (8-bit mantissa) with fp32 accumulation: the trained weights move by ~1e-3 relative.
    assert_rel_close(low.weight, ref.weight, torch.bfloat16)
    dbl.fit(x, y, epochs=30)  # float32 data converted to the parameters' float64
    assert dbl.weight.dtype == torch.float64 and dbl.loss_history_.dtype == torch.float64
    assert_rel_close(ref.weight, dbl.weight, torch.float32)


# ------------------------------------------------------------------------------------------------
# score / evaluate


@pytest.mark.parametrize("o", [1, 3])
@pytest.mark.parametrize("weighted", [False, True])
def test_score_and_evaluate_match_sklearn(o, weighted):
    metrics = pytest.importorskip("sklearn.metrics")
    x, y = _data(200, 4, o, noise=1.0)
    reg = FusedLinearRegressor(4, o, lr=0.1).fit(x, y, epochs=20)
    sw = torch.rand(200) if weighted else None
    pred = reg.predict(x).double().numpy()
    yy = y.double().numpy()
    swn = None if sw is None else sw.double().numpy()
    r2 = metrics.r2_score(yy, pred, sample_weight=swn)  # multi-output: uniform average
    mse = metrics.mean_squared_error(yy, pred, sample_weight=swn)
    assert reg.score(x, y, sample_weight=sw) == pytest.approx(r2, rel=1e-9, abs=1e-12)
    ev = reg.evaluate(x, y, sample_weight=sw)
    assert set(ev) == {"mse", "r2"}
    assert ev["r2"] == pytest.approx(r2, rel=1e-9, abs=1e-12)
    assert ev["mse"] == pytest.approx(mse, rel=1e-9)
    if o == 1:
        assert reg.score(x, y[:, 0]) == pytest.approx(metrics.r2_score(yy[:, 0], pred[:, 0]), rel=1e-9)


def test_score_constant_target_like_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    x = torch.randn(10, 2)
    reg = FusedLinearRegressor(2, 2)
    with torch.no_grad():
        reg.weight.zero_()
        reg.bias.copy_(torch.tensor([1.0, 0.0]))
    y = torch.stack([torch.ones(10), torch.full((10,), 5.0)], 1)  # constant targets: one hit, one miss
    want = metrics.r2_score(y.numpy(), reg.predict(x).numpy())
    assert reg.score(x, y) == pytest.approx(want) == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------
# state


@pytest.mark.parametrize(
    "opts", [{"momentum": 0.9, "nesterov": True}, {"momentum": 0.5, "dampening": 0.5}, {}]
)
def test_state_dict_round_trip_mid_training_continues_identically(backend_device, opts):
    backend, device = backend_device
    x, y = _data(256, 5, 2, device)
    torch.manual_seed(0)
    a = FusedLinearRegressor(5, 2, lr=0.02, backend=backend, device=device, **opts)
    a.fit(x, y, epochs=3, batch_size=32, seed=1)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    a.fit(x, y, epochs=4, batch_size=32, seed=2)
    a.step(x, y)

    torch.manual_seed(123)  # a different initialisation, then overwritten by the saved state
    b = FusedLinearRegressor(5, 2, lr=0.02, backend=backend, device=device, **opts)
    buf.seek(0)
    b.load_state_dict(torch.load(buf))  # weights_only load: the extra state is plain Python
    assert b._first_step is False
    b.fit(x, y, epochs=4, batch_size=32, seed=2)
    b.step(x, y)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    if opts:
        assert torch.equal(a.weight_momentum, b.weight_momentum) and torch.equal(
            a.bias_momentum, b.bias_momentum
        )
        assert set(a.state_dict()) == {"weight", "bias", "weight_momentum", "bias_momentum", "_extra_state"}
    else:
        assert set(a.state_dict()) == {"weight", "bias", "_extra_state"}


def test_first_step_is_saved_before_any_training():
    """A fresh model's state says first_step: loading it into a trained model restarts momentum."""
    x, y = _data(16, 2, 1)
    torch.manual_seed(0)
    fresh = FusedLinearRegressor(2, momentum=0.9)
    sd = copy.deepcopy(fresh.state_dict())
    fresh.fit(x, y, epochs=3)
    trained = FusedLinearRegressor(2, momentum=0.9).fit(x, y, epochs=2)
    trained.load_state_dict(sd)
    assert trained._first_step is True
    trained.fit(x, y, epochs=3)
    assert torch.equal(trained.weight, fresh.weight)


def test_reset_parameters_and_epochs_zero():
    x, y = _data(16, 2, 1)
    torch.manual_seed(4)
    reg = FusedLinearRegressor(2, momentum=0.9)
    init = _state(reg)
    reg.fit(x, y, epochs=0)
    assert reg.loss_history_.shape == (0,)
    _assert_state_equal(init, _state(reg))
    reg.fit(x, y, epochs=2)
    torch.manual_seed(4)
    reg.reset_parameters()
    _assert_state_equal(init, _state(reg))


def test_forward_is_differentiable():
    reg = FusedLinearRegressor(3, 2)
    x = torch.randn(4, 5, 3, requires_grad=True)
    out = reg(x)
    assert out.shape == (4, 5, 2)
    out.sum().backward()
    assert x.grad is not None and reg.weight.grad is not None


# ------------------------------------------------------------------------------------------------
# non-finite data and divergence


@pytest.mark.parametrize("where", ["x", "y", "sample_weight"])
def test_nan_data_raises_naming_epoch_and_row_with_params_restored(backend_device, where):
    backend, device = backend_device
    x, y = _data(60, 3, 1, device)
    sw = torch.ones(60, device=device)
    {"x": x, "y": y, "sample_weight": sw}[where][25] = float("nan") if where != "y" else float("inf")
    torch.manual_seed(0)
    reg = FusedLinearRegressor(3, lr=0.05, momentum=0.9, backend=backend, device=device)
    replay = copy.deepcopy(reg)
    # Unshuffled batches of 10: steps 0 and 1 of epoch 0 apply, step 2 (rows 20..29) is the first bad one.
    with pytest.raises(FloatingPointError, match=rf"epoch 0 .*{where}\[25\]") as info:
        reg.fit(x, y, epochs=5, batch_size=10, shuffle=False, sample_weight=sw)
    assert info.value.epoch == 0 and info.value.rows == {where: 25}
    assert torch.isfinite(reg.weight).all() and torch.isfinite(reg.bias).all()
    for rows in (slice(0, 10), slice(10, 20)):
        replay.step(x[rows], y[rows], sample_weight=sw[rows])
    torch.testing.assert_close(reg.weight, replay.weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(reg.bias, replay.bias, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(reg.weight_momentum, replay.weight_momentum, rtol=1e-6, atol=1e-7)
    assert reg._first_step is False and reg.loss_history_.shape == (0,) and reg.n_iter_ == 0


def test_nan_on_the_very_first_step_leaves_everything_as_before(backend_device):
    backend, device = backend_device
    x, y = _data(20, 2, 1, device)
    x[0, 1] = float("nan")
    reg = FusedLinearRegressor(2, momentum=0.9, backend=backend, device=device)
    before = _state(reg)
    for kwargs in ({}, {"batch_size": 5, "shuffle": False}):
        with pytest.raises(FloatingPointError, match=r"epoch 0 .*x\[0\]"):
            reg.fit(x, y, epochs=3, **kwargs)
        _assert_state_equal(before, _state(reg))


def test_divergence_raises_with_the_last_finite_parameters(backend_device):
    backend, device = backend_device
    x, y = _data(64, 4, 2, device)
    x = x * 10
    torch.manual_seed(0)
    reg = FusedLinearRegressor(4, 2, lr=1.0, backend=backend, device=device)
    replay = copy.deepcopy(reg)
    with pytest.raises(FloatingPointError, match="diverged: lower lr") as info:
        reg.fit(x, y, epochs=1000)
    e = info.value.epoch
    assert 0 < e < 1000 and info.value.rows == {}
    assert torch.isfinite(reg.weight).all() and torch.isfinite(reg.bias).all()
    assert reg.loss_history_.shape == (e,) and torch.isfinite(reg.loss_history_).all()
    replay.fit(x, y, epochs=e)  # the same e full-batch steps, all finite
    assert torch.equal(reg.weight, replay.weight) and torch.equal(reg.bias, replay.bias)
