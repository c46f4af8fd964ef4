#!/usr/bin/env bash
# The CUDA build, checked without a GPU:
#   1. nvcc compiles every csrc/*.cu for sm_80 and sm_90 (object files; the kernels include CUDA
#      headers only, no torch). Flags mirror torch's extension build (no implicit half/bfloat16
#      conversions or operators). STRICT=1 turns warnings into errors.
#   2. g++ compiles csrc/bindings.cpp with -DGRPO_WITH_CUDA (its CUDA branches: the CPU JIT build
#      never sees them), against torch's headers (torch.utils.cpp_extension.include_paths()),
#      Python's and the CUDA toolkit's ($CUDA_HOME/include, else next to nvcc).
#   3. every undefined grpo::*_cuda symbol of bindings.o is defined by the .cu objects (nm -C,
#      so a parameter type that differs counts as missing), i.e. the extension would link; the
#      names checked are CUDA_ENTRY_REGEX's (default: grpo::...::*_cuda functions and templates).
# Exits 0 with a message when nvcc is not installed; prints each step's time.
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
PYTHON="${PYTHON:-python}"
CXX="${CXX:-$(command -v g++ || command -v c++ || true)}"

OUT="$(mktemp -d)"
trap 'rm -rf "${OUT}"' EXIT
shopt -s nullglob
sources=(csrc/*.cu)
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "compile_cuda.sh: no csrc/*.cu files"
  exit 0
fi

step_start=${SECONDS}
took() { echo "compile_cuda.sh: $1 took $((SECONDS - step_start)) s"; step_start=${SECONDS}; }

# -- 1. the kernels ----------------------------------------------------------------------
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
took "nvcc (${#sources[@]} source(s), sm_80 + sm_90)"
if [[ ${status} -ne 0 ]]; then
  exit ${status}
fi
echo "compile_cuda.sh: all ${#sources[@]} CUDA source(s) compiled for sm_80 and sm_90"

# -- 2. the bindings' CUDA branches --------------------------------------------------------
if [[ ! -f csrc/bindings.cpp ]]; then
  echo "compile_cuda.sh: FAILED: no csrc/bindings.cpp"
  exit 1
fi
if [[ -z "${CXX}" ]]; then
  echo "compile_cuda.sh: FAILED: no C++ compiler for csrc/bindings.cpp (set CXX)"
  exit 1
fi
# the toolkit's headers (cuda_runtime_api.h): $CUDA_HOME/include, else the folder nvcc itself
# uses (its --dryrun INCLUDES line: nvcc may be a wrapper script outside the toolkit)
cuda_include=""
for dir in "${CUDA_HOME:+${CUDA_HOME}/include}" \
    "$("${NVCC}" -v --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ INCLUDES="-I\([^"]*\)".*/\1/p' | head -n 1)" \
    /usr/local/cuda/include; do
  if [[ -n "${dir}" && -f "${dir}/cuda_runtime_api.h" ]]; then
    cuda_include="${dir}"
    break
  fi
done
if [[ -z "${cuda_include}" ]]; then
  echo "compile_cuda.sh: FAILED: no cuda_runtime_api.h found for ${NVCC} (set CUDA_HOME)"
  exit 1
fi
# torch's and Python's include folders as system headers, as torch's extension build passes them
# (torch's CPU wheel has every header bindings.cpp uses)
mapfile -t includes < <("${PYTHON}" -c '
import sysconfig
from torch.utils.cpp_extension import include_paths
for p in include_paths() + [sysconfig.get_paths()["include"]]:
    print("-isystem" + p)')
abi="$("${PYTHON}" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')"
echo "${CXX} -c csrc/bindings.cpp -DGRPO_WITH_CUDA (CUDA headers: ${cuda_include})"
# C++20 as torch's extension build (its headers need it); -O1: what is checked is that it
# compiles and what it references, not its speed
if ! "${CXX}" -c csrc/bindings.cpp -o "${OUT}/bindings.o" -std=c++20 -O1 -fPIC -fopenmp -Wall \
    -DGRPO_WITH_CUDA -DTORCH_EXTENSION_NAME=grpo_kernels_compile_check -DTORCH_API_INCLUDE_EXTENSION_H \
    -D_GLIBCXX_USE_CXX11_ABI="${abi}" -Icsrc "${includes[@]}" -isystem "${cuda_include}" \
    ${STRICT:+-Werror} ${CXX_EXTRA_FLAGS:-}; then
  echo "compile_cuda.sh: FAILED: csrc/bindings.cpp with -DGRPO_WITH_CUDA"
  exit 1
fi
took "g++ bindings.cpp -DGRPO_WITH_CUDA"

# -- 3. the symbols the bindings call are the ones the kernels define -------------------------
# nm -C: demangled, so a changed parameter type shows as a different signature
# the entry points: functions (templates too) of namespace grpo or one nested in it, named *_cuda
default_regex='^grpo::[A-Za-z0-9_:]*_cuda[<(]'
CUDA_ENTRY_REGEX="${CUDA_ENTRY_REGEX:-${default_regex}}"
needed="$(nm -C --undefined-only "${OUT}/bindings.o" | sed -n 's/^ *U //p' | grep -E "${CUDA_ENTRY_REGEX}" | sort -u || true)"
defined="$(for obj in "${OUT}"/*.o; do [[ "${obj}" == "${OUT}/bindings.o" ]] || nm -C --defined-only "${obj}"; done \
  | sed -n 's/^[0-9a-fA-F]* [TtWw] //p' | sort -u)"
if [[ -z "${needed}" ]]; then
  echo "compile_cuda.sh: FAILED: bindings.o references no grpo::*_cuda function: were its CUDA branches compiled?"
  exit 1
fi
missing="$(comm -23 <(echo "${needed}") <(echo "${defined}"))"
if [[ -n "${missing}" ]]; then
  echo "compile_cuda.sh: FAILED: csrc/bindings.cpp calls CUDA entry points that no csrc/*.cu defines"
  echo "(a renamed function, or a parameter type that differs between the header and the .cu):"
  echo "${missing}" | sed 's/^/  missing: /'
  echo "defined by the .cu objects:"
  echo "${defined}" | grep -E '^grpo::' | sed 's/^/  /' || true
  exit 1
fi
took "symbol check"
echo "compile_cuda.sh: bindings.cpp's $(echo "${needed}" | wc -l) grpo::*_cuda call(s) are all defined:"
echo "${needed}" | sed 's/^/  /'
