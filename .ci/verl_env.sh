#!/usr/bin/env bash
# A separate virtual environment with verl 0.9.1 (for tests/verl_reference.py and verl's FSDP
# engine on the CPU), apart from the dev venv: verl pins transformers<5.11 and installs a
# top-level package named "tests".
#
#   bash .ci/verl_env.sh [VENV]      (default: ${TMPDIR:-/tmp}/grpo_verl_venv)
#
# Creates VENV, or reuses it when it already holds this exact install set (a stamp file) and this
# checkout's editable grpo_kernels; prints VENV's python as the only line on stdout (all else goes
# to stderr), so:  PY="$(bash .ci/verl_env.sh)"
#
# The light set: verl with --no-deps plus what these import (found by trial in a bare venv):
#   verl.trainer.ppo.{core_algos,rollout_corr_helper}, verl.workers.utils.losses,
#   verl.workers.config, verl.workers.engine.fsdp (FSDPEngine), verl.models.transformers.monkey_patch
# verl/__init__ imports verl.protocol, which imports ray (plain ray, not ray[default]); losses.py
# imports verl.utils.dataset, which imports datasets and PIL; torch_functional imports transformers;
# the FSDP engine imports peft. Not needed: hydra-core, wandb, tensorboard, torchdata, pandas (comes
# with datasets anyway), pylatexenc, pybind11, ray[default]'s extras (aiohttp, grpcio, opencensus, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd -P)"
venv="${1:-${TMPDIR:-/tmp}/grpo_verl_venv}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

# bump when the set changes: a venv with another stamp is rebuilt
TORCH_REQ="torch==2.13.0"
VERL_REQ="verl==0.9.1"
LIGHT_REQS=(
    "packaging>=20" "numpy>=2"
    "tensordict==0.10.0" "ray==2.60.0" "omegaconf==2.3.1" "transformers==5.10.4"
    "codetiming==1.4.0" "datasets==5.2.0" "pillow==13.0.0" "peft==0.21.2"
)
# triton: the verl tests run the Triton backend too (interpreted, tiny shapes)
DEV_REQS=("ninja" "pytest>=7" "triton==3.9.0")
stamp_text="$TORCH_REQ $VERL_REQ ${LIGHT_REQS[*]} ${DEV_REQS[*]}"
stamp="$venv/.grpo_verl_env_stamp"
py="$venv/bin/python"

log() { echo "verl_env: $*" >&2; }

# grpo_kernels must resolve to this checkout (an editable install of another clone would not)
grpo_here() {
    "$py" - "$repo" <<'EOF' >/dev/null 2>&1
import importlib.util, os, sys
spec = importlib.util.find_spec("grpo_kernels")
sys.exit(0 if spec and os.path.realpath(spec.origin).startswith(os.path.join(sys.argv[1], "")) else 1)
EOF
}

if [[ -x "$py" && -f "$stamp" && "$(cat "$stamp")" == "$stamp_text" ]]; then
    if ! grpo_here; then
        log "re-pointing the editable grpo_kernels at $repo"
        GRPO_KERNELS_BUILD_EXT=0 "$py" -m pip install -q --no-deps -e "$repo" >&2
    fi
    echo "$py"
    exit 0
fi

start=$SECONDS
if [[ -e "$venv" ]]; then
    log "rebuilding $venv (no stamp, or a different install set)"
    rm -rf "$venv"
fi
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
log "creating $venv with $PYTHON"
"$PYTHON" -m venv "$venv"
pip=("$py" -m pip install -q)
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build
"${pip[@]}" "$TORCH_REQ" >&2
log "torch: $((SECONDS - start)) s"
"${pip[@]}" --no-deps "$VERL_REQ" >&2
"${pip[@]}" "${LIGHT_REQS[@]}" "${DEV_REQS[@]}" "$TORCH_REQ" >&2
log "verl and its light set: $((SECONDS - start)) s"
# build isolation: no torch in the build env, so a pure-Python editable install (no extension)
GRPO_KERNELS_BUILD_EXT=0 "$py" -m pip install -q --no-deps -e "$repo" >&2
log "grpo_kernels: $((SECONDS - start)) s"

"$py" - >&2 <<'EOF'
import warnings
warnings.filterwarnings("ignore")
import verl
from verl.trainer.ppo import core_algos, rollout_corr_helper  # noqa: F401
from verl.workers.utils import losses  # noqa: F401
from verl.workers.config import ActorConfig  # noqa: F401
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead  # noqa: F401
from verl.models.transformers.monkey_patch import apply_monkey_patch  # noqa: F401
import grpo_kernels  # noqa: F401
assert verl.__version__ == "0.9.1", verl.__version__
EOF
grpo_here || { log "grpo_kernels does not resolve to $repo"; exit 1; }
echo "$stamp_text" > "$stamp"
log "ready in $((SECONDS - start)) s: $(du -sh "$venv" | cut -f1)"
echo "$py"
