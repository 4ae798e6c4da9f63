"""fastlin.sgd_update_ (the op) against torch.optim.SGD's own functional math
(torch.optim.sgd.sgd, single-tensor path) over every option combination, several steps, every
dtype, multi-tensor groups with odd sizes, non-contiguous parameters / buffers and expanded
gradients, every CPU ISA; arguments validated before anything is written."""

import itertools

import pytest
import torch
from conftest import REL_TOL, assert_rel_close, rel_error
from torch.optim.sgd import sgd as functional_sgd  # torch.optim.SGD's own math

from fastlin import ops, reference


def _options():
    for momentum, dampening, weight_decay, nesterov, maximize in itertools.product(
        [0.0, 0.9], [0.0, 0.3], [0.0, 0.05], [False, True], [False, True]
    ):
        if nesterov and (momentum == 0 or dampening != 0):
            continue  # torch.optim.SGD rejects these
        if momentum == 0 and dampening != 0:
            continue  # dampening only acts through momentum
        yield dict(
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
        )


OPTIONS = list(_options())
SHAPES = [(1, 1), (1,), (7, 3), (17,), (4097,), (3, 257)]


def _torch_sgd(params, grads, bufs, lr, o):
    """torch.optim.SGD's step: torch.optim.sgd.sgd on the single-tensor path; bufs[i] None on
    the first step, returned updated."""
    bl = list(bufs)
    functional_sgd(params, grads, bl, foreach=False, lr=lr, **o)
    return bl


def _run(backend, dtype, o, steps=5, shapes=SHAPES, lr=0.1, device="cpu"):
    """5 steps of ours, torch.optim.SGD's, the reference in float64 and the reference in dtype
    (float32 math, one rounding per stored value: the kernels' semantics)."""
    torch.manual_seed(1)
    base = [torch.randn(s, dtype=torch.float64).to(device, dtype) for s in shapes]
    ours, theirs, low = [p.clone() for p in base], [p.clone() for p in base], [p.clone() for p in base]
    ref64 = [p.to(torch.float64) for p in base]
    mom = o["momentum"] != 0
    bufs_ours = (
        [torch.full_like(p, float("nan")) for p in ours] if mom else []
    )  # written, not read, on step 1
    bufs_theirs = [None] * len(base)
    bufs_ref = [torch.zeros_like(p) for p in ref64] if mom else []
    bufs_low = [torch.zeros_like(p) for p in low] if mom else []
    for step in range(steps):
        grads = [torch.randn(s, dtype=torch.float64).to(device, dtype) for s in shapes]
        ops.sgd_update_(ours, grads, bufs_ours, lr, first_step=step == 0, backend=backend, **o)
        bufs_theirs = _torch_sgd(theirs, grads, bufs_theirs, lr, o)
        reference.sgd_update_(
            ref64, [g.to(torch.float64) for g in grads], bufs_ref, lr, first_step=step == 0, **o
        )
        reference.sgd_update_(low, grads, bufs_low, lr, first_step=step == 0, **o)
    return ours, theirs, ref64, low, bufs_ours, bufs_theirs, bufs_ref, bufs_low


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k[:3]}{v}" for k, v in o.items()))
def test_sgd_matches_torch(kernel_backend_device, opts):
    """float32: the same as torch.optim.SGD after 5 steps up to a few ulps of the O(1) values
    (same formula and order; where an FMA is contracted may differ, a last-bit difference per
    term, atol 1e-6 ~ 8 ulp at 1.0), and far under 1e-5 of the float64 reference."""
    backend, device = kernel_backend_device
    ours, theirs, ref64, _, bo, bt, _, _ = _run(backend, torch.float32, opts, device=device)
    for i in range(len(ours)):
        torch.testing.assert_close(ours[i], theirs[i], rtol=1e-6, atol=1e-6)
        assert_rel_close(ours[i], ref64[i], torch.float32, what=f"param {i}")
        if opts["momentum"]:
            torch.testing.assert_close(bo[i], bt[i], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "opts",
    [
        OPTIONS[0],
        OPTIONS[-1],
        dict(momentum=0.9, dampening=0.3, weight_decay=0.05, nesterov=False, maximize=False),
    ],
    ids=["plain", "all", "damp"],
)
def test_sgd_dtypes(kernel_backend_device, dtype, opts):
    """float64 within 1e-12 of float64; bf16/fp16 (float32 math, one rounding per stored value)
    against float64 within the dtype's tolerance, or at most 2x the error of the same semantics
    run by the reference (5 steps of rounding p and buf compound), DESIGN.md's 2x rule."""
    backend, device = kernel_backend_device
    ours, _, ref64, low, bo, _, br, bl = _run(backend, dtype, opts, device=device)
    for i in range(len(ours)):
        assert ours[i].dtype == dtype
        pairs = [(ours[i], ref64[i], low[i], f"param {i}")]
        if opts["momentum"]:
            pairs.append((bo[i], br[i], bl[i], f"buffer {i}"))
        for out, r64, rlow, what in pairs:
            factor = 1.0 if dtype == torch.float64 else max(1.0, 2 * rel_error(rlow, r64) / REL_TOL[dtype])
            assert_rel_close(out, r64, dtype, factor=factor, what=what)


