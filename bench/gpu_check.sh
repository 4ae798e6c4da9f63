#!/usr/bin/env bash
# The one GPU check of the Triton and CUDA backends (issues 4 and 5). From the repository root of a
# CUDA machine (no network needed):
#     bash bench/gpu_check.sh               # OUT=<dir> keeps gpu_check.log, gpu_bench.json, the table
# Stages, each timestamped, each allowed to fail (reported, the next one still runs):
#   versions   nvidia-smi, python, torch, triton, nvcc
#   build      pip install -e . with the CUDA kernels (FASTLIN_BUILD_CUDA=1, FASTLIN_CUDA_ARCH_LIST=9.0);
#              if that fails, a CPU-only build (the Triton backend needs no compiled code at all)
#   exceptions a failed input check of fastlin._C must raise, on cpu and cuda (else: toolchain facts,
#              the native stack, and a rebuild with another g++)
#   bench      bench/gpu_bench.py: eager, torch.compile, fastlin triton/cuda, the copy-bandwidth limit
#   sanitizer  compute-sanitizer memcheck on a small cuda train_step (when the cuda backend built)
#   profile    only when named in GPU_CHECK_STAGES: Nsight Compute metrics of the kernels behind the
#              missed targets (bench/gpu_profile.py)
#   tests      every GPU test in one pytest-xdist pool, in the time left: tests/test_triton.py,
#              tests/test_cuda*.py and the cuda/triton cases of the other test files
# The bench runs before the tests so a slow build or test run cannot starve it.
# Everything finishes within GPU_CHECK_BUDGET seconds (default 460, under the 8-minute limit); each
# stage gets `timeout` with what is left after the later stages' reserve. The table comes last.
# Environment: OUT (results dir), PYTHON (default python), GPU_CHECK_BUDGET, GPU_CHECK_SKIP_BUILD=1
# (already installed), MAX_JOBS (build parallelism, default nproc), GPU_CHECK_STAGES (a subset of
# "build exceptions bench sanitizer tests", plus "profile", for a short rerun; default all but
# profile), GPU_CHECK_WORKERS (pytest-xdist workers of the tests stage, default 14), GPU_BENCH_ARGS (extra
# arguments of gpu_bench.py, e.g. --no-compile for a rerun), GPU_CHECK_TESTS / GPU_CHECK_K (the test
# files and the -k expression of the tests stage, for a targeted rerun).
set -u
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
T0=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-460}
PY=${PYTHON:-python}
OUT_DIR=${OUT:-}
if [ -n "$OUT_DIR" ]; then
    mkdir -p "$OUT_DIR"
    exec > >(tee -a "$OUT_DIR/gpu_check.log") 2>&1
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # fastlin importable even if the install failed
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

SUMMARY=()
named() { [[ " ${GPU_CHECK_STAGES:-} " == *" $1 "* ]]; }  # stage $1 is listed in GPU_CHECK_STAGES
want() { [ -z "${GPU_CHECK_STAGES:-}" ] || named "$1"; }     # ... or no list was given
elapsed() { echo $(( $(date +%s) - T0 )); }
log() { echo "[gpu_check $(date +%H:%M:%S) +$(elapsed)s] $*"; }
# seconds a stage may take: at most $1, and never eat into the $2 seconds reserved for later stages
allow() {
    local want=$1 reserve=$2 left
    left=$(( BUDGET - $(elapsed) - reserve ))
    [ "$left" -lt "$want" ] && want=$left
    echo "$want"
}
# stage NAME MAX_SECONDS RESERVE_SECONDS CMD... : runs CMD under timeout, logs and records the outcome
stage() {
    local name=$1 max=$2 reserve=$3 secs rc t
    shift 3
    secs=$(allow "$max" "$reserve")
    if [ "$secs" -lt 5 ]; then
        log "== $name: SKIPPED (no time left: budget ${BUDGET}s)"
        SUMMARY+=("$name: skipped (no time left)")
        return 0
    fi
    log "== $name: start (limit ${secs}s): $*"
    t=$(date +%s)
    timeout --kill-after=10 "$secs" "$@"
    rc=$?
    t=$(( $(date +%s) - t ))
    case $rc in
        0) log "== $name: OK (${t}s)"; SUMMARY+=("$name: ok (${t}s)") ;;
        124|137) log "== $name: TIMED OUT after ${t}s"; SUMMARY+=("$name: TIMED OUT after ${t}s") ;;
        *) log "== $name: FAILED rc=$rc (${t}s)"; SUMMARY+=("$name: FAILED rc=$rc (${t}s)") ;;
    esac
    return 0
}

