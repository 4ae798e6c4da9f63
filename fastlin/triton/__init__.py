"""fastlin's Triton backend: every fastlin op as Triton kernels, registered as torch.ops.fastlin_triton.*
with the signatures of csrc/ops.cpp (torch.library.triton_op + wrap_triton, so torch.compile traces
through them). Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (set before triton
is first imported). Select it with backend="triton" (or FASTLIN_BACKEND=triton).

Numerics: fp32 accumulation for fp32/bf16/fp16 inputs, fp64 for fp64. tl.dot (used for O > 4
outputs, and for one output with a bfloat16 x on sm_90 and later: PACK_ONE_OUTPUT)
multiplies a bfloat16 x by three bf16 pieces of each float32 operand (exact products, float32
sums, bf16 tensor cores; a float16 x, at "ieee" precision, goes in as two bf16 pieces, exact too)
and runs float32 operands at ``input_precision()``: by default what
torch.get_float32_matmul_precision() asks of torch's own matmuls ("highest", torch's default: "ieee",
true fp32; "high"/"medium": "tf32"), or "ieee", "tf32", "tf32x3" set by :func:`set_input_precision`
or FASTLIN_TRITON_INPUT_PRECISION.
"""

from fastlin import ops as _ops
from fastlin.triton import _common
from fastlin.triton._common import input_precision, set_input_precision
from fastlin.triton.fit import fit
from fastlin.triton.linear import linear, linear_backward
from fastlin.triton.linear_mse_loss import linear_mse_loss
from fastlin.triton.mse_loss import mse_loss, mse_loss_backward
from fastlin.triton.sgd_update import sgd_update_
from fastlin.triton.train_step import train_step

INTERPRET = _common.INTERPRET

for _op in (linear, linear_backward, mse_loss, mse_loss_backward, linear_mse_loss, sgd_update_, train_step):
    _common.opaque_under_interpreter(_op)
del _op
# fit is a whole training loop (epochs x batches of launches, a seeded generator for the shuffles):
# torch.compile calls it as one opaque op rather than unrolling it into a graph.
_common.make_opaque(fit)
# Shape-only fakes, those of the C++ ops (torch.export keeps a triton_op opaque and runs its fake:
# the default one, the launcher itself, pinned a dynamic batch to its example size).
_ops.register_fakes("fastlin_triton")

__all__ = [
    "fit",
    "input_precision",
    "linear",
    "linear_backward",
    "linear_mse_loss",
    "mse_loss",
    "mse_loss_backward",
    "set_input_precision",
    "sgd_update_",
    "train_step",
    "INTERPRET",
]
