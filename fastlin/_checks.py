"""Python twins of csrc/checks.h, for the reference and Triton backends and the high-level API.

Messages name the op, the argument and what was expected, in the same words as the C++ checks,
so a user sees the same error whichever backend runs. Every check runs before anything is written.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
LOW_PRECISION = (torch.bfloat16, torch.float16)


def shape_str(shape) -> str:
    shape = tuple(shape)
    return "(" + ", ".join(str(s) for s in shape) + (",)" if len(shape) == 1 else ")")


def check_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fastlin.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")


def check_dim(op: str, name: str, t: torch.Tensor, dim: int, layout: str) -> None:
    if t.dim() != dim:
        raise ValueError(f"fastlin.{op}: {name} must be {dim}-D {layout}, got shape {shape_str(t.shape)}")


def check_floating(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"fastlin.{op}: {name} must be float32, float64, bfloat16 or float16, got {t.dtype}")


def check_same_dtype(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(
            f"fastlin.{op}: {name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}"
        )


def check_same_device(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise RuntimeError(
            f"fastlin.{op}: {name} must be on the device of {ref_name} ({ref.device}), got {t.device}"
        )


def check_shape(op: str, name: str, t: torch.Tensor, expected, why: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(
            f"fastlin.{op}: {name} must have shape {shape_str(expected)} {why}, got {shape_str(t.shape)}"
        )


def check_reduction(op: str, reduction, allow_none: bool) -> None:
    ok = ("none", "mean", "sum") if allow_none else ("mean", "sum")
    if reduction not in ok:
        want = "'none', 'mean' or 'sum'" if allow_none else "'mean' or 'sum'"
        raise ValueError(f"fastlin.{op}: reduction must be {want}, got {reduction!r}")


def check_linear_args(op: str, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    check_tensor(op, "input", input)
    check_tensor(op, "weight", weight)
    check_dim(op, "input", input, 2, "(N, in_features)")
    check_dim(op, "weight", weight, 2, "(out_features, in_features)")
    check_floating(op, "input", input)
    check_same_dtype(op, "weight", weight, "input", input)
    check_same_device(op, "weight", weight, "input", input)
    if weight.shape[1] != input.shape[1]:
        raise ValueError(
            f"fastlin.{op}: weight must have shape (out_features, {input.shape[1]}) to match input's last "
            f"dimension {input.shape[1]}, got {shape_str(weight.shape)}"
        )
    if bias is not None:
        check_tensor(op, "bias", bias)
        check_dim(op, "bias", bias, 1, "(out_features,)")
        check_same_dtype(op, "bias", bias, "input", input)
        check_same_device(op, "bias", bias, "input", input)
        check_shape(op, "bias", bias, (weight.shape[0],), "to match weight's out_features")


def check_target(op: str, target: torch.Tensor, input: torch.Tensor, weight: torch.Tensor) -> None:
    check_tensor(op, "target", target)
    check_same_device(op, "target", target, "input", input)
    check_shape(
        op,
        "target",
        target,
        (input.shape[0], weight.shape[0]),
        "(N, out_features) to match input's rows and weight's out_features; "
        "fastlin never broadcasts a target",
    )


def check_mse_args(op: str, input: torch.Tensor, target: torch.Tensor, reduction: str) -> None:
    check_reduction(op, reduction, allow_none=True)
    check_tensor(op, "input", input)
    check_tensor(op, "target", target)
    check_floating(op, "input", input)
    check_same_dtype(op, "target", target, "input", input)
    check_same_device(op, "target", target, "input", input)
    check_shape(op, "target", target, input.shape, "(the shape of input; fastlin never broadcasts a target)")


def check_mse_grad_output(op: str, grad_output: torch.Tensor, input: torch.Tensor) -> None:
    """input's dtype and device; one value (any shape holding one element), else broadcastable to
    input's shape (torch's rule; the gradient always has input's shape)."""
    check_tensor(op, "grad_output", grad_output)
    check_same_dtype(op, "grad_output", grad_output, "input", input)
    check_same_device(op, "grad_output", grad_output, "input", input)
    if grad_output.numel() == 1:
        return
    try:
        ok = torch.broadcast_shapes(grad_output.shape, input.shape) == input.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"fastlin.{op}: grad_output must be a scalar or broadcastable to input's shape "
            f"{shape_str(input.shape)}, got shape {shape_str(grad_output.shape)}"
        )