# ------------------------------------------------------------------------------------------------
log "== versions"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 || log "nvidia-smi failed"
$PY - <<'EOF' 2>&1 || true
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton: not importable:", e)
EOF
(command -v nvcc >/dev/null && nvcc --version | tail -2) || log "nvcc not on PATH (CUDA_HOME=${CUDA_HOME:-unset})"
command -v compute-sanitizer >/dev/null || log "compute-sanitizer not on PATH"

# ------------------------------------------------------------------------------------------------
# build: with CUDA kernels; on failure fall back to a CPU-only build (schemas + C++ CPU kernels)
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ "${GPU_CHECK_SKIP_BUILD:-0}" = 1 ] || ! want build; then
    log "build skipped (GPU_CHECK_SKIP_BUILD=1 or not in GPU_CHECK_STAGES)"; SUMMARY+=("build: skipped on request")
else
    stage build-cuda 150 170 env FASTLIN_BUILD_CUDA=1 FASTLIN_CUDA_ARCH_LIST=9.0 \
        $PY -m pip install --no-build-isolation --no-deps -e . -q
    if ! $PY -c "import fastlin, sys; sys.exit(0 if fastlin.backends.status()['cuda'][0] else 1)" 2>/dev/null; then
        log "cuda backend unavailable after the CUDA build; building CPU-only so the cpp backend and schemas exist"
        stage build-cpu-fallback 70 170 env FASTLIN_BUILD_CUDA=0 \
            $PY -m pip install --no-build-isolation --no-deps -e . -q
    fi
fi
$PY -c "import fastlin; fastlin.info()" 2>&1 || log "fastlin.info() failed"

# ------------------------------------------------------------------------------------------------
# C++ exceptions out of fastlin._C: on the first 2026-11-26 H200 run every failed input check
# segfaulted instead of raising. The image's g++ (/opt/gcc, what CXX names) links libstdc++
# statically, and the crash was in that private copy's ostream, formatting the error message;
# setup.py now links the shared libstdc++ explicitly. So: a bad call must raise, on the CPU and on
# the GPU, each in its own process; if it crashes, print the compilers, the extension's NEEDED list
# and the native stack, and rebuild once with another g++ from the PATH or /usr/bin.
cat > /tmp/fastlin_exc.py <<'EOF2'
import sys
import torch
import fastlin  # noqa: F401
dev = sys.argv[1]
x, w = torch.randn(4, 3, device=dev), torch.randn(2, 5, device=dev)
try:  # a C++ exception from torch itself first: does any C++ throw crash, or only ours?
    torch.mm(x, w)
except RuntimeError:
    print(f"  {dev}: torch's own C++ error raised")
try:
    torch.ops.fastlin.linear(x, w, None)
except ValueError as e:
    print(f"  {dev}: bad input raised ValueError: {str(e)[:90]}")
    sys.exit(0)
