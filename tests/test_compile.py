"""torch.compile(fullgraph=True) over fastlin modules: no graph breaks (fullgraph=True raises on
any), results equal to eager.

Most cases use the "aot_eager" compile backend: it runs dynamo (graph capture, where graph breaks
come from) and AOTAutograd (fake tensors through the fake impls, the joint forward/backward
graph, functionalisation of the in-place ops) but not inductor's code generation, which costs
~20 s per graph on 2 cores and adds nothing about fastlin; one case runs inductor end to end.

A full training step (forward, backward, optimizer step) compiles as one graph only with
torch._dynamo.config.trace_autograd_ops=True (dynamo otherwise graph-breaks on Tensor.backward()
for any model), and Optimizer.zero_grad is never traced (dynamo skips it by design), so it stays
outside the compiled step. Stock torch.optim.SGD cannot be compiled into that graph at all (its
step() calls torch._dynamo.graph_break() in _use_grad); fastlin.optim.SGD can.
"""

import copy
import importlib
import io

import pytest
import torch
from conftest import assert_rel_close

import fastlin

F64 = torch.float64


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    # Start like a fresh process: a lazily filled op cache must not be written while dynamo
    # traces (a dict write inside an autograd.Function is a graph break), so begin with it empty.
    cache = getattr(fastlin.ops, "_cache", None)
    if isinstance(cache, dict):
        cache.clear()
    yield
    torch._dynamo.reset()


