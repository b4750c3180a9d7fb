#!/usr/bin/env bash
# The first run on a GPU machine, as ONE command of at most 9 minutes on a warm machine: build for
# the GPU at hand, `pplfast doctor` (every op against float64) alongside the GPU tests, then the
# headline benchmarks against the peers.
#
#   bash benchmarks/fetch_peer_wheels.sh         # once, where there is network: wheels in .whl/
#   OUT=gpu-out bash benchmarks/gpu_session.sh   # on the GPU machine, .whl/ carried along
#   bash benchmarks/gpu_session.sh --dry-run     # anywhere: each step runs what it can without a
#                                                # GPU and prints what it would run
#
# Every step has its own time limit (the sum is checked against 540 s before anything runs); a
# step that fails or runs out never stops the next. Results land in $OUT as soon as each exists,
# eight files at most:
#   session.log                 every step's command, output, exit status and seconds
#   doctor.jsonl                `python -m pplfast doctor --json`: one line per check, as it ends
#   tests.log                   the GPU tests (pytest prints its summary when its limit is hit)
#   bench-logits-triton.json    logits bf16 16384x128256 and 4096x50257, backend triton
#   bench-logits-cuda.json      the same, backend cuda
#   bench-linear.json           hidden states 8192x4096x131072, bf16 and the fp32 routing row
#   bench-stats.json            token_stats at 16384x128256 bf16
#   bench-compare.json          compare at 16384x128256 bf16
# Each bench JSON is rewritten after every case ("complete": false until the run ends).
#
# Peers and tools the machine lacks (liger-kernel, cut-cross-entropy, pytest-xdist) travel as
# wheels in .whl/ and are installed --no-deps into a fresh temporary folder first. The build
# names the GPU's own architecture (PPLFAST_CUDA_ARCHS, e.g. "90"); when it fails, the package is
# built again without the CUDA extension, so that the CPU and Triton parts still run.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac

PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results/gpu-$(date +%F)}
mkdir -p "$OUT"
LOG="$OUT/session.log"
export PYTHONUNBUFFERED=1

# ---- the plan: each step's limit in seconds; their sum must fit the 9-minute command ----------
BUDGET=540
GRACE=5  # after its limit, a step gets SIGINT and this long to end before SIGKILL
L_WHEELS=15 L_MACHINE=10 L_BUILD=90 L_BUILD_CPU=50
L_CHECK=140  # doctor and the GPU tests, side by side
L_LOGITS_TRITON=40 L_LOGITS_CUDA=30 L_LINEAR=65 L_STATS=25 L_COMPARE=25
LIMITS=("$L_WHEELS" "$L_MACHINE" "$L_BUILD" "$L_BUILD_CPU" "$L_CHECK" "$L_LOGITS_TRITON"
        "$L_LOGITS_CUDA" "$L_LINEAR" "$L_STATS" "$L_COMPARE")
TOTAL=0
for limit in "${LIMITS[@]}"; do TOTAL=$((TOTAL + limit + GRACE)); done
if ((TOTAL > BUDGET)); then
  echo "gpu_session.sh: the steps' limits add up to ${TOTAL}s, over the ${BUDGET}s budget" >&2
  exit 2
fi

# the GPU tests: every test marked cuda (GPU only) or interpreter (Triton: compiled on CUDA
# tensors where there is a GPU), without the compile-only tests that already run on CPU; the
# dry run checks that these files hold every test the selection picks in tests/
GPU_TEST_FILES=(tests/cli/test_bench.py tests/engine/test_api.py tests/engine/test_compare.py
  tests/engine/test_linear_token_nll.py tests/engine/test_special_values.py
  tests/engine/test_token_nll.py tests/engine/test_token_stats.py tests/kernels/test_cuda.py
  tests/kernels/test_linear_stats_triton.py tests/kernels/test_linear_triton.py
  tests/kernels/test_slice_partials.py tests/kernels/test_triton_token_nll.py)
SELECT=(-m "(cuda or interpreter) and not slow" -k "not compile_for and not compiles_for")

