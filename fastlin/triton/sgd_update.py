"""fastlin_triton::sgd_update_: torch.optim.SGD's update of every parameter of a group, in place,
in one launch (per dtype, and per 8 parameters): a multi-tensor kernel whose programs each find
their tensor from block ranges passed as scalars, then update BLOCK elements of it (parameter,
gradient, momentum buffer read once, written once). The math runs in fp32 (fp64 for fp64
parameters) with the scalars converted the way torch converts them, so the iterates follow
torch.optim.SGD to float rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from fastlin import _checks as C
from fastlin.triton import _common as K
from fastlin.triton._common import cast_out, scalar

SLOTS = 8
# Elements per program and warps per program; module settings read at each launch (bench/gpu_bench.py
# compares a few). BLOCK must be a power of two. H200, 4096 x 4096 + 4096 fp32 with momentum, side by
# side (bench/RESULTS.md, third lease): 1024/4 0.185 ms, 2048/4 0.145, 4096/4 0.136, 4096/8 0.137,
# 8192/8 0.136 (torch's fused SGD 0.101).
BLOCK = 4096
NUM_WARPS = 4


@triton.jit
def _sgd_slot(
    pid,
    start,
    end,
    p_ptr,
    g_ptr,
    m_ptr,
    n,
    lr,
    momentum,
    dampening,
    weight_decay,
    HAS_MOMENTUM: tl.constexpr,
    HAS_WD: tl.constexpr,
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    FIRST_STEP: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    if (pid >= start) & (pid < end):
        offs = tl.cast(pid - start, tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0).to(ACC)
        p = tl.load(p_ptr + offs, mask=mask, other=0).to(ACC)
        if MAXIMIZE:
            g = -g
        if HAS_WD:
            g = g + scalar(weight_decay, ACC) * p
        if HAS_MOMENTUM:
            if FIRST_STEP:
                buf = g
            else:
                buf = (
                    tl.load(m_ptr + offs, mask=mask, other=0).to(ACC) * scalar(momentum, ACC)
                    + scalar(1.0 - dampening, ACC) * g
                )
            if NESTEROV:
                g = g + scalar(momentum, ACC) * buf
            else:
                g = buf
            tl.store(m_ptr + offs, cast_out(buf, m_ptr.dtype.element_ty, INTERPRET), mask=mask)
        tl.store(
            p_ptr + offs, cast_out(p - scalar(lr, ACC) * g, p_ptr.dtype.element_ty, INTERPRET), mask=mask
        )


# the tensors' block ranges vary with the group; sizes stay specialised (n % 16 lets loads vectorise)
# fmt: off
@triton.jit(do_not_specialize=["s1", "s2", "s3", "s4", "s5", "s6", "s7", "s8"])
def _sgd_update_kernel(
    p0, g0, m0, n0, p1, g1, m1, n1, p2, g2, m2, n2, p3, g3, m3, n3,
    p4, g4, m4, n4, p5, g5, m5, n5, p6, g6, m6, n6, p7, g7, m7, n7,
    s1, s2, s3, s4, s5, s6, s7, s8,
    lr: tl.float64, momentum: tl.float64, dampening: tl.float64, weight_decay: tl.float64,
    NT: tl.constexpr, HAS_MOMENTUM: tl.constexpr, HAS_WD: tl.constexpr, NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr, FIRST_STEP: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Slot i (tensor p_i, g_i, m_i of n_i elements) owns programs [s_i, s_{i+1}) (s_0 = 0); slots
    NT and up are not compiled in. A program runs the one slot that owns it."""
    pid = tl.program_id(0)
    _sgd_slot(pid, 0, s1, p0, g0, m0, n0, lr, momentum, dampening, weight_decay,
              HAS_MOMENTUM, HAS_WD, NESTEROV, MAXIMIZE, FIRST_STEP, ACC, BLOCK, INTERPRET)
    if NT > 1:
        _sgd_slot(pid, s1, s2, p1, g1, m1, n1, lr, momentum, dampening, weight_decay,
                  HAS_MOMENTUM, HAS_WD, NESTEROV, MAXIMIZE, FIRST_STEP, ACC, BLOCK, INTERPRET)
    if NT > 2:
        _sgd_slot(pid, s2, s3, p2, g2, m2, n2, lr, momentum, dampening, weight_decay,
                  HAS_MOMENTUM, HAS_WD, NESTEROV, MAXIMIZE, FIRST_STEP, ACC, BLOCK, INTERPRET)
    if NT > 3:
        _sgd_slot(pid, s3, s4, p3, g3, m3, n3, lr, momentum, dampening, weight_decay,
                  HAS_MOMENTUM, HAS_WD, NESTEROV, MAXIMIZE, FIRST_STEP, ACC, BLOCK, INTERPRET)
    if NT > 4:
        _sgd_slot(pid, s4, s5, p4, g4, m4, n4, lr, momentum, dampening, weight_decay,
                  HAS_MOMENTUM, HAS_WD, NESTEROV, MAXIMIZE, FIRST_STEP, ACC, BLOCK, INTERPRET)
    if NT > 5:
        _sgd_slot(pid, s5, s6, p5, g5, m5, n5, lr, momentum, dampening, weight_decay,
                  HAS_MOMENTUM, HAS_WD, NESTEROV, MAXIMIZE, FIRST_STEP, ACC, BLOCK, INTERPRET)
    if NT > 6:
        _sgd_slot(pid, s6, s7, p6, g6, m6, n6, lr, momentum, dampening, weight_decay,
                  HAS_MOMENTUM, HAS_WD, NESTEROV, MAXIMIZE, FIRST_STEP, ACC, BLOCK, INTERPRET)
    if NT > 7:
        _sgd_slot(pid, s7, s8, p7, g7, m7, n7, lr, momentum, dampening, weight_decay,
                  HAS_MOMENTUM, HAS_WD, NESTEROV, MAXIMIZE, FIRST_STEP, ACC, BLOCK, INTERPRET)
