"""fastlin.optim.SGD against torch.optim.SGD, step for step.

Every run is compared after every step with torch.optim.SGD run in float64 on the same initial
values and the same gradients (the oracle). Tolerances: float64 runs use REL_TOL[float64]; float32
runs use REL_TOL[float32] = 1e-5 after up to 50 steps: each step rounds each element about three
times (weight decay, momentum buffer, parameter) at 2^-24 = 6e-8, and the momentum buffer carries
its rounding forward with weight 1/(1 - 0.9) = 10, so a random-walk estimate after 50 steps is
sqrt(50) * 13 * 6e-8 = 5.5e-6 at worst; stock torch.optim.SGD in float32 measures 2e-7..3e-7 on
these runs. Any real deviation (dampening applied on the first step, a momentum buffer that
restarts after a state_dict round trip, a missed weight decay) is 1e-3 or more.
"""

import copy
import itertools
import warnings

import pytest
import torch
from conftest import REL_TOL, assert_rel_close

import fastlin

F64 = torch.float64
STEPS = 50
SHAPES = [(17, 257), (17,), (3, 1), (1,)]


def _combos():
    out = []
    for momentum, dampening, weight_decay, nesterov, maximize in itertools.product(
        [0.0, 0.9], [0.0, 0.5], [0.0, 1e-2], [False, True], [False, True]
    ):
        if nesterov and (momentum <= 0 or dampening != 0):  # torch's rule: ValueError
            continue
        out.append(
            dict(
                lr=0.1,
                momentum=momentum,
                dampening=dampening,
                weight_decay=weight_decay,
                nesterov=nesterov,
                maximize=maximize,
            )
        )
    return out


COMBOS = _combos()
COMBO_IDS = [
    f"m{c['momentum']}-d{c['dampening']}-wd{c['weight_decay']}{'-nesterov' if c['nesterov'] else ''}"
    f"{'-max' if c['maximize'] else ''}"
    for c in COMBOS
]


def make_params(init, dtype, device):
    return [torch.nn.Parameter(t.to(device=device, dtype=dtype).clone()) for t in init]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.to(device=p.device, dtype=p.dtype).clone()


def assert_close(out, ref, dtype, floor, what):
    """||out - ref|| <= REL_TOL[dtype] * max(||ref||, floor).

    The floor is the tensor's typical magnitude: sqrt(numel) for the N(0, 1) initial values and
    gradients of these tests (the scale rounding errors are relative to). A one-element parameter
    random-walking through 0, or a buffer averaging gradients of both signs, would otherwise turn
    rounding that is fine relative to the values it came from into a large error relative to a
    result that happens to be near 0 (1 run in 300 of stock torch.optim.SGD itself)."""
    num = torch.linalg.vector_norm(out.detach().double() - ref.detach().double()).item()
    den = max(torch.linalg.vector_norm(ref.detach().double()).item(), float(floor))
    err = num / den if den else num
    assert err <= REL_TOL[dtype], f"{what}: relative error {err:.3e} > {REL_TOL[dtype]:.1e} ({dtype})"


def typical(t):
    """sqrt(numel): the norm of an N(0, 1) tensor of t's size."""
    return t.numel() ** 0.5


def compare(params, opt, ref_params, ref_opt, dtype, what, floors=None):
    """Parameters and momentum buffers against the float64 oracle; same state keys as torch.
    floors: per parameter, the typical magnitude of it and its buffer (default: typical(p))."""
    for i, (p, r) in enumerate(zip(params, ref_params)):
        assert p.dtype == dtype
        floor = typical(p) if floors is None else floors[i]
        assert_close(p, r, dtype, floor, f"{what}: param {i}")
        st, ref_st = opt.state.get(p, {}), ref_opt.state.get(r, {})
        assert set(st) == set(ref_st), f"{what}: state keys of param {i}: {set(st)} != torch {set(ref_st)}"
        if "momentum_buffer" in ref_st:
            buf = st["momentum_buffer"]
            assert buf.dtype == dtype and buf.shape == p.shape and buf.device == p.device
            assert_close(buf, ref_st["momentum_buffer"], dtype, floor, f"{what}: momentum_buffer {i}")


