#!/usr/bin/env bash
# What only a GPU can check, one mode per device call (each under 6 minutes on a cold H200):
#
#   bash .ci/gpu_check.sh smoke      # the GPU tests: CUDA kernels, the contract's cuda cases, > 2^31 indices
#   bash .ci/gpu_check.sh bench      # the headline loss shape, distillation, the token_logprobs table, vs TRL and Liger
#   bash .ci/gpu_check.sh sanitize   # compute-sanitizer memcheck + racecheck over every GPU kernel
#
# Everything lands under $OUT (default /tmp/grpo_gpu_out) AS IT GOES: summary.txt (machine,
# versions, then one line per finished part: status, seconds, log) and one log per part, so a
# killed run still returns what finished. At most 7 files per mode (the device call returns 8).
# Parts run most informative first; the exit status is 1 if any part failed (or ran out of time).
# A part never starts past DEADLINE_S (default 340 s) from the start, and each runs under
# `timeout` with what is left of it, so the mode ends within 6 minutes whatever happens.
# GRPO_KERNELS_REQUIRE_BACKENDS=cpp,triton (exported): a backend that cannot run fails the tests
# and the bench (tests/support.py, bench/verdict.py) instead of skipping.
# trl / liger-kernel come from .whl/ when present (.ci/gpu_wheels.sh makes it; carry .whl).
#
# Time estimates, cold H200 (16 cores), from bench/RESULTS.md's H100 runs and the build times
# measured on a 2-core CPU machine (user time: nvcc 15 s for sm_80 + sm_90, g++ bindings.cpp
# ~40 s at -O1); none of this has been timed on an H200 yet:
#   all modes  python + torch + CUDA start, per process                           ~10 s
#   build      JIT build of the cpp extension (nvcc sm_90 + 2 x g++ -O3, ninja)  ~60-90 s
#   smoke      build ~75 s; test_cuda_gpu.py (24 tests: Qwen V=151936, > 2^31 logits) ~30 s;
#              the contract's 1524 *-cuda cases (torch/triton/cpp x every dtype and option
#              case, tiny shapes, ~300 Triton compilations at ~0.5 s) over 8 xdist workers
#              ~90 s (measured on the CPU: ~180 ms per case on 2 loaded cores, most of it
#              Python and the float64 reference); test_large_index's 12 GPU tests (> 4 GB bf16
#              chunks) + test_triton_backend's 3 GPU tests ~60 s; test_batch_invariance.py on cuda
#              (7 cases x 3 backends, V=301, batches up to 1024 rows) ~20 s; test_distill_gpu.py
#              (39 cases, 3 backends, ~12 Triton compilations) ~30 s => ~320 s (90 s per test at most)
#   bench      (no separate build: report.py builds in the background while Triton and the peers
#              run) headline N=8192 H=4096 V=151936 bf16 loss: 7 cases, first calls (Triton
#              autotune, Liger's torch.compile ~60 s) ~150 s; token_logprobs on the 12 GPU
#              shapes x 4 cases, ~2 s each ~100 s; distillation N=4096 H=2048 H_t=4096 V=151936
#              bf16, beta 0.5 / 1 x ours / TRL / Liger, a fresh process each (~10 s) ~60 s
#              => ~330 s (no job starts past the budget; the logprobs table goes last)
#   sanitize   build ~75 s; memcheck cpp / triton ~60 s each (48 small calls per backend, each
#              kernel 10-100x slower; Triton compiles ~20 s, once); racecheck cpp / triton (bf16,
#              fp64) ~40 s each => ~285 s
#
# Options (environment): OUT, DEADLINE_S, SMOKE_WORKERS (default 8; 0 = no xdist),
# TEST_TIMEOUT_S (per test, default 90), SANITIZER (its path), SANITIZER_ARGS (extra flags),
# BENCH_ARGS (extra report.py flags).
set -uo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"
case "${mode}" in
  smoke | bench | sanitize) ;;
  *) echo "usage: bash .ci/gpu_check.sh smoke|bench|sanitize"; exit 2 ;;
esac
OUT="${OUT:-/tmp/grpo_gpu_out}"
mkdir -p "${OUT}"
DEADLINE_S="${DEADLINE_S:-340}"
export PYTHONUNBUFFERED=1 GRPO_KERNELS_REQUIRE_BACKENDS=cpp,triton
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"  # the JIT build's ninja jobs
unset TRITON_INTERPRET
START=${SECONDS}
status=0
summary="${OUT}/summary.txt"

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="${PWD}:${PYTHONPATH:-}"
{
  echo "gpu_check.sh ${mode} at $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  python3 -c "import importlib.metadata as m
for p in ('trl', 'liger-kernel', 'transformers', 'pytest-xdist', 'pytest-timeout'):
    try: print(p, m.version(p))
    except m.PackageNotFoundError: print(p, 'not installed')" | paste -sd ' '
  echo "part | status | seconds | log"
} 2>&1 | tee "${summary}"

