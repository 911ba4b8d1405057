#!/usr/bin/env bash
# Compile-checks the torch launchers (csrc/cuda/*.cu) on a machine with nvcc but no CUDA build of
# torch, against the headers of a CUDA torch wheel that is only unpacked, never installed.
# (The torch-free kernels need none of this: cmake -DCONVMIXER_CUDA_CHECK_ONLY=ON.)
#
# One-time setup, ~1.5 GB of downloads into $DIR (default ~/.cache/convmixer_kernels/cuda_headers):
#   tools/check_cuda_launchers.sh --fetch
# Then, after each change to csrc/cuda/*.cu or the headers they include:
#   tools/check_cuda_launchers.sh
# Never run this in CI: CI must not download a CUDA build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${CONVMIXER_CUDA_HEADERS:-$HOME/.cache/convmixer_kernels/cuda_headers}
TORCH_VERSION=$(python -c "import torch; print(torch.__version__.split('+')[0])")

if [ "${1:-}" = "--fetch" ]; then
  mkdir -p "$DIR/wheels"
  # --isolated and an explicit index: a local find-links CPU wheel (+cpu sorts higher) must not win.
  PIP_CONFIG_FILE=/dev/null python -m pip download --isolated --no-deps -d "$DIR/wheels" \
    --index-url https://pypi.org/simple "torch==$TORCH_VERSION"
  # ATen/cuda/CUDAContext.h includes the cuBLAS, cuSPARSE and cuSOLVER headers.
  PIP_CONFIG_FILE=/dev/null python -m pip download --isolated -d "$DIR/wheels" \
    --index-url https://pypi.org/simple "nvidia-cublas" "nvidia-cusparse" "nvidia-cusolver"
  for w in "$DIR"/wheels/torch-*.whl; do unzip -q -o "$w" 'torch/include/*' -d "$DIR"; done
  for w in "$DIR"/wheels/nvidia_*.whl; do unzip -q -o "$w" '*/include/*' -d "$DIR" || true; done
  echo "headers unpacked under $DIR"
  exit 0
fi

[ -d "$DIR/torch/include" ] || { echo "no CUDA torch headers in $DIR: run $0 --fetch first" >&2; exit 1; }
py_include=$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
nv_includes=()
for d in "$DIR"/nvidia/*/include; do [ -d "$d" ] && nv_includes+=(-isystem "$d"); done
status=0
for src in csrc/cuda/*.cu; do
  echo "== $src"
  # The flags torch.utils.cpp_extension passes (CMakeLists.txt's CONVMIXER_TORCH_NVCC_FLAGS).
  nvcc -std=c++17 -O1 -gencode=arch=compute_90,code=sm_90 \
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
    -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr \
    -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H -DCONVMIXER_WITH_CUDA \
    -isystem "$DIR/torch/include" -isystem "$DIR/torch/include/torch/csrc/api/include" \
    "${nv_includes[@]}" -isystem "$py_include" -Icsrc \
    -c "$src" -o /dev/null || status=1
done
exit $status
