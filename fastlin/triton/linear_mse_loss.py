"""fastlin_triton::linear_mse_loss: loss = reduce((input @ weight.T + bias - target)^2) and its
gradients in one pass over input, never materialising the (N, O) prediction.

The one-pass row kernel (fastlin/triton/_onepass.py) computes each tile's residual r in registers,
writes grad_input = scale * r @ W and grad_target = -scale * r for the tile when asked, and keeps
per-program partials of sum r^2, r^T x and sum r; the reduce kernel sums those in a fixed order into
the loss, grad_weight and grad_bias (scale = 2 / (N * O) for "mean", 2 for "sum").

With more than MAX_BLOCK_O (64) outputs the outputs are split over programs, and grad_input (which
needs all of a row's outputs) is then made from an fp32 (N, O) buffer of -scale * r by the matmul
kernel: the one case that materialises an (N, O) array.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch.library import triton_op

from fastlin import _checks as C
from fastlin.triton import _common as K
from fastlin.triton import _onepass as OP
from fastlin.triton.linear import matmul_into


@triton_op("fastlin_triton::linear_mse_loss", mutates_args=())
def linear_mse_loss(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    target: torch.Tensor,
    reduction: str,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (loss 0-d, grad_input (N, D), grad_weight (O, D), grad_bias (O,), grad_target (N, O)) for
    grad_output = 1, in input's dtype; masked-off gradients are empty (0,)."""
    op = "linear_mse_loss"
    C.check_linear_args(op, input, weight, bias)
    C.check_tensor(op, "target", target)
    C.check_same_dtype(op, "target", target, "input", input)
    C.check_target(op, target, input, weight)
    C.check_reduction(op, reduction, allow_none=False)
    K.check_devices(op, "input", input, weight=weight, bias=bias, target=target)
    m = [bool(v) for v in output_mask]
    N, D = input.shape
    O = weight.shape[0]
    numel = N * O
    mean = reduction == "mean"
    # d loss / d r = scale * r; with no elements every gradient is a sum over nothing (0)
    scale = (2.0 / numel if numel else 0.0) if mean else 2.0
    gi = input.new_empty((N, D)) if m[0] else input.new_empty((0,))
    gw = input.new_empty((O, D)) if m[1] else input.new_empty((0,))
    gb = input.new_empty((O,)) if m[2] else input.new_empty((0,))
    gt = input.new_empty((N, O)) if m[3] else input.new_empty((0,))
    loss = input.new_empty(())
    pl = OP.plan(N, D, O, input.dtype, input.device)
    ws = OP.workspace(pl, O, D, input.device, need_w=m[1], need_b=m[2])
    split = m[0] and pl.NOB > 1  # grad_input needs every output of a row in one program
    r_buf = torch.empty((N, O), dtype=pl.acc, device=input.device) if split else None
    OP.run_onepass(
        pl,
        ws,
        input,
        target,
        weight,
        bias,
        n_rows=N,
        gx=gi if m[0] and not split else None,
        gt=r_buf if split else (gt if m[3] else None),
        row_scale=scale,
        need_gw=m[1],
        need_gb=m[2],
    )
    OP.run_reduce(
        pl,
        ws,
        O,
        D,
        mode=0,
        out_w=gw if m[1] else None,
        out_b=gb if m[2] else None,
        loss=loss,
        loss_div=float(numel) if mean else 1.0,
        grad_scale=scale,
    )
    if split:  # r_buf holds -scale * r
        matmul_into(gi, r_buf, weight, alpha=-1.0)
        if m[3]:
            gt.copy_(r_buf)
    elif m[0] and O == 0:
        gi.zero_()
    return loss, gi, gw, gb, gt
