"""Bad input raises a clear error naming the argument and what was expected, on every backend,
before anything is written: parameters, momentum buffers and optimizer state are unchanged."""

import contextlib
import copy

import pytest
import torch

import fastlin
from fastlin import functional as F


@contextlib.contextmanager
def raises(exc, *fragments, case=""):
    """pytest.raises(exc), and the message contains every fragment (argument name, expectation);
    a tuple fragment is satisfied by any of its spellings. ``case`` labels failures."""
    try:
        with pytest.raises(exc) as info:
            yield info
    except pytest.fail.Exception as e:
        raise AssertionError(f"{case}: {e}") from None
    msg = str(info.value)
    for f in fragments:
        alternatives = f if isinstance(f, tuple) else (f,)
        assert any(a in msg for a in alternatives), f"{case}: {f!r} not in error message: {msg}"


# The C++ checks print c10's ScalarType names, the Python twins torch's: either names the dtype.
F64_NAME = ("torch.float64", "Double")
F32_NAME = ("torch.float32", "Float")
I64_NAME = ("torch.int64", "Long")


def other_device(device):
    """A second device: the CPU for CUDA tensors, else 'meta' (no GPU here)."""
    return "cpu" if device == "cuda" else "meta"


def snapshot(*objs):
    """Deep copies of tensors / optimizer state, to prove nothing was written."""
    return [copy.deepcopy(o) for o in objs]


def assert_unchanged(before, *objs):
    for b, o in zip(before, objs):
        if isinstance(o, torch.Tensor) or o is None:
            assert (b is None and o is None) or torch.equal(b, o), "a tensor was modified by a failed call"
        elif isinstance(o, torch.optim.Optimizer):
            sb, so = b.state_dict(), o.state_dict()
            assert sb["param_groups"] == so["param_groups"]
            # (an empty entry is no state: torch's SGD creates them too, on reading self.state[p])
            assert {k for k, v in sb["state"].items() if v} == {k for k, v in so["state"].items() if v}
            for k in sb["state"]:
                for name, t in sb["state"][k].items():
                    assert torch.equal(t, so["state"][k][name]), f"optimizer state {k}.{name} was modified"
        else:
            raise AssertionError(type(o))


# ---------------------------------------------------------------------------------------------
# linear


def test_linear_feature_size_mismatch(backend_device):
    backend, device = backend_device
    m = fastlin.nn.Linear(3, 2, device=device, backend=backend)
    x = torch.randn(7, 4, device=device)
    before = snapshot(m.weight, m.bias)
    with raises(ValueError, "weight", "(out_features, 4)", "(2, 3)"):
        m(x)
    with raises(ValueError, "weight", "(out_features, 4)"):
        F.linear(x.reshape(7, 1, 4), m.weight, None, backend=backend)  # leading dims too
    assert_unchanged(before, m.weight, m.bias)


@pytest.mark.parametrize("shape", [(3,), (1, 2, 3), ()], ids=["1d", "3d", "0d"])
def test_linear_weight_of_wrong_rank(backend_device, shape):
    backend, device = backend_device
    x = torch.randn(7, 3, device=device)
    with raises(ValueError, "weight", "2-D", "(out_features, in_features)"):
        F.linear(x, torch.randn(shape, device=device), None, backend=backend)


def test_linear_input_of_wrong_rank_or_type(backend_device):
    backend, device = backend_device
    w = torch.randn(2, 3, device=device)
    with raises(ValueError, "input", "at least 1 dimension"):
        F.linear(torch.randn((), device=device), w, backend=backend)
    with raises(TypeError, "input", "torch.Tensor", "list"):
        F.linear([[1.0, 2.0, 3.0]], w, backend=backend)
    with raises(TypeError, "weight", "torch.Tensor"):
        F.linear(torch.randn(7, 3, device=device), [[1.0, 2.0, 3.0]], backend=backend)


@pytest.mark.parametrize("shape", [(3,), (2, 1), ()], ids=["wrong-size", "2d", "0d"])
def test_linear_bias_of_wrong_shape(backend_device, shape):
    backend, device = backend_device
    x, w = torch.randn(7, 3, device=device), torch.randn(2, 3, device=device)
    with raises(ValueError, "bias"):
        F.linear(x, w, torch.randn(shape, device=device), backend=backend)


