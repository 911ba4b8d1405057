#!/usr/bin/env bash
# The GPU validation sweep in phases, each fitting one device call of a few minutes, every log and
# JSON under OUT (the device tool's $OUT comes back to the workstation):
#
#   bash tools/gpu/gpu_sweep.sh OUT build      # CUDA build for sm_90 (TORCH_CUDA_ARCH_LIST=9.0)
#   bash tools/gpu/gpu_sweep.sh OUT tests      # the whole python_tests suite, JUnit XML
#   bash tools/gpu/gpu_sweep.sh OUT sanitize   # compute-sanitizer tools x {cuda, triton}
#   bash tools/gpu/gpu_sweep.sh OUT stages     # per-stage pytest-benchmark JSON + report
#   bash tools/gpu/gpu_sweep.sh OUT models     # python -m convmixer_kernels.bench, four paper models
#   bash tools/gpu/gpu_sweep.sh OUT all        # all of the above, in that order
#
# Every phase records nvidia-smi, torch/triton versions and the git commit in OUT/environment.txt.
# A phase's exit status is its own; `all` runs on after a failing phase and fails at the end.
set -uo pipefail
cd "$(dirname "$0")/../.."
if [ $# -lt 2 ]; then
  sed -n '2,13p' "$0" >&2
  exit 2
fi
OUT=$1
shift
mkdir -p "$OUT"
PYTHON=${PYTHON:-python}

environment() {
  {
    date -u
    git rev-parse HEAD 2>/dev/null || echo "commit: unknown (not a git checkout)"
    if command -v nvidia-smi > /dev/null; then
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
    else
      echo "nvidia-smi: not found"
    fi
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
    "$PYTHON" -c "import triton; print('triton', triton.__version__)" 2>&1
  } > "$OUT/environment.txt"
}

phase_build() {
  TORCH_CUDA_ARCH_LIST=9.0 CONVMIXER_PTXAS_VERBOSE=1 "$PYTHON" -m pip install -v \
    --no-build-isolation -e ".[test,triton,bench]" > "$OUT/build.log" 2>&1 || return 1
  (cd / && "$PYTHON" -c "import convmixer_kernels as ck; print(ck.available_backends())") \
    | tee "$OUT/backends.txt"
  grep -q "'cuda'" "$OUT/backends.txt"
}

phase_tests() {
  pytest python_tests -q -p no:cacheprovider -rs --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
  local rc=$?
  tail -n 3 "$OUT/tests.log"
  return $rc
}

phase_sanitize() {
  bash tools/gpu/run_sanitizers.sh "$OUT/sanitize" cuda triton
}

phase_stages() {
  pytest bench/test_stages.py --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$OUT/stages.json" > "$OUT/stages.log" 2>&1 || return 1
  "$PYTHON" -m convmixer_kernels.benchmarking.stages_report "$OUT/stages.json" --out "$OUT/stages.md"
}

phase_models() {
  local rc=0 model
  for model in convmixer_1536_20 convmixer_768_32 convmixer_1024_20_ks9_p14 convmixer_256_8; do
    "$PYTHON" -m convmixer_kernels.bench --model "$model" --dtype bf16 --contenders all \
      --out "$OUT/models/$model-bf16" > "$OUT/models-$model-bf16.log" 2>&1 || rc=1
  done
  "$PYTHON" -m convmixer_kernels.bench --model convmixer_768_32 --dtype fp16 --contenders all \
    --out "$OUT/models/convmixer_768_32-fp16" > "$OUT/models-convmixer_768_32-fp16.log" 2>&1 || rc=1
  return $rc
}

environment
phases=()
for phase in "$@"; do
  if [ "$phase" = all ]; then
    phases+=(build tests sanitize stages models)
  elif declare -F "phase_$phase" > /dev/null; then
    phases+=("$phase")
  else
    echo "unknown phase '$phase'" >&2
    exit 2
  fi
done
status=0
for phase in "${phases[@]}"; do
  echo "== $phase"
  "phase_$phase" || { echo "phase $phase FAILED"; status=1; }
done
exit $status
