"""Plain-torch reference implementations of every fastlin op: the oracle of the tests and the
fallback backend. Same signatures and semantics as the schemas in csrc/ops.cpp; reduced-precision
inputs are computed in float32 (float64 stays float64) and cast back, like the kernels."""

from __future__ import annotations

import math

import torch

from fastlin import _checks as C


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype, for an op's outputs. A no-op t.to(t.dtype) hands back t itself, and torch 2.11's
    dynamo gets an autograd.Function wrong whose forward returns such a tensor: the compiled
    gradient is zero (seen with fastlin's Functions on the reference backend, and with a 10-line
    Function returning (a - b).square().sum().to(a.dtype); torch 2.13 is right). So the cast is
    skipped when there is nothing to cast."""
    return t if t.dtype == dtype else t.to(dtype)


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,))


def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """input (N, D), weight (O, D), bias (O,) or None -> (N, O)."""
    C.check_linear_args("linear", input, weight, bias)
    a = _acc(input.dtype)
    y = input.to(a) @ weight.to(a).T
    if bias is not None:
        y = y + bias.to(a)
    return _cast(y, input.dtype)


def linear_backward(grad_output, input, weight, output_mask):
    """-> (grad_input (N, D), grad_weight (O, D), grad_bias (O,)); masked-off ones are empty (0,)."""
    C.check_linear_args("linear_backward", input, weight, None)
    C.check_same_dtype("linear_backward", "grad_output", grad_output, "input", input)
    C.check_shape(
        "linear_backward", "grad_output", grad_output, (input.shape[0], weight.shape[0]), "(N, out_features)"
    )
    a = _acc(input.dtype)
    g = grad_output.to(a)
    dt = input.dtype
    return (
        _cast(g @ weight.to(a), dt) if output_mask[0] else _empty(input),
        _cast(g.T @ input.to(a), dt) if output_mask[1] else _empty(input),
        _cast(g.sum(0), dt) if output_mask[2] else _empty(input),
    )


def mse_loss(input: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Any shape; target must have input's shape. "none" -> input's shape, else 0-d."""
    C.check_mse_args("mse_loss", input, target, reduction)
    sq = (input.to(_acc(input.dtype)) - target.to(_acc(input.dtype))).square()
    if reduction == "none":
        return _cast(sq, input.dtype)
    out = sq.sum() if reduction == "sum" else sq.sum() / sq.numel() if sq.numel() else sq.sum() * math.nan
    return _cast(out, input.dtype)


def mse_loss_backward(grad_output, input, target, reduction: str = "mean") -> torch.Tensor:
    C.check_mse_args("mse_loss_backward", input, target, reduction)
    C.check_mse_grad_output("mse_loss_backward", grad_output, input)
    a = _acc(input.dtype)
    scale = 2.0 / input.numel() if reduction == "mean" and input.numel() else 2.0
    return _cast((input.to(a) - target.to(a)) * grad_output.to(a) * scale, input.dtype)


def linear_mse_loss(input, weight, bias, target, reduction="mean", output_mask=(True, True, True, True)):
    """Loss and gradients (grad_output = 1) of reduce((input @ weight.T + bias - target)^2)."""
    op = "linear_mse_loss"
    C.check_linear_args(op, input, weight, bias)
    C.check_same_dtype(op, "target", target, "input", input)
    C.check_target(op, target, input, weight)
    C.check_reduction(op, reduction, allow_none=False)
    a, dt = _acc(input.dtype), input.dtype
    x, w = input.to(a), weight.to(a)
    r = x @ w.T - target.to(a)
    if bias is not None:
        r = r + bias.to(a)
    loss = r.square().sum()
    scale = 2.0
    if reduction == "mean":
        loss = loss / r.numel() if r.numel() else loss * math.nan
        scale = 2.0 / r.numel() if r.numel() else math.nan
    g = r * scale
    m = output_mask
    return (
        _cast(loss, dt),
        _cast(g @ w, dt) if m[0] else _empty(input),
        _cast(g.T @ x, dt) if m[1] else _empty(input),
        _cast(g.sum(0), dt) if m[2] else _empty(input),
        _cast(-g, dt) if m[3] else _empty(input),
    )


def _sgd_direction(p, g, buf, lr, momentum, dampening, weight_decay, nesterov, maximize, first_step):
    """torch.optim.SGD's math for one tensor in the accumulation dtype -> (new p, new buf or None)."""
    if maximize:
        g = -g
    if weight_decay != 0:
        g = g + weight_decay * p
    new_buf = None
    if momentum != 0:
        new_buf = g.clone() if first_step else buf * momentum + (1 - dampening) * g
        g = g + momentum * new_buf if nesterov else new_buf
    return p - lr * g, new_buf


def sgd_update_(
    params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, maximize, first_step
) -> None:
    """In-place torch.optim.SGD update of every parameter of a group."""
    C.check_sgd_update_args("sgd_update_", params, grads, momentum_buffers, momentum)
    with torch.no_grad():
        for i, (p, g) in enumerate(zip(params, grads)):
            a = _acc(p.dtype)
            buf = momentum_buffers[i].to(a) if momentum_buffers else None
            new_p, new_buf = _sgd_direction(
                p.to(a), g.to(a), buf, lr, momentum, dampening, weight_decay, nesterov, maximize, first_step
            )
            if new_buf is not None:
                momentum_buffers[i].copy_(new_buf)
            p.copy_(new_p)


