"""torch.autocast: the fastlin drop-ins follow torch's autocast rules; the ops themselves do not autocast.

Under autocast torch runs linear in the autocast dtype (its inputs cast by differentiable copies, so
float32 parameters get float32 gradients) and mse_loss in float32; float64 tensors and tensors on
another device type are left alone. fastlin.functional (and so fastlin.nn) applies the same casts
in front of its ops; every op computes at the dtypes it is given whatever the ambient autocast
state (the reference's float32 matrix products, for one, would otherwise run in bfloat16).

Values are checked against a float64 oracle built from the same cast inputs, at the tolerance of
the autocast dtype (conftest.REL_TOL): the kernels' products and sums are in float32, and their one
rounding to the autocast dtype is the same as torch's."""

import pytest
import torch
from conftest import REL_TOL, assert_rel_close, norm64

import fastlin

LOW = [torch.bfloat16, torch.float16]
LOW_IDS = ["bf16", "f16"]
SHAPES = [(1, 1, 1), (7, 3, 3), (4097, 257, 17)]


def assert_one_rounding(out, ref64, dtype):
    """Each element of out is ref64 computed in float32 and rounded once to ``dtype`` (a cast):
    within half a unit in the last place of ``dtype`` (half the subnormal spacing below its normal
    range) plus the float32 computation's error, allowed 8 float32 roundoffs (a subtraction, a
    scale and its own rounding, a product: 3-4; negligible beside half a bfloat16 / float16 unit,
    2^-8 / 2^-11). Elementwise: float16 gradients here are mostly subnormal."""
    fi = torch.finfo(dtype)
    bound = (fi.eps / 2 + 8 * 2.0**-24) * ref64.abs() + fi.smallest_normal * fi.eps / 2
    err = (out.detach().double() - ref64).abs()
    assert (err <= bound).all(), f"worst error / bound: {(err / bound).max().item():.3f}"


def assert_close_low(out, ref64, dtype, what):
    """||out - ref|| <= REL_TOL[dtype] ||ref|| (conftest) plus half the subnormal spacing of ``dtype``
    per element: an output below float16's normal range (6.1e-5; these gradients are ~1e-6) is
    rounded to an absolute grid of 6e-8, however it was summed."""
    fi = torch.finfo(dtype)
    err = norm64(out - ref64.to(out.device))
    allowed = REL_TOL[dtype] * norm64(ref64) + fi.smallest_normal * fi.eps / 2 * ref64.numel() ** 0.5
    assert err <= allowed, f"{what}: error {err:.3e} > {allowed:.3e} ({dtype})"