# part NAME CAP_S COMMAND...: run COMMAND under timeout min(CAP_S, what is left of DEADLINE_S),
# its output tee'd to $OUT/NAME.log; one line in summary.txt when it ends
part() {
  local name="$1" cap="$2"
  shift 2
  local left=$((DEADLINE_S - (SECONDS - START)))
  if ((left < 15)); then
    echo "${name} | NOT RUN: ${DEADLINE_S} s deadline reached | 0 | -" | tee -a "${summary}"
    status=1
    return
  fi
  local limit=$((cap < left ? cap : left)) t0=${SECONDS} rc
  echo "== ${name} (at most ${limit} s): $*"
  # a child bash runs the command (it may be one of the functions below, exported); PART_LEFT_S
  # tells it its own limit (report.py's budget)
  PART_LEFT_S=${limit} timeout --kill-after=10 "${limit}" bash -c '"$@"' "${name}" "$@" 2>&1 | tee "${OUT}/${name}.log"
  rc=${PIPESTATUS[0]}
  local verdict="ok"
  if ((rc == 124 || rc == 137)); then verdict="TIMED OUT after ${limit} s"; elif ((rc != 0)); then verdict="FAILED (rc ${rc})"; fi
  ((rc != 0)) && status=1
  echo "${name} | ${verdict} | $((SECONDS - t0)) | ${name}.log" | tee -a "${summary}"
}

build_ext() {
  python3 -c "
import time
t = time.time()
from grpo_kernels.backends import cpp
module = cpp.load_extension()
assert module.has_cuda(), 'the extension was built without its CUDA kernels'
print(f'cpp extension with CUDA kernels ready in {time.time() - t:.0f} s')"
}

pytest_gpu() {  # pytest with the per-test timeout, -x, and the short summary of failures
  python3 -m pytest -x -q -rfE -p no:cacheprovider --timeout="${TEST_TIMEOUT_S:-90}" --durations=10 "$@"
}

bench_run() {  # bench_run NAME REPORT_ARGS...: report.py into a scratch folder, results.json to $OUT
  local name="$1" budget=$((${PART_LEFT_S:-200} - 45))
  shift
  python3 bench/report.py --out "/tmp/grpo_bench_${name}" --budget-s "$((budget > 30 ? budget : 30))" "$@" ${BENCH_ARGS:-}
  local rc=$?
  cp "/tmp/grpo_bench_${name}/results.json" "${OUT}/${name}_results.json" 2>/dev/null
  return ${rc}
}

sanitize() {  # sanitize TOOL BACKEND DRIVER_ARGS...
  local tool="$1" backend="$2"
  shift 2
  # every tensor its own cudaMalloc (memcheck sees past a tensor's end); no autotuning trials
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 GRPO_KERNELS_TRITON_AUTOTUNE=0 \
    "${SANITIZER}" --tool "${tool}" --error-exitcode 99 --print-limit 50 --target-processes application-only \
    ${SANITIZER_ARGS:-} python3 bench/sanitize_driver.py --backends "${backend}" "$@"
}
SANITIZER="${SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}"
export -f build_ext pytest_gpu bench_run sanitize
export OUT SANITIZER

xdist=()
if [[ "${SMOKE_WORKERS:-8}" != 0 ]] && python3 -c "import xdist" 2>/dev/null; then
  xdist=(-n "${SMOKE_WORKERS:-8}")
fi

case "${mode}" in
  smoke)
    part build 200 build_ext
    # the CUDA kernels' own tests first: code no CI runs
    part cuda_gpu 120 pytest_gpu tests/test_cuda_gpu.py
    # batch invariance on the device (torch/triton/cpp): the fixed address-independent column split
    # of the CUDA row sweep, which only the device emulation checked on the CPU
    part batch_invariance 60 pytest_gpu tests/test_batch_invariance.py
    # the divergence row passes (Triton, CUDA, torch) on the device, Qwen's vocabulary included
    part distill_gpu 60 pytest_gpu tests/test_distill_gpu.py
    # the contract's cuda cases (marked gpu; the *-cpu ones are what CI runs)
    part contract 200 pytest_gpu "${xdist[@]}" -m gpu tests/test_row_pass_contract.py
    # > 2^31 element offsets (12, marked gpu) and the Triton GPU-only tests (3, not marked): 15 by name
    part gpu_extra 150 pytest_gpu -k test_gpu_ tests/test_large_index.py tests/test_triton_backend.py
    ;;
  bench)
    if ! python3 -c "import pytest_benchmark" 2>/dev/null; then
      echo "bench | FAILED: pytest-benchmark is not installed (bench/ runs on it) | 0 | -" | tee -a "${summary}"
      exit 1
    fi
    part bench_headline 200 bench_run bench_headline --shapes N8192-H4096-V151936-bf16 --kinds loss floor \
      --cases ours:triton ours:cpp floor floor:real trl:chunked liger ref:eager
    # distillation: the fused divergence (auto: Triton) against TRL's chunked divergence and Liger's
    # JSD (eager), a fresh process per row (bench/distill_compare.py)
    part bench_distill 90 python3 bench/distill_compare.py --device cuda --dtype bf16 --n 4096 --h 2048 --ht 4096 \
      --v 151936 --betas 0.5 1 --methods ours trl liger --json-out "${OUT}/bench_distill.json"
    part bench_logprobs 200 bench_run bench_logprobs --kinds logprobs --cases ours:triton ours:cpp trl:chunked ref:eager
    ;;
  sanitize)
    part build 200 build_ext
    part memcheck_cpp 100 sanitize memcheck cpp
    part memcheck_triton 100 sanitize memcheck triton
    part racecheck_cpp 70 sanitize racecheck cpp --dtypes bf16 fp64
    part racecheck_triton 70 sanitize racecheck triton --dtypes bf16 fp64
    ;;
esac
echo "gpu_check.sh ${mode}: $([[ ${status} -eq 0 ]] && echo PASSED || echo FAILED) in $((SECONDS - START)) s" | tee -a "${summary}"
exit ${status}
