"""Functional API, mirroring torch.nn.functional: any leading dimensions, torch's argument order."""

from __future__ import annotations

import torch

from fastlin import _checks as C
from fastlin import ops
from fastlin.autograd import LinearFunction, LinearMSELossFunction, MSELossFunction

__all__ = ["linear", "mse_loss", "linear_mse_loss", "sgd_update_", "train_step", "fit"]


def _as_2d(op: str, input: torch.Tensor) -> torch.Tensor:
    C.check_tensor(op, "input", input)
    if input.dim() == 0:
        raise ValueError(
            f"fastlin.{op}: input must have at least 1 dimension (..., in_features), got a 0-d tensor"
        )
    return input.unsqueeze(0) if input.dim() == 1 else input.flatten(0, -2)


_is_compiling = torch.compiler.is_compiling
_Tensor = torch.Tensor
_is_native = ops.is_native
_cpu_native = ops.cpu_native
_any_autocast = ops._any_autocast


def _autocast_on(device_type: str) -> bool:
    # (is_autocast_enabled raises for device types autocast does not know, such as meta)
    return device_type in ops.AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(device_type)


def _autocast(device_type: str, tensors: tuple, lower: bool) -> tuple:
    """torch.autocast's cast of an op's arguments (aten's cached_cast rule): the floating tensors on
    the autocast device type, float64 excepted, go to the autocast dtype (``lower``: the ops torch
    runs in lower precision, like linear) or to float32 (like mse_loss). Unchanged while autocast
    is off for that device type. The casts are ordinary differentiable ops in front of the fastlin
    op, which itself computes at its inputs' dtypes (ops.impl, csrc/ops.cpp)."""
    if not _autocast_on(device_type):
        return tensors
    dt = torch.get_autocast_dtype(device_type) if lower else torch.float32
    return tuple(
        t.to(dt)
        if isinstance(t, _Tensor)
        and t.dtype != dt
        and t.dtype != torch.float64
        and t.is_floating_point()
        and t.device.type == device_type
        else t
        for t in tensors
    )


def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, backend=None):
    """input (..., D), weight (O, D), bias (O,) or None -> (..., O), like torch.nn.functional.linear."""
    return _linear(input, weight, bias, backend)


def _linear(input, weight, bias, backend):
    if _any_autocast() and isinstance(input, _Tensor):  # like aten::linear: in the autocast dtype
        input, weight, bias = _autocast(input.device.type, (input, weight, bias), lower=True)
    # Hot path (cpp/cuda backends, eager): the registered op, whose autograd is C++
    # (csrc/cpu/autograd.cpp), called without the OpOverload wrapper; the op checks its
    # arguments with the same messages. torch.compile keeps tracing LinearFunction below.
    if (
        isinstance(input, _Tensor)
        and isinstance(weight, _Tensor)
        and (bias is None or isinstance(bias, _Tensor))
        and not _is_compiling()
        and (_cpu_native(backend) if input.is_cpu else _is_native(backend, input.device, "linear"))
    ):
        nd = input.dim()
        if nd == 2:
            return ops.native_linear(input, weight, bias)
        if nd != 0:
            x = input.unsqueeze(0) if nd == 1 else input.flatten(0, -2)
            return ops.native_linear(x, weight, bias).reshape(*input.shape[:-1], weight.shape[0])
    C.check_tensor("linear", "weight", weight)
    y = LinearFunction.apply(_as_2d("linear", input), weight, bias, backend)
    return y.reshape(*input.shape[:-1], weight.shape[0])


def mse_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    size_average=None,
    reduce=None,
    reduction: str = "mean",
    *,
    backend=None,
) -> torch.Tensor:
    """Like torch.nn.functional.mse_loss, except that a target whose shape differs from input's
    raises instead of broadcasting."""
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    elif reduction == "elementwise_mean":  # torch's deprecated alias: accepted with torch's warning
        torch.nn._reduction.get_enum(reduction)
        reduction = "mean"
    return _mse_loss(input, target, reduction, backend)


def _mse_loss(input, target, reduction, backend):
    if _any_autocast() and isinstance(input, _Tensor):  # like aten::mse_loss: in float32
        input, target = _autocast(input.device.type, (input, target), lower=False)
    if (
        isinstance(input, _Tensor)
        and isinstance(target, _Tensor)
        and not _is_compiling()
        and (_cpu_native(backend) if input.is_cpu else _is_native(backend, input.device, "mse_loss"))
    ):
        return ops.native_mse_loss(input, target, reduction)  # C++ autograd, see _linear()
    return MSELossFunction.apply(input, target, reduction, backend)


def linear_mse_loss(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    reduction: str = "mean",
    *,
    backend=None,
) -> torch.Tensor:
    """mse_loss(linear(input, weight, bias), target, reduction) in one pass over input (no (N, O)
    prediction is materialised for "mean"/"sum"). input (..., D), target (..., O). Under
    torch.autocast: that composition, unfused (see below)."""
    C.check_reduction("linear_mse_loss", reduction, allow_none=True)
    # "none": the elementwise loss is (N, O) anyway. Under autocast torch's composition runs linear
    # in the autocast dtype and the loss in float32 against the float32 target; the fused op works
    # in one dtype and returns the loss in it, so it would round the target and the loss instead:
    # compose the two ops, which apply those rules.
    if reduction == "none" or (
        _any_autocast() and isinstance(input, _Tensor) and _autocast_on(input.device.type)
    ):
        return mse_loss(
            linear(input, weight, bias, backend=backend), target, reduction=reduction, backend=backend
        )
    x = _as_2d("linear_mse_loss", input)
    C.check_tensor("linear_mse_loss", "target", target)
    C.check_tensor("linear_mse_loss", "weight", weight)
    # weight's rank first: the target check below reads weight.shape[0]
    C.check_dim("linear_mse_loss", "weight", weight, 2, "(out_features, in_features)")
    if tuple(target.shape) != (*input.shape[:-1], weight.shape[0]):
        raise ValueError(
            "fastlin.linear_mse_loss: target must have shape "
            f"{C.shape_str((*input.shape[:-1], weight.shape[0]))} "
            f"(input's leading dimensions, out_features); fastlin never broadcasts a target, got "
            f"{C.shape_str(target.shape)}"
        )
    t = target.reshape(x.shape[0], weight.shape[0])
    if not torch.is_grad_enabled():  # nothing will call backward: skip the gradient work
        return ops.linear_mse_loss(x, weight, bias, t, reduction, (False,) * 4, backend=backend)[0]
    return LinearMSELossFunction.apply(x, weight, bias, t, reduction, backend)


sgd_update_ = ops.sgd_update_
train_step = ops.train_step
fit = ops.fit