def _grads(module):
    return [p.grad.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("fused", [False, True], ids=["Linear+MSELoss", "LinearMSELoss"])
def test_compile_forward_and_loss(backend_device, fused):
    backend, device = backend_device
    if fused:
        model = fastlin.nn.LinearMSELoss(5, 3, device=device, dtype=F64, backend=backend)

        def f(x, y):
            return model(x, y)
    else:
        model = fastlin.nn.Linear(5, 3, device=device, dtype=F64, backend=backend)
        crit = fastlin.nn.MSELoss(backend=backend)

        def f(x, y):
            return crit(model(x), y)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for n in (7, 33):  # a second batch size: recompiles with a symbolic N through the fake impls
        x = torch.randn(n, 5, dtype=F64, device=device, requires_grad=True)
        y = torch.randn(n, 3, dtype=F64, device=device)
        model.zero_grad()
        eager = f(x, y)
        eager.backward()
        want, gx_eager = _grads(model), x.grad
        model.zero_grad()
        x.grad = None
        got = compiled(x, y)
        got.backward()
        gx = x.grad
        assert_rel_close(got, eager, F64, what=f"N={n} loss")
        assert_rel_close(gx, gx_eager, F64, what=f"N={n} grad input")
        for a, b in zip(_grads(model), want):
            assert_rel_close(a, b, F64, what=f"N={n} param grad")


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_compile_full_training_step(backend_device, momentum):
    """forward + loss + backward + fastlin.optim.SGD step in one fullgraph-compiled function."""
    backend, device = backend_device
    torch.manual_seed(0)
    x = torch.randn(64, 5, dtype=F64, device=device)
    y = torch.randn(64, 3, dtype=F64, device=device)

    def build():
        model = fastlin.nn.Linear(5, 3, device=device, dtype=F64, backend=backend)
        crit = fastlin.nn.MSELoss(backend=backend)
        opt = fastlin.optim.SGD(
            model.parameters(), lr=0.1, momentum=momentum, nesterov=momentum > 0, backend=backend
        )
        return model, crit, opt

    model, crit, opt = build()
    e_model, e_crit, e_opt = build()
    e_model.load_state_dict(model.state_dict())

    def step(model, crit, opt):
        loss = crit(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        for i in range(4):
            opt.zero_grad()
            e_opt.zero_grad()
            got = compiled(model, crit, opt)
            want = step(e_model, e_crit, e_opt)
            assert_rel_close(got, want, F64, what=f"loss at step {i}")
            for a, b in zip(model.parameters(), e_model.parameters()):
                assert_rel_close(a, b, F64, what=f"param after step {i}")
            if momentum:
                for a, b in zip(model.parameters(), e_model.parameters()):
                    assert_rel_close(
                        opt.state[a]["momentum_buffer"],
                        e_opt.state[b]["momentum_buffer"],
                        F64,
                        what=f"momentum buffer after step {i}",
                    )


def test_compile_optimizer_step_alone(backend_device):
    """The usual pattern: eager forward/backward, compiled opt.step() (no trace_autograd_ops)."""
    backend, device = backend_device
    params = [torch.nn.Parameter(torch.randn(s, dtype=F64, device=device)) for s in [(17, 257), (17,), (1,)]]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = fastlin.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2, backend=backend)
    ref_opt = torch.optim.SGD(ref, lr=0.1, momentum=0.9, weight_decay=1e-2)
    compiled = torch.compile(opt.step, fullgraph=True, backend="aot_eager")
    for i in range(4):
        for p, r in zip(params, ref):
            g = torch.randn_like(p)
            p.grad, r.grad = g.clone(), g.clone()
        compiled()
        ref_opt.step()
        for p, r in zip(params, ref):
            assert_rel_close(p, r, F64, what=f"param after step {i}")
            assert_rel_close(
                opt.state[p]["momentum_buffer"],
                ref_opt.state[r]["momentum_buffer"],
                F64,
                what=f"buffer after step {i}",
            )


@pytest.mark.parametrize("O", [1, 5])
@pytest.mark.parametrize(
    "bias,momentum", [(True, 0.9), (False, 0.9), (False, 0.0)], ids=["b-m", "m", "plain"]
)
def test_compile_train_step_op(kernel_backend_device, O, bias, momentum):
    """ops.train_step compiled (fullgraph; aot_eager functionalises its in-place updates) gives eager's
    bits over three steps: the same kernels on the same data. On a GPU the Triton op is traced down
    to its kernels (wrap_triton), and torch clones each argument it finds written and copies it back:
    a placeholder for the absent bias aliased the weight and overwrote its update that way (found on
    an H200; tests/test_triton_writes.py checks the kernels for it on the CPU)."""
    backend, device = kernel_backend_device
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(37, 33, generator=g).to(device), torch.randn(37, O, generator=g).to(device)

    def state():
        w = (torch.randn(O, 33, generator=torch.Generator().manual_seed(4)) / 6).to(device)
        b = torch.zeros(O, device=device) + 0.5 if bias else None
        wm = torch.zeros_like(w) if momentum else None
        bm = torch.zeros_like(b) if momentum and bias else None
        return [w, b, wm, bm]

    def step(w, b, wm, bm, first):
        return fastlin.ops.train_step(
            x, y, w, b, wm, bm, None, lr=0.1, momentum=momentum, first_step=first, backend=backend
        )

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got, want = state(), state()
    for i in range(3):
        lg, lw = compiled(*got, i == 0), step(*want, i == 0)
        assert torch.equal(lg, lw), f"loss at step {i}: {lg} != {lw}"
        for name, a, b in zip(("weight", "bias", "weight_momentum", "bias_momentum"), got, want):
            if a is not None:
                assert torch.equal(a, b), f"{name} after step {i}: max diff {(a - b).abs().max()}"


def test_compile_no_graph_breaks_reported_by_explain(backend_device):
    backend, device = backend_device
    model = fastlin.nn.LinearMSELoss(5, 3, device=device, backend=backend)
    lin, crit = fastlin.nn.Linear(5, 3, device=device, backend=backend), fastlin.nn.MSELoss(backend=backend)
    x, y = torch.randn(7, 5, device=device), torch.randn(7, 3, device=device)
    for f in (lambda: model(x, y), lambda: crit(lin(x), y)):
        ex = torch._dynamo.explain(f)()
        assert ex.graph_break_count == 0, ex.break_reasons
        assert ex.graph_count == 1


@pytest.mark.slow
def test_compile_inductor_end_to_end():
    """The default compile backend (inductor) around the fastlin ops, forward and backward."""
    if not fastlin.backends.status()["cpp"][0]:
        pytest.skip(f"backend cpp unavailable: {fastlin.backends.status()['cpp'][1]}")
    model = fastlin.nn.Linear(5, 3, dtype=F64, backend="cpp")
    crit = fastlin.nn.MSELoss(backend="cpp")
    e_model = copy.deepcopy(model)

    def f(model, x, y):
        return crit(torch.tanh(model(x)) * 2, y)

    x, y = torch.randn(7, 5, dtype=F64), torch.randn(7, 3, dtype=F64)
    got = torch.compile(f, fullgraph=True)(model, x, y)
    want = f(e_model, x, y)
    got.backward()
    want.backward()
    assert_rel_close(got, want, F64, what="loss")
    for a, b in zip(model.parameters(), e_model.parameters()):
        assert_rel_close(a.grad, b.grad, F64, what="grad")


def test_export_save_load_roundtrip(backend_device):
    """torch.export of a model built from fastlin modules, with a dynamic batch dimension: the
    ExportedProgram holds the fastlin ops (their fake impls give the shapes), survives
    torch.export.save / load, and runs on other batch sizes like the eager model."""
    backend, device = backend_device
    model = torch.nn.Sequential(
        fastlin.nn.Linear(5, 4, device=device, dtype=F64, backend=backend),
        torch.nn.Tanh(),
        fastlin.nn.Linear(4, 2, device=device, dtype=F64, backend=backend),
    )
    x = torch.randn(8, 5, device=device, dtype=F64)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("n")},))
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    if backend == "cpp":  # the native ops are in the graph as themselves, not decomposed
        assert "fastlin.linear.default" in ops, ops
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf).module()
    for n in (1, 8, 13):
        xn = torch.randn(n, 5, device=device, dtype=F64)
        assert_rel_close(loaded(xn), model(xn), F64, what=f"exported model, batch {n}")


