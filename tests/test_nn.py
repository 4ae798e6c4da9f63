"""fastlin.nn drop-ins against torch.nn: Linear, MSELoss, LinearMSELoss.

Every output and gradient is checked against torch's own module evaluated in float64 on the same
values (the oracle), with the per-dtype tolerances of conftest.REL_TOL, on every backend that runs
here. Construction (signature, RNG draws, state_dict) is checked for exact equality with torch.
"""

import copy
import inspect
import warnings

import pytest
import torch
from conftest import REL_TOL, assert_rel_close

import fastlin
from fastlin._checks import shape_str

NS = [1, 7, 4097]
DS = [1, 3, 257]
OS = [1, 3, 17]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
DTYPE_IDS = ["f32", "f64", "bf16"]
REDUCTIONS = ["none", "mean", "sum"]


def leaf64(t: torch.Tensor) -> torch.Tensor:
    """A float64 leaf with t's values (the oracle's copy), requiring grad like t."""
    return t.detach().to(torch.float64).requires_grad_(t.requires_grad)


def randn(*shape, dtype=torch.float32, device="cpu", requires_grad=False):
    return torch.randn(shape, dtype=dtype, device=device).requires_grad_(requires_grad)


def assert_close(out, ref, dtype, what, scale=None):
    """||out - ref|| <= REL_TOL[dtype] * max(||ref||, ||scale||), and NaN exactly where ref has NaN
    (e.g. the mean of an empty tensor).

    ``scale`` is the root-sum-square magnitude of the terms each output element sums, e.g.
    sqrt(|g|^2.T @ |x|^2) for g.T @ x. For random data it is about ||ref||, so it does not loosen
    the check; it only keeps a sum that happens to cancel (a single grad-weight element summing
    4097 random-sign products to 0.85 while its terms are ~64 in root-sum-square) from turning
    rounding that is fine relative to the terms into a large error relative to the result."""
    out, ref = out.detach(), ref.detach()
    out_nan, ref_nan = torch.isnan(out), torch.isnan(ref)
    assert torch.equal(out_nan.cpu(), ref_nan.cpu()), f"{what}: NaN where torch has none (or the reverse)"
    if ref_nan.any():
        out, ref = out[~out_nan], ref[~ref_nan]
        scale = None
    if scale is None:
        assert_rel_close(out, ref, dtype, what=what)
        return
    num = torch.linalg.vector_norm(out.double() - ref.double()).item()
    den = max(torch.linalg.vector_norm(ref.double()).item(), torch.linalg.vector_norm(scale.double()).item())
    err = num / den if den else num
    assert err <= REL_TOL[dtype], f"{what}: relative error {err:.3e} > {REL_TOL[dtype]:.1e} ({dtype})"


def linear_scales(x, w, b, g):
    """Root-sum-square term magnitudes (see assert_close) of y = x W^T + b and of its gradients for
    upstream gradient g, all float64: {"output", "grad input", "grad weight", "grad bias"}."""
    x2, w2, g2 = x.detach().double().square(), w.detach().double().square(), g.detach().double().square()
    x2, g2 = x2.reshape(-1, x2.shape[-1]), g2.reshape(-1, g2.shape[-1])
    y2 = x2 @ w2.T
    if b is not None:
        y2 = y2 + b.detach().double().square()
    return {
        "output": y2.sqrt(),
        "grad input": (g2 @ w2).sqrt(),
        "grad weight": (g2.T @ x2).sqrt(),
        "grad bias": g2.sum(0).sqrt(),
    }


# ---------------------------------------------------------------------------------------------
# Linear: construction


def _params(cls):
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}