def test_linear_dtype_mix(backend_device):
    backend, device = backend_device
    m = fastlin.nn.Linear(3, 2, device=device, backend=backend)
    with raises(TypeError, "weight", "dtype", F64_NAME, F32_NAME):
        m(torch.randn(7, 3, device=device, dtype=torch.float64))
    x = torch.randn(7, 3, device=device)
    with raises(TypeError, "bias", "dtype", F64_NAME):
        F.linear(x, m.weight, torch.randn(2, device=device, dtype=torch.float64), backend=backend)
    with raises(TypeError, "input", "float32, float64, bfloat16 or float16", I64_NAME):
        F.linear(torch.ones(7, 3, device=device, dtype=torch.long), m.weight.long(), backend=backend)


def test_linear_device_mix(backend_device):
    backend, device = backend_device
    other = other_device(device)
    x = torch.randn(7, 3, device=device)
    w = torch.randn(2, 3, device=device)
    with raises(RuntimeError, "weight", "device", other):
        F.linear(x, w.to(other), None, backend=backend)
    with raises(RuntimeError, "bias", "device", other):
        F.linear(x, w, torch.randn(2, device=other), backend=backend)


# ---------------------------------------------------------------------------------------------
# mse_loss and linear_mse_loss


@pytest.mark.parametrize("input_shape, target_shape", [((7,), (7, 1)), ((7, 1), (7,)), ((7, 3), (1, 3))])
def test_mse_loss_target_that_would_broadcast(backend_device, input_shape, target_shape):
    backend, device = backend_device
    x = torch.randn(input_shape, device=device, requires_grad=True)
    y = torch.randn(target_shape, device=device)
    shape = "(" + ", ".join(map(str, input_shape)) + ("," if len(input_shape) == 1 else "") + ")"
    with raises(ValueError, "target", shape, "broadcast"):
        fastlin.nn.MSELoss(backend=backend)(x, y)
    with raises(ValueError, "target", shape):
        F.mse_loss(x, y, reduction="none", backend=backend)
    assert x.grad is None


@pytest.mark.parametrize("reduction", ["avg", "Mean", "", "batchmean"])
def test_bad_reduction_strings(backend_device, reduction):
    backend, device = backend_device
    x, y = torch.randn(7, 3, device=device), torch.randn(7, 3, device=device)
    with pytest.raises(ValueError):  # torch rejects these too
        torch.nn.functional.mse_loss(x, y, reduction=reduction)
    with raises(ValueError, "reduction", "'none', 'mean' or 'sum'", repr(reduction)):
        fastlin.nn.MSELoss(reduction=reduction, backend=backend)(x, y)
    m = fastlin.nn.LinearMSELoss(3, 2, device=device, reduction=reduction, backend=backend)
    before = snapshot(m.weight, m.bias)
    with raises(ValueError, "reduction", repr(reduction)):
        m(x, torch.randn(7, 2, device=device))
    assert_unchanged(before, m.weight, m.bias)


def test_mse_loss_dtype_and_device_mix(backend_device):
    backend, device = backend_device
    x = torch.randn(7, 3, device=device)
    with raises(TypeError, "target", "dtype", F64_NAME):
        F.mse_loss(x, torch.randn(7, 3, device=device, dtype=torch.float64), backend=backend)
    other = other_device(device)
    with raises(RuntimeError, "target", "device", other):
        F.mse_loss(x, torch.randn(7, 3, device=other), backend=backend)


@pytest.mark.parametrize("shape", [(2,), (7, 2), (2, 7, 3), (7, 3, 1)])
def test_mse_loss_backward_grad_output_that_does_not_broadcast(backend_device, shape):
    """A grad_output that does not broadcast to input's shape (or would grow it) is refused with
    the same message on every backend; one of another dtype or device too."""
    backend, device = backend_device
    x, y = torch.randn(7, 3, device=device), torch.randn(7, 3, device=device)
    with raises(ValueError, "grad_output", "broadcastable to input's shape (7, 3)", str(shape)):
        fastlin.ops.mse_loss_backward(torch.randn(shape, device=device), x, y, "none", backend=backend)
    with raises(TypeError, "grad_output", "dtype", F64_NAME):
        fastlin.ops.mse_loss_backward(
            torch.randn((), device=device, dtype=torch.float64), x, y, "mean", backend=backend
        )
    other = other_device(device)
    with raises(RuntimeError, "grad_output", "device", other):
        fastlin.ops.mse_loss_backward(torch.randn(7, 3, device=other), x, y, "none", backend=backend)