def random_grads(steps, shapes, dtype, device):
    """Fresh random gradients for every step, rounded to dtype (the oracle sees the same values)."""
    return [[torch.randn(s, dtype=F64).to(dtype) for s in shapes] for _ in range(steps)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("opts", COMBOS, ids=COMBO_IDS)
def test_sgd_step_for_step_with_state_dict_round_trip(backend_device, opts, dtype):
    """50 steps; at step 25 fastlin's state_dict goes into a fresh torch.optim.SGD, which takes
    steps 25..29; at step 30 torch's state_dict goes into a fresh fastlin.optim.SGD, which takes
    the rest. The float64 torch oracle runs all 50 steps uninterrupted."""
    backend, device = backend_device
    init = [torch.randn(s, dtype=F64) for s in SHAPES]
    grads = random_grads(STEPS, SHAPES, dtype, device)
    params, ref_params = make_params(init, dtype, device), make_params(init, F64, device)
    opt = fastlin.optim.SGD(params, backend=backend, **opts)
    ref_opt = torch.optim.SGD(ref_params, **opts)
    assert isinstance(opt, torch.optim.SGD) and isinstance(opt, torch.optim.Optimizer)
    current = opt
    for step in range(STEPS):
        if step == 25:
            sd = copy.deepcopy(opt.state_dict())
            ref_sd = ref_opt.state_dict()
            assert sd["param_groups"] == ref_sd["param_groups"]  # same keys and values as torch's
            assert {k: set(v) for k, v in sd["state"].items()} == {
                k: set(v) for k, v in ref_sd["state"].items()
            }
            current = torch.optim.SGD(params, **opts)
            current.load_state_dict(sd)
        if step == 30:
            sd = copy.deepcopy(current.state_dict())
            current = fastlin.optim.SGD(params, backend=backend, **opts)
            current.load_state_dict(sd)
        set_grads(params, grads[step])
        set_grads(ref_params, [g.to(F64) for g in grads[step]])
        kept = [p.grad.clone() for p in params]
        current.step()
        ref_opt.step()
        if isinstance(current, fastlin.optim.SGD):
            # (stock torch may: its foreach path, the default on CUDA, adds the buffer into the
            # gradients in place for nesterov without weight decay or maximize)
            for p, g in zip(params, kept):
                assert torch.equal(p.grad, g), "step modified a gradient"
        compare(params, current, ref_params, ref_opt, dtype, f"step {step} ({type(current).__module__})")


@pytest.mark.parametrize(
    "opts",
    [
        dict(momentum=0.0),
        dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
        dict(momentum=0.9, dampening=0.5),
    ],
    ids=["plain", "nesterov-wd", "dampening"],
)
def test_sgd_tensor_lr(backend_device, opts):
    backend, device = backend_device
    init = [torch.randn(s, dtype=F64) for s in SHAPES]
    grads = random_grads(STEPS, SHAPES, F64, device)
    params, ref_params = make_params(init, F64, device), make_params(init, F64, device)
    opt = fastlin.optim.SGD(params, lr=torch.tensor(0.05), backend=backend, **opts)
    ref_opt = torch.optim.SGD(ref_params, lr=torch.tensor(0.05), **opts)
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    for step in range(STEPS):
        if step == 20:  # a changed tensor lr is honoured
            opt.param_groups[0]["lr"].fill_(0.02)
            ref_opt.param_groups[0]["lr"].fill_(0.02)
        set_grads(params, grads[step])
        set_grads(ref_params, grads[step])
        opt.step()
        ref_opt.step()
        compare(params, opt, ref_params, ref_opt, F64, f"step {step}")


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
@pytest.mark.parametrize("scheduler", ["StepLR", "LambdaLR", "CosineAnnealingLR"])
def test_sgd_with_lr_scheduler(backend_device, scheduler, tensor_lr):
    backend, device = backend_device
    make_sched = {
        "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=10, gamma=0.5),
        "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 0.95**e),
        "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=STEPS),
    }[scheduler]
    lr = torch.tensor(0.1) if tensor_lr else 0.1
    init = [torch.randn(s, dtype=F64) for s in SHAPES]
    grads = random_grads(STEPS, SHAPES, F64, device)
    params, ref_params = make_params(init, F64, device), make_params(init, F64, device)
    opt = fastlin.optim.SGD(params, lr=lr, momentum=0.9, backend=backend)
    ref_opt = torch.optim.SGD(ref_params, lr=copy.deepcopy(lr), momentum=0.9)
    sched, ref_sched = make_sched(opt), make_sched(ref_opt)
    with warnings.catch_warnings():
        # e.g. "Detected call of `lr_scheduler.step()` before `optimizer.step()`": the scheduler
        # must see fastlin's step() as an optimizer step.
        warnings.simplefilter("error")
        for step in range(STEPS):
            set_grads(params, grads[step])
            set_grads(ref_params, grads[step])
            opt.step()
            ref_opt.step()
            sched.step()
            ref_sched.step()
            assert [float(v) for v in sched.get_last_lr()] == pytest.approx(
                [float(v) for v in ref_sched.get_last_lr()], rel=1e-15
            )
            compare(params, opt, ref_params, ref_opt, F64, f"step {step}")
    assert float(opt.param_groups[0]["lr"]) < 0.1  # the schedule did change the lr
    # the scheduler's own state_dict round trip still matches
    sched2 = make_sched(opt)
    sched2.load_state_dict(sched.state_dict())
    assert sched2.get_last_lr() == sched.get_last_lr()


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_closure(backend_device, momentum):
    """step(closure) re-evaluates the model (fastlin modules) and returns the closure's loss."""
    backend, device = backend_device
    x = torch.randn(64, 5, dtype=F64, device=device)
    y = torch.randn(64, 3, dtype=F64, device=device)
    model = fastlin.nn.Linear(5, 3, dtype=F64, device=device, backend=backend)
    ref_model = torch.nn.Linear(5, 3, dtype=F64, device=device)
    ref_model.load_state_dict(model.state_dict())
    crit, ref_crit = fastlin.nn.MSELoss(backend=backend), torch.nn.MSELoss()
    opt = fastlin.optim.SGD(model.parameters(), lr=0.1, momentum=momentum, backend=backend)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=momentum)

    def closure(model, crit, opt):
        def f():
            opt.zero_grad()
            loss = crit(model(x), y)
            loss.backward()
            return loss

        return f

    floors = [torch.linalg.vector_norm(p.detach()).item() for p in model.parameters()]
    for step in range(STEPS):
        loss = opt.step(closure(model, crit, opt))
        ref_loss = ref_opt.step(closure(ref_model, ref_crit, ref_opt))
        assert_rel_close(loss, ref_loss, F64, what=f"closure loss at step {step}")
        compare(
            list(model.parameters()), opt, list(ref_model.parameters()), ref_opt, F64, f"step {step}", floors
        )
    assert opt.step() is None  # no closure: returns None like torch


