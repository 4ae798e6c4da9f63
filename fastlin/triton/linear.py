"""fastlin_triton::linear and fastlin_triton::linear_backward.

linear: y = input @ weight.T + bias through _linear_kernel, a tiled matmul C = alpha * A @ B + bias
on arbitrary strides (so weight.T, non-contiguous inputs and, in linear_backward, grad_output @ weight
need no copies), accumulating in fp32 (fp64 for fp64).
  * >= 5 output columns and >= 5 reduction columns: tl.dot. bf16/fp16 operands of one dtype use the
    native tensor-core dot (products exact in fp32, fp32 accumulation); fp32 operands follow
    fastlin.triton.input_precision() ("ieee" by default).
  * otherwise (the O = 1..4 of linear regression, or fp64) FMAs, no tl.dot (its minimum tile of 16
    would waste 4-16x the work), in one of two 2-D forms: with <= 4 output columns, each column is a
    row-wise reduction of a coalesced (BLOCK_M, BLOCK_K) tile of A against one column of B; with
    more columns, rank-1 updates acc += A[:, k] B[k, :] along the shared axis. (A 3-D broadcast
    product summed over its middle axis, the form this replaced, gave wrong results on an H200 with
    Triton 3.6.0 for small M, right ones in the interpreter; see bench/RESULTS.md.)
linear_backward: grad_input = grad_output @ weight by the same kernel; grad_weight = grad_output.T @
input and grad_bias = grad_output.sum(0) by the one-pass row kernel (fastlin/triton/_onepass.py):
per-program partials over row tiles, then a fixed-order reduction (deterministic, no atomics).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from fastlin import _checks as C
from fastlin.triton import _common as K
from fastlin.triton import _onepass as OP
from fastlin.triton._common import cast_out, scalar

FORM_DOT, FORM_COLUMNS, FORM_RANK1 = 0, 1, 2


def _configs():
    if K.INTERPRET:
        return [triton.Config({"BLOCK_M": 64}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": bm}, num_warps=w) for bm in (1, 2, 4, 8, 16, 32, 64, 128) for w in (4, 8)
    ]


def _prune(configs, named_args, **kwargs):
    bn, bk, form = kwargs["BLOCK_NC"], kwargs["BLOCK_K"], kwargs["FORM"]
    dot = form == FORM_DOT
    fits = {}
    for c in configs:
        bm, w = c.kwargs["BLOCK_M"], c.num_warps
        if dot and bm < 16:
            continue
        # elements held at once: both dot operands; the A tile; the accumulator
        live = {FORM_DOT: bm * (bn + bk), FORM_COLUMNS: bm * bk, FORM_RANK1: bm * bn}[form]
        if live <= 32 * 32 * w:
            fits.setdefault(w, []).append(c)
    out = []
    for _, cs in sorted(fits.items(), key=lambda kv: -kv[0]):  # 8 warps first
        out += sorted(cs, key=lambda c: -c.kwargs["BLOCK_M"])[:2]
    if not out:
        out = [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] < (16 if dot else 1), c.kwargs["BLOCK_M"]))]
    return out if K.AUTOTUNE else out[:1]


@triton.autotune(
    configs=_configs(),
    key=["Nc", "K", "BLOCK_NC", "BLOCK_K", "FORM", "NATIVE", "PRECISION"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit(do_not_specialize=["M"])
def _linear_kernel(
    a_ptr,
    b_ptr,
    bias_ptr,
    c_ptr,
    M,
    Nc,
    K,
    s_am,
    s_ak,
    s_bk,
    s_bn,
    s_bias,
    s_cm,
    s_cn,
    alpha: tl.float64,
    HAS_BIAS: tl.constexpr,
    HAS_ALPHA: tl.constexpr,
    FORM: tl.constexpr,
    NATIVE: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_NC: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """C (M, Nc) = alpha * A (M, K) @ B (K, Nc) + bias (Nc)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = tl.cast(pid_m, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_NC + tl.arange(0, BLOCK_NC)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M
    mask_n = rn < Nc
    acc = tl.zeros((BLOCK_M, BLOCK_NC), ACC)
    if FORM == 2:  # FORM_RANK1: acc += A[:, k] B[k, :], one k at a time
        for k in range(0, K):
            k64 = tl.cast(k, tl.int64)
            a = tl.load(a_ptr + rm * s_am + k64 * s_ak, mask=mask_m, other=0).to(ACC)
            b = tl.load(b_ptr + k64 * s_bk + rn * s_bn, mask=mask_n, other=0).to(ACC)
            acc += a[:, None] * b[None, :]
    else:
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            mask_k = kk < K
            a = tl.load(
                a_ptr + rm[:, None] * s_am + kk.to(tl.int64)[None, :] * s_ak,
                mask=mask_m[:, None] & mask_k[None, :],
                other=0,
            )
            if FORM == 0:  # FORM_DOT
                b = tl.load(
                    b_ptr + kk[:, None] * s_bk + rn[None, :] * s_bn,
                    mask=mask_k[:, None] & mask_n[None, :],
                    other=0,
                )
                if NATIVE:  # bf16/fp16 x bf16/fp16: exact products, fp32 accumulation
                    acc += tl.dot(a, b, out_dtype=ACC)
                else:
                    acc += tl.dot(a.to(ACC), b.to(ACC), input_precision=PRECISION, out_dtype=ACC)
            else:  # FORM_COLUMNS: output column j = row-wise sum of the A tile times B[:, j]
                a = a.to(ACC)
                for j in tl.static_range(BLOCK_NC):
                    col = pid_n * BLOCK_NC + j
                    b = tl.load(b_ptr + kk * s_bk + col * s_bn, mask=mask_k & (col < Nc), other=0).to(ACC)
                    part = tl.sum(a * b[None, :], axis=1)
                    acc += tl.where(rn[None, :] == col, part[:, None], 0)
    if HAS_ALPHA:
        acc = acc * scalar(alpha, ACC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn * s_bias, mask=mask_n, other=0).to(ACC)[None, :]
    tl.store(
        c_ptr + rm[:, None] * s_cm + rn[None, :] * s_cn,
        cast_out(acc, c_ptr.dtype.element_ty, INTERPRET),
        mask=mask_m[:, None] & mask_n[None, :],
    )


def matmul_into(
    out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, alpha: float = 1.0
) -> None:
    """out (M, Nc) = alpha * a (M, K) @ b (K, Nc) + bias (Nc,); any strides; fp32 (fp64) accumulation."""
    M, Kd = a.shape
    Nc = b.shape[1]
    if M == 0 or Nc == 0:
        return
    acc = K.acc_dtype(a.dtype)
    if Nc > 4 and Kd > 4 and acc == torch.float32:
        form, bn, bk = FORM_DOT, min(max(16, K.next_pow2(Nc)), 64), min(max(16, K.next_pow2(Kd)), 64)
    elif Nc <= 4:
        form, bn, bk = FORM_COLUMNS, K.next_pow2(Nc), min(K.next_pow2(Kd), 128)
    else:
        form, bn, bk = FORM_RANK1, min(K.next_pow2(Nc), 64), 1
    use_dot = form == FORM_DOT
    # Triton 3.6's interpreter multiplies bf16 operands of tl.dot as their raw uint16 bits: upcast there
    native = use_dot and a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16) and not K.INTERPRET

    def grid(meta):
        return (K.cdiv(M, meta["BLOCK_M"]), K.cdiv(Nc, bn))

    K.launch(
        _linear_kernel,
        grid,
        a,
        b,
        bias if bias is not None else a,
        out,
        M,
        Nc,
        Kd,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        bias.stride(0) if bias is not None else 0,
        out.stride(0),
        out.stride(1),
        float(alpha),
        HAS_BIAS=bias is not None,
        HAS_ALPHA=alpha != 1.0,
        FORM=form,
        NATIVE=native,
        ACC=K.tl_acc(a.dtype),
        PRECISION=K.input_precision(),
        INTERPRET=K.INTERPRET,
        BLOCK_NC=bn,
        BLOCK_K=bk,
    )


