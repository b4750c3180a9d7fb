#!/usr/bin/env bash
# First run on a GPU machine: build, `pplfast doctor`, every GPU test, and `pplfast bench`
# against the peers, in two commands of under 10 minutes each on one warm machine:
#
#   OUT=gpu-out bash benchmarks/gpu_session.sh check   # build, doctor, GPU tests  (~9 min max)
#   OUT=gpu-out bash benchmarks/gpu_session.sh bench   # the figures               (~8 min max)
#
# Every step has its own time limit; a step that fails or runs out does not stop the next one.
# Everything lands in $OUT (at most 8 files: session.log, doctor.json, tests.log, and one JSON
# per bench run). `bench` builds first when the extension is missing (a fresh machine).
#
# Peers that the machine lacks (liger-kernel, cut-cross-entropy, quack-kernels; Triton itself
# when the machine's is older than 3.6) travel as wheels in .whl/ and are installed --no-deps
# into a private folder first. PPLFAST_CUDA_ARCHS limits the nvcc build to the GPU at hand
# (default here: the capability of GPU 0, e.g. "90"), so the build takes a minute, not several.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-$(date +%F)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
LOG="$OUT/session.log"

step() {  # step NAME SECONDS COMMAND...: run, log, record the exit status, never abort
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date +%T), limit ${limit}s): $*" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "== $name: exit $rc" | tee -a "$LOG"
  return 0
}

if compgen -G ".whl/*.whl" >/dev/null; then
  site=$(mktemp -d)
  step wheels 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$site" .whl/*.whl
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi

phase=${1:-check}
case $phase in check|bench) ;; *) echo "usage: $0 check|bench" >&2; exit 2 ;; esac

step machine 30 bash -c "nvidia-smi; $PY -c 'import torch, triton; print(torch.__version__, \
torch.version.cuda, triton.__version__, torch.cuda.get_device_name(0), \
torch.cuda.get_device_capability(0))'"
arch=$("$PY" -c 'import torch; m, n = torch.cuda.get_device_capability(0); print(f"{m}{n}")' \
       2>/dev/null || echo 90)
export PPLFAST_CUDA_ARCHS=${PPLFAST_CUDA_ARCHS:-$arch}
if [ "$phase" = check ] || ! "$PY" -c "import pplfast._C" 2>/dev/null; then
  step build 180 "$PY" -m pip install -q --no-deps --no-build-isolation -e .
fi

if [ "$phase" = check ]; then
  # doctor first: one line per backend x check, the quickest answer to "are the numbers right"
  step doctor 60 bash -c "pplfast doctor --json > '$OUT/doctor.json'"

  # the GPU tests: CUDA-only tests and the Triton kernels compiled on CUDA tensors; a failure is
  # listed and the run goes on (the limit, not -x, bounds the time)
  step tests 280 bash -c "$PY -m pytest -q -p no:cacheprovider -rfE --maxfail=50 \
    tests/test_special_values.py tests/test_cuda.py tests/test_triton_token_nll.py \
    tests/test_linear_triton.py tests/test_linear_stats_triton.py tests/test_token_nll.py \
    tests/test_linear_token_nll.py tests/test_token_stats.py tests/test_compare.py \
    > '$OUT/tests.log' 2>&1"
else
  # the figures: logits path on both GPU backends, then the hidden-states path and the
  # statistics (each implementation timed the same way, ratios within one run)
  step bench-logits-triton 150 pplfast bench --path logits --backend triton --shapes \
    16384x128256,4096x50257 --dtypes bf16,fp32 --no-progress --json "$OUT/bench-logits-triton.json"
  step bench-logits-cuda 90 pplfast bench --path logits --backend cuda --shapes \
    16384x128256,4096x50257 --dtypes bf16,fp32 --no-progress --json "$OUT/bench-logits-cuda.json"
  step bench-linear 180 pplfast bench --path linear --shapes 8192x4096x131072 --dtypes bf16,fp32 \
    --no-progress --json "$OUT/bench-linear.json"
  step bench-stats 90 pplfast bench --path stats --shapes 16384x128256 --dtypes bf16 \
    --no-progress --json "$OUT/bench-stats.json"
fi
echo "== done ($(date +%T)); files in $OUT" | tee -a "$LOG"
