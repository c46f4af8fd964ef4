#!/usr/bin/env bash
# Everything that needs a GPU, in one command on a CUDA machine:
#   bash .ci/gpu_check.sh tests   # GPU parity + kernel tests (bf16/fp16/fp32/fp64, every backend)
#   bash .ci/gpu_check.sh bench   # the GPU benchmark set (bench/report.py), tables + plot under $OUT
#                                 # (BENCH_ARGS="--compare-with DIR": before/after against another checkout)
#   bash .ci/gpu_check.sh level   # sequence- vs token-level importance sampling at the headline shape
#   bash .ci/gpu_check.sh         # all three (BENCH_ARGS="--budget-s 200" etc. passes through)
# Peers' wheels (trl, liger-kernel) are picked up from .whl/ when present (offline machines).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/grpo_gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
mode="${1:-all}"
status=0
if [[ "$mode" == "all" || "$mode" == "tests" ]]; then
  python3 -m pytest -q -rs -p no:cacheprovider --durations=10 \
    tests/test_parity.py tests/test_token_logprobs.py tests/test_triton_backend.py tests/test_cuda_gpu.py \
    tests/test_large_index.py tests/test_determinism.py tests/test_sequence_chunks.py \
    tests/test_options_reach_kernels.py tests/test_row_pass_contract.py tests/test_reliability.py \
    tests/test_batch_invariance.py tests/test_rewards_path.py tests/test_rollout_correction.py \
    tests/test_chunk_rule.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -n 60
  status=${PIPESTATUS[0]}
fi
if [[ "$mode" != "tests" ]] && ! python3 -c "import pytest_benchmark" 2>/dev/null; then
  echo "pytest-benchmark is not installed: bench/ runs on it (pip install pytest-benchmark, or its wheel in .whl/)"
  status=1
fi
if [[ "$mode" == "all" || "$mode" == "bench" ]]; then
  python3 bench/report.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -n 80
  [[ ${PIPESTATUS[0]} -ne 0 ]] && status=1
fi
if [[ "$mode" == "all" || "$mode" == "level" ]]; then
  python3 -m pytest -q -p no:cacheprovider bench/test_bench.py::test_level --bench-shape N8192-H4096-V151936-bf16 \
    --benchmark-group-by=group --benchmark-columns=min,median,max,rounds \
    --benchmark-json "$OUT/sequence_level.json" 2>&1 | tee "$OUT/sequence_level.log" | tail -n 30
  [[ ${PIPESTATUS[0]} -ne 0 ]] && status=1
fi
exit $status