def _step_rows(
    input,
    target,
    weight,
    bias,
    weight_momentum,
    bias_momentum,
    sample_weight,
    rows,
    lr,
    momentum,
    dampening,
    weight_decay,
    nesterov,
    maximize,
    first_step,
    check_finite,
):
    """One step on input[rows] -> (loss, weight sum, applied). Mirrors csrc/cpu/train_step.h."""
    a = _acc(weight.dtype)
    x = (input if rows is None else input[rows]).to(a)
    y = (target if rows is None else target[rows]).to(a)
    w = weight.to(a)
    r = x @ w.T - y
    if bias is not None:
        r = r + bias.to(a)
    O = weight.shape[0]
    if sample_weight is not None:
        sw = (sample_weight if rows is None else sample_weight[rows]).to(a)
        wsum = sw.sum()
        rw = r * sw[:, None]
    else:
        wsum = torch.tensor(float(r.shape[0]), dtype=a, device=r.device)
        rw = r
    denom = wsum * O
    loss = (rw * r).sum() / denom
    g = rw * (2.0 / denom)
    opts = (lr, momentum, dampening, weight_decay, nesterov, maximize, first_step)
    new_w, new_wb = _sgd_direction(
        w, g.T @ x, None if weight_momentum is None else weight_momentum.to(a), *opts
    )
    new_b = new_bb = None
    if bias is not None:
        new_b, new_bb = _sgd_direction(
            bias.to(a), g.sum(0), None if bias_momentum is None else bias_momentum.to(a), *opts
        )
    if check_finite:
        ok = bool(torch.isfinite(loss)) and bool(torch.isfinite(new_w).all())
        ok = ok and (new_b is None or bool(torch.isfinite(new_b).all()))
        if not ok:
            return loss, wsum, False
    weight.copy_(new_w)
    if new_b is not None:
        bias.copy_(new_b)
    if new_wb is not None:
        weight_momentum.copy_(new_wb)
    if new_bb is not None:
        bias_momentum.copy_(new_bb)
    return loss, wsum, True


def train_step(
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
    maximize,
    first_step,
) -> torch.Tensor:
    """One fused full-batch SGD step on the MSE; updates weight/bias/buffers in place, returns the loss."""
    C.check_train_args(
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
    if input.shape[0] == 0:
        raise ValueError(
            f"fastlin.train_step: input must have at least one row, got shape {C.shape_str(input.shape)}"
        )
    with torch.no_grad():
        loss, _, _ = _step_rows(
            input,
            target,
            weight,
            bias,
            weight_momentum,
            bias_momentum,
            sample_weight,
            None,
            lr,
            momentum,
            dampening,
            weight_decay,
            nesterov,
            maximize,
            first_step,
            False,
        )
    return _cast(loss, torch.float64 if input.dtype == torch.float64 else torch.float32)


def fit(
    input,
    target,
    weight,
    bias,
    weight_momentum,
    bias_momentum,
    sample_weight,
    epochs,
    batch_size,
    shuffle,
    seed,
    lr,
    momentum,
    dampening,
    weight_decay,
    nesterov,
    maximize,
    first_step,
) -> torch.Tensor:
    """`epochs` passes of train_step (see csrc/ops.cpp) -> per-epoch loss history (epochs,)."""
    C.check_train_args(
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
    n = input.shape[0]
    if n == 0:
        raise ValueError(
            f"fastlin.fit: input must have at least one row, got shape {C.shape_str(input.shape)}"
        )
    if epochs < 0:
        raise ValueError(f"fastlin.fit: epochs must be >= 0, got {epochs}")
    bs = n if batch_size <= 0 or batch_size >= n else batch_size
    history = torch.full((epochs,), math.nan, dtype=torch.float64)
    gen = torch.Generator(device=input.device)
    gen.manual_seed(seed)
    first = first_step
    with torch.no_grad():
        for e in range(epochs):
            order = torch.randperm(n, generator=gen, device=input.device) if shuffle and bs < n else None
            total = weight_total = 0.0
            ok = True
            for start in range(0, n, bs):
                if bs == n and order is None:
                    rows = None
                elif order is None:
                    rows = torch.arange(start, min(start + bs, n), device=input.device)
                else:
                    rows = order[start : start + bs]
                loss, wsum, ok = _step_rows(
                    input,
                    target,
                    weight,
                    bias,
                    weight_momentum,
                    bias_momentum,
                    sample_weight,
                    rows,
                    lr,
                    momentum,
                    dampening,
                    weight_decay,
                    nesterov,
                    maximize,
                    first,
                    True,
                )
                if not ok:
                    break
                first = False
                total += float(loss) * float(wsum)
                weight_total += float(wsum)
            if not ok:
                break
            history[e] = total / weight_total
    return _cast(history, torch.float64 if input.dtype == torch.float64 else torch.float32)


# Rows per chunk of the reference gram: bounds its float64 copy of the data (~8 MB at D + O = 64).
_GRAM_CHUNK = 1 << 14


def gram(input, target, sample_weight):
    """Z^T diag(w) Z with Z = [input, 1, target] (N, D + 1 + O), float64 (P, P); see csrc/ops.cpp."""
    C.check_gram_args("gram", input, target, sample_weight)
    N, D = input.shape
    P = D + 1 + target.shape[1]
    out = torch.zeros((P, P), dtype=torch.float64, device=input.device)
    for i in range(0, N, _GRAM_CHUNK):
        rows = slice(i, min(N, i + _GRAM_CHUNK))
        ones = torch.ones((rows.stop - i, 1), dtype=torch.float64, device=input.device)
        z = torch.cat([input[rows].double(), ones, target[rows].double()], dim=1)
        zw = z if sample_weight is None else z * sample_weight[rows].double()[:, None]
        out += zw.T @ z
    return out