print(f"  {dev}: bad input did not raise")
sys.exit(1)
EOF2
exc_check() {
    local d rc ok=0
    for d in cpu cuda; do
        timeout 60 $PY /tmp/fastlin_exc.py $d 2>&1 | tail -4
        rc=${PIPESTATUS[0]}
        [ "$rc" = 0 ] || { log "C++ exception on $d: FAILED rc=$rc (139 = segfault)"; ok=1; FAILED_DEV=$d; }
    done
    return $ok
}
# the native stack of the crash (the image has cuda-gdb, which also debugs host-only code)
crash_stack() {
    command -v cuda-gdb >/dev/null || { echo "no cuda-gdb for a native stack"; return 0; }
    echo "native stack of the crash on $1 (cuda-gdb):"
    timeout 120 cuda-gdb -q -batch -ex run -ex bt --args $PY /tmp/fastlin_exc.py "$1" 2>&1 \
        | grep -E "^#|signal|SIG" | head -25
}
toolchain_info() {
    local so
    so=$(ls fastlin/_C*.so 2>/dev/null | head -1)
    echo "CC=${CC:-unset} CXX=${CXX:-unset}; on PATH: $(which -a gcc g++ c++ 2>/dev/null | tr '\n' ' ')"
    for c in ${CXX:-} $(which -a g++ 2>/dev/null) /usr/bin/g++*; do [ -x "$c" ] && echo "$c: $($c --version | head -1)"; done
    [ -n "$so" ] && readelf -d "$so" | grep -E "NEEDED" && echo "C++ runtime symbols inside $so:" \
        "$(nm "$so" | grep -c ' [TW] _ZNSo9_M_insert')"
}
if want exceptions && [ -n "$(ls fastlin/_C*.so 2>/dev/null)" ]; then
    log "== exceptions: does a failed input check raise (cpu, cuda)?"
    if exc_check; then
        SUMMARY+=("exceptions: ok (cpu and cuda raise ValueError)")
    else
        toolchain_info 2>&1
        crash_stack "$FAILED_DEV"
        ALT=""
        for c in $(which -a g++ 2>/dev/null) /usr/bin/g++ /usr/bin/g++-1[0-9]; do
            if [ -x "$c" ] && [ "$(readlink -f "$c")" != "$(readlink -f "${CXX:-$(command -v g++)}")" ]; then
                ALT=$c; break
            fi
        done
        if [ -n "$ALT" ]; then
            ALTCC=${ALT/g++/gcc}
            log "rebuilding with CXX=$ALT CC=$ALTCC"
            stage build-cuda-alt 150 150 env CXX="$ALT" CC="$ALTCC" FASTLIN_BUILD_CUDA=1 FASTLIN_CUDA_ARCH_LIST=9.0 \
                $PY -m pip install --no-build-isolation --no-deps -e . -q
            WHAT="rebuilding with $ALT"
        else
            WHAT="no other g++ to rebuild with"
        fi
        if exc_check; then SUMMARY+=("exceptions: FAILED with the default build, ok after $WHAT")
        else SUMMARY+=("exceptions: FAILED (also after $WHAT)"); toolchain_info 2>&1 | tail -4; fi
    fi
fi

# ------------------------------------------------------------------------------------------------
# the bench (autotuning on): table written to $OUT and printed again at the very end
TABLE=${OUT_DIR:-/tmp}/gpu_bench_table.txt
rm -f "$TABLE"
want bench && stage bench 110 20 env TRITON_INTERPRET=0 OUT="${OUT_DIR:-/tmp}" $PY bench/gpu_bench.py ${GPU_BENCH_ARGS:-}

# ------------------------------------------------------------------------------------------------
if ! want sanitizer; then
    :
elif $PY -c "import fastlin, sys; sys.exit(0 if fastlin.backends.status()['cuda'][0] else 1)" 2>/dev/null \
    && command -v compute-sanitizer >/dev/null; then
    cat > /tmp/fastlin_sanitize.py <<'EOF'
