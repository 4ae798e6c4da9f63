"""torch.library.opcheck for every registered fastlin op: the schema tells the truth about
mutation and aliasing, the fake (meta) impls agree with the kernels on shapes/dtypes/strides, and
the ops survive AOTAutograd with dynamic shapes. A few samples each: odd shapes, no bias,
non-contiguous inputs, masked-off gradients."""

import pytest
import torch

OPS = [
    "linear",
    "linear_backward",
    "mse_loss",
    "mse_loss_backward",
    "linear_mse_loss",
    "sgd_update_",
    "train_step",
    "fit",
]


@pytest.fixture
def op_namespace(kernel_backend_device):
    """(torch.ops namespace, device) of the kernel backend: cpp/cuda register torch.ops.fastlin.*,
    Triton registers the same schemas as torch.ops.fastlin_triton.*."""
    backend, device = kernel_backend_device
    if backend == "cuda" and device != "cuda":
        pytest.skip("the cuda backend runs on CUDA tensors")
    if backend == "triton":
        import fastlin.triton  # noqa: F401

        return torch.ops.fastlin_triton, device, backend
    if backend == "cpp" and device != "cpu":
        pytest.skip("the cpp backend runs on CPU tensors")
    return torch.ops.fastlin, device, backend


def r(*shape, device, dtype=torch.float32):
    return torch.randn(shape, dtype=dtype, device=device)


def noncontig(n, d, device, dtype=torch.float32):
    t = torch.randn(d, n, dtype=dtype, device=device).t()
    assert not t.is_contiguous()
    return t


def samples(op, device):
    """(args, kwargs) samples for op on device."""
    f64 = torch.float64
    if op == "linear":
        return [
            (r(7, 3, device=device), r(5, 3, device=device), r(5, device=device)),
            (r(7, 3, device=device), r(5, 3, device=device), None),
            (r(1, 1, device=device), r(1, 1, device=device), r(1, device=device)),
            (noncontig(9, 257, device), r(17, 257, device=device).t().contiguous().t(), r(17, device=device)),
            (r(4, 3, device=device, dtype=f64), r(2, 3, device=device, dtype=f64), None),
            (r(0, 3, device=device), r(5, 3, device=device), r(5, device=device)),
        ]
    if op == "linear_backward":
        return [
            (r(7, 5, device=device), r(7, 3, device=device), r(5, 3, device=device), [True, True, True]),
            (r(7, 5, device=device), r(7, 3, device=device), r(5, 3, device=device), [True, False, False]),
            (r(7, 5, device=device), r(7, 3, device=device), r(5, 3, device=device), [False, True, True]),
            (
                noncontig(9, 17, device),
                noncontig(9, 257, device),
                r(17, 257, device=device),
                [True, True, False],
            ),
            (
                r(1, 1, device=device, dtype=f64),
                r(1, 1, device=device, dtype=f64),
                r(1, 1, device=device, dtype=f64),
                [True, True, True],
            ),
        ]
    if op == "mse_loss":
        return [(r(7, 3, device=device), r(7, 3, device=device), red) for red in ("none", "mean", "sum")] + [
            (r(device=device), r(device=device), "mean"),
            (noncontig(4097, 3, device), r(4097, 3, device=device), "sum"),
            (r(2, 3, 5, device=device, dtype=f64), r(2, 3, 5, device=device, dtype=f64), "none"),
            (noncontig(257, 3, device), r(257, 3, device=device), "none"),
        ]
    if op == "mse_loss_backward":
        return [
            (r(device=device), r(7, 3, device=device), r(7, 3, device=device), "mean"),
            (r(device=device), r(7, 3, device=device), r(7, 3, device=device), "sum"),
            (r(7, 3, device=device), r(7, 3, device=device), r(7, 3, device=device), "none"),
            (r(device=device), noncontig(257, 3, device), r(257, 3, device=device), "mean"),
        ]
    if op == "linear_mse_loss":
        return [
            (
                r(7, 3, device=device),
                r(5, 3, device=device),
                r(5, device=device),
                r(7, 5, device=device),
                "mean",
                [True, True, True, True],
            ),
            (
                r(7, 3, device=device),
                r(5, 3, device=device),
                None,
                r(7, 5, device=device),
                "sum",
                [False, True, False, True],
            ),
            (
                r(1, 1, device=device),
                r(1, 1, device=device),
                r(1, device=device),
                r(1, 1, device=device),
                "mean",
                [False, False, False, False],
            ),
            (
                noncontig(33, 257, device),
                r(17, 257, device=device),
                r(17, device=device),
                noncontig(33, 17, device),
                "mean",
                [True, True, True, False],
            ),
            (
                r(4, 3, device=device, dtype=f64),
                r(2, 3, device=device, dtype=f64),
                None,
                r(4, 2, device=device, dtype=f64),
                "sum",
                [True, True, False, True],
            ),
        ]
    if op == "sgd_update_":

        def group(n_buf):
            ps = [r(17, 3, device=device), r(17, device=device), r(1, device=device)]
            gs = [torch.randn_like(p) for p in ps]
            bs = [torch.randn_like(p) for p in ps[:n_buf]]
            return ps, gs, bs

        out = []
        for momentum, dampening, wd, nesterov, maximize, first in [
            (0.0, 0.0, 0.0, False, False, False),
            (0.9, 0.0, 1e-2, True, False, True),
            (0.9, 0.5, 0.0, False, True, False),
        ]:
            ps, gs, bs = group(3 if momentum else 0)
            out.append((ps, gs, bs, 0.1, momentum, dampening, wd, nesterov, maximize, first))
        return out
    if op in ("train_step", "fit"):

        def case(bias, momentum, sample_weight, n=9, d=3, o=2):
            x, y = r(n, d, device=device), r(n, o, device=device)
            w = r(o, d, device=device)
            b = r(o, device=device) if bias else None
            wm = torch.randn_like(w) if momentum else None
            bm = torch.randn_like(b) if momentum and bias else None
            sw = torch.rand(n, device=device) + 0.5 if sample_weight else None
            return x, y, w, b, wm, bm, sw

        out = []
        for bias, momentum, sw, first in [
            (True, 0.0, False, False),
            (False, 0.9, True, True),
            (True, 0.9, False, False),
        ]:
            tensors = case(bias, momentum, sw)
            sgd = (0.05, momentum, 0.0, 1e-2, momentum > 0, False, first)
            if op == "train_step":
                out.append((*tensors, *sgd))
            else:  # epochs, batch_size, shuffle, seed
                out.append((*tensors, 3, 4, True, 1234, *sgd))
        x, y, w, b, wm, bm, sw = case(True, 0.0, False, n=5, d=257, o=17)
        x = noncontig(5, 257, device)
        args = (x, y, w, b, wm, bm, sw)
        sgd = (0.01, 0.0, 0.0, 0.0, False, True, False)
        out.append((*args, *sgd) if op == "train_step" else (*args, 2, 0, False, 0, *sgd))
        return out
    raise AssertionError(op)


SAMPLE_IDS = [(op, i) for op in OPS for i in range(len(samples(op, "meta")))]


@pytest.mark.parametrize("op, i", SAMPLE_IDS, ids=[f"{op}-{i}" for op, i in SAMPLE_IDS])
def test_opcheck(op_namespace, op, i):
    ns, device, backend = op_namespace
    assert hasattr(ns, op), f"{backend}: op {op} is not registered"
    torch.library.opcheck(getattr(ns, op), samples(op, device)[i])
