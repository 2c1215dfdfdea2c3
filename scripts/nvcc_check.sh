#!/usr/bin/env bash
# Compile-check the CUDA extension sources without a GPU (CI, and any machine with nvcc).
#
#   bash scripts/nvcc_check.sh            # sm_90 (H100 / H200)
#   TSPRUNE_CUDA_ARCHS="8.0;9.0" bash scripts/nvcc_check.sh
#
# 1. nvcc -c every csrc/cuda/*.cu for each architecture (with torch's include dirs on the path,
#    although the kernels themselves only use the CUDA runtime).
# 2. g++ -c every csrc/cuda/*.cpp (the pybind11 / torch binding) against the installed torch's
#    headers. A CPU-only torch wheel ships every header the binding needs (it uses no CUDA header:
#    the stream comes from Python), so this is a full compile, not a syntax check.
# 3. Link them into a throwaway tsprune_kernels._C_cuda (.so, against libcudart) and import it in
#    Python: catches undefined symbols and binding errors. Calls fail there without a GPU, by design.
# 4. Build and run csrc/cuda/tests/repack_host_test.cu: the kernel's copy routines run on the host
#    over hundreds of random layouts and are compared byte for byte with a naive gather.
#
# What a CPU-only torch cannot give: the real CUDAExtension build (setup.py links c10_cuda /
# torch_cuda, absent from CPU wheels) and running the kernel; benchmarks/gpu_suite.sh does both.
# Without nvcc the script says so and exits 0, unless TSPRUNE_REQUIRE_NVCC=1 (then 1).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$NVCC" && -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then NVCC="$CUDA_HOME/bin/nvcc"; fi
if [[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [[ -z "$NVCC" ]]; then
  echo "nvcc_check: nvcc not found (PATH, \$CUDA_HOME, /usr/local/cuda): SKIPPED"
  [[ "${TSPRUNE_REQUIRE_NVCC:-0}" == "1" ]] && exit 1
  exit 0
fi
# the toolkit root (nvcc may be a wrapper script elsewhere): nvcc's own TOP
CUDA_ROOT="$("$NVCC" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)"
CUDA_ROOT="$(cd "${CUDA_ROOT:-$(dirname "$(readlink -f "$NVCC")")/..}" && pwd)"
PY="${PYTHON:-python}"
ARCHS="${TSPRUNE_CUDA_ARCHS:-9.0}"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
echo "nvcc_check: $("$NVCC" --version | tail -1); archs $ARCHS; build dir $OUT"

read -r TORCH_INC PY_INC TORCH_LIB CXX_STD < <("$PY" - <<'EOF'
import sysconfig
import torch
from torch.utils import cpp_extension as ce
major, minor = (int(v) for v in torch.__version__.split(".")[:2])
std = "c++20" if (major, minor) >= (2, 10) else "c++17"   # what torch's own headers expect
print(":".join(ce.include_paths()), sysconfig.get_paths()["include"], ce.library_paths()[0], std)
EOF
)
INC=()
IFS=: read -r -a _incs <<<"$TORCH_INC"
for p in "${_incs[@]}"; do INC+=("-I$p"); done
INC+=("-I$PY_INC" "-Icsrc" "-Icsrc/cuda" "-I$CUDA_ROOT/include")

GENCODE=()
IFS=';' read -r -a _archs <<<"$ARCHS"
for a in "${_archs[@]}"; do
  a="${a//./}"
  a="${a%+PTX}"
  GENCODE+=("-gencode" "arch=compute_${a},code=sm_${a}")
done

shopt -s nullglob
objs=()
fail=0
for cu in csrc/cuda/*.cu; do
  o="$OUT/$(basename "${cu%.cu}").cu.o"
  if "$NVCC" -c -O3 -std=c++17 -Xcompiler -fPIC -lineinfo "${GENCODE[@]}" --resource-usage "${INC[@]}" "$cu" -o "$o" 2>"$o.log"; then
    echo "ok    nvcc -c $cu  ($(grep -ho 'Used [0-9]* registers' "$o.log" | sort -u | tr '\n' ' '))"
    objs+=("$o")
  else
    echo "FAIL  nvcc -c $cu"; cat "$o.log"; fail=1
  fi
done
for cpp in csrc/cuda/*.cpp; do
  o="$OUT/$(basename "${cpp%.cpp}").cpp.o"
  if g++ -c -O2 -fPIC -std="$CXX_STD" -DTORCH_EXTENSION_NAME=_C_cuda -DTORCH_API_INCLUDE_EXTENSION_H \
      "${INC[@]}" "$cpp" -o "$o" 2>"$o.log"; then
    echo "ok    g++ -c $cpp ($CXX_STD)"
    objs+=("$o")
  else
    echo "FAIL  g++ -c $cpp"; cat "$o.log"; fail=1
  fi
done
[[ $fail == 0 ]] || { echo "nvcc_check: FAILED"; exit 1; }

if ((${#objs[@]})); then
  mkdir -p "$OUT/pkg"
  g++ -shared -o "$OUT/pkg/_C_cuda.so" "${objs[@]}" -L"$TORCH_LIB" -lc10 -ltorch -ltorch_cpu -ltorch_python \
      -L"$CUDA_ROOT/lib64" -lcudart -Wl,-rpath,"$CUDA_ROOT/lib64" -Wl,-rpath,"$TORCH_LIB"
  "$PY" - "$OUT/pkg/_C_cuda.so" <<'EOF'
import importlib.util
import sys

import torch  # noqa: F401  (loads libtorch first, as the package does)

spec = importlib.util.spec_from_file_location("_C_cuda", sys.argv[1])
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
assert hasattr(m, "repack"), dir(m)
assert m.repack([], [], [], 0) == []
try:
    m.repack([torch.ones(2)], [None], [None], 0)
    raise SystemExit("repack accepted a CPU tensor")
except RuntimeError as e:
    assert "not a CUDA tensor" in str(e), e
print("ok    link + import tsprune_kernels._C_cuda (throwaway build): repack binding present")
EOF
fi

if [[ -f csrc/cuda/tests/repack_host_test.cu ]]; then
  "$NVCC" -std=c++17 -O1 -Icsrc/cuda csrc/cuda/tests/repack_host_test.cu -o "$OUT/repack_host_test"
  echo "ok    $("$OUT/repack_host_test")"
fi
echo "nvcc_check: all CUDA sources compiled"