import torch, fastlin
from fastlin import ops
for N, D, O in [(1, 1, 1), (7, 3, 3), (4097, 257, 17), (1000, 256, 1)]:
    for dt in (torch.float32, torch.bfloat16):
        x, y = torch.randn(N, D, device="cuda").to(dt), torch.randn(N, O, device="cuda").to(dt)
        w, b = torch.randn(O, D, device="cuda"), torch.randn(O, device="cuda")
        wm, bm = torch.zeros_like(w), torch.zeros_like(b)
        ops.train_step(x, y, w, b, wm, bm, torch.rand(N, device="cuda"), lr=0.01, momentum=0.9, backend="cuda",
                       first_step=True)
        ops.fit(x, y, w, b, wm, bm, None, epochs=2, batch_size=max(1, N // 3), lr=0.01, momentum=0.9, backend="cuda")
torch.cuda.synchronize()
print("sanitized train_step/fit runs done")
EOF
    stage sanitizer 60 10 compute-sanitizer --tool memcheck --error-exitcode 1 $PY /tmp/fastlin_sanitize.py
else
    log "sanitizer stage skipped (cuda backend unavailable or no compute-sanitizer)"
    SUMMARY+=("sanitizer: skipped (cuda backend unavailable or no compute-sanitizer)")
fi

if named profile; then
    if command -v ncu >/dev/null; then
        NCSV=${OUT_DIR:-/tmp}/ncu.csv
        stage profile 120 8 bash -c "ncu --csv --profile-from-start off --metrics $($PY bench/gpu_profile.py --metrics) \
            $PY bench/gpu_profile.py > $NCSV 2>&1; $PY bench/gpu_profile.py --summarize $NCSV"
    else
        log "profile stage skipped: no ncu on PATH"; SUMMARY+=("profile: skipped (no ncu)")
    fi
fi

# pytest-xdist when it is there (the GPU image has it): a crashing test then costs one worker, not
# the stage, and kernel compilation runs in parallel
XDIST_OK=0
$PY -c "import xdist" 2>/dev/null && XDIST_OK=1
xdist() { [ "$XDIST_OK" = 1 ] && echo "-n $1"; }
# Every GPU test in one pytest-xdist pool, last, in the time left: tests/test_triton.py (Triton
# kernels against the float64 reference; FASTLIN_GPU_QUICK=1: its GPU shape selection),
# tests/test_cuda*.py, and the cuda / triton cases of every other test file (parity, gradcheck,
# opcheck, torch.compile, modules, optimizer, regressor). FASTLIN_TRITON_AUTOTUNE=0: one heuristic
# config per shape (autotuning every test shape costs minutes). One pool instead of three stages in
# a row (the lease of 2026-11-26 05:29 spent 76 + 40 s on the first two and cut the third at 89%).
# (tests/test_triton_writes.py runs on the CPU alone: CI has it.) Files in order of what a cut would
# cost (xdist hands tests out in collection order, so a run cut by the budget loses the last files):
# the two backends' own files, the fused ops, then the rest with the 494 module cases last. The
# reference backend's CUDA cases are left out (it is the oracle), except under torch.compile: that
# is where torch 2.11 (the GPU image's) differs from CI's torch (a zero gradient, session 10).
FIRST="tests/test_triton.py tests/test_cuda.py tests/test_train_step.py tests/test_linear_mse_loss.py tests/test_fit.py"
LAST="tests/test_nn.py"
TESTS="$(for f in $FIRST; do [ -f "$f" ] && echo "$f"; done) $(ls tests/test_*.py 2>/dev/null \
    | grep -v -e test_triton_writes.py $(for f in $FIRST $LAST; do echo "-e $f"; done)) $([ -f $LAST ] && echo $LAST)"
TESTS=$(echo ${GPU_CHECK_TESTS:-$TESTS})
if ! want tests; then
    :
elif [ -n "$TESTS" ]; then
    # one line per test (-v) into tests.log, and each failure's message into failures.log as it
    # happens (tests/conftest.py, FASTLIN_FAIL_LOG), so a run cut short by the budget still says
    # what failed and why
    GLOG=${OUT_DIR:-/tmp}/tests.log
    FLOG=${OUT_DIR:-/tmp}/failures.log
    rm -f "$FLOG"
    stage gpu-tests 420 8 env TRITON_INTERPRET=0 FASTLIN_TRITON_AUTOTUNE=0 FASTLIN_GPU_QUICK=1 \
        FASTLIN_FAIL_LOG="$FLOG" bash -c "\
        $PY -m pytest -v -p no:cacheprovider -W ignore::DeprecationWarning $(xdist "${GPU_CHECK_WORKERS:-14}") \
        $TESTS -k '${GPU_CHECK_K:-((cuda or triton) and not reference-cuda) or (test_compile and reference-cuda)}' \
        --tb=short -rfE --durations=25 > $GLOG 2>&1"
    log "gpu tests: $(grep -c ' PASSED' "$GLOG") passed, $(grep -c ' FAILED' "$GLOG") failed, \
$(grep -c ' SKIPPED' "$GLOG") skipped, $(grep -c 'node down\|crashed' "$GLOG") worker crashes, \
last progress $(grep -o '\[ *[0-9]*%\]' "$GLOG" | tail -1); first failures:"
    [ -f "$FLOG" ] && head -60 "$FLOG"
    grep -E 'crashed|node down' "$GLOG" | head -10
    # the slowest tests (what to trim when the stage is cut by the budget)
    sed -n '/slowest .*durations/,/^$/p' "$GLOG" | head -28
    tail -3 "$GLOG"
else
    log "no tests/test_*.py"; SUMMARY+=("gpu-tests: none present")
fi

# ------------------------------------------------------------------------------------------------
log "== summary (budget ${BUDGET}s, used $(elapsed)s)"
for s in "${SUMMARY[@]}"; do echo "  $s"; done
echo
if [ -s "$TABLE" ]; then
    echo "== GPU bench ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1))"
    cat "$TABLE"
else
    echo "== GPU bench: no table (see the bench stage above)"
fi