@pytest.mark.parametrize(
    "fast, ref",
    [
        (fastlin.nn.Linear, torch.nn.Linear),
        (fastlin.nn.MSELoss, torch.nn.MSELoss),
    ],
    ids=["Linear", "MSELoss"],
)
def test_signature_matches_torch(fast, ref):
    fp, tp = _params(fast), _params(ref)
    # Every torch argument, in torch's order, with torch's default; fastlin adds keyword-only extras.
    assert list(fp)[: len(tp)] == list(tp)
    assert {k: fp[k] for k in tp} == tp
    extra = [k for k in fp if k not in tp]
    kinds = inspect.signature(fast.__init__).parameters
    assert all(kinds[k].kind is inspect.Parameter.KEYWORD_ONLY for k in extra), extra


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_linear_init_same_draws_as_torch(backend_device, bias, dtype):
    backend, device = backend_device
    torch.manual_seed(1234)
    ref = torch.nn.Linear(257, 17, bias=bias, device=device, dtype=dtype)
    after_ref = torch.rand(3, device=device)  # the RNG must also be left in the same state
    torch.manual_seed(1234)
    m = fastlin.nn.Linear(257, 17, bias=bias, device=device, dtype=dtype, backend=backend)
    after_m = torch.rand(3, device=device)
    assert isinstance(m, torch.nn.Linear)
    assert (m.in_features, m.out_features) == (257, 17)
    assert m.weight.dtype == dtype and m.weight.device.type == device
    assert torch.equal(m.weight, ref.weight)
    if bias:
        assert torch.equal(m.bias, ref.bias)
    else:
        assert m.bias is None
    assert torch.equal(after_m, after_ref)
    assert list(m.state_dict()) == list(ref.state_dict()) == (["weight", "bias"] if bias else ["weight"])
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert all(p.requires_grad for p in m.parameters())
    assert repr(m).startswith("Linear(in_features=257, out_features=17")


@pytest.mark.parametrize("bias", [True, False])
def test_linear_state_dict_interchangeable(backend_device, bias):
    backend, device = backend_device
    ref = torch.nn.Linear(7, 3, bias=bias, device=device)
    m = fastlin.nn.Linear(7, 3, bias=bias, device=device, backend=backend)
    x = randn(5, 7, device=device)
    # torch -> fastlin
    m.load_state_dict(ref.state_dict(), strict=True)
    assert_rel_close(m(x), ref(x).double(), torch.float32, what="fastlin after loading torch's state_dict")
    # fastlin -> torch
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p))
    ref2 = torch.nn.Linear(7, 3, bias=bias, device=device)
    ref2.load_state_dict(m.state_dict(), strict=True)
    for k, v in m.state_dict().items():
        assert torch.equal(ref2.state_dict()[k], v), k
    assert_rel_close(m(x), ref2(x).double(), torch.float32, what="torch after loading fastlin's state_dict")
    # torch.nn.Module plumbing: deepcopy and .to(dtype) keep the backend and the values
    m2 = copy.deepcopy(m).double()
    assert m2.backend == backend and m2.weight.dtype == torch.float64
    assert_rel_close(m2(x.double()), ref2.double()(x.double()), torch.float64, what="deepcopy().double()")


# ---------------------------------------------------------------------------------------------
# Linear: values and gradients over the odd-shape grid


def _check_linear(m, x, dtype, what):
    """Forward and backward of fastlin module m on x against torch.nn.Linear in float64."""
    ref = torch.nn.Linear(
        m.in_features, m.out_features, bias=m.bias is not None, dtype=torch.float64, device=x.device
    )
    with torch.no_grad():
        ref.weight.copy_(m.weight)
        if m.bias is not None:
            ref.bias.copy_(m.bias)
    x64 = leaf64(x)
    y = m(x)
    y64 = ref(x64)
    assert y.shape == y64.shape, f"{what}: output shape {tuple(y.shape)} != torch {tuple(y64.shape)}"
    assert y.dtype == dtype
    g = torch.randn_like(y64).to(dtype)  # a random upstream gradient, so backward must use it
    scales = linear_scales(x, m.weight, m.bias, g)
    assert_close(y, y64, dtype, f"{what}: output", scales["output"].reshape(y64.shape))
    y.backward(g)
    y64.backward(g.double())
    pairs = [("grad weight", m.weight.grad, ref.weight.grad)]
    if m.bias is not None:
        pairs.append(("grad bias", m.bias.grad, ref.bias.grad))
    if x.requires_grad:
        pairs.append(("grad input", x.grad, x64.grad))
    for name, got, want in pairs:
        assert got is not None, f"{what}: {name} missing"
        assert got.dtype == dtype and got.shape == want.shape, (
            f"{what}: {name} {got.dtype} {tuple(got.shape)}"
        )
        assert_close(got, want, dtype, f"{what}: {name}", scales[name].reshape(want.shape))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("O", OS)
