"""fastlin_triton::train_step: one full-batch SGD step of y ~ input @ weight.T + bias under the MSE,
in two launches and one pass over input.

1. The one-pass row kernel (fastlin/triton/_onepass.py): a persistent grid of a few programs per
   SM; each reads its row tiles of x once, forms the residual r = x W^T + b - y in registers, and
   accumulates sum w_i r_i^2, sum w_i r_i x_i, sum w_i r_i and sum w_i in fp32 (fp64 for fp64).
   Nothing of size N is allocated; the workspace is P x (O*D + O + 2) floats.
2. The reduce kernel sums the P partials of each element of dW, db in a fixed order (bit-identical
   run to run, no atomics), scales by 2 / (O * sum w), and applies torch.optim.SGD's update
   (weight decay, momentum, dampening, nesterov, maximize) to weight, bias and their momentum
   buffers in place; its program 0 writes the loss.
No host synchronisation: lr and the options are kernel arguments, the loss stays on the device.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.library import triton_op

from fastlin import _checks as C
from fastlin.triton import _common as K
from fastlin.triton import _onepass as OP


def check_train(
    op,
    input,
    target,
    weight,
    bias,
    weight_momentum,
    bias_momentum,
    sample_weight,
    lr,
    momentum,
    dampening,
    weight_decay,
    nesterov,
) -> None:
    C.check_train_args(
        op,
        input,
        target,
        weight,
        bias,
        weight_momentum,
        bias_momentum,
        sample_weight,
        lr,
        momentum,
        dampening,
        weight_decay,
        nesterov,
    )
    K.check_devices(
        op,
        "input",
        input,
        target=target,
        weight=weight,
        bias=bias,
        weight_momentum=weight_momentum,
        bias_momentum=bias_momentum,
        sample_weight=sample_weight,
    )
    if input.shape[0] == 0:
        raise ValueError(
            f"fastlin.{op}: input must have at least one row, got shape {C.shape_str(input.shape)}"
        )


@triton_op("fastlin_triton::train_step", mutates_args=("weight", "bias", "weight_momentum", "bias_momentum"))
def train_step(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    weight_momentum: Optional[torch.Tensor],
    bias_momentum: Optional[torch.Tensor],
    sample_weight: Optional[torch.Tensor],
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
) -> torch.Tensor:
    """input (N, D), target (N, O), weight (O, D), bias (O,); updates weight/bias/buffers in place and
    returns the loss before the update (0-d, float32; float64 for float64 input)."""
    check_train(
        "train_step",
        input,
        target,
        weight,
        bias,
        weight_momentum,
        bias_momentum,
        sample_weight,
        lr,
        momentum,
        dampening,
        weight_decay,
        nesterov,
    )
    N, D = input.shape
    O = weight.shape[0]
    pl = OP.plan(N, D, O, input.dtype, input.device)
    loss = torch.empty((), dtype=pl.acc, device=input.device)
    if O == 0:
        loss.fill_(float("nan"))
        return loss
    ws = OP.workspace(pl, O, D, input.device, need_b=bias is not None)
    OP.run_onepass(
        pl,
        ws,
        input,
        target,
        weight,
        bias,
        n_rows=N,
        sw=sample_weight,
        need_gw=True,
        need_gb=bias is not None,
    )
    has_m = momentum != 0
    opts = dict(
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
        maximize=maximize,
        first_step=first_step,
    )
    OP.run_reduce(
        pl,
        ws,
        O,
        D,
        mode=1,
        out_w=weight,
        out_b=bias,
        wm=weight_momentum if has_m else None,
        bm=bias_momentum if has_m else None,
        loss=loss,
        train_loss=True,
        n_rows=N,
        has_sw=sample_weight is not None,
        opts=opts,
    )
    return loss
