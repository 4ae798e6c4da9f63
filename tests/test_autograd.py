"""fastlin.autograd Functions: float64 gradcheck on every backend that takes float64, and backward
computing only what is needed (needs_input_grad -> output_mask -> None gradients)."""

import itertools

import pytest
import torch
from conftest import assert_rel_close
from torch.utils._python_dispatch import TorchDispatchMode

import fastlin
from fastlin.autograd import LinearFunction, LinearMSELossFunction, MSELossFunction

F64 = torch.float64


def _f64_or_skip(backend, device):
    """Skip (with the backend's own message) where a backend rejects float64 by design."""
    x = torch.randn(2, 3, dtype=F64, device=device)
    try:
        fastlin.ops.linear(x, torch.randn(1, 3, dtype=F64, device=device), None, backend=backend)
    except TypeError as e:
        if "float64" in str(e) or "Double" in str(e) or "dtype" in str(e):
            pytest.skip(f"backend {backend} does not take float64: {e}")
        raise


def leaf(*shape, device, requires_grad=True):
    return torch.randn(shape, dtype=F64, device=device, requires_grad=requires_grad)


# ---------------------------------------------------------------------------------------------
# gradcheck


@pytest.mark.parametrize("N, D, O", [(1, 1, 1), (7, 3, 5), (5, 17, 3)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradcheck_linear(backend_device, N, D, O, bias):
    backend, device = backend_device
    _f64_or_skip(backend, device)
    x, w = leaf(N, D, device=device), leaf(O, D, device=device)
    b = leaf(O, device=device) if bias else None
    assert torch.autograd.gradcheck(lambda x, w, b: LinearFunction.apply(x, w, b, backend), (x, w, b))


@pytest.mark.parametrize("shape", [(), (1,), (7,), (7, 3), (2, 3, 4)], ids=["0d", "1", "7", "7x3", "2x3x4"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_gradcheck_mse_loss(backend_device, shape, reduction):
    backend, device = backend_device
    _f64_or_skip(backend, device)
    x, t = leaf(*shape, device=device), leaf(*shape, device=device)
    assert torch.autograd.gradcheck(lambda x, t: MSELossFunction.apply(x, t, reduction, backend), (x, t))


@pytest.mark.parametrize("N, D, O", [(1, 1, 1), (7, 3, 5), (5, 17, 3)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradcheck_linear_mse_loss(backend_device, N, D, O, bias, reduction):
    backend, device = backend_device
    _f64_or_skip(backend, device)
    x, w, t = leaf(N, D, device=device), leaf(O, D, device=device), leaf(N, O, device=device)
    b = leaf(O, device=device) if bias else None

    def f(x, w, b, t):
        return LinearMSELossFunction.apply(x, w, b, t, reduction, backend)

    assert torch.autograd.gradcheck(f, (x, w, b, t))


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_gradcheck_functional_any_shape(backend_device, reduction):
    """The any-shape wrappers of fastlin.functional (3-D input, 'none' composes two Functions)."""
    backend, device = backend_device
    _f64_or_skip(backend, device)
    x, w, b, t = (
        leaf(2, 3, 4, device=device),
        leaf(5, 4, device=device),
        leaf(5, device=device),
        leaf(2, 3, 5, device=device),
    )

    def f(x, w, b, t):
        return fastlin.functional.linear_mse_loss(x, w, b, t, reduction, backend=backend)

    assert torch.autograd.gradcheck(f, (x, w, b, t))
    assert torch.autograd.gradcheck(
        lambda x, w, b: fastlin.functional.linear(x, w, b, backend=backend), (x, w, b)
    )


# ---------------------------------------------------------------------------------------------
# backward computes only what is needed


class RecordMasks(TorchDispatchMode):
    """Records the output_mask of every fastlin op call (any namespace: fastlin, fastlin_triton)."""

    def __init__(self):
        super().__init__()
        self.calls = []  # (op name, output_mask or None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        schema = func._schema
        if schema.name.split("::")[0].startswith("fastlin"):
            names = [a.name for a in schema.arguments]
            bound = dict(zip(names, args), **kwargs)
            mask = bound.get("output_mask")
            self.calls.append((schema.name.split("::")[1], None if mask is None else tuple(mask)))
        return func(*args, **kwargs)


def _masks(rec, op):
    return [m for name, m in rec.calls if name == op]


# (bias, needs) with something to differentiate (a bias-less layer has no bias gradient to need)
LINEAR_NEEDS = [
    (bias, c)
    for bias in (True, False)
    for c in itertools.product([False, True], repeat=3)
    if c[0] or c[1] or bias and c[2]
]


@pytest.mark.parametrize(
    "bias, needs",
    LINEAR_NEEDS,
    ids=[
        ("bias-" if b else "nobias-") + "".join("xwb"[i] for i in range(3) if c[i]) for b, c in LINEAR_NEEDS
    ],
)
def test_linear_backward_only_what_is_needed(backend_device, bias, needs):
    backend, device = backend_device
    x = leaf(7, 3, device=device, requires_grad=needs[0])
    w = leaf(5, 3, device=device, requires_grad=needs[1])
    b = leaf(5, device=device, requires_grad=needs[2]) if bias else None
    g = torch.randn(7, 5, dtype=F64, device=device)
    with RecordMasks() as rec:
        y = LinearFunction.apply(x, w, b, backend)
        y.backward(g)
    want = (needs[0], needs[1], bias and needs[2])
    if backend != "reference":  # the kernels see exactly the gradients autograd needs
        assert _masks(rec, "linear_backward") == [want]
    ref_inputs = [t.detach().requires_grad_(t.requires_grad) if t is not None else None for t in (x, w, b)]
    torch.nn.functional.linear(*ref_inputs).backward(g)
    for name, t, r, need in zip("xwb", (x, w, b), ref_inputs, want):
        if t is None:
            continue
        if need:
            assert_rel_close(t.grad, r.grad, F64, what=f"grad {name}")
        else:
            assert t.grad is None, f"grad {name} computed although not needed"


NEEDS4 = [c for c in itertools.product([False, True], repeat=4) if any(c)]


@pytest.mark.parametrize("needs", NEEDS4, ids=["".join("xwbt"[i] for i in range(4) if c[i]) for c in NEEDS4])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_mse_loss_computes_only_what_is_needed(backend_device, needs, reduction):
    backend, device = backend_device
    x = leaf(7, 3, device=device, requires_grad=needs[0])
    w = leaf(5, 3, device=device, requires_grad=needs[1])
    b = leaf(5, device=device, requires_grad=needs[2])
    t = leaf(7, 5, device=device, requires_grad=needs[3])
    gout = torch.randn((), dtype=F64, device=device)
    with RecordMasks() as rec:
        loss = LinearMSELossFunction.apply(x, w, b, t, reduction, backend)
        loss.backward(gout)
    if backend != "reference":
        assert _masks(rec, "linear_mse_loss") == [needs]  # gradients computed in forward: only those
    refs = [a.detach().requires_grad_(a.requires_grad) for a in (x, w, b, t)]
    torch.nn.functional.mse_loss(
        torch.nn.functional.linear(*refs[:3]), refs[3], reduction=reduction
    ).backward(gout)
    for name, a, r, need in zip("xwbt", (x, w, b, t), refs, needs):
        if need:
            assert_rel_close(a.grad, r.grad, F64, what=f"grad {name}")
        else:
            assert a.grad is None, f"grad {name} computed although not needed"


def test_linear_mse_loss_no_grad_computes_no_gradients(backend_device):
    backend, device = backend_device
    if backend == "reference":
        pytest.skip("the op-level output_mask is observable on the kernel backends only")
    x, w, b, t = (
        leaf(7, 3, device=device),
        leaf(5, 3, device=device),
        leaf(5, device=device),
        leaf(7, 5, device=device),
    )
    with RecordMasks() as rec, torch.no_grad():
        fastlin.functional.linear_mse_loss(x, w, b, t, backend=backend)
        fastlin.nn.LinearMSELoss(3, 5, device=device, dtype=F64, backend=backend)(x, t)
    assert _masks(rec, "linear_mse_loss") == [(False,) * 4] * 2


@pytest.mark.parametrize(
    "needs", [(True, False), (False, True), (True, True)], ids=["input", "target", "both"]
)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_mse_loss_grads_where_needed(backend_device, needs, reduction):
    backend, device = backend_device
    x = leaf(7, 3, device=device, requires_grad=needs[0])
    t = leaf(7, 3, device=device, requires_grad=needs[1])
    loss = MSELossFunction.apply(x, t, reduction, backend)
    g = torch.randn(loss.shape, dtype=F64, device=device)
    with RecordMasks() as rec:
        loss.backward(g)
    if backend != "reference":
        assert len(_masks(rec, "mse_loss_backward")) == 1  # one kernel call serves both gradients
    refs = [a.detach().requires_grad_(a.requires_grad) for a in (x, t)]
    torch.nn.functional.mse_loss(*refs, reduction=reduction).backward(g)
    for name, a, r, need in zip(("input", "target"), (x, t), refs, needs):
        if need:
            assert_rel_close(a.grad, r.grad, F64, what=f"grad {name}")
        else:
            assert a.grad is None


@pytest.mark.parametrize("fn", ["linear", "mse_loss", "linear_mse_loss"])
def test_backward_twice_with_retain_graph(backend_device, fn):
    """A second backward over a retained graph adds the same gradients again: saved tensors (the
    fused op saves its gradients) must not be modified in place by backward."""
    backend, device = backend_device
    x, w, b, t = (
        leaf(7, 3, device=device),
        leaf(5, 3, device=device),
        leaf(5, device=device),
        leaf(7, 5, device=device),
    )
    if fn == "linear":
        out = LinearFunction.apply(x, w, b, backend)
        g = torch.randn(7, 5, dtype=F64, device=device)
        inputs = (x, w, b)
    elif fn == "mse_loss":
        out = MSELossFunction.apply(x @ w.T, t, "mean", backend)
        g = torch.randn((), dtype=F64, device=device)
        inputs = (w, t)
    else:
        out = LinearMSELossFunction.apply(x, w, b, t, "mean", backend)
        g = torch.randn((), dtype=F64, device=device)
        inputs = (x, w, b, t)
    first = torch.autograd.grad(out, inputs, g, retain_graph=True)
    second = torch.autograd.grad(out, inputs, g * 3)
    for a, c in zip(first, second):
        assert_rel_close(c, 3 * a, F64, what="second backward")