def test_sgd_several_param_groups(backend_device):
    backend, device = backend_device
    shapes = [(17, 257), (17,), (3, 3), (3,), (5,)]
    init = [torch.randn(s, dtype=F64) for s in shapes]
    grads = random_grads(STEPS, shapes, F64, device)
    groups = [
        dict(lr=0.1, momentum=0.9, nesterov=True),
        dict(lr=0.05, momentum=0.0, weight_decay=1e-2, maximize=True),
    ]
    late = dict(lr=0.2, momentum=0.5, dampening=0.5)  # added with add_param_group at step 10

    def build(cls, params, **kw):
        opt = cls(
            [dict(params=params[0:2], **groups[0]), dict(params=params[2:4], **groups[1])], lr=0.3, **kw
        )
        return opt

    params, ref_params = make_params(init, F64, device), make_params(init, F64, device)
    opt = build(fastlin.optim.SGD, params, backend=backend)
    ref_opt = build(torch.optim.SGD, ref_params)
    for step in range(STEPS):
        if step == 10:
            opt.add_param_group(dict(params=[params[4]], **late))
            ref_opt.add_param_group(dict(params=[ref_params[4]], **late))
        if step == 30:  # per-group options can be changed between steps
            for o in (opt, ref_opt):
                o.param_groups[1]["maximize"] = False
                o.param_groups[0]["lr"] = 0.01
        set_grads(params, grads[step])
        set_grads(ref_params, grads[step])
        opt.step()
        ref_opt.step()
        compare(params, opt, ref_params, ref_opt, F64, f"step {step}")
    assert opt.state_dict()["param_groups"] == ref_opt.state_dict()["param_groups"]


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_skips_params_without_grad(backend_device, momentum):
    """A parameter whose .grad is None is neither updated nor given state; one whose gradients
    start later starts its momentum buffer then (its first step), while the others continue."""
    backend, device = backend_device
    init = [torch.randn(s, dtype=F64) for s in SHAPES]
    grads = random_grads(STEPS, SHAPES, F64, device)
    for step in range(STEPS):
        grads[step][0] = None if step < 10 else grads[step][0]  # no gradient until step 10
        grads[step][2] = None if step % 3 == 0 else grads[step][2]  # every third step without one
        grads[step][3] = None  # never a gradient
    params, ref_params = make_params(init, F64, device), make_params(init, F64, device)
    params[3].requires_grad_(False)
    ref_params[3].requires_grad_(False)
    opt = fastlin.optim.SGD(params, lr=0.1, momentum=momentum, weight_decay=1e-2, backend=backend)
    ref_opt = torch.optim.SGD(ref_params, lr=0.1, momentum=momentum, weight_decay=1e-2)
    for step in range(STEPS):
        set_grads(params, grads[step])
        set_grads(ref_params, grads[step])
        opt.step()
        ref_opt.step()
        compare(params, opt, ref_params, ref_opt, F64, f"step {step}")
        if step < 10:
            assert torch.equal(params[0], init[0].to(device)), "a parameter without grad was updated"
            assert params[0] not in opt.state or not opt.state[params[0]]
    assert torch.equal(params[3], init[3].to(device))
    assert not opt.state.get(params[3])