def _fake_op_cases(x, y, w, b, n):
    """(op, args, expected output shapes) for the ops whose outputs hang on the batch size n of
    x (n, 5), y (n, 3), w (3, 5), b (3,)."""
    none3 = (None, None, None)  # momentum buffers, sample weights
    opts = (0.1, 0.0, 0.0, 0.0, False, False, True)  # lr, momentum, dampening, wd, nesterov, maximize, first
    return [
        ("linear", (x, w, b), [(n, 3)]),
        ("linear_backward", (y, x, w, [True, True, True]), [(n, 5), (3, 5), (3,)]),
        ("mse_loss", (y, y, "none"), [(n, 3)]),
        ("mse_loss", (y, y, "mean"), [()]),
        ("mse_loss_backward", (y.new_empty(()), y, y, "mean"), [(n, 3)]),
        ("linear_mse_loss", (x, w, b, y, "mean", [True] * 4), [(), (n, 5), (3, 5), (3,), (n, 3)]),
        ("train_step", (x, y, w, b, *none3, *opts), [()]),
        ("fit", (x, y, w, b, *none3, 2, 4, False, 0, *opts), [(2,)]),
    ]


@pytest.mark.parametrize("case", range(8))
@pytest.mark.parametrize("ns", ["fastlin", "fastlin_triton"])
def test_fake_impls_keep_the_batch_symbolic(ns, case):
    """Each op's fake implementation, run on a batch of symbolic size n (what torch.export with a
    dynamic batch and torch.compile's dynamic shapes do), gives outputs of the right shapes without
    pinning n to the example's size. The Triton ops' default fake (their launcher run on fake
    tensors) did: torch.export of a model on them failed with "Constraints violated (n)" (H200)."""
    if ns == "fastlin":
        if not fastlin.backends.extension_loaded():
            pytest.skip("fastlin._C is not built")
    else:
        pytest.importorskip("triton")
        importlib.import_module("fastlin.triton")  # registers torch.ops.fastlin_triton.*
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    shape_env = ShapeEnv()
    mode = FakeTensorMode(shape_env=shape_env)
    # (DUCK: the rows of x and y, both 8, share one symbol; the other sizes are static)
    batch = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DUCK, DimDynamic.STATIC])
    x = mode.from_tensor(torch.randn(8, 5), symbolic_context=batch)
    y = mode.from_tensor(torch.randn(8, 3), symbolic_context=batch)
    static = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.STATIC] * 2)
    w = mode.from_tensor(torch.randn(3, 5), symbolic_context=static)
    b = mode.from_tensor(torch.randn(3), symbolic_context=StatelessSymbolicContext([DimDynamic.STATIC]))
    n = x.shape[0].node.expr
    assert shape_env.replace(n) == n and not n.is_number
    name, args, want = _fake_op_cases(x, y, w, b, n)[case]
    with mode:
        out = getattr(getattr(torch.ops, ns), name)(*args)
    assert shape_env.replace(n) == n, f"{ns}::{name} pinned the batch size: {shape_env.replacements}"
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    got = [tuple(d.node.expr if isinstance(d, torch.SymInt) else d for d in o.shape) for o in outs]
    assert got == want, (ns, name)