def test_sgd_non_contiguous(kernel_backend_device):
    """Transposed / strided parameters and buffers are updated in place (written back), expanded
    (stride-0) gradients are read correctly."""
    backend, device = kernel_backend_device
    o = dict(momentum=0.9, dampening=0.0, weight_decay=0.05, nesterov=True, maximize=False)
    store = torch.randn(40, 30, device=device)
    p1 = store[::2, ::3]  # strided view: the update must land in `store`
    p2 = torch.randn(9, 5, device=device).t()
    ps = [p1, p2]
    bufs = [
        torch.zeros(10, 20, device=device).t(),
        torch.zeros(9, 5, device=device).t(),
    ]  # non-contiguous buffers
    ref = [p.clone() for p in ps]
    rbufs = [None, None]
    for step in range(3):
        gs = [torch.randn(1, 10, device=device).expand(20, 10), torch.randn(5, 9, device=device)[:, ::1]]
        before = store.clone()
        ops.sgd_update_(ps, gs, bufs, 0.1, first_step=step == 0, backend=backend, **o)
        rbufs = _torch_sgd(ref, gs, rbufs, 0.1, o)
        for a, b in zip(ps, ref):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        untouched = torch.ones_like(store, dtype=torch.bool)
        untouched[::2, ::3] = False
        assert torch.equal(store[untouched], before[untouched]), "elements outside the view changed"


def test_sgd_multi_tensor_parallel():
    """A group large enough to split over threads, tensor boundaries off the 16-element pieces:
    the same result as one tensor at a time, bit for bit, at any thread count."""
    shapes = [(70001,), (3, 17), (1,), (40000, 3), (5,)]
    o = dict(momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False, maximize=True)
    ps = [torch.randn(s) for s in shapes]
    gs = [torch.randn(s) for s in shapes]
    bs = [torch.randn(s) for s in shapes]
    results = []
    prev = torch.get_num_threads()
    try:
        for nt in (prev, 1):
            torch.set_num_threads(nt)
            p2, b2 = [p.clone() for p in ps], [b.clone() for b in bs]
            ops.sgd_update_(p2, gs, b2, 0.05, first_step=False, backend="cpp", **o)
            results.append((p2, b2))
        torch.set_num_threads(prev)
        single = []
        for p, g, b in zip(ps, gs, bs):
            p3, b3 = p.clone(), b.clone()
            ops.sgd_update_([p3], [g], [b3], 0.05, first_step=False, backend="cpp", **o)
            single.append((p3, b3))
    finally:
        torch.set_num_threads(prev)
    for (pa, ba), (pb, bb) in zip(zip(*results[0]), zip(*results[1])):
        assert torch.equal(pa, pb) and torch.equal(ba, bb)
    for (pa, ba), (ps1, bs1) in zip(zip(*results[0]), single):
        assert torch.equal(pa, ps1) and torch.equal(ba, bs1)
    ref = [p.clone() for p in ps]
    rb = _torch_sgd(ref, gs, [b.clone() for b in bs], 0.05, o)
    for a, r in zip(results[0][0], ref):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)
    for a, r in zip(results[0][1], rb):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)


def test_sgd_mixed_dtypes_and_empty():
    """One call over float32, float64, bfloat16 and empty parameters."""
    ps = [
        torch.randn(5),
        torch.randn(3, dtype=torch.float64),
        torch.randn(4, dtype=torch.bfloat16),
        torch.randn(0),
    ]
    gs = [torch.randn_like(p) for p in ps]
    ref = [p.to(torch.float64) for p in ps]
    ops.sgd_update_(ps, gs, [], 0.1, backend="cpp")
    reference.sgd_update_(ref, [g.to(torch.float64) for g in gs], [], 0.1, 0.0, 0.0, 0.0, False, False, False)
    for p, r in zip(ps, ref):
        if p.numel():
            assert_rel_close(p, r, p.dtype)


def test_sgd_validates_before_writing():
    """A bad second parameter raises naming it, and the first parameter and buffers are untouched."""
    p1, p2 = torch.randn(4), torch.randn(3)
    g1, g2 = torch.randn(4), torch.randn(5)
    b1, b2 = torch.randn(4), torch.randn(3)
    saved = [t.clone() for t in (p1, p2, b1, b2)]
    with pytest.raises(ValueError, match="grads"):
        torch.ops.fastlin.sgd_update_([p1, p2], [g1, g2], [b1, b2], 0.1, 0.9, 0.0, 0.0, False, False, False)
    with pytest.raises(TypeError, match="momentum_buffers"):
        torch.ops.fastlin.sgd_update_(
            [p1, p2], [g1, torch.randn(3)], [b1, b2.double()], 0.1, 0.9, 0.0, 0.0, False, False, False
        )
    with pytest.raises(ValueError, match="momentum_buffers"):
        torch.ops.fastlin.sgd_update_(
            [p1, p2], [g1, torch.randn(3)], [b1], 0.1, 0.9, 0.0, 0.0, False, False, False
        )
    for t, s in zip((p1, p2, b1, b2), saved):
        assert torch.equal(t, s)


def test_sgd_opcheck():
    for momentum, first in ((0.0, False), (0.9, True), (0.9, False)):
        ps = [torch.randn(3, 2), torch.randn(5)]
        gs = [torch.randn(3, 2), torch.randn(5)]
        bs = [torch.randn(3, 2), torch.randn(5)] if momentum else []
        torch.library.opcheck(
            torch.ops.fastlin.sgd_update_.default, (ps, gs, bs, 0.1, momentum, 0.0, 0.01, False, False, first)
        )
