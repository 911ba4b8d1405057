#!/usr/bin/env bash
# Runs tools/gpu/sanitize.py (a tiny fused training step plus odd-shaped stages) under each
# compute-sanitizer tool for each backend, one log per pair, and exits non-zero if any run
# reports an error or fails.
#
#   bash tools/gpu/run_sanitizers.sh OUT_DIR [BACKEND...]      # default backends: cuda triton
#
# OUT_DIR/<tool>-<backend>.log is the sanitizer's report, .out the program's own output.
# A run is clean when the program exits 0 and the report says "ERROR SUMMARY: 0 errors".
# A default backend that this build or machine lacks is reported as skipped; one named on the
# command line must run, and a run that sanitized nothing at all fails.
#
# Environment:
#   TOOLS            tools to run (default: memcheck racecheck initcheck synccheck)
#   SANITIZER        the compute-sanitizer binary (default: from PATH, else /usr/local/cuda/bin)
#   SANITIZER_ARGS   extra arguments, e.g. a kernel filter if library kernels (cuDNN, cuBLAS)
#                    report findings that are not ours: the CUDA backend's kernels live in
#                    namespace convmixer_kernels::cuda, so a kernel-name substring filter on
#                    "convmixer_kernels" selects them (compute-sanitizer --help, --kernel-name)
#   PYTHON           the interpreter with convmixer_kernels installed (default: python)
set -uo pipefail

if [ $# -lt 1 ]; then
  echo "usage: $0 OUT_DIR [BACKEND...]" >&2
  exit 2
fi
out=$1
shift
explicit=$#
backends=("$@")
[ ${#backends[@]} -eq 0 ] && backends=(cuda triton)
tools=${TOOLS:-memcheck racecheck initcheck synccheck}
python=${PYTHON:-python}
sanitizer=${SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}
here=$(cd "$(dirname "$0")" && pwd)

if [ ! -x "$sanitizer" ]; then
  echo "compute-sanitizer not found (set SANITIZER=/path/to/compute-sanitizer)" >&2
  exit 2
fi
mkdir -p "$out"
available=$("$python" -c "import torch, convmixer_kernels as ck
print(' '.join(ck.available_backends()) if torch.cuda.is_available() else '')") || {
  echo "cannot import convmixer_kernels with $python" >&2
  exit 2
}

failed=0
ran=0
summary=()
for backend in "${backends[@]}"; do
  if [[ " $available " != *" $backend "* ]]; then
    summary+=("$(printf '%-10s %-8s skipped: backend not available (have: %s)' '*' "$backend" "${available:-no GPU}")")
    [ "$explicit" -gt 0 ] && failed=1
    continue
  fi
  for tool in $tools; do
    log="$out/$tool-$backend.log"
    rm -f "$log"
    echo "== $tool, backend $backend"
    # shellcheck disable=SC2086  # SANITIZER_ARGS is a list of words
    "$sanitizer" --tool "$tool" --log-file "$log" --error-exitcode 1 ${SANITIZER_ARGS:-} \
      "$python" "$here/sanitize.py" --backend "$backend" >"$out/$tool-$backend.out" 2>&1
    rc=$?
    ran=$((ran + 1))
    errors=$(grep -o 'ERROR SUMMARY: [0-9]* error' "$log" 2>/dev/null | tail -n 1 | grep -o '[0-9]*')
    if [ "$rc" -eq 0 ] && [ "${errors:-x}" = "0" ]; then
      status="clean"
    else
      status="FAILED (exit $rc, errors ${errors:-unknown}; see $log and ${log%.log}.out)"
      failed=1
    fi
    summary+=("$(printf '%-10s %-8s %s' "$tool" "$backend" "$status")")
  done
done

echo
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
if [ "$ran" -eq 0 ]; then
  echo "nothing was sanitized" | tee -a "$out/summary.txt"
  exit 1
fi
exit $failed