step() {  # step NAME LIMIT COMMAND...: run under its limit, log it, never stop the session
  local name=$1 limit=$2 start=$SECONDS rc shown
  shift 2
  shown=$*
  shown=${shown//$'\n'/ }
  echo "== $name ($(date +%T), limit ${limit}s): ${shown:0:400}" | tee -a "$LOG"
  # SIGINT: pytest prints its summary, pplfast's commands end with one line
  timeout -s INT --kill-after="$GRACE" "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  echo "== $name: exit $rc after $((SECONDS - start))s" | tee -a "$LOG"
  return "$rc"
}

would() {  # the dry run's account of a step it cannot run here
  echo "== $1: would run (limit $2s): ${*:3}" | tee -a "$LOG"
}

echo "== gpu_session.sh$([ "$DRY" = 1 ] && echo " --dry-run") ($(date -u +%FT%TZ)): limits add" \
     "up to ${TOTAL}s of ${BUDGET}s (each with ${GRACE}s to end); results in $OUT" | tee -a "$LOG"

# ---- the wheels of the peers and pytest-xdist -----------------------------------------------
if compgen -G ".whl/*.whl" >/dev/null; then
  site=$([ "$DRY" = 1 ] && echo "<a fresh temporary folder>" || mktemp -d)
  WHEELS=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade
          --target "$site" .whl/*.whl)
  if [ "$DRY" = 1 ]; then
    would wheels "$L_WHEELS" "${WHEELS[@]}"
  elif step wheels "$L_WHEELS" "${WHEELS[@]}"; then
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
  fi
else
  echo "== wheels: no .whl/*.whl (benchmarks/fetch_peer_wheels.sh makes them): the peers that" \
       "are not installed are skipped, and the tests run without pytest-xdist unless it is" | tee -a "$LOG"
fi

# ---- the machine, and the GPU's architecture for the build -----------------------------------
VERSIONS='import importlib.metadata as md, torch
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "absent"
print("torch", torch.__version__, "CUDA", torch.version.cuda, "GPU",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none", "|", ", ".join(
      f"{n} {version(n)}" for n in ("triton", "pytest-xdist", "liger-kernel", "cut-cross-entropy")))'
step machine "$L_MACHINE" bash -c 'if command -v nvidia-smi >/dev/null; then nvidia-smi; fi
  "$0" -c "$1"' "$PY" "$VERSIONS"
arch=$("$PY" -c 'import torch
if torch.cuda.is_available():
    m, n = torch.cuda.get_device_capability(0)
    print(f"{m}{n}")' 2>/dev/null)
if [ -n "$arch" ]; then
  export PPLFAST_CUDA_ARCHS=${PPLFAST_CUDA_ARCHS:-$arch}
fi

# ---- the build: this GPU's architecture only; without the CUDA extension if that fails ---------
BUILD=("$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .)
if [ "$DRY" = 1 ]; then
  would build "$L_BUILD" "PPLFAST_CUDA_ARCHS=${PPLFAST_CUDA_ARCHS:-<capability of GPU 0>}" \
        "${BUILD[@]}"
  would build-without-cuda "$L_BUILD_CPU" "(only if the build fails) PPLFAST_NO_CUDA=1" \
        "${BUILD[@]}"
  step import 30 "$PY" -c "import pplfast, pplfast._C; print('pplfast', pplfast.__version__)"
elif ! step build "$L_BUILD" "${BUILD[@]}"; then
  step build-without-cuda "$L_BUILD_CPU" env PPLFAST_NO_CUDA=1 "${BUILD[@]}"
fi

# ---- the check: doctor (every op, dtype, option and special value against float64) beside the
# GPU tests --------------------------------------------------------------------------------------
cores=$(nproc 2>/dev/null || echo 2)
workers=$((cores > 4 ? cores - 2 : 1))  # two cores for doctor, which runs alongside
XDIST=()
if "$PY" -c "import xdist" 2>/dev/null; then
  XDIST=(-n "$workers")
fi
PYTEST=("$PY" -m pytest "${XDIST[@]}" -x -q -rfE -p no:cacheprovider "${SELECT[@]}")
if [ "$DRY" = 1 ]; then
  # doctor runs for real on this machine's backends (its JSON lines, as on the GPU)
  step doctor "$L_CHECK" bash -c '"$0" -m pplfast doctor --quick --json > "$1"' "$PY" \
       "$OUT/doctor.jsonl"
  would tests "$L_CHECK" "${PYTEST[@]}" "${GPU_TEST_FILES[@]}"
  # the selection, collected over all of tests/: every file it picks must be in the list above
  step tests-collect 60 bash -c '"$0" -m pytest --collect-only -q "${@:3}" tests > "$1" 2>&1
    rc=$?
    missing=$(grep -o "^tests/[a-z_0-9/]*\.py" "$1" | sort -u | while read -r f; do
      case " $2 " in *" $f "*) ;; *) echo "$f" ;; esac; done)
    if [ -n "$missing" ]; then
      echo "GPU tests outside GPU_TEST_FILES of benchmarks/gpu_session.sh: $missing"; exit 1
    fi
    exit $rc' "$PY" "$OUT/tests.log" "${GPU_TEST_FILES[*]}" -p no:cacheprovider "${SELECT[@]}"
else
  # doctor in the background; a line it printed is already flushed to doctor.jsonl when its
  # limit ends it
  (step doctor "$L_CHECK" bash -c \
     'OMP_NUM_THREADS=2 "$0" -m pplfast doctor --json > "$1"' "$PY" "$OUT/doctor.jsonl") &
  doctor_pid=$!
  step tests "$L_CHECK" bash -c '"${@:2}" > "$1" 2>&1' _ "$OUT/tests.log" "${PYTEST[@]}" \
       "${GPU_TEST_FILES[@]}"
  wait "$doctor_pid"
fi

# ---- the figures: each implementation timed the same way, ratios within one run -------------
bench() {  # bench NAME LIMIT OPTIONS...: one `pplfast bench` run into $OUT/NAME.json
  local name=$1 limit=$2
  shift 2
  local cmd=("$PY" -m pplfast bench --device cuda --no-progress "$@")
  if [ "$DRY" = 1 ]; then
    step "$name" "$limit" "${cmd[@]}" --dry-run
  else
    step "$name" "$limit" "${cmd[@]}" --json "$OUT/$name.json"
  fi
}
LOGITS=(--path logits --shapes 16384x128256,4096x50257 --dtypes bf16)
bench bench-logits-triton "$L_LOGITS_TRITON" "${LOGITS[@]}" --backend triton
bench bench-logits-cuda "$L_LOGITS_CUDA" "${LOGITS[@]}" --backend cuda
bench bench-linear "$L_LINEAR" --path linear --shapes 8192x4096x131072 --dtypes bf16,fp32
bench bench-stats "$L_STATS" --path stats --shapes 16384x128256 --dtypes bf16
bench bench-compare "$L_COMPARE" --path compare --shapes 16384x128256 --dtypes bf16

echo "== done ($(date +%T), ${SECONDS}s): $(ls "$OUT" | wc -l) files in $OUT:" \
     "$(ls "$OUT" | tr '\n' ' ')" | tee -a "$LOG"
grep -E "^== [a-z-]+: exit" "$LOG" | sed 's/^== /   /' | tee -a "$LOG"
