#!/usr/bin/env bash
# The peers that .ci/gpu_check.sh bench measures against, as wheels in .whl/ (git-ignored), for a
# GPU machine that cannot reach a package index: run this where pip can, then carry .whl/ along;
# gpu_check.sh installs whatever is in .whl/ (pip --no-index --no-deps --target) before it starts.
#
#   bash .ci/gpu_wheels.sh            # trl 1.16.0 + liger-kernel 0.8.5 for CPython 3.12, manylinux x86_64
#   PY=3.11 bash .ci/gpu_wheels.sh    # another Python on the GPU machine
#
# --no-deps: everything else they import is on the GPU image already (torch, triton, transformers,
# accelerate; checked below against each wheel's Requires-Dist); EXTRA_WHEELS="name==version ..."
# adds more. One version of each package only: two stop the whole install there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-3.12}"
WHEELS=(trl==1.16.0 liger-kernel==0.8.5 ${EXTRA_WHEELS:-})
mkdir -p .whl
for spec in "${WHEELS[@]}"; do
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "${PY}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${spec}"
done
# one version per package (a wheel left by an earlier run with other pins would break the install)
dupes="$(ls .whl/*.whl | xargs -n1 basename | cut -d- -f1 | tr '[:upper:]-' '[:lower:]_' | sort | uniq -d)"
if [[ -n "${dupes}" ]]; then
  echo "gpu_wheels.sh: several versions in .whl/ of: ${dupes} (remove the old ones)"
  exit 1
fi
for whl in .whl/*.whl; do
  echo "$(basename "${whl}") requires:"
  unzip -p "${whl}" '*.dist-info/METADATA' | sed -n 's/^Requires-Dist: //p' | grep -v 'extra ==' | sed 's/^/    /' || true
done
du -sh .whl | sed 's/^/gpu_wheels.sh: .whl = /'