@pytest.mark.parametrize("D", DS)
@pytest.mark.parametrize("N", NS)
def test_linear_matches_torch(backend_device, N, D, O, bias, dtype):
    backend, device = backend_device
    m = fastlin.nn.Linear(D, O, bias=bias, device=device, dtype=dtype, backend=backend)
    x = randn(N, D, dtype=dtype, device=device, requires_grad=True)
    _check_linear(m, x, dtype, f"N={N} D={D} O={O}")


def _noncontig_inputs(device):
    base = torch.randn(9, 2 * 257, device=device)
    return {
        "strided": base[:, ::2],  # row stride 514, column stride 2
        "transposed": torch.randn(257, 9, device=device).t(),  # column-major
        "expanded": torch.randn(1, 257, device=device).expand(9, 257),  # row stride 0
        "3d-permuted": torch.randn(257, 4, 3, device=device).permute(2, 1, 0),  # (3, 4, 257)
    }


@pytest.mark.parametrize("kind", ["strided", "transposed", "expanded", "3d-permuted"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear_noncontiguous_input(backend_device, kind, bias):
    backend, device = backend_device
    m = fastlin.nn.Linear(257, 17, bias=bias, device=device, backend=backend)
    x = _noncontig_inputs(device)[kind]
    assert not x.is_contiguous()
    x.requires_grad_(True)
    _check_linear(m, x, torch.float32, kind)


def test_linear_noncontiguous_weight(backend_device):
    """A weight that is a transposed view (e.g. tied to another layer's weight.T)."""
    backend, device = backend_device
    m = fastlin.nn.Linear(257, 17, device=device, backend=backend)
    w_t = torch.randn(257, 17, device=device)
    m.weight = torch.nn.Parameter(w_t.t())
    assert not m.weight.is_contiguous()
    _check_linear(m, randn(7, 257, device=device, requires_grad=True), torch.float32, "weight.T")


@pytest.mark.parametrize(
    "shape",
    [(3,), (1, 3), (2, 5, 3), (2, 1, 4, 3), (0, 3), (2, 0, 3)],
    ids=["1d", "1xD", "BxTxD", "4d", "empty", "empty-3d"],
)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_linear_any_leading_dims(backend_device, shape, bias, dtype):
    backend, device = backend_device
    m = fastlin.nn.Linear(3, 17, bias=bias, device=device, dtype=dtype, backend=backend)
    x = randn(*shape, dtype=dtype, device=device, requires_grad=True)
    ref_shape = torch.nn.functional.linear(x.detach(), m.weight.detach()).shape
    assert ref_shape == (*shape[:-1], 17)
    _check_linear(m, x, dtype, f"input {shape}")
    if x.numel() == 0:  # an empty batch contributes nothing: the kernels must write exact zeros
        assert torch.count_nonzero(m.weight.grad) == 0
        if bias:
            assert torch.count_nonzero(m.bias.grad) == 0


def test_linear_no_grad_and_inference_mode(backend_device):
    backend, device = backend_device
    m = fastlin.nn.Linear(257, 3, device=device, backend=backend)
    x = randn(7, 257, device=device)
    with torch.no_grad():
        y = m(x)
    assert not y.requires_grad
    with torch.inference_mode():
        y2 = m(x)
    ref = torch.nn.functional.linear(x.double(), m.weight.double(), m.bias.double())
    assert_rel_close(y, ref, torch.float32, what="no_grad")
    assert_rel_close(y2, ref, torch.float32, what="inference_mode")


def test_linear_grad_accumulates(backend_device):
    """Two backward passes add into .grad like torch (the op must not overwrite it)."""
    backend, device = backend_device
    m = fastlin.nn.Linear(3, 17, device=device, dtype=torch.float64, backend=backend)
    ref = torch.nn.Linear(3, 17, device=device, dtype=torch.float64)
    ref.load_state_dict(m.state_dict())
    for _ in range(2):
        x = randn(7, 3, dtype=torch.float64, device=device)
        g = torch.randn(7, 17, dtype=torch.float64, device=device)
        m(x).backward(g)
        ref(x).backward(g)
    assert_rel_close(m.weight.grad, ref.weight.grad, torch.float64, what="grad weight")
    assert_rel_close(m.bias.grad, ref.bias.grad, torch.float64, what="grad bias")


# ---------------------------------------------------------------------------------------------
# MSELoss

MSE_SHAPES = [(), (1,), (7,), (4097,), (3, 17), (2, 3, 5), (4097, 17), (0,), (0, 3)]
MSE_IDS = ["0d", "1", "7", "4097", "3x17", "2x3x5", "4097x17", "empty", "empty-2d"]


def _check_mse(crit, input, target, dtype, what):
    ref_crit = torch.nn.MSELoss(reduction=crit.reduction)
    i64, t64 = leaf64(input), leaf64(target)
    out = crit(input, target)
    ref = ref_crit(i64, t64)
    assert out.shape == ref.shape and out.dtype == dtype, f"{what}: {out.dtype} {tuple(out.shape)}"
    assert_close(out, ref, dtype, f"{what}: loss")
    g = torch.randn(ref.shape, dtype=torch.float64, device=ref.device).to(dtype)  # random grad_output
    out.backward(g)
    ref.backward(g.double())
    for name, a, b in (("grad input", input, i64), ("grad target", target, t64)):
        if a.requires_grad:
            assert a.grad is not None and a.grad.shape == a.shape and a.grad.dtype == dtype, f"{what}: {name}"
            assert_close(a.grad, b.grad, dtype, f"{what}: {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", MSE_SHAPES, ids=MSE_IDS)
def test_mse_loss_matches_torch(backend_device, shape, reduction, dtype):
    backend, device = backend_device
    crit = fastlin.nn.MSELoss(reduction=reduction, backend=backend)
    assert isinstance(crit, torch.nn.MSELoss)
    input = randn(*shape, dtype=dtype, device=device, requires_grad=True)
    target = randn(*shape, dtype=dtype, device=device, requires_grad=True)
    _check_mse(crit, input, target, dtype, f"{shape} {reduction}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("which", ["input", "target", "both"])
def test_mse_loss_noncontiguous(backend_device, reduction, which):
    backend, device = backend_device
    crit = fastlin.nn.MSELoss(reduction=reduction, backend=backend)
    nc = {
        "t": lambda: torch.randn(17, 257, device=device).t(),
        "s": lambda: torch.randn(257, 34, device=device)[:, ::2],
    }
    input = nc["t"]() if which in ("input", "both") else randn(257, 17, device=device)
    target = nc["s"]() if which in ("target", "both") else randn(257, 17, device=device)
    input.requires_grad_(True)
    target.requires_grad_(True)
    _check_mse(crit, input, target, torch.float32, f"non-contiguous {which}")


@pytest.mark.parametrize("needs", ["input", "target"])
def test_mse_loss_grad_of_one_side(backend_device, needs):
    backend, device = backend_device
    crit = fastlin.nn.MSELoss(backend=backend)
    input = randn(7, 3, dtype=torch.float64, device=device, requires_grad=needs == "input")
    target = randn(7, 3, dtype=torch.float64, device=device, requires_grad=needs == "target")
    _check_mse(crit, input, target, torch.float64, f"only {needs} requires grad")
    assert (input.grad is None) == (needs != "input") and (target.grad is None) == (needs != "target")


LEGACY = [
    (None, None),
    (True, None),
    (False, None),
    (None, True),
    (None, False),
    (True, True),
    (True, False),
    (False, True),
    (False, False),
]


@pytest.mark.parametrize("size_average, reduce", LEGACY, ids=[f"sa={a}-r={b}" for a, b in LEGACY])
def test_mse_loss_legacy_arguments(backend_device, size_average, reduce):
    backend, device = backend_device
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's "size_average and reduce ... deprecated"
        ref_crit = torch.nn.MSELoss(size_average, reduce)
        crit = fastlin.nn.MSELoss(size_average, reduce, backend=backend)
        crit_kw = fastlin.nn.MSELoss(
            size_average=size_average, reduce=reduce, reduction="sum", backend=backend
        )
    assert crit.reduction == ref_crit.reduction
    # A legacy argument overrides reduction=, as in torch; with none given, reduction= wins.
    assert crit_kw.reduction == ("sum" if (size_average, reduce) == (None, None) else ref_crit.reduction)
    x = randn(4, 5, dtype=torch.float64, device=device, requires_grad=True)
    y = randn(4, 5, dtype=torch.float64, device=device, requires_grad=True)
    _check_mse(crit, x, y, torch.float64, f"legacy {size_average} {reduce}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ref_f = torch.nn.functional.mse_loss(x.detach(), y.detach(), size_average, reduce)
        out_f = fastlin.functional.mse_loss(x.detach(), y.detach(), size_average, reduce, backend=backend)
    assert_rel_close(out_f, ref_f, torch.float64, what="functional legacy")


def test_mse_loss_deprecated_elementwise_mean(backend_device):
    """torch still accepts reduction='elementwise_mean' (with a deprecation warning): so does the drop-in."""
    backend, device = backend_device
    x = randn(7, 3, dtype=torch.float64, device=device, requires_grad=True)
    y = randn(7, 3, dtype=torch.float64, device=device)
    with pytest.warns(UserWarning, match="elementwise_mean"):
        ref = torch.nn.MSELoss(reduction="elementwise_mean")(x, y)
    with pytest.warns(UserWarning, match="elementwise_mean"):
        out = fastlin.nn.MSELoss(reduction="elementwise_mean", backend=backend)(x, y)
    assert_close(out, ref, torch.float64, "elementwise_mean")


@pytest.mark.parametrize(
    "input_shape, target_shape",
    [((7,), (7, 1)), ((7, 1), (7,)), ((7, 3), (1, 3)), ((7, 3), (3,)), ((), (1,)), ((2, 3), (3, 2))],
)
def test_mse_loss_target_shape_must_match(backend_device, input_shape, target_shape):
    """The deliberate difference from torch: no broadcasting of target (torch only warns)."""
    backend, device = backend_device
    crit = fastlin.nn.MSELoss(backend=backend)
    x = randn(*input_shape, device=device, requires_grad=True)
    y = randn(*target_shape, device=device)
    with pytest.raises(ValueError) as e:
        crit(x, y)
    msg = str(e.value)
    assert "target" in msg and shape_str(input_shape) in msg and shape_str(target_shape) in msg, msg
    try:
        torch.broadcast_shapes(input_shape, target_shape)
    except RuntimeError:
        return  # torch raises too
    with pytest.warns(UserWarning, match="target size"):  # what torch does instead: warn and broadcast
        torch.nn.functional.mse_loss(x.detach(), y)


# ---------------------------------------------------------------------------------------------
# LinearMSELoss: the fused module equals mse_loss(linear(x), y)

LMSE_DO = [(1, 1), (3, 17), (257, 3)]


def _check_linear_mse(m, x, y, dtype, what):
    ref = torch.nn.Linear(
        m.in_features, m.out_features, bias=m.bias is not None, dtype=torch.float64, device=x.device
    )
    with torch.no_grad():
        ref.weight.copy_(m.weight)
        if m.bias is not None:
            ref.bias.copy_(m.bias)
    x64, y64 = leaf64(x), leaf64(y)
    loss = m(x, y)
    pred64 = ref(x64)
    loss64 = torch.nn.functional.mse_loss(pred64, y64, reduction=m.reduction)
    assert loss.shape == loss64.shape and loss.dtype == dtype, f"{what}: {loss.dtype} {tuple(loss.shape)}"
    g = torch.randn(loss64.shape, dtype=torch.float64, device=x.device).to(dtype)  # random grad_output
    # Term magnitudes (see assert_close): the residual r = x W^T + b - y has rss magnitude s_r, so
    # r^2 is good to |r| s_r and dloss/dpred = 2 r g (/ numel) to G = 2 |g| s_r (/ numel); the
    # linear part's gradients are sums of G-sized terms, scaled like Linear's. (For 'none' the
    # module composes linear and mse_loss like torch: the prediction is rounded to the dtype
    # before the subtraction, so r carries the rounding of the prediction, not of r.)
    r64 = (pred64 - y64).detach()
    s_r = (
        linear_scales(x, m.weight, m.bias, r64)["output"].reshape(r64.shape).square() + y64.detach().square()
    ).sqrt()
    per = 1.0 / r64.numel() if m.reduction == "mean" and r64.numel() else 1.0
    loss_scale = r64.abs() * s_r
    loss_scale = loss_scale if m.reduction == "none" else loss_scale.sum() * per
    G = 2 * g.double().abs() * s_r * per
    scales = linear_scales(x, m.weight, m.bias, G)
    scales["grad target"] = G
    assert_close(loss, loss64, dtype, f"{what}: loss", loss_scale)
    loss.backward(g)
    loss64.backward(g.double())
    pairs = [("grad weight", m.weight.grad, ref.weight.grad)]
    if m.bias is not None:
        pairs.append(("grad bias", m.bias.grad, ref.bias.grad))
    if x.requires_grad:
        pairs.append(("grad input", x.grad, x64.grad))
    if y.requires_grad:
        pairs.append(("grad target", y.grad, y64.grad))
    for name, got, want in pairs:
        assert got is not None and got.shape == want.shape and got.dtype == dtype, f"{what}: {name}"
        assert_close(got, want, dtype, f"{what}: {name}", scales[name].reshape(want.shape))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("D, O", LMSE_DO, ids=[f"D={d}-O={o}" for d, o in LMSE_DO])
@pytest.mark.parametrize("N", NS)
def test_linear_mse_loss_matches_composition(backend_device, N, D, O, bias, reduction, dtype):
    backend, device = backend_device
    m = fastlin.nn.LinearMSELoss(
        D, O, bias=bias, device=device, dtype=dtype, reduction=reduction, backend=backend
    )
    x = randn(N, D, dtype=dtype, device=device, requires_grad=True)
    y = randn(N, O, dtype=dtype, device=device, requires_grad=True)
    _check_linear_mse(m, x, y, dtype, f"N={N} D={D} O={O} {reduction}")


@pytest.mark.parametrize(
    "x_shape, y_shape",
    [((3,), (17,)), ((2, 5, 3), (2, 5, 17)), ((0, 3), (0, 17))],
    ids=["1d", "BxTxD", "empty"],
)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_mse_loss_leading_dims(backend_device, x_shape, y_shape, reduction):
    backend, device = backend_device
    m = fastlin.nn.LinearMSELoss(
        3, 17, device=device, dtype=torch.float64, reduction=reduction, backend=backend
    )
    x = randn(*x_shape, dtype=torch.float64, device=device, requires_grad=True)
    y = randn(*y_shape, dtype=torch.float64, device=device, requires_grad=True)
    _check_linear_mse(m, x, y, torch.float64, f"{x_shape} {reduction}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_mse_loss_noncontiguous(backend_device, reduction):
    backend, device = backend_device
    m = fastlin.nn.LinearMSELoss(257, 17, device=device, reduction=reduction, backend=backend)
    x = torch.randn(257, 33, device=device).t().requires_grad_(True)  # (33, 257) column-major
    y = torch.randn(33, 34, device=device)[:, ::2].requires_grad_(True)  # (33, 17) column stride 2
    _check_linear_mse(m, x, y, torch.float32, f"non-contiguous {reduction}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_mse_loss_module_api(backend_device, reduction):
    backend, device = backend_device
    torch.manual_seed(7)
    ref = torch.nn.Linear(257, 3, device=device)
    torch.manual_seed(7)
    m = fastlin.nn.LinearMSELoss(257, 3, device=device, reduction=reduction, backend=backend)
    assert isinstance(m, torch.nn.Linear)
    assert torch.equal(m.weight, ref.weight) and torch.equal(m.bias, ref.bias)  # Linear's init draws
    assert list(m.state_dict()) == ["weight", "bias"]
    assert f"reduction={reduction!r}" in repr(m)
    x, y = randn(7, 257, device=device), randn(7, 3, device=device)
    assert_rel_close(m.predict(x), ref(x).double(), torch.float32, what="predict")
    with torch.no_grad():  # the no-grad path skips the gradient work; same value
        loss_ng = m(x, y)
    loss = m(x, y)
    assert not loss_ng.requires_grad and loss.requires_grad
    ref_loss = torch.nn.functional.mse_loss(ref(x).double(), y.double(), reduction=reduction)
    assert_rel_close(loss_ng, ref_loss, torch.float32, what="no_grad loss")
    assert_rel_close(loss, ref_loss, torch.float32, what="loss")


@pytest.mark.parametrize("y_shape", [(7,), (7, 1, 1), (1, 3), (7, 4)])
def test_linear_mse_loss_target_shape_must_match(backend_device, y_shape):
    backend, device = backend_device
    m = fastlin.nn.LinearMSELoss(5, 3 if y_shape != (7,) else 1, device=device, backend=backend)
    x = randn(7, 5, device=device)
    y = randn(*y_shape, device=device)
    w0 = m.weight.detach().clone()
    with pytest.raises(ValueError) as e:
        m(x, y)
    msg = str(e.value)
    assert "target" in msg and shape_str((7, m.out_features)) in msg, msg
    assert torch.equal(m.weight, w0)