# fmt: on


def _launch_group(ps, gs, ms, lr, momentum, dampening, weight_decay, nesterov, maximize, first_step):
    """One launch for up to SLOTS contiguous tensors of one dtype."""
    args = []
    starts = []
    total = 0
    for i in range(SLOTS):
        if i < len(ps):
            p, g, m = ps[i], gs[i], (ms[i] if ms else ps[i])
            n = p.numel()
        else:
            p, g, m, n = ps[0], gs[0], (ms[0] if ms else ps[0]), 0
        args += [p, g, m, n]
        total += K.cdiv(n, BLOCK)
        starts.append(total)
    if total == 0:
        return
    K.launch(
        _sgd_update_kernel,
        (total,),
        *args,
        *starts,
        float(lr),
        float(momentum),
        float(dampening),
        float(weight_decay),
        NT=len(ps),
        HAS_MOMENTUM=momentum != 0,
        HAS_WD=weight_decay != 0,
        NESTEROV=bool(nesterov),
        MAXIMIZE=bool(maximize),
        FIRST_STEP=bool(first_step),
        ACC=K.tl_acc(ps[0].dtype),
        BLOCK=BLOCK,
        INTERPRET=K.INTERPRET,
        num_warps=NUM_WARPS,
    )


@triton_op("fastlin_triton::sgd_update_", mutates_args=("params", "momentum_buffers"))
def sgd_update_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
) -> None:
    """In place, for each i: torch.optim.SGD's update of params[i] from grads[i] (and momentum_buffers[i],
    written and not read when first_step). momentum_buffers is empty when momentum == 0."""
    op = "sgd_update_"
    C.check_sgd_update_args(op, params, grads, momentum_buffers, momentum)
    if not params:
        return
    K.check_devices(op, "params[0]", params[0], **{f"params[{i}]": p for i, p in enumerate(params)})
    # Non-contiguous tensors (rare for parameters) are updated through contiguous copies.
    ps, gs, ms, back = [], [], [], []
    for i, p in enumerate(params):
        if p.numel() == 0:
            continue
        pc = p if p.is_contiguous() else p.contiguous()
        g = grads[i] if grads[i].is_contiguous() else grads[i].contiguous()
        m = None
        if momentum_buffers:
            mb = momentum_buffers[i]
            m = mb if mb.is_contiguous() else mb.contiguous()
            if m is not mb:
                back.append((mb, m))
        if pc is not p:
            back.append((p, pc))
        ps.append(pc)
        gs.append(g)
        ms.append(m)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(ps):
        by_dtype.setdefault(p.dtype, []).append(i)
    for idx in by_dtype.values():
        for c in range(0, len(idx), SLOTS):
            chunk = idx[c : c + SLOTS]
            _launch_group(
                [ps[i] for i in chunk],
                [gs[i] for i in chunk],
                [ms[i] for i in chunk] if momentum_buffers else [],
                lr,
                momentum,
                dampening,
                weight_decay,
                nesterov,
                maximize,
                first_step,
            )
    for dst, src in back:
        dst.copy_(src)
