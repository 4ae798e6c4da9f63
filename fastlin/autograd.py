"""One torch.autograd.Function per differentiable fastlin op. They take 2-D inputs (see
fastlin.functional for the any-shape wrappers) and call fastlin.ops, so they run on every backend."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from fastlin import ops


def _shape_only(t: torch.Tensor) -> torch.Tensor:
    """A zero-storage stand-in with t's shape, dtype and device, for a tensor backward only needs
    the shape of (the kernels never read it: its output is masked off)."""
    return t.new_empty(()).expand(t.shape)


class LinearFunction(torch.autograd.Function):
    """y = input @ weight.T + bias.   input (N, D), weight (O, D), bias (O,) or None -> (N, O)."""

    @staticmethod
    def forward(ctx, input, weight, bias, backend=None):
        need_input, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.backend = backend
        ctx.has_bias = bias is not None
        # grad_input needs weight, grad_weight needs input: keep only those alive.
        ctx.save_for_backward(
            input if need_weight else _shape_only(input), weight if need_input else _shape_only(weight)
        )
        return ops.linear(input, weight, bias, backend=backend)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = (need[0], need[1], need[2] and ctx.has_bias)
        gi, gw, gb = ops.linear_backward(grad_output, input, weight, mask, backend=ctx.backend)
        return (
            gi if mask[0] else None,
            gw if mask[1] else None,
            gb if mask[2] else None,
            None,  # backend
        )


class MSELossFunction(torch.autograd.Function):
    """reduce((input - target)^2); input and target of one (any) shape."""

    @staticmethod
    def forward(ctx, input, target, reduction="mean", backend=None):
        ctx.reduction, ctx.backend = reduction, backend
        ctx.save_for_backward(input, target)
        return ops.mse_loss(input, target, reduction, backend=backend)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, target = ctx.saved_tensors
        g = ops.mse_loss_backward(grad_output, input, target, ctx.reduction, backend=ctx.backend)
        return (
            g if ctx.needs_input_grad[0] else None,
            -g if ctx.needs_input_grad[1] else None,
            None,  # reduction
            None,  # backend
        )


class LinearMSELossFunction(torch.autograd.Function):
    """reduce((input @ weight.T + bias - target)^2), reduction "mean" | "sum", in one pass over input.

    The gradients are computed during forward (the pass over input happens once); backward only
    scales them by grad_output."""

    @staticmethod
    def forward(ctx, input, weight, bias, target, reduction="mean", backend=None):
        need = ctx.needs_input_grad
        mask = (need[0], need[1], need[2] and bias is not None, need[3])
        loss, gi, gw, gb, gt = ops.linear_mse_loss(
            input, weight, bias, target, reduction, mask, backend=backend
        )
        ctx.mask = mask
        ctx.save_for_backward(gi, gw, gb, gt)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        grads = ctx.saved_tensors
        out = [g * grad_output if m else None for g, m in zip(grads, ctx.mask)]
        return (*out, None, None)  # reduction, backend
