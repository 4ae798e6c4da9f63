#!/usr/bin/env bash
# CI for the CUDA sources (called by .ci/run). No GPU is needed:
#   1. every csrc/cuda/*.cu compiles with nvcc for sm_80 and sm_90, warnings as errors, the same
#      defines torch's cpp_extension passes; ptxas register/spill figures of the row-pass kernels
#      are printed;
#   2. a torch-free host harness (csrc/cuda/tests/harness.cu) links against cudart and calls every
#      launcher (without a GPU it says "no CUDA device" and exits 0; with one it runs a numeric
#      self-check);
#   3. the kernels themselves run on a CPU emulation of the CUDA execution model
#      (csrc/cuda/tests/cuda_emu.h) against a float64 reference: a smoke subset here.
# Options: --emu-full  run the whole emulator suite under AddressSanitizer + UBSan (slow: ~30 min
#                      on 2 busy cores);
#          --no-emu    skip step 3;
#          --bench     run the harness with --bench (on a GPU: train_step vs copy bandwidth);
#          --glue      also compile the tensor glue (csrc/cuda/*.cpp; -O0, no object kept: unlike a
#                      syntax check this runs the flow warnings, e.g. -Winfinite-recursion) with g++ against the torch
#                      headers of the python3 on PATH (a CPU torch will do: c10/cuda's generated
#                      macro header is stubbed).
#          --torch-include=DIR
#                      the same against another torch's headers (DIR = a torch/include tree, e.g.
#                      unpacked from the wheel the GPU machines run: torch 2.11 there, 2.13 here),
#                      and every other C++ source too (csrc/ops.cpp, csrc/cpu/*.cpp). The torch 2.11
#                      build broke on an API change (autograd nodes: shared_ptr vs intrusive_ptr)
#                      that only a device run showed; this finds such breaks here:
#                        pip download torch==2.11.0 --no-deps -d /tmp/t && unzip -q /tmp/t/torch-*.whl 'torch/include/*' -d /tmp/t
#                        .ci/compile_cuda.sh --no-emu --torch-include=/tmp/t/torch/include
# FASTLIN_CUDA_OUT=dir keeps the objects and the harness there (e.g. for compute-sanitizer).
# Skips with a message (exit 0) when nvcc is not installed.
set -euo pipefail
cd "$(dirname "$0")/.."

emu=smoke
harness_args=""
glue=0
torch_inc=""
for arg in "$@"; do
  case "$arg" in
    --emu-full) emu=full ;;
    --no-emu) emu=none ;;
    --bench) harness_args=--bench ;;
    --glue) glue=1 ;;
    --torch-include=*) glue=1; torch_inc=${arg#--torch-include=} ;;
    *) echo "compile_cuda.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

NVCC="${NVCC:-}"
if [ -z "$NVCC" ]; then
  if [ -x /usr/local/cuda-13.0/bin/nvcc ]; then
    NVCC=/usr/local/cuda-13.0/bin/nvcc
  elif command -v nvcc >/dev/null 2>&1; then
    NVCC=$(command -v nvcc)
  fi
fi
if [ -z "$NVCC" ] || [ ! -x "$NVCC" ]; then
  echo "compile_cuda.sh: nvcc not found; skipping the CUDA compile checks"
  exit 0
fi
CUDA_ROOT=$(cd "$(dirname "$NVCC")/.." && pwd)
JOBS=$(nproc 2>/dev/null || echo 2)
if [ -n "${FASTLIN_CUDA_OUT:-}" ]; then
  out=$FASTLIN_CUDA_OUT
  mkdir -p "$out"
else
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
fi
echo "+ $NVCC ($("$NVCC" --version | tail -n 1)); $JOBS jobs"

# torch's cpp_extension COMMON_NVCC_FLAGS, then ours. --Werror all-warnings: any nvcc/ptxas warning
# fails; -Xcompiler -Wall,-Wextra,-Werror: host-side warnings in our sources fail.
NVFLAGS=(-std=c++17 -O3 -lineinfo
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr
  -Xcompiler -Wall,-Wextra,-Werror --Werror all-warnings
  -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
  -Icsrc/cuda -Xptxas -v)
export NVCC out
printf '%s\n' "${NVFLAGS[@]}" > "$out/flags"

compile_one() {
  local src=$1 obj
  obj="$out/$(basename "$src" .cu).o"
  mapfile -t flags < "$out/flags"
  if ! "$NVCC" "${flags[@]}" -c "$src" -o "$obj" > "$obj.log" 2>&1; then
    cat "$obj.log"
    echo "FAILED: $src"
    return 1
  fi
  echo "ok: $src"
}
export -f compile_one

