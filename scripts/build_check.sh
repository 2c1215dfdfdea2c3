#!/usr/bin/env bash
# Builds the tsprune CPU kernels with CMake (static library + C++ test) and runs the test with
# ctest. Used by CI. Needs python with torch importable; no CUDA needed.
#   BUILD_DIR (default build/cmake), JOBS (default 2), PYTHON (default python),
#   TSPRUNE_NO_NATIVE=1 to build without -march=native.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python}"
BUILD_DIR="${BUILD_DIR:-build/cmake}"
JOBS="${JOBS:-2}"

TORCH_PREFIX="$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')" || {
  echo "build_check.sh: torch is not importable with $PYTHON" >&2
  exit 2
}
NATIVE=ON
if [[ "${TSPRUNE_NO_NATIVE:-0}" == "1" ]]; then NATIVE=OFF; fi

GEN=()
if command -v ninja >/dev/null 2>&1; then GEN=(-G Ninja); fi
# A build dir configured with another generator cannot be reused with this one.
if [[ -f "$BUILD_DIR/CMakeCache.txt" ]] && ! grep -q "CMAKE_GENERATOR:INTERNAL=${GEN[1]:-Unix Makefiles}" "$BUILD_DIR/CMakeCache.txt"; then
  rm -rf "$BUILD_DIR"
fi

cmake -S . -B "$BUILD_DIR" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DTSPRUNE_NATIVE="$NATIVE"
cmake --build "$BUILD_DIR" -j"$JOBS"
ctest --test-dir "$BUILD_DIR" --output-on-failure
