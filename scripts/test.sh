#!/usr/bin/env bash
# The whole test suite: C++ tests (CMake + ctest), a compile check of every CUDA source (nvcc -c,
# when nvcc exists), the Triton kernels through the interpreter on small shapes, then pytest on
# everything else. Exits non-zero on the first failing part.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
export TSPRUNE_REQUIRE_CPP="${TSPRUNE_REQUIRE_CPP:-1}"   # a missing C++ build fails the kernel tests
export PYTHON="$PY"
echo "== C++ tests (cmake + ctest)"
bash scripts/build_check.sh
if [[ -f scripts/nvcc_check.sh ]] && compgen -G "csrc/cuda/*.cu" >/dev/null; then
  echo "== CUDA sources compile (nvcc -c)"
  bash scripts/nvcc_check.sh
fi
if [[ -f tests/kernels/test_triton.py ]]; then
  echo "== Triton kernels through the interpreter"
  TRITON_INTERPRET=1 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_triton.py
fi
echo "== pytest"
"$PY" -m pytest -q -p no:cacheprovider tests --ignore=tests/kernels/test_triton.py "$@"