@triton_op("fastlin_triton::linear", mutates_args=())
def linear(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y = input @ weight.T + bias.   input (N, D), weight (O, D), bias (O,) or None -> (N, O)."""
    C.check_linear_args("linear", input, weight, bias)
    K.check_devices("linear", "input", input, weight=weight, bias=bias)
    out = input.new_empty((input.shape[0], weight.shape[0]))
    matmul_into(out, input, weight.t(), bias)
    return out


@triton_op("fastlin_triton::linear_backward", mutates_args=())
def linear_backward(
    grad_output: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, output_mask: Sequence[bool]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (grad_input (N, D), grad_weight (O, D), grad_bias (O,)); masked-off ones are empty (0,)."""
    op = "linear_backward"
    C.check_linear_args(op, input, weight, None)
    C.check_tensor(op, "grad_output", grad_output)
    C.check_same_dtype(op, "grad_output", grad_output, "input", input)
    C.check_shape(op, "grad_output", grad_output, (input.shape[0], weight.shape[0]), "(N, out_features)")
    K.check_devices(op, "input", input, weight=weight, grad_output=grad_output)
    N, D = input.shape
    O = weight.shape[0]
    gi = input.new_empty((N, D)) if output_mask[0] else input.new_empty((0,))
    gw = input.new_empty((O, D)) if output_mask[1] else input.new_empty((0,))
    gb = input.new_empty((O,)) if output_mask[2] else input.new_empty((0,))
    if output_mask[0]:
        if O == 0:
            gi.zero_()
        else:
            matmul_into(gi, grad_output, weight)
    if (output_mask[1] or output_mask[2]) and O > 0:
        pl = OP.plan(N, D, O, input.dtype, input.device)
        ws = OP.workspace(pl, O, D, input.device, need_w=output_mask[1], need_b=output_mask[2])
        OP.run_onepass(
            pl,
            ws,
            input,
            grad_output,
            None,
            None,
            n_rows=N,
            given_g=True,
            need_gw=output_mask[1],
            need_gb=output_mask[2],
        )
        OP.run_reduce(
            pl,
            ws,
            O,
            D,
            mode=0,
            out_w=gw if output_mask[1] else None,
            out_b=gb if output_mask[2] else None,
            grad_scale=1.0,
        )
    return gi, gw, gb
