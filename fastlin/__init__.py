"""fastlin: fused kernels for training linear models in PyTorch.

import fastlin
model = fastlin.nn.Linear(1, 1)           # drop-in for torch.nn.Linear
criterion = fastlin.nn.MSELoss()          # drop-in for torch.nn.MSELoss
opt = fastlin.optim.SGD(model.parameters(), lr=0.01)
fastlin.info()                            # which backends run here, and why not
reg = fastlin.FusedLinearRegressor(1, 1, lr=0.01).fit(x, y, epochs=1000)   # fused training loop
"""

from __future__ import annotations

__version__ = "0.1.0"

from fastlin import (  # noqa: E402
    autograd,
    backends,  # noqa: E402  (loads fastlin._C, or warns once and falls back)
    functional,
    nn,
    ops,
    optim,
    reference,
    solvers,
)
from fastlin.regressor import FusedLinearRegressor  # noqa: E402
from fastlin.solvers import IllConditionedWarning, ridge_path  # noqa: E402

__all__ = [
    "FusedLinearRegressor",
    "IllConditionedWarning",
    "autograd",
    "backends",
    "functional",
    "info",
    "nn",
    "ops",
    "optim",
    "reference",
    "ridge_path",
    "solvers",
    "__version__",
]


def info(file=None) -> dict:
    """Print (and return) what fastlin runs on here: versions, threads, and each backend's status."""
    import os
    import platform
    import sys

    import torch

    status = backends.status()
    report = {
        "fastlin": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "threads": torch.get_num_threads(),
        # the instruction set of the C++ kernels (csrc/cpu/isa.h; FASTLIN_CPU_ISA caps it)
        "cpu_isa": torch.ops.fastlin.cpu_isa() if backends.extension_loaded() else None,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "default_backend": backends.default(),
        "backends": {k: {"available": ok, "reason": why} for k, (ok, why) in status.items()},
    }
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        report["triton"] = None
    if torch.cuda.is_available():
        report["gpu"] = torch.cuda.get_device_name()
    out = file or sys.stdout
    print(
        f"fastlin {__version__}  torch {report['torch']}  triton {report['triton']}  "
        f"python {report['python']}",
        file=out,
    )
    print(
        f"cpu: {report['processor']} ({report['machine']}), {report['threads']} threads, "
        f"kernels {report['cpu_isa'] or 'none'}"
        f"{'  OMP_NUM_THREADS=' + os.environ['OMP_NUM_THREADS'] if 'OMP_NUM_THREADS' in os.environ else ''}",
        file=out,
    )
    if torch.cuda.is_available():
        print(f"gpu: {report['gpu']} (CUDA {report['cuda']})", file=out)
    print(f"default backend: {report['default_backend']}", file=out)
    for name, (ok, why) in status.items():
        print(f"  {name:<10} {'available' if ok else 'unavailable: ' + why}", file=out)
    return report


def _cpu_name() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