start=$(date +%s)
ls csrc/cuda/*.cu | xargs -P "$JOBS" -I{} bash -c 'compile_one {}'
echo "compiled $(ls csrc/cuda/*.cu | wc -l) files for sm_80 + sm_90 in $(( $(date +%s) - start )) s"

# Register and spill figures of the row-pass kernels on sm_90 (the train-step / linear work horse).
python3 - "$out" <<'EOF'
import glob, re, subprocess, sys
rows = []
for log in sorted(glob.glob(sys.argv[1] + "/rowpass_*.o.log")):
    cur = None
    for line in open(log):
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
        if m:
            cur = [m.group(1), m.group(2), "?", "?"]
            rows.append(cur)
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and cur:
            cur[3] = f"spill {m.group(2)}/{m.group(3)} B"
        m = re.search(r"Used (\d+) registers", line)
        if m and cur:
            cur[2] = m.group(1)
names = [r[0] for r in rows]
try:
    dem = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
except OSError:
    dem = names
print("ptxas (sm_90), rowpass_kernel<T, VEC, OT, KMAX>: registers, spills")
for r, d in zip(rows, dem):
    if r[1] != "sm_90":
        continue
    d = d.replace("fastlin::cuda::", "").replace("(RowPassArgs)", "").replace("void ", "")
    print(f"  {r[2]:>4} regs  {r[3]:<16} {d}")
EOF

if [ "$glue" = 1 ]; then
  if [ -n "$torch_inc" ]; then
    inc="$torch_inc $torch_inc/torch/csrc/api/include"
  else
    inc=$(python3 -c "from torch.utils import cpp_extension as c; print(' '.join(c.include_paths()))")
  fi
  pyinc=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['include'])")
  isys=()
  if [ ! -f "${inc%% *}/c10/cuda/impl/cuda_cmake_macros.h" ]; then  # a CPU torch: stub it
    mkdir -p "$out/stubs/c10/cuda/impl"
    printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$out/stubs/c10/cuda/impl/cuda_cmake_macros.h"
    isys=(-isystem "$out/stubs")
  fi
  for d in $inc "$pyinc" "$CUDA_ROOT/include"; do isys+=(-isystem "$d"); done
  common=(-std=c++17 -Wno-unknown-pragmas -Wno-psabi "${isys[@]}" -Icsrc
    -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C -D_GLIBCXX_USE_CXX11_ABI=1
    -DPy_LIMITED_API=0x03090000 -DFASTLIN_WITH_CUDA=1)
  for src in csrc/cuda/*.cpp; do
    g++ "${common[@]}" -c -O0 -o /dev/null -Wall -Wextra -Werror "$src"
    echo "glue ok: $src"
  done
  if [ -n "$torch_inc" ]; then  # the CPU sources with the build's own flags (setup.py), in parallel
    printf '%s\n' csrc/ops.cpp csrc/cpu/*.cpp | xargs -P "$JOBS" -I{} sh -c \
      'g++ "$@" -fsyntax-only -fopenmp -Wall {} && echo "ok against $0: {}"' "$torch_inc" "${common[@]}"
  fi
fi

# Host harness: links every launcher against cudart.
"$NVCC" -std=c++17 -O2 -Icsrc/cuda -Xcompiler -Wall,-Wextra,-Werror --Werror all-warnings \
  -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
  -c csrc/cuda/tests/harness.cu -o "$out/harness.o"
"$NVCC" -o "$out/harness" "$out"/*.o
echo "+ harness $harness_args"
"$out/harness" $harness_args

# Step 3: the kernels on the CPU emulator (g++ >= 11 for C++20 <barrier>-free fibers via ucontext).
if [ "$emu" != none ]; then
  CXX=${CXX:-g++}
  if ! command -v "$CXX" >/dev/null 2>&1; then
    echo "compile_cuda.sh: no C++ compiler for the emulator; skipping it"
    exit 0
  fi
  if [ "$emu" = full ]; then
    EFLAGS=(-O1 -g -fsanitize=address,undefined -fno-sanitize-recover=undefined)
    mode=""
  else
    EFLAGS=(-O1)
    mode="--smoke"
  fi
  start=$(date +%s)
  mkdir -p "$out/emu"
  for src in csrc/cuda/*.cu; do
    "$CXX" -std=c++20 -x c++ -DFASTLIN_CUDA_EMU "${EFLAGS[@]}" -Wall -Wextra -Werror -Wno-unknown-pragmas \
      -Icsrc/cuda -isystem "$CUDA_ROOT/include" -c "$src" -o "$out/emu/$(basename "$src" .cu).o" &
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 0.2; done
  done
  "$CXX" -std=c++20 -DFASTLIN_CUDA_EMU "${EFLAGS[@]}" -Wall -Wextra -Werror -Wno-unknown-pragmas -Icsrc/cuda \
    -Icsrc/cuda/tests -isystem "$CUDA_ROOT/include" -c csrc/cuda/tests/emu_test.cpp -o "$out/emu/emu_test.o" &
  wait
  "$CXX" "${EFLAGS[@]}" "$out"/emu/*.o -o "$out/emu/emu_test"
  echo "+ emulator ($emu)"
  ASAN_OPTIONS=detect_leaks=0 "$out/emu/emu_test" $mode 2> >(grep -v "ASan doesn't fully support makecontext" >&2)
  echo "emulator: $(( $(date +%s) - start )) s"
fi
