"""fastlin_triton::mse_loss and fastlin_triton::mse_loss_backward (any shape; target of input's shape).

"none": one elementwise kernel. "mean"/"sum": a persistent kernel whose programs each sum the
squared differences of their blocks (fp32 per lane, fp64 for fp64 input) into one partial, then a
one-program kernel sums the partials in a fixed order (deterministic, no atomics) and divides.
Backward: grad = (input - target) * grad_output * scale, grad_output read from the device (a 0-d
tensor, or broadcast to input's shape), never with .item().
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from fastlin import _checks as C
from fastlin.triton import _common as K
from fastlin.triton._common import cast_out, scalar

BLOCK = 1024


def _block() -> int:
    return 4096 if K.INTERPRET else BLOCK


@triton.jit
def _mse_none_kernel(
    x_ptr, t_ptr, out_ptr, n, ACC: tl.constexpr, BLOCK: tl.constexpr, INTERPRET: tl.constexpr
):
    offs = tl.cast(tl.program_id(0), tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    d = tl.load(x_ptr + offs, mask=mask, other=0).to(ACC) - tl.load(t_ptr + offs, mask=mask, other=0).to(ACC)
    tl.store(out_ptr + offs, cast_out(d * d, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _mse_partial_kernel(x_ptr, t_ptr, ws_ptr, n, ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros((BLOCK,), ACC)
    for blk in range(pid, tl.cdiv(n, BLOCK), tl.num_programs(0)):
        offs = tl.cast(blk, tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        d = tl.load(x_ptr + offs, mask=mask, other=0).to(ACC) - tl.load(t_ptr + offs, mask=mask, other=0).to(
            ACC
        )
        acc += d * d
    tl.store(ws_ptr + pid, tl.sum(acc, axis=0))


@triton.jit(do_not_specialize=["P"])
def _mse_finish_kernel(
    ws_ptr, out_ptr, P, div: tl.float64, ACC: tl.constexpr, BLOCK_P: tl.constexpr, INTERPRET: tl.constexpr
):
    acc = tl.zeros((BLOCK_P,), ACC)
    for p0 in range(0, P, BLOCK_P):
        pp = p0 + tl.arange(0, BLOCK_P)
        acc += tl.load(ws_ptr + pp, mask=pp < P, other=0)
    tl.store(out_ptr, cast_out(tl.sum(acc, axis=0) / scalar(div, ACC), out_ptr.dtype.element_ty, INTERPRET))


@triton.jit
def _mse_backward_kernel(
    x_ptr,
    t_ptr,
    go_ptr,
    out_ptr,
    n,
    scale: tl.float64,
    GO_SCALAR: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    offs = tl.cast(tl.program_id(0), tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    d = tl.load(x_ptr + offs, mask=mask, other=0).to(ACC) - tl.load(t_ptr + offs, mask=mask, other=0).to(ACC)
    if GO_SCALAR:
        go = tl.load(go_ptr).to(ACC)
    else:
        go = tl.load(go_ptr + offs, mask=mask, other=0).to(ACC)
    tl.store(
        out_ptr + offs, cast_out(d * go * scalar(scale, ACC), out_ptr.dtype.element_ty, INTERPRET), mask=mask
    )


def _flat(t: torch.Tensor) -> torch.Tensor:
    """t as a unit-stride 1-D tensor: a view when t is contiguous, else one copy. (Not reshape(-1):
    evenly strided tensors, e.g. x[:, ::2], reshape to a strided view.)"""
    return t.contiguous().view(-1)


@triton_op("fastlin_triton::mse_loss", mutates_args=())
def mse_loss(input: torch.Tensor, target: torch.Tensor, reduction: str) -> torch.Tensor:
    """reduce((input - target)^2); "none" -> input's shape, "mean"/"sum" -> 0-d, in input's dtype."""
    C.check_mse_args("mse_loss", input, target, reduction)
    K.check_devices("mse_loss", "input", input, target=target)
    n = input.numel()
    acc = K.acc_dtype(input.dtype)
    blk = _block()
    x, t = _flat(input), _flat(target)
    if reduction == "none":
        out = torch.empty(input.shape, dtype=input.dtype, device=input.device)
        if n:
            K.launch(
                _mse_none_kernel,
                (K.cdiv(n, blk),),
                x,
                t,
                out,
                n,
                ACC=K.tl_acc(acc),
                BLOCK=blk,
                INTERPRET=K.INTERPRET,
            )
        return out
    P = K.persistent_programs(input.device, K.cdiv(max(n, 1), blk))
    ws = torch.empty((P,), dtype=acc, device=input.device)
    out = input.new_empty(())
    K.launch(_mse_partial_kernel, (P,), x, t, ws, n, ACC=K.tl_acc(acc), BLOCK=blk)
    # mean of nothing is NaN (0 / 0), like torch
    div = float(n) if reduction == "mean" else 1.0
    K.launch(
        _mse_finish_kernel,
        (1,),
        ws,
        out,
        P,
        div,
        ACC=K.tl_acc(acc),
        BLOCK_P=min(K.next_pow2(P), 1024),
        INTERPRET=K.INTERPRET,
    )
    return out


@triton_op("fastlin_triton::mse_loss_backward", mutates_args=())
def mse_loss_backward(
    grad_output: torch.Tensor, input: torch.Tensor, target: torch.Tensor, reduction: str
) -> torch.Tensor:
    """d loss / d input times grad_output (one value, or broadcastable to input's shape):
    (input - target) * grad_output * (2 / numel for "mean", else 2)."""
    op = "mse_loss_backward"
    C.check_mse_args(op, input, target, reduction)
    C.check_mse_grad_output(op, grad_output, input)
    K.check_devices(op, "input", input, target=target, grad_output=grad_output)
    go_scalar = grad_output.numel() == 1
    n = input.numel()
    out = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    if n == 0:
        return out
    scale = 2.0 / n if reduction == "mean" else 2.0
    blk = _block()
    # one value is read on the device; a broadcast grad_output is materialised at input's shape
    go = _flat(grad_output) if go_scalar else _flat(grad_output.expand(input.shape))
    K.launch(
        _mse_backward_kernel,
        (K.cdiv(n, blk),),
        _flat(input),
        _flat(target),
        go,
        out,
        n,
        scale,
        GO_SCALAR=go_scalar,
        ACC=K.tl_acc(input.dtype),
        BLOCK=blk,
        INTERPRET=K.INTERPRET,
    )
    return out