@pytest.mark.parametrize("target_shape", [(7,), (7, 1, 1), (1, 2), (2, 7)])
def test_linear_mse_loss_target_shape(backend_device, target_shape):
    backend, device = backend_device
    out_features = 1 if target_shape == (7,) else 2
    m = fastlin.nn.LinearMSELoss(3, out_features, device=device, backend=backend)
    x = torch.randn(7, 3, device=device)
    before = snapshot(m.weight, m.bias)
    for reduction in ("mean", "none"):
        m.reduction = reduction
        with raises(ValueError, "target", f"(7, {out_features})"):
            m(x, torch.randn(target_shape, device=device))
    assert_unchanged(before, m.weight, m.bias)


def test_linear_mse_loss_mismatches(backend_device):
    backend, device = backend_device
    x, w, b, y = (
        torch.randn(7, 3, device=device),
        torch.randn(2, 3, device=device),
        torch.randn(2, device=device),
        torch.randn(7, 2, device=device),
    )
    with raises(ValueError, "weight", "(out_features, 4)"):
        F.linear_mse_loss(torch.randn(7, 4, device=device), w, b, y, backend=backend)
    with raises(ValueError, "weight", "2-D"):
        F.linear_mse_loss(x, w[0], b, torch.randn(7, device=device), backend=backend)
    with raises(TypeError, "dtype"):
        F.linear_mse_loss(x, w, b, y.double(), backend=backend)
    with raises(TypeError, "dtype"):
        F.linear_mse_loss(x.double(), w, b, y.double(), backend=backend)
    other = other_device(device)
    with raises(RuntimeError, "device", other):
        F.linear_mse_loss(x, w, b, y.to(other), backend=backend)
    with raises(RuntimeError, "device", other):
        F.linear_mse_loss(x, w.to(other), b, y, backend=backend)


# ---------------------------------------------------------------------------------------------
# fastlin.optim.SGD: torch's validation, same exception types; nothing written by a failed step

SGD_BAD = [
    dict(lr=-0.1),
    dict(lr=0.1, momentum=-0.5),
    dict(lr=0.1, weight_decay=-1e-2),
    dict(lr=0.1, momentum=0.0, nesterov=True),
    dict(lr=0.1, momentum=0.9, dampening=0.5, nesterov=True),
    dict(lr=torch.tensor([0.1, 0.2])),
]


@pytest.mark.parametrize(
    "kwargs",
    SGD_BAD,
    ids=[
        "neg-lr",
        "neg-momentum",
        "neg-wd",
        "nesterov-no-momentum",
        "nesterov-dampening",
        "tensor-lr-2-elems",
    ],
)
def test_sgd_invalid_options_like_torch(kwargs):
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(Exception) as torch_err:
        torch.optim.SGD([p], **kwargs)
    with pytest.raises(type(torch_err.value)) as err:
        fastlin.optim.SGD([p], **kwargs)
    assert type(err.value) is type(torch_err.value) is ValueError
    assert str(err.value) == str(torch_err.value)  # torch's own words: "Invalid learning rate: -0.1", ...


def _opt_with_state(backend, device, groups=1, momentum=0.9):
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in [(5, 3), (5,), (2,), (4, 4)]]
    if groups == 1:
        opt = fastlin.optim.SGD(params, lr=0.1, momentum=momentum, backend=backend)
    else:
        opt = fastlin.optim.SGD(
            [dict(params=params[:2]), dict(params=params[2:], lr=0.01)],
            lr=0.1,
            momentum=momentum,
            backend=backend,
        )
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # momentum buffers exist now
    for p in params:
        p.grad = torch.randn_like(p)
    return params, opt


@pytest.mark.parametrize("groups", [1, 2])
def test_sgd_step_with_bad_momentum_buffer_changes_nothing(backend_device, groups):
    backend, device = backend_device
    params, opt = _opt_with_state(backend, device, groups)
    opt.state[params[3]]["momentum_buffer"] = torch.randn(4, 5, device=device)  # wrong shape, last group
    before = snapshot(*params, opt)
    with raises(ValueError, "momentum_buffers", "(4, 4)", "(4, 5)"):
        opt.step()
    assert_unchanged(before, *params, opt)


