#!/usr/bin/env bash
# Compile every csrc/*.cu with nvcc for sm_80 and sm_90 (object files only; no torch
# needed: the kernels include CUDA headers only). Fails on any compiler error; exits 0
# with a message when nvcc is not installed. Flags mirror torch's extension build
# (no implicit half/bfloat16 conversions or operators). STRICT=1 turns warnings into errors.
set -euo pipefail

cd "$(dirname "$0")/.."
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "${NVCC}" && -n "${CUDA_HOME:-}" && -x "${CUDA_HOME}/bin/nvcc" ]]; then
  NVCC="${CUDA_HOME}/bin/nvcc"
fi
if [[ -z "${NVCC}" ]]; then
  echo "compile_cuda.sh: nvcc not found; skipping the CUDA compile check"
  exit 0
fi

OUT="$(mktemp -d)"
trap 'rm -rf "${OUT}"' EXIT
shopt -s nullglob
sources=(csrc/*.cu)
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "compile_cuda.sh: no csrc/*.cu files"
  exit 0
fi

"${NVCC}" --version | tail -n 1
status=0
for src in "${sources[@]}"; do
  obj="${OUT}/$(basename "${src%.cu}").o"
  echo "nvcc -c ${src}"
  if ! "${NVCC}" -c "${src}" -o "${obj}" -O3 -std=c++17 -Icsrc \
      -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
      -DGRPO_WITH_CUDA \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
      -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
      -Xcompiler -Wall ${STRICT:+-Werror all-warnings} ${NVCC_EXTRA_FLAGS:-}; then
    echo "compile_cuda.sh: FAILED: ${src}"
    status=1
  fi
done
if [[ ${status} -eq 0 ]]; then
  echo "compile_cuda.sh: all ${#sources[@]} CUDA source(s) compiled for sm_80 and sm_90"
fi
exit ${status}
