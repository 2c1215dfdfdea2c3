#!/usr/bin/env bash
# Installs tsprune and everything it needs into the current Python, without ever replacing torch.
#   bash scripts/install.sh          package + runtime dependencies (+ the C++ CPU extension)
#   bash scripts/install.sh test     ... plus the test tools (pytest, pytest-benchmark, hypothesis)
# torch: if none is importable, installs torch==2.13.0 (on the project's CPU machines a local CPU
# wheel; GPU users install their CUDA build of torch first). The installed version is then pinned
# in every pip call so no dependency can swap it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "install.sh: no torch found; installing torch==2.13.0" >&2
  "$PY" -m pip install -q "torch==2.13.0"
fi
TORCH_VER="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')"
EXTRAS=""
if [[ "${1:-}" == "test" ]]; then EXTRAS="[test]"; fi
# setuptools/wheel/ninja/pybind11 must be present for the no-isolation build of the extension.
"$PY" -m pip install -q "torch==${TORCH_VER}" setuptools wheel ninja pybind11 numpy
"$PY" -m pip install -q --no-build-isolation -e ".${EXTRAS}" "torch==${TORCH_VER}"
"$PY" -c "import tsprune_kernels as K, json; print('tsprune_kernels backends:', json.dumps({k: v['cpu'] for k, v in K.backends().items()}))"