def test_sgd_step_with_a_new_param_and_a_bad_buffer_changes_nothing(backend_device):
    """Two update calls in one group (a parameter on its first step + the others): both are checked
    before either writes."""
    backend, device = backend_device
    params, opt = _opt_with_state(backend, device)
    del opt.state[params[0]]  # params[0] takes its first momentum step now
    opt.state[params[3]]["momentum_buffer"] = torch.randn(3, device=device)
    before = snapshot(*params, opt)
    with raises(ValueError, "momentum_buffers", "(4, 4)"):
        opt.step()
    assert_unchanged(before, *params, opt)
    assert params[0] not in opt.state or "momentum_buffer" not in opt.state[params[0]]


@pytest.mark.parametrize("groups", [1, 2])
def test_sgd_sparse_grad_changes_nothing(backend_device, groups):
    backend, device = backend_device
    if device == "meta":
        pytest.skip("no sparse meta tensors")
    params, opt = _opt_with_state(backend, device, groups)
    params[3].grad = torch.randn(4, 4, device=device).to_sparse()
    before = snapshot(*params, opt)
    with raises(RuntimeError, "sparse"):
        opt.step()
    assert_unchanged(before, *params, opt)


def test_sgd_rejects_torch_only_modes():
    p = torch.nn.Parameter(torch.randn(3))
    with raises(ValueError, "differentiable"):
        fastlin.optim.SGD([p], lr=0.1, differentiable=True)
    with raises(ValueError, "fused"):
        fastlin.optim.SGD([p], lr=0.1, fused=True)
    with raises(ValueError, "backend", "auto, cpp, cuda, triton, reference"):
        opt = fastlin.optim.SGD([p], lr=0.1, backend="fast")
        p.grad = torch.randn_like(p)
        opt.step()


# ---------------------------------------------------------------------------------------------
# the mutating ops: sgd_update_, train_step, fit


def _group(device, n_buf=3):
    ps = [torch.randn(s, device=device) for s in [(5, 3), (5,), (2,)]]
    gs = [torch.randn_like(p) for p in ps]
    bs = [torch.randn_like(p) for p in ps[:n_buf]]
    return ps, gs, bs


def test_sgd_update_bad_lists_change_nothing(backend_device):
    backend, device = backend_device
    other = other_device(device)
    cases = [
        ("grads", lambda ps, gs, bs: (ps, gs[:2], bs), ValueError, ["grads", "one tensor per parameter"]),
        (
            "buffers",
            lambda ps, gs, bs: (ps, gs, bs[:2]),
            ValueError,
            ["momentum_buffers", "one per parameter"],
        ),
        (
            "grad shape",
            lambda ps, gs, bs: (ps, gs[:2] + [torch.randn(3, device=device)], bs),
            ValueError,
            ["grads", "(2,)", "(3,)"],
        ),
        (
            "buffer shape",
            lambda ps, gs, bs: (ps, gs, bs[:2] + [torch.randn(1, 2, device=device)]),
            ValueError,
            ["momentum_buffers", "(2,)"],
        ),
        ("grad dtype", lambda ps, gs, bs: (ps, gs[:2] + [gs[2].double()], bs), TypeError, ["grads", "dtype"]),
        (
            "buffer dtype",
            lambda ps, gs, bs: (ps, gs, bs[:2] + [bs[2].double()]),
            TypeError,
            ["momentum_buffers", "dtype"],
        ),
        (
            "grad device",
            lambda ps, gs, bs: (ps, gs[:2] + [gs[2].to(other)], bs),
            RuntimeError,
            ["grads", "device"],
        ),
    ]
    for what, make, exc, fragments in cases:
        ps, gs, bs = _group(device)
        ps2, gs2, bs2 = make(ps, gs, bs)
        before = snapshot(*ps, *bs)
        with raises(exc, *fragments, case=what):
            F.sgd_update_(ps2, gs2, bs2, lr=0.1, momentum=0.9, backend=backend)
        assert_unchanged(before, *ps, *bs)
    ps, gs, _ = _group(device)
    before = snapshot(*ps)
    with raises(ValueError, "momentum_buffers", "empty when momentum == 0"):
        F.sgd_update_(ps, gs, [torch.randn_like(p) for p in ps], lr=0.1, momentum=0.0, backend=backend)
    assert_unchanged(before, *ps)


def _train_args(device, bias=True, momentum=True, n=9, d=3, o=2):
    x, y = torch.randn(n, d, device=device), torch.randn(n, o, device=device)
    w = torch.randn(o, d, device=device)
    b = torch.randn(o, device=device) if bias else None
    wm = torch.randn_like(w) if momentum else None
    bm = torch.randn_like(b) if momentum and bias else None
    return dict(input=x, target=y, weight=w, bias=b, weight_momentum=wm, bias_momentum=bm, sample_weight=None)


