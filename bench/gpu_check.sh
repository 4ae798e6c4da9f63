#!/usr/bin/env bash
# The one GPU check of the Triton and CUDA backends (issues 4 and 5). From the repository root of a
# CUDA machine (no network needed):
#     bash bench/gpu_check.sh               # OUT=<dir> keeps gpu_check.log, gpu_bench.json, the table
# Stages, each timestamped, each allowed to fail (reported, the next one still runs):
#   versions   nvidia-smi, python, torch, triton, nvcc
#   build      pip install -e . with the CUDA kernels (FASTLIN_BUILD_CUDA=1, FASTLIN_CUDA_ARCH_LIST=9.0);
#              if that fails, a CPU-only build (the Triton backend needs no compiled code at all)
#   triton     TRITON_INTERPRET=0 pytest tests/test_triton.py (quick selection: FASTLIN_GPU_QUICK=1)
#   bench      bench/gpu_bench.py: eager, torch.compile, fastlin triton/cuda, the copy-bandwidth limit
#   cuda       pytest tests/test_cuda*.py (when present)
#   sanitizer  compute-sanitizer memcheck on a small cuda train_step (when the cuda backend built)
#   generic    the generic suite (tests/test_*.py) filtered to its cuda/triton cases, in the time left
# The bench runs before the longer test stages so a slow build or test run cannot starve it.
# Everything finishes within GPU_CHECK_BUDGET seconds (default 460, under the 8-minute limit); each
# stage gets `timeout` with what is left after the later stages' reserve. The table comes last.
# Environment: OUT (results dir), PYTHON (default python), GPU_CHECK_BUDGET, GPU_CHECK_SKIP_BUILD=1
# (already installed), MAX_JOBS (build parallelism, default nproc).
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
if [ "${GPU_CHECK_SKIP_BUILD:-0}" = 1 ]; then
    log "build skipped (GPU_CHECK_SKIP_BUILD=1)"; SUMMARY+=("build: skipped on request")
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
# Triton correctness on the GPU (no interpreter): every kernel against the float64 reference.
# FASTLIN_TRITON_AUTOTUNE=0: one heuristic config per shape (autotuning every test shape costs minutes).
# Four pytest processes on contiguous slices (bench/pytest_shard.py): the time goes into compiling
# each kernel specialisation once, and one process compiles one at a time.
SHARDS=${GPU_CHECK_SHARDS:-4}
export PY SHARDS OUT_DIR
stage triton-tests 90 110 env TRITON_INTERPRET=0 FASTLIN_TRITON_AUTOTUNE=0 FASTLIN_GPU_QUICK=1 \
    PYTHONPATH="$ROOT/bench:$PYTHONPATH" bash -c '
    pids=""
    tails() {
        for i in $(seq 0 $((SHARDS - 1))); do echo "-- shard $i/$SHARDS"; tail -25 /tmp/fastlin_triton_shard_$i.log; done
        [ -n "$OUT_DIR" ] && cp /tmp/fastlin_triton_shard_*.log "$OUT_DIR"/ 2>/dev/null
    }
    trap "kill \$pids 2>/dev/null; tails; exit 124" TERM INT
    for i in $(seq 0 $((SHARDS - 1))); do
        $PY -m pytest -q -p no:cacheprovider -p pytest_shard --shard $i/$SHARDS \
            -W ignore::DeprecationWarning tests/test_triton.py --tb=short -rfE > /tmp/fastlin_triton_shard_$i.log 2>&1 &
        pids="$pids $!"
    done
    rc=0
    for p in $pids; do wait $p || rc=1; done
    tails
    exit $rc'

# ------------------------------------------------------------------------------------------------
# the bench (autotuning on): table written to $OUT and printed again at the very end
TABLE=${OUT_DIR:-/tmp}/gpu_bench_table.txt
rm -f "$TABLE"
stage bench 110 20 env TRITON_INTERPRET=0 OUT="${OUT_DIR:-/tmp}" $PY bench/gpu_bench.py

# ------------------------------------------------------------------------------------------------
CUDA_TESTS=$(ls tests/test_cuda*.py 2>/dev/null | tr '\n' ' ')
if [ -n "$CUDA_TESTS" ]; then
    stage cuda-tests 90 15 env TRITON_INTERPRET=0 $PY -m pytest -q -p no:cacheprovider $CUDA_TESTS -rfEs
else
    log "no tests/test_cuda*.py"; SUMMARY+=("cuda-tests: none present")
fi

if $PY -c "import fastlin, sys; sys.exit(0 if fastlin.backends.status()['cuda'][0] else 1)" 2>/dev/null \
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

GENERIC=$(ls tests/test_*.py 2>/dev/null | grep -v -e test_triton.py -e 'test_cuda' | tr '\n' ' ')
if [ -n "$GENERIC" ]; then
    # pytest-xdist when it is there (the GPU image has it): the time goes into compiling kernels
    XDIST=""
    $PY -c "import xdist" 2>/dev/null && XDIST="-n ${GPU_CHECK_WORKERS:-8}"
    stage generic-gpu-tests 300 8 env TRITON_INTERPRET=0 FASTLIN_TRITON_AUTOTUNE=0 \
        $PY -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning $XDIST $GENERIC -k "cuda or triton" \
        --tb=line -rfE
else
    log "no generic test files besides test_triton.py / test_cuda*.py"; SUMMARY+=("generic-gpu-tests: none present")
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
