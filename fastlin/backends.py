"""Backend selection: which implementation of the fastlin ops runs for a given device.

Backends:
  cpp        C++ kernels registered for CPU tensors (fastlin._C)
  cuda       CUDA C++ kernels registered for CUDA tensors (fastlin._C built with FASTLIN_BUILD_CUDA)
  triton     Triton kernels (fastlin.triton) on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1
  reference  plain torch (fastlin.reference), any device; the oracle of the tests
  auto       cpp on the CPU; on CUDA, the GPU backend measured faster (_AUTO_CUDA_DEFAULT, or the
             entry in _AUTO_CUDA_CASES for the op, dtype and output width), else the other one,
             else reference

The default comes from the FASTLIN_BACKEND environment variable (read at import, "auto" if unset);
most entry points also take ``backend=``.
"""

from __future__ import annotations

import os
import warnings

import torch

NAMES = ("auto", "cpp", "cuda", "triton", "reference")

# name -> (available, reason when not). Filled once by _probe(); cheap to read afterwards.
_status: dict[str, tuple[bool, str]] = {}
_C_error: str | None = None
_default = os.environ.get("FASTLIN_BACKEND", "auto").strip().lower() or "auto"


def _load_C() -> None:
    global _C_error
    import importlib.util

    if importlib.util.find_spec("fastlin._C") is None:  # (importing it would say "circular import")
        _C_error = "fastlin._C could not be loaded (it is not built: no compiled extension in the package)"
    else:
        try:
            from fastlin import _C  # noqa: F401  (importing it registers torch.ops.fastlin.*)
        except ImportError as e:  # an ABI or torch-version mismatch, a missing library
            _C_error = f"fastlin._C could not be loaded ({e})"
    if _C_error is not None:
        warnings.warn(
            f"{_C_error}; fastlin falls back to the reference backend. "
            "Rebuild with: python -m pip install --no-build-isolation -e .",
            RuntimeWarning,
            stacklevel=3,
        )


def _has_kernel(key: str) -> bool:
    return _C_error is None and torch._C._dispatch_has_kernel_for_dispatch_key("fastlin::train_step", key)


def _triton_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return False, f"triton is not installed ({e})"
    try:
        import fastlin.triton  # noqa: F401
    except ImportError as e:
        return False, f"fastlin.triton could not be imported ({e})"
    if not torch.cuda.is_available() and not interpret_mode():
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels on CPU tensors)"
    return True, ""


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _probe() -> None:
    if _status:
        return
    _load_C()
    _status["reference"] = (True, "")
    _status["cpp"] = (_has_kernel("CPU"), _C_error or "the extension has no CPU kernels")
    if _has_kernel("CUDA"):
        _status["cuda"] = (torch.cuda.is_available(), "no CUDA device")
    else:
        _status["cuda"] = (
            False,
            _C_error
            or "fastlin._C was built without CUDA kernels (build with FASTLIN_BUILD_CUDA=1 and a CUDA torch)",
        )
    _status["triton"] = _triton_status()


def extension_loaded() -> bool:
    """Whether fastlin._C (the op schemas and the compiled kernels) is loaded."""
    _probe()
    return _C_error is None


def status() -> dict[str, tuple[bool, str]]:
    """{backend: (available, reason if not)} for the concrete backends."""
    _probe()
    return dict(_status)


def default() -> str:
    return _default


def set_default(name: str) -> None:
    """Set the process-wide default backend (what FASTLIN_BACKEND sets at import)."""
    global _default
    _default = _validate(name)


def _validate(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in NAMES:
        raise ValueError(f"fastlin: backend must be one of {', '.join(NAMES)}; got {name!r}")
    return name.lower()


# auto on CUDA tensors: the backends to try, fastest first as measured on an H200 (bench/RESULTS.md,
# "### Third lease" and "### Fourth lease", 2026-11-26, default precision). CUDA C++ first: it ran
# train_step 4M x 256 O = 1 in 0.982 vs 1.045 ms (fp32) and 0.607 vs 0.661 ms (bf16), O = 16 fp32
# 4.71 vs 10.57 ms, linear_mse_loss O = 1 fp32 0.982 vs 1.057 ms, sgd_update_ 16.8M parameters
# 0.092 vs 0.152 ms.
_AUTO_CUDA_DEFAULT = ("cuda", "triton")
# (op, input dtype, out_features > 4) -> the order where a measurement puts another backend first.
# bfloat16 with more than 4 outputs: Triton's one-pass tl.dot kernel (bf16 tensor cores, x read
# once) against CUDA's cuBLAS path (x read twice, three bf16 pieces per operand): train_step
# 4M x 256 O = 16 1.379 vs 4.955 ms (fourth lease). linear_mse_loss and fit run the same kernels
# on each backend (Triton's one-pass kernel; CUDA's cuBLAS path past 2^19 elements a batch).
# float16 with more than 4 outputs keeps the default order (CUDA 9.5 vs Triton 10.6 ms, fifth lease)
# until Triton's newer path (x as two bf16 pieces on the tensor cores; predicted 1.6-3.5 ms) is timed.
_AUTO_CUDA_CASES: dict[tuple[str, torch.dtype, bool], tuple[str, ...]] = {
    (op, torch.bfloat16, True): ("triton", "cuda") for op in ("train_step", "linear_mse_loss", "fit")
}


def resolve(
    backend: str | None,
    device: torch.device,
    op: str | None = None,
    dtype: torch.dtype | None = None,
    out_features: int | None = None,
) -> str:
    """The concrete backend that runs op ``op`` (None: any op) for tensors on ``device``; ``auto``
    on CUDA also goes by the input's ``dtype`` and the layer's ``out_features`` where given.

    Raises RuntimeError naming the reason when an explicitly requested backend cannot run there.
    """
    _probe()
    name = _default if backend is None else backend
    if name not in _status and name != "auto":
        name = _validate(name)
    if name == "auto":
        if device.type == "cpu":
            return "cpp" if _status["cpp"][0] else "reference"
        if device.type == "cuda":
            wide = out_features is not None and out_features > 4
            for cand in _AUTO_CUDA_CASES.get((op, dtype, wide), _AUTO_CUDA_DEFAULT):
                if _status[cand][0]:
                    return cand
        return "reference"
    ok, why = _status[name]
    if not ok:
        raise RuntimeError(f"fastlin: backend {name!r} is not available: {why}")
    if name == "cpp" and device.type != "cpu":
        raise RuntimeError(f"fastlin: backend 'cpp' runs on CPU tensors only, got tensors on {device}")
    if name == "cuda" and device.type != "cuda":
        raise RuntimeError(f"fastlin: backend 'cuda' runs on CUDA tensors only, got tensors on {device}")
    if name == "triton" and device.type != "cuda" and not (device.type == "cpu" and interpret_mode()):
        raise RuntimeError(
            f"fastlin: backend 'triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
            f"got tensors on {device}"
        )
    return name