def _pair(d, o, bias, device, backend):
    torch.manual_seed(3)
    ref = torch.nn.Linear(d, o, bias=bias, device=device)
    mod = fastlin.nn.Linear(d, o, bias=bias, device=device, backend=backend)
    mod.load_state_dict(ref.state_dict())
    return ref, mod


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("N,D,O", SHAPES, ids=[f"{n}x{d}x{o}" for n, d, o in SHAPES])
def test_linear_and_mse_loss_follow_torch_autocast(backend_device, dtype, bias, N, D, O):
    backend, device = backend_device
    ref, mod = _pair(D, O, bias, device, backend)
    x = torch.randn(N, D, device=device, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    t = torch.randn(N, O, device=device)
    with torch.autocast(device, dtype=dtype):
        y_ref = ref(x_ref)
        loss_ref = torch.nn.functional.mse_loss(y_ref, t)
        y = mod(x)
        loss = fastlin.nn.MSELoss(backend=backend)(y, t)
    grad_y = []
    y.register_hook(grad_y.append)  # what linear's backward receives, in the autocast dtype
    assert (y.dtype, loss.dtype) == (y_ref.dtype, loss_ref.dtype) == (dtype, torch.float32)
    loss_ref.backward()
    loss.backward()
    for p, p_ref in zip(mod.parameters(), ref.parameters()):
        assert p.grad.dtype == p_ref.grad.dtype == torch.float32
    assert x.grad.dtype == x_ref.grad.dtype == torch.float32

    # The oracle: the same casts, then float64.
    x64 = x.detach().to(dtype).double()
    w64 = mod.weight.detach().to(dtype).double()
    y64 = x64 @ w64.T + (mod.bias.detach().to(dtype).double() if bias else 0)
    assert_close_low(y, y64, dtype, what="output")
    # The loss of fastlin's own (rounded) prediction, in float32 like torch's.
    assert_rel_close(loss, (y.detach().double() - t.double()).square().mean(), torch.float32, what="loss")
    # Backward: d loss / d y in float32, rounded once to the autocast dtype on its way into
    # linear's backward (the cast's own backward).
    (g,) = grad_y
    assert g.dtype == dtype
    assert_one_rounding(g, 2.0 / y.numel() * (y.detach().double() - t.double()), dtype)
    # linear's backward on that g: float32 sums rounded to the dtype, then cast to float32.
    g64 = g.double()
    assert_close_low(mod.weight.grad, g64.T @ x64, dtype, what="grad_weight")
    assert_close_low(x.grad, g64 @ w64, dtype, what="grad_input")
    if bias:
        assert_close_low(mod.bias.grad, g64.sum(0), dtype, what="grad_bias")
    # torch's own run: the same values up to those roundings.
    assert_rel_close(y, y_ref, dtype, what="output against stock torch's under autocast")


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_fused_linear_mse_loss_under_autocast_is_torchs_composition(backend_device, dtype):
    # The fused op works in one dtype and returns its loss in it; under autocast torch computes the
    # loss in float32 against the float32 target, so functional.linear_mse_loss composes linear and
    # mse_loss there: the same values as the unfused drop-ins, the loss in float32.
    backend, device = backend_device
    torch.manual_seed(5)
    fused = fastlin.nn.LinearMSELoss(9, 3, device=device, backend=backend)
    plain = fastlin.nn.Linear(9, 3, device=device, backend=backend)
    plain.load_state_dict(fused.state_dict())
    x, t = torch.randn(33, 9, device=device), torch.randn(33, 3, device=device)
    with torch.autocast(device, dtype=dtype):
        loss = fused(x, t)
        loss_plain = fastlin.nn.MSELoss(backend=backend)(plain(x), t)
    assert loss.dtype == torch.float32
    loss.backward()
    loss_plain.backward()
    assert torch.equal(loss, loss_plain)
    for p, q in zip(fused.parameters(), plain.parameters()):
        assert p.grad.dtype == torch.float32 and torch.equal(p.grad, q.grad)


def test_float64_is_left_alone(backend_device):
    # torch's autocast never casts float64: a float64 model computes as it does outside autocast.
    backend, device = backend_device
    mod = fastlin.nn.Linear(6, 2, device=device, dtype=torch.float64, backend=backend)
    x = torch.randn(11, 6, device=device, dtype=torch.float64)
    t = torch.randn(11, 2, device=device, dtype=torch.float64)
    crit = fastlin.nn.MSELoss(backend=backend)
    out = crit(mod(x), t)
    with torch.autocast(device, dtype=torch.bfloat16):
        out_ac = crit(mod(x), t)
    assert out_ac.dtype == torch.float64 and torch.equal(out_ac, out)


@pytest.mark.parametrize("O", [3, 17])
@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_ops_compute_at_their_inputs_dtypes_under_autocast(backend_device, dtype, O):
    # The ops (fastlin.ops / torch.ops.fastlin.*) do not autocast, and nothing inside them does:
    # float32 inputs give the float32 results of a run outside autocast, bit for bit. Without
    # ops.impl's guard this fails on the reference backend (its float32 products would run in the
    # autocast dtype); without csrc/ops.cpp's, on the CUDA backend with O = 17 (its at::mm).
    backend, device = backend_device
    x, t = torch.randn(37, 11, device=device), torch.randn(37, O, device=device)
    w, b = torch.randn(O, 11, device=device), torch.randn(O, device=device)

    def run():
        out = [fastlin.ops.linear(x, w, b, backend=backend)]
        out += fastlin.ops.linear_mse_loss(x, w, b, t, "mean", backend=backend)
        out += fastlin.ops.linear_backward(t, x, w, (True, True, True), backend=backend)
        out.append(fastlin.ops.mse_loss(x, x.flip(0), "sum", backend=backend))
        w2, b2 = w.clone(), b.clone()
        out.append(fastlin.ops.train_step(x, t, w2, b2, lr=0.1, backend=backend))
        return [*out, w2, b2]

    plain = run()
    with torch.autocast(device, dtype=dtype):
        under = run()
    for i, (a, c) in enumerate(zip(plain, under)):
        assert c.dtype == a.dtype == torch.float32 and torch.equal(c, a), f"output {i}"


def test_native_ops_carry_the_autocast_guard():
    # The C++ ops register a kernel for both Autocast keys that turns autocast off inside them
    # (csrc/ops.cpp): the CUDA glue's float32 matrix products (at::mm, O > 16) would otherwise be
    # cast to the autocast dtype. Only a GPU can show that in values; here, that it is registered.
    if not fastlin.backends.extension_loaded():
        pytest.skip("fastlin._C is not loaded")
    ops = ["linear", "linear_backward", "mse_loss", "mse_loss_backward", "linear_mse_loss"]
    ops += ["sgd_update_", "train_step", "fit", "gram"]
    for name in ops:
        for key in ("AutocastCPU", "AutocastCUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastlin::{name}", key), (name, key)


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_training_loop_under_autocast_tracks_torch(backend_device, dtype):
    # The seed's loop with the three drop-ins under autocast, 30 steps, against stock torch's under
    # the same autocast; float16 with a GradScaler as torch's AMP recipe has it (its scale keeps
    # these ~1e-6 gradients out of float16's subnormals; the scaler's unscale and inf check work
    # on fastlin.optim.SGD's param_groups like on torch's). Both round the same values at the same
    # points, so they stay within the autocast dtype's tolerance of each other.
    backend, device = backend_device
    ref, mod = _pair(4, 2, True, device, backend)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    opt = fastlin.optim.SGD(mod.parameters(), lr=0.05, momentum=0.9, backend=backend)
    use_scaler = dtype == torch.float16
    scaler_ref = torch.amp.GradScaler(device, enabled=use_scaler)
    scaler = torch.amp.GradScaler(device, enabled=use_scaler)
    crit = fastlin.nn.MSELoss(backend=backend)
    x = torch.randn(64, 4, device=device)
    t = x @ torch.randn(4, 2, device=device) + 0.5
    for _ in range(30):
        with torch.autocast(device, dtype=dtype):
            loss_ref = torch.nn.functional.mse_loss(ref(x), t)
            loss = crit(mod(x), t)
        for o, sc, ls in ((opt_ref, scaler_ref, loss_ref), (opt, scaler, loss)):
            o.zero_grad()
            sc.scale(ls).backward()
            sc.step(o)
            sc.update()
    assert mod.weight.dtype == torch.float32
    # The same steps skipped: the first overflows float16 at the initial scale 65536 in both.
    assert scaler.get_scale() == scaler_ref.get_scale()
    # 30 steps of rounding differences at the autocast dtype, each damped by the step: a few units
    # of its rounding in the parameters, as in the single-step checks above.
    for p, q in zip(mod.parameters(), ref.parameters()):
        assert_rel_close(p, q, dtype, what="parameters after 30 steps")
    assert abs(loss.item() - loss_ref.item()) <= REL_TOL[dtype] * abs(loss_ref.item())


@pytest.mark.parametrize("N,D", [(17, 5), (257, 257)], ids=["17x5", "257x257"])
def test_compiled_module_under_autocast(backend_device, N, D):
    # torch.compile(fullgraph=True) traces the casts of fastlin.functional like eager runs them, and
    # the op inside runs at its inputs' dtypes there too (the reference backend's float32 products
    # were autocast to bfloat16 under compile only: found at 257 x 257, bf16 results 1 ulp apart).
    backend, device = backend_device
    torch._dynamo.reset()
    ref, mod = _pair(D, 3, True, device, backend)
    crit = fastlin.nn.MSELoss(backend=backend)

    def f(x, t):
        with torch.autocast(device, dtype=torch.bfloat16):
            y = mod(x)
            return y, crit(y, t)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x, t = torch.randn(N, D, device=device), torch.randn(N, 3, device=device)
    y_c, loss_c = compiled(x, t)
    y_e, loss_e = f(x, t)
    torch._dynamo.reset()
    assert (y_c.dtype, loss_c.dtype) == (torch.bfloat16, torch.float32)
    assert torch.equal(y_c, y_e) and torch.equal(loss_c, loss_e)
