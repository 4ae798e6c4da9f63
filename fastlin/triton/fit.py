"""fastlin_triton::fit: `epochs` passes of the fused train step as a loop of launches with no host
synchronisation: three launches per step, the loss history written on the device.

Per step (rows of the epoch's mini-batch; gathered by index in the kernel when shuffled):
1. the one-pass row kernel (partials of the loss, dW, db, sum of sample weights);
2. the reduce kernel in staging mode: the updated weight/bias/buffers go to a staging buffer, and
   each program writes whether its updated parameters are finite (program 0 also checks the loss);
3. the commit kernel: applies the staged values only if every flag is set, adds the step's loss
   (weighted by its rows or sample weights) to the epoch's running sums, writes the epoch's
   history entry after its last step, and otherwise sets the device-side "stopped" flag.
Every kernel of a later step reads "stopped" and does nothing, so the first non-finite step ends
the loop exactly as csrc/ops.cpp says: parameters keep their last finite values, the history is NaN
from that epoch on. Shuffled orders come from torch.randperm(N, generator=<generator on input's
device seeded with seed>) per epoch, as in the reference (same generator, same permutations).
torch.compile calls fit as one opaque op (see fastlin/triton/__init__.py): tracing into it would
unroll the whole loop into the graph.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch.library import triton_op

from fastlin.triton import _onepass as OP
from fastlin.triton.train_step import check_train


@triton_op("fastlin_triton::fit", mutates_args=("weight", "bias", "weight_momentum", "bias_momentum"))
def fit(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    weight_momentum: Optional[torch.Tensor],
    bias_momentum: Optional[torch.Tensor],
    sample_weight: Optional[torch.Tensor],
    epochs: int,
    batch_size: int,
    shuffle: bool,
    seed: int,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
) -> torch.Tensor:
    """-> per-epoch loss history (epochs,), float32 (float64 for float64 input), on input's device."""
    check_train(
        "fit",
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
    if epochs < 0:
        raise ValueError(f"fastlin.fit: epochs must be >= 0, got {epochs}")
    N, D = input.shape
    O = weight.shape[0]
    dev = input.device
    bs = N if batch_size <= 0 or batch_size >= N else batch_size
    pl = OP.plan(bs, D, O, input.dtype, dev)
    # a shorter last batch gets the plan train_step would give it (its own number of programs, so
    # the same partial sums in the same order: fit is exactly train_step in a loop); fewer programs,
    # so it fits the workspace sized for the full batches
    pl_last = OP.plan(N % bs, D, O, input.dtype, dev) if N % bs else pl
    hist = torch.full((epochs,), math.nan, dtype=pl.acc, device=dev)
    if epochs == 0 or O == 0:
        return hist
    has_b = bias is not None
    has_m = momentum != 0
    ws = OP.workspace(pl, O, D, dev, need_b=has_b)
    n_ok = OP.reduce_grid(O, D, True, has_b)[1]
    stage = torch.empty((2 * (O * D + O),), dtype=pl.acc, device=dev)
    ok = torch.empty((n_ok,), dtype=torch.int32, device=dev)
    flag = torch.zeros((1,), dtype=torch.int32, device=dev)
    stats = torch.empty((2,), dtype=pl.acc, device=dev)
    hacc = torch.zeros((2,), dtype=torch.float64, device=dev)
    wm = weight_momentum if has_m else None
    bm = bias_momentum if has_m else None
    shuffled = shuffle and bs < N
    gen = None
    if shuffled:
        gen = torch.Generator(device=dev)
        gen.manual_seed(seed)
    opts = dict(
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
        maximize=maximize,
    )
    step = 0
    for e in range(epochs):
        order = torch.randperm(N, generator=gen, device=dev) if shuffled else None
        for start in range(0, N, bs):
            rows = min(bs, N - start)
            p = pl if rows == bs else pl_last
            idx = None
            x, y, sw = input, target, sample_weight
            if order is not None:
                idx = order[start : start + rows]
            elif bs < N:
                x, y = input[start : start + rows], target[start : start + rows]
                sw = None if sample_weight is None else sample_weight[start : start + rows]
            OP.run_onepass(
                p,
                ws,
                x,
                y,
                weight,
                bias,
                n_rows=rows,
                sw=sw,
                idx=idx,
                flag=flag,
                need_gw=True,
                need_gb=has_b,
            )
            OP.run_reduce(
                p,
                ws,
                O,
                D,
                mode=2,
                out_w=weight,
                out_b=bias,
                wm=wm,
                bm=bm,
                n_rows=rows,
                has_sw=sw is not None,
                opts={**opts, "first_step": first_step and step == 0},
                stage=stage,
                ok=ok,
                flag=flag,
                stats=stats,
            )
            OP.run_commit(
                p,
                O,
                D,
                stage=stage,
                ok=ok,
                n_ok=n_ok,
                w=weight,
                b=bias,
                wm=wm,
                bm=bm,
                flag=flag,
                stats=stats,
                hacc=hacc,
                hist=hist,
                epoch=e,
                is_last=start + rows >= N,
                has_momentum=has_m,
            )
            step += 1
    return hist
