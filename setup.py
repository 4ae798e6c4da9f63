"""Build fastlin._C: the op schemas (csrc/ops.cpp), the C++ CPU kernels (csrc/cpu/) and, when
building for CUDA, the CUDA kernels (csrc/cuda/).

Install after torch:  pip install --no-build-isolation -e .
Environment:
  FASTLIN_BUILD_CUDA=1|0     force the CUDA kernels on/off (default: on when torch has CUDA and
                             CUDA_HOME is found)
  FASTLIN_CUDA_ARCH_LIST     e.g. "8.0;9.0" (default "8.0;9.0")
  DEBUG=1                    -O0 -g
"""

import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - exercised only on a machine without torch
    sys.exit(
        "fastlin: torch must be installed before fastlin is built, and the build must see it:\n"
        "    python -m pip install torch==2.13.0\n"
        "    python -m pip install --no-build-isolation -e ."
    )

ROOT = os.path.dirname(os.path.abspath(__file__))
DEBUG = os.environ.get("DEBUG", "0") == "1"


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _want_cuda():
    flag = os.environ.get("FASTLIN_BUILD_CUDA")
    if flag is not None:
        return flag == "1"
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _loaded_libstdcxx():
    """Path of the libstdc++ this process runs with (torch, imported above, needs it), or None."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split()  # address perms offset dev inode [path]
                if len(fields) >= 6 and os.path.basename(fields[-1]).startswith("libstdc++.so"):
                    return fields[-1]
    except OSError:
        pass
    return None


# The C++ runtime is linked as the shared library torch itself runs with, named by its full path.
# A toolchain whose g++ links libstdc++ statically (the GPU machines' /opt/gcc, which their CXX
# names; -lstdc++ finds only the archive there) gave _C a private copy of the runtime, and every
# failed input check crashed in that copy's ostream while formatting its message (SIGSEGV on an
# H200, torch 2.11; bench/RESULTS.md). A shared object named on the link line before the driver's
# own -lstdc++ resolves every runtime symbol, so the archive adds nothing.
CXX_RUNTIME = _loaded_libstdcxx()
LINK = ["-fopenmp"] + ([CXX_RUNTIME] if CXX_RUNTIME else [])


def _extension():
    sources = _rel(
        [os.path.join(ROOT, "csrc", "ops.cpp")] + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
    )
    opt = ["-O0", "-g"] if DEBUG else ["-O3"]
    # -ffp-contract=fast lets `a * b + c` in the kernels become one FMA where the ISA has it.
    # -falign-loops=64: every loop starts on a cache line. The bf16 train_step's row loop ran 20-40%
    # slower (262144x256x1, 2 threads: 6.2-8.2 against 4.9-5.6 ms, builds alternated 5 times) after an
    # unrelated change elsewhere in the same object moved it by 32 bytes; aligned, both builds match.
    cxx = opt + [
        "-std=c++17",
        "-fopenmp",
        "-fno-math-errno",
        "-ffp-contract=fast",
        "-falign-loops=64",
        "-Wall",
        "-Wno-unknown-pragmas",
        "-Wno-psabi",
    ]
    macros = [("Py_LIMITED_API", "0x03090000")]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if _want_cuda():
        sources += _rel(
            glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
            + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))
        )
        arch_list = os.environ.get("FASTLIN_CUDA_ARCH_LIST", "8.0;9.0")
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        nvcc = opt + ["-std=c++17", "-lineinfo"] if not DEBUG else ["-O0", "-G", "-std=c++17"]
        macros.append(("FASTLIN_WITH_CUDA", "1"))
        return cpp_extension.CUDAExtension(
            "fastlin._C",
            sources,
            include_dirs=include_dirs,
            define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=LINK,
            py_limited_api=True,
        )
    return cpp_extension.CppExtension(
        "fastlin._C",
        sources,
        include_dirs=include_dirs,
        define_macros=macros,
        extra_compile_args={"cxx": cxx},
        extra_link_args=LINK,
        py_limited_api=True,
    )


setup(
    packages=find_packages(include=["fastlin", "fastlin.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