def check_sgd_options(
    op: str, lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool
):
    if not lr >= 0:
        raise ValueError(f"fastlin.{op}: lr must be >= 0, got {lr}")
    if not momentum >= 0:
        raise ValueError(f"fastlin.{op}: momentum must be >= 0, got {momentum}")
    if not weight_decay >= 0:
        raise ValueError(f"fastlin.{op}: weight_decay must be >= 0, got {weight_decay}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(f"fastlin.{op}: nesterov requires momentum > 0 and dampening == 0")


def check_sgd_update_args(op, params, grads, momentum_buffers, momentum) -> None:
    if len(grads) != len(params):
        raise ValueError(
            f"fastlin.{op}: grads must have one tensor per parameter ({len(params)}), got {len(grads)}"
        )
    want = 0 if momentum == 0 else len(params)
    if len(momentum_buffers) != want:
        raise ValueError(
            f"fastlin.{op}: momentum_buffers must be empty when momentum == 0, else one per parameter "
            f"({len(params)}), got {len(momentum_buffers)}"
        )
    for i, (p, g) in enumerate(zip(params, grads)):
        check_floating(op, f"params[{i}]", p)
        check_same_dtype(op, f"grads[{i}]", g, f"params[{i}]", p)
        check_same_device(op, f"grads[{i}]", g, f"params[{i}]", p)
        check_shape(op, f"grads[{i}]", g, p.shape, "(the shape of its parameter)")
        if momentum_buffers:
            b = momentum_buffers[i]
            check_same_dtype(op, f"momentum_buffers[{i}]", b, f"params[{i}]", p)
            check_same_device(op, f"momentum_buffers[{i}]", b, f"params[{i}]", p)
            check_shape(op, f"momentum_buffers[{i}]", b, p.shape, "(the shape of its parameter)")


def check_train_args(
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
    for name, t in (("input", input), ("target", target), ("weight", weight)):
        check_tensor(op, name, t)
    check_dim(op, "input", input, 2, "(N, in_features)")
    check_dim(op, "weight", weight, 2, "(out_features, in_features)")
    check_floating(op, "input", input)
    check_same_dtype(op, "target", target, "input", input)
    if not (weight.dtype == input.dtype or (input.dtype in LOW_PRECISION and weight.dtype == torch.float32)):
        raise TypeError(
            f"fastlin.{op}: weight must have input's dtype ({input.dtype}), or float32 for bfloat16/float16 "
            f"input; got {weight.dtype}"
        )
    check_same_device(op, "weight", weight, "input", input)
    if weight.shape[1] != input.shape[1]:
        raise ValueError(
            f"fastlin.{op}: weight must have shape (out_features, {input.shape[1]}) to match input's last "
            f"dimension {input.shape[1]}, got {shape_str(weight.shape)}"
        )
    check_target(op, target, input, weight)
    O = weight.shape[0]
    if bias is not None:
        check_same_dtype(op, "bias", bias, "weight", weight)
        check_same_device(op, "bias", bias, "weight", weight)
        check_shape(op, "bias", bias, (O,), "(out_features,)")
    if momentum != 0 and weight_momentum is None:
        raise ValueError(f"fastlin.{op}: weight_momentum must be given when momentum != 0")
    if momentum != 0 and bias is not None and bias_momentum is None:
        raise ValueError(f"fastlin.{op}: bias_momentum must be given when momentum != 0 and bias is given")
    if weight_momentum is not None:
        check_same_dtype(op, "weight_momentum", weight_momentum, "weight", weight)
        check_same_device(op, "weight_momentum", weight_momentum, "weight", weight)
        check_shape(op, "weight_momentum", weight_momentum, weight.shape, "(the shape of weight)")
    if bias_momentum is not None:
        if bias is None:
            raise ValueError(f"fastlin.{op}: bias_momentum given without bias")
        check_same_dtype(op, "bias_momentum", bias_momentum, "weight", weight)
        check_same_device(op, "bias_momentum", bias_momentum, "weight", weight)
        check_shape(op, "bias_momentum", bias_momentum, (O,), "(out_features,)")
    if sample_weight is not None:
        check_same_device(op, "sample_weight", sample_weight, "input", input)
        check_floating(op, "sample_weight", sample_weight)
        check_shape(op, "sample_weight", sample_weight, (input.shape[0],), "(N,)")
    check_sgd_options(op, lr, momentum, dampening, weight_decay, nesterov)


def check_fit_loop_args(op: str, epochs, batch_size, seed) -> None:
    """The loop options of FusedLinearRegressor.fit (single-process and distributed)."""
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
        raise ValueError(f"{op}: epochs must be an int >= 0, got {epochs!r}")
    if batch_size is not None and (
        not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1
    ):
        raise ValueError(f"{op}: batch_size must be None or an int >= 1, got {batch_size!r}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise TypeError(f"{op}: seed must be None or an int, got {type(seed).__name__}")


def check_gram_args(op, input, target, sample_weight) -> None:
    check_tensor(op, "input", input)
    check_tensor(op, "target", target)
    check_dim(op, "input", input, 2, "(N, in_features)")
    check_dim(op, "target", target, 2, "(N, out_features)")
    check_floating(op, "input", input)
    check_same_dtype(op, "target", target, "input", input)
    check_same_device(op, "target", target, "input", input)
    check_shape(op, "target", target, (input.shape[0], target.shape[1]), "(N, out_features) with input's N")
    if sample_weight is not None:
        check_tensor(op, "sample_weight", sample_weight)
        check_same_dtype(op, "sample_weight", sample_weight, "input", input)
        check_same_device(op, "sample_weight", sample_weight, "input", input)
        check_shape(op, "sample_weight", sample_weight, (input.shape[0],), "(N,)")