def test_sgd_momentum_buffer_is_torchs(backend_device):
    """state[p]["momentum_buffer"]: created on the first step equal to the (decayed) gradient, a
    tensor of p's shape/dtype/device that later steps update, and that a user may replace."""
    backend, device = backend_device
    p = torch.nn.Parameter(torch.randn(17, 3, dtype=F64, device=device))
    opt = fastlin.optim.SGD([p], lr=0.1, momentum=0.9, dampening=0.5, weight_decay=1e-2, backend=backend)
    assert len(opt.state) == 0
    p0 = p.detach().clone()
    g = torch.randn_like(p)
    p.grad = g.clone()
    opt.step()
    buf = opt.state[p]["momentum_buffer"]
    assert set(opt.state[p]) == {"momentum_buffer"}
    assert buf.shape == p.shape and buf.dtype == p.dtype and buf.device == p.device
    assert_rel_close(buf, g + 1e-2 * p0, F64, what="first momentum buffer (no dampening on the first step)")
    assert_rel_close(p, p0 - 0.1 * (g + 1e-2 * p0), F64, what="first step")
    # a user-replaced buffer is what the next step reads (as in torch)
    new_buf = torch.randn_like(p)
    opt.state[p]["momentum_buffer"] = new_buf.clone()
    p1 = p.detach().clone()
    g2 = torch.randn_like(p)
    p.grad = g2.clone()
    opt.step()
    want_buf = 0.9 * new_buf + 0.5 * (g2 + 1e-2 * p1)
    assert_rel_close(opt.state[p]["momentum_buffer"], want_buf, F64, what="buffer after a user replaced it")
    assert_rel_close(p, p1 - 0.1 * want_buf, F64, what="step after a user replaced the buffer")


def test_sgd_hooks_and_zero_grad(backend_device):
    """torch.optim.Optimizer machinery works on the subclass: step hooks, zero_grad, repr."""
    backend, device = backend_device
    p = torch.nn.Parameter(torch.randn(4, 3, device=device))
    opt = fastlin.optim.SGD([p], lr=0.1, backend=backend)
    seen = []
    h1 = opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    h2 = opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
    p.grad = torch.randn_like(p)
    before = p.detach().clone()
    opt.step()
    assert seen == ["pre", "post"]
    assert not torch.equal(p, before)
    h1.remove()
    h2.remove()
    opt.zero_grad()
    assert p.grad is None
    assert "SGD (" in repr(opt)


def test_sgd_signature_matches_torch():
    import inspect

    fp = inspect.signature(fastlin.optim.SGD.__init__).parameters
    tp = inspect.signature(torch.optim.SGD.__init__).parameters
    for name, par in tp.items():
        assert name in fp, name
        assert fp[name].default == par.default or (fp[name].default is None and par.default is None), name
        assert fp[name].kind == par.kind, name
    assert list(fp)[: len(tp)] == list(tp)
    opt = fastlin.optim.SGD([torch.nn.Parameter(torch.randn(2))])
    ref = torch.optim.SGD([torch.nn.Parameter(torch.randn(2))])
    assert opt.defaults == ref.defaults
