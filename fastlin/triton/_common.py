"""Shared pieces of the Triton backend: settings, input checks, launch helpers, small jit helpers.

Settings (module level, read at each call, so they can be changed at run time):

* ``input_precision`` of ``tl.dot`` on float32 operands: ``"ieee"`` (true fp32 FMAs, so the
  results hold the float32 tolerance of DESIGN.md, ~1e-7 relative), ``"tf32"`` (tensor cores,
  ~3e-4 relative, what torch does with ``allow_tf32``) or ``"tf32x3"`` (three TF32 products, close to
  fp32). By default it follows ``torch.get_float32_matmul_precision()`` like torch's own matmuls:
  ``"highest"`` (torch's default) gives ``"ieee"``, ``"high"``/``"medium"`` give ``"tf32"``. Set it
  with :func:`set_input_precision` (``None`` to follow torch again) or the environment variable
  ``FASTLIN_TRITON_INPUT_PRECISION``. Only the paths with ``O > 4`` outputs use ``tl.dot`` (and
  ``linear``/``grad_input`` with more than 4 columns on both sides); ``O <= 4`` runs on FMAs, exact fp32
  whatever the setting. The one-pass kernels upcast bf16/fp16 ``x`` to fp32 before the dot (the
  weights are fp32 master copies); ``linear`` with bf16/fp16 operands of one dtype uses their native
  tensor-core dot (exact products, fp32 accumulation). Measured on an H200 (4M x 256, O = 16, one
  train_step; bench/RESULTS.md): "ieee" 11.2 ms, "tf32x3" 4.6 ms, "tf32" 2.2 ms, stock eager 4.3 ms.
* ``PROGRAMS_PER_SM``: programs of the persistent one-pass kernels per streaming multiprocessor.
* ``MAX_BLOCK_D`` / ``MAX_BLOCK_D_DOT`` / ``MAX_BLOCK_O``: the widest rows kept whole in registers
  and the outputs per program; wider rows are walked in chunks (a second, cache-hot read of each
  row tile), more outputs split over programs. Tests lower them to reach those paths cheaply.
Environment, read at import: ``FASTLIN_TRITON_AUTOTUNE=0`` (no benchmarking: the first, heuristic
config per shape; for test runs on a GPU), ``FASTLIN_TRITON_OPAQUE=1`` (torch.compile calls the ops
instead of tracing into their kernels), ``TRITON_INTERPRET=1`` (CPU tensors through the interpreter).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from fastlin import _checks as C

# Triton reads TRITON_INTERPRET when it is imported; so do we (a later change would not take effect).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpreter_numpy_shim() -> None:
    """Triton 3.6.0's interpreter turns a scalar into a Python int with int(array of shape (1,)),
    which numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"), so
    any `range()` with a run-time bound fails. Fixed upstream (triton-lang/triton#9171, PR #9172)
    after 3.6.0; until then index through the array's single element. Interpreter only."""
    try:
        from triton.runtime import interpreter as I
    except ImportError:  # pragma: no cover
        return
    orig = getattr(I, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_fastlin_shim", False):
        return

    def _patch_lang_tensor(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _patch_lang_tensor._fastlin_shim = True
    I._patch_lang_tensor = _patch_lang_tensor


if INTERPRET:
    _interpreter_numpy_shim()

PRECISIONS = ("ieee", "tf32", "tf32x3")
# None: follow torch.get_float32_matmul_precision() (what torch's own float32 matmuls do on CUDA)
_input_precision = os.environ.get("FASTLIN_TRITON_INPUT_PRECISION", "").strip().lower() or None
if _input_precision is not None and _input_precision not in PRECISIONS:
    raise ValueError(
        f"fastlin: FASTLIN_TRITON_INPUT_PRECISION must be one of {', '.join(PRECISIONS)}; "
        f"got {_input_precision!r}"
    )
# torch's float32 matmul precision -> tl.dot's: "highest" is true fp32; "high" and "medium" let
# torch's CUDA matmuls use TF32 tensor cores (torch.backends.cuda.matmul.allow_tf32 follows it)
_FROM_TORCH = {"highest": "ieee", "high": "tf32", "medium": "tf32"}

PROGRAMS_PER_SM = 2  # with the pipelined tile loop 2 resident programs per SM keep HBM busy
MAX_BLOCK_D = 512  # O <= 4 path: widest row (x BLOCK_O) kept whole in registers
MAX_BLOCK_D_DOT = 256  # the same for the tl.dot path (O > 4), also capped by the W tile: 8192 // BLOCK_O
MAX_BLOCK_O = 64  # outputs per program on the tl.dot path; more outputs split over a second grid axis
# One output and a bfloat16 x on the tensor cores (_onepass PACK: the three bf16 pieces of w packed
# into one tl.dot operand; two bf16 dots a tile instead of ~2 FMAs and a 32-lane shuffle reduction
# per row on the CUDA cores): None lets the autotuner choose between it and the FMA path, PACK
# being the pick without autotuning (N = 4M, D = 256 on an H200: 0.616 ms, 82% of the bf16 read,
# against the FMA path's 0.662 ms in the same run), True forces it, False rules it out.
# FASTLIN_TRITON_PACK_ONE_OUTPUT=1 / 0.
_pack_env = os.environ.get("FASTLIN_TRITON_PACK_ONE_OUTPUT", "").strip()
PACK_ONE_OUTPUT: bool | None = None if _pack_env == "" else _pack_env == "1"
# PACK_DEFER, an experiment for the next GPU measurement (FASTLIN_TRITON_PACK_DEFER=1; gpu_bench's
# triton:packdefer): PACK subtracts each tile's dW product at the next tile's forward dot instead of
# right after its own dot; bit-identical results. In the sm_90a SASS (session 11's reading) the
# subtraction's 32 FADDs then sit in that dot's wait window, not between the dW dot's wait and the
# next tile's cp.async issues (summing the products outside the tensor core cost PACK ~9% on an
# H200: 0.528 -> 0.616 ms).
PACK_DEFER: bool = os.environ.get("FASTLIN_TRITON_PACK_DEFER", "0") == "1"
INTERPRET_PROGRAMS = 4  # the interpreter runs programs one after the other: few, big ones
# FASTLIN_TRITON_AUTOTUNE=0: no benchmarking, the first (heuristic) config for each shape. For test
# runs on a GPU, where every shape would otherwise be tuned; benchmarks leave it on.
AUTOTUNE = os.environ.get("FASTLIN_TRITON_AUTOTUNE", "1") != "0"
# FASTLIN_TRITON_OPAQUE=1: torch.compile calls every op as an opaque custom op instead of tracing into
# its kernels (a fallback should a torch version fail to trace them; fit is always opaque).
OPAQUE = os.environ.get("FASTLIN_TRITON_OPAQUE", "0") == "1"


def set_input_precision(precision: str | None) -> None:
    """input_precision of tl.dot on float32 operands: "ieee", "tf32" or "tf32x3"; None (the default)
    follows torch.get_float32_matmul_precision(): "highest" (torch's default) -> "ieee", "high" or
    "medium" -> "tf32"."""
    global _input_precision
    if precision is None:
        _input_precision = None
        return
    p = str(precision).lower()
    if p not in PRECISIONS:
        raise ValueError(
            f"fastlin.triton: input_precision must be one of {', '.join(PRECISIONS)} or None; "
            f"got {precision!r}"
        )
    _input_precision = p


def input_precision() -> str:
    """The input_precision the next launch uses (see set_input_precision)."""
    if _input_precision is not None:
        return _input_precision
    return _FROM_TORCH.get(torch.get_float32_matmul_precision(), "ieee")


# ---------------------------------------------------------------------------------------------
# Checks (in addition to fastlin._checks, whose messages are the C++ ones).


def check_devices(op: str, ref_name: str, ref: torch.Tensor, **tensors) -> None:
    """Every tensor on ref's device, and that device one the Triton backend runs on."""
    dev = ref.device
    if dev.type != "cuda" and not (dev.type == "cpu" and INTERPRET):
        raise RuntimeError(
            f"fastlin.{op}: {ref_name} is on {dev}; the Triton backend runs on CUDA tensors (or on CPU "
            f"tensors when TRITON_INTERPRET=1 is set before triton is first imported)"
        )
    for name, t in tensors.items():
        if t is not None:
            C.check_same_device(op, name, t, ref_name, ref)


# Host-side integer helpers in plain Python: triton.cdiv / triton.next_power_of_2 are constexpr
# functions costing ~3.5 us a call on the host, and a train_step's plan makes about ten such calls
# (measured with the launch patched out: Triton sgd_update_ spent 41 of its 90 us of host time in 16
# cdiv calls).
def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_TL = {torch.float32: tl.float32, torch.float64: tl.float64}


def tl_acc(dtype: torch.dtype):
    return _TL[acc_dtype(dtype)]


@functools.cache
def _props(index: int):
    return torch.cuda.get_device_properties(index)


def _cuda_props(device: torch.device):
    """The (cached) properties of a CUDA device; the current one for an index-less device."""
    return _props(device.index if device.index is not None else torch.cuda.current_device())


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) compute capability of a CUDA device; None elsewhere (the interpreter)."""
    if device.type != "cuda":
        return None
    p = _cuda_props(device)
    return (p.major, p.minor)


def persistent_programs(device: torch.device, work_items: int) -> int:
    """Programs of a persistent kernel: a few per SM, never more than there are items of work.
    Fixed by the device, not by the autotuned tile size, so workspaces can be sized before the
    launch (programs left without a tile write zero partials)."""
    if device.type == "cuda":
        cap = _cuda_props(device).multi_processor_count * PROGRAMS_PER_SM
    else:
        cap = INTERPRET_PROGRAMS
    return max(1, min(cap, int(work_items)))


def launch(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs), through torch.library.wrap_triton on a GPU (torch.compile
    traces the launch). Under the interpreter the kernel is called as it is: the ops are opaque
    there (opaque_under_interpreter) and have shape-only fakes, so no tracer reaches a launch, and
    torch 2.11's wrap_triton refuses interpreted kernels (2.13's hands them back unwrapped)."""
    if INTERPRET:
        kernel[grid](*args, **kwargs)
        return
    dev = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    if (
        dev is not None
        and dev.type == "cuda"
        and dev.index is not None
        and dev.index != torch.cuda.current_device()
    ):
        with torch.cuda.device(dev):  # Triton launches on the current device
            torch.library.wrap_triton(kernel)[grid](*args, **kwargs)
        return
    torch.library.wrap_triton(kernel)[grid](*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# jit helpers


@triton.jit
def cast_out(v, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """v.to(dtype) with round-to-nearest-even. Triton 3.6's interpreter truncates fp32 -> bf16
    (error up to 2^-7), so there the rounding is done on the bits; on the GPU this is the native
    conversion."""
    if INTERPRET and dtype == tl.bfloat16:
        bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        out = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = v.to(dtype)
    return out


# Products on FMAs (the one-pass kernels' paths without tl.dot, BLOCK_O <= 4), as a broadcast
# product summed over the shared axis. A shared axis of size 1 is a plain broadcast instead: on an
# H200 (Triton 3.6.0) tl.sum over a size-1 axis of such a 3-D product came out ~8x too large, the
# interpreter being right. The same 3-D form in `linear` (a loaded tile, shared axis 4, output tile
# 32-64 wide) was wrong outright there; these uses pass every GPU test at O = 2..4, which is a
# property of their operands' layouts: re-check them on a GPU after any Triton upgrade.


@triton.jit
def fma_mm(a, b, K: tl.constexpr):
    """a (M, K) @ b (K, N) -> (M, N); K is the block size of the shared axis."""
    if K == 1:
        out = a * b
    else:
        out = tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    return out


@triton.jit
def fma_mm_nt(a, b, K: tl.constexpr):
    """a (M, K) @ b (N, K)^T -> (M, N), summed along the rows' contiguous axis."""
    if K == 1:
        out = a * tl.trans(b)
    else:
        out = tl.sum(a[:, None, :] * b[None, :, :], axis=2)
    return out


@triton.jit
def is_finite(v):
    """Elementwise: v is neither inf nor NaN (inf - inf and NaN - NaN are NaN)."""
    return (v - v) == 0


@triton.jit
def scalar(v, ACC: tl.constexpr):
    """A float kernel argument as an ACC scalar. Float arguments are declared tl.float64 so fp64
    kernels get them unrounded; the interpreter passes them as Python floats (no .to()), and
    tl.full makes the constant in ACC directly from the double there."""
    return tl.full((), v, ACC)


def make_opaque(op) -> None:
    """Keep a triton_op opaque to AOT functionalization (like a torch.library.custom_op): the
    compiled graph calls the op, which launches its kernels, instead of tracing into them."""
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    def _opaque(mode, func, types, args, kwargs):
        return mode.__torch_dispatch__(func, types, args, kwargs)

    op.register_torch_dispatch(FunctionalTensorMode, _opaque)


def opaque_under_interpreter(op) -> None:
    """Under TRITON_INTERPRET=1 keep a triton_op opaque to AOT functionalization (like a
    torch.library.custom_op) instead of decomposing it into its kernels: interpreted kernels cannot
    be traced, but an opaque op can, so torch.compile and opcheck's AOT test work on CPU tensors
    too (the compiled graph calls the op, which runs the interpreted kernels). On a GPU nothing
    changes: torch.compile sees through the op to the Triton kernels."""
    if INTERPRET or OPAQUE:
        make_opaque(op)