def _train_cases(device):
    other = other_device(device)
    return [
        ("target (N,)", dict(target=lambda a: a["target"][:, 0]), {}, ValueError, ["target", "(9, 2)"]),
        (
            "feature mismatch",
            dict(input=lambda a: torch.randn(9, 4, device=device)),
            {},
            ValueError,
            ["weight", "(out_features, 4)"],
        ),
        ("weight rank", dict(weight=lambda a: a["weight"][0]), {}, ValueError, ["weight", "2-D"]),
        ("bias shape", dict(bias=lambda a: torch.randn(3, device=device)), {}, ValueError, ["bias", "(2,)"]),
        ("dtype mix", dict(target=lambda a: a["target"].double()), {}, TypeError, ["target", "dtype"]),
        ("weight dtype", dict(weight=lambda a: a["weight"].double()), {}, TypeError, ["weight", "dtype"]),
        ("device mix", dict(target=lambda a: a["target"].to(other)), {}, RuntimeError, ["target", "device"]),
        ("no weight_momentum", dict(weight_momentum=lambda a: None), {}, ValueError, ["weight_momentum"]),
        ("no bias_momentum", dict(bias_momentum=lambda a: None), {}, ValueError, ["bias_momentum"]),
        (
            "buffer shape",
            dict(weight_momentum=lambda a: torch.randn(3, 2, device=device)),
            {},
            ValueError,
            ["weight_momentum", "(2, 3)"],
        ),
        (
            "sample_weight shape",
            dict(sample_weight=lambda a: torch.rand(8, device=device)),
            {},
            ValueError,
            ["sample_weight", "(9,)"],
        ),
        ("negative lr", {}, dict(lr=-0.1), ValueError, ["lr", ">= 0"]),
        ("negative momentum", {}, dict(momentum=-0.9), ValueError, ["momentum", ">= 0"]),
        ("negative weight_decay", {}, dict(weight_decay=-1e-2), ValueError, ["weight_decay", ">= 0"]),
        ("nesterov with dampening", {}, dict(nesterov=True, dampening=0.5), ValueError, ["nesterov"]),
        (
            "empty input",
            dict(
                input=lambda a: a["input"][:0], target=lambda a: a["target"][:0], sample_weight=lambda a: None
            ),
            {},
            ValueError,
            ["input", "at least one row"],
        ),
    ]


@pytest.mark.parametrize("op", ["train_step", "fit"])
def test_train_step_and_fit_bad_input_change_nothing(backend_device, op):
    backend, device = backend_device
    for what, replace, opts, exc, fragments in _train_cases(device):
        args = _train_args(device)
        mutated = [args["weight"], args["bias"], args["weight_momentum"], args["bias_momentum"]]
        before = snapshot(*mutated)
        call_args = dict(args)
        for k, f in replace.items():
            call_args[k] = f(args)
        sgd = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False)
        sgd.update(opts)
        extra = dict(epochs=2, batch_size=4) if op == "fit" else {}
        with raises(exc, *fragments, case=what):
            getattr(F, op)(**call_args, **sgd, **extra, backend=backend)
        assert_unchanged(before, *mutated)
    args = _train_args(device)
    if op == "fit":
        before = snapshot(args["weight"])
        with raises(ValueError, "epochs", ">= 0"):
            F.fit(**args, epochs=-1, lr=0.1, momentum=0.9, backend=backend)
        assert_unchanged(before, args["weight"])


# ---------------------------------------------------------------------------------------------
# backends


def test_unknown_and_unavailable_backend(backend_device):
    backend, device = backend_device
    x, w = torch.randn(7, 3, device=device), torch.randn(2, 3, device=device)
    with raises(ValueError, "backend", "auto, cpp, cuda, triton, reference", "'fast'"):
        F.linear(x, w, backend="fast")
    for name, (ok, why) in fastlin.backends.status().items():
        if not ok:
            with raises(RuntimeError, f"backend {name!r} is not available", why):
                F.linear(x, w, backend=name)
    if device == "cpu":
        for name in ("cuda",):
            if fastlin.backends.status()[name][0]:
                with raises(RuntimeError, "CUDA tensors"):
                    F.linear(x, w, backend=name)
