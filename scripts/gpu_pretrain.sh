#!/usr/bin/env bash
# Pre-train (or continue pre-training) the default Chronos-Bolt on a lent GPU in ONE device call,
# and bring the exported model back (issue 10). The device machine has torch, transformers,
# pandas, einops and accelerate but not chronos-forecasting: carry its wheel.
#
# Here, once per checkout (the wheel folder is ignored by git, never committed):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       -d .whl "chronos-forecasting==$(python3 -c 'import importlib.metadata as m; print(m.version("chronos-forecasting"))')"
# On the device (device tool): run(command="bash scripts/gpu_pretrain.sh 7", carry=[".whl"], timeout_s=600)
#   argument 1: minutes of training (default 7; the schedule decays fully within them)
#   PRETRAIN_ARGS: more python -m tsprune.pretrain options, e.g.
#     PRETRAIN_ARGS="--init models/candidate-bolt-2.5m --batch 512 --periodic 0.15"  (continue the 2.5M candidate)
#     PRETRAIN_ARGS="--d-model 256 --d-ff 1024 --heads 4 --d-kv 64"    (the official tiny shape)
# DEVICE=cpu runs the same thing here (a smoke test of the script).
# Back here: bash scripts/gpu_pretrain.sh --join FILES_AT models/NAME
#   (FILES_AT: the run's files_at folder) joins the split weight file and checks the model loads
#   (format 2: every file's sha256 is verified by load_pruned).
#
# What comes back in $OUT: model/ (config.json, meta.json, plan.json, model.safetensors split into
# parts of at most 15 MiB: the device returns files of at most 16 MiB), pretrain.log.jsonl (every
# step's loss, the monitor loss, samples, wall time), gpu.txt (nvidia-smi, torch versions).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ "${1:-}" == "--join" ]]; then
  src="${2:?--join needs the files_at folder}"; dest="${3:?--join needs a destination model folder}"
  if [[ -e "$dest" ]]; then echo "gpu_pretrain: $dest exists; choose a new folder" >&2; exit 2; fi
  mkdir -p "$dest"
  for f in config.json meta.json plan.json; do cp "$src/model/$f" "$dest/"; done
  cat "$src"/model/model.safetensors.part* > "$dest/model.safetensors"
  python3 -c "import sys, tsprune; m = tsprune.load_pruned(sys.argv[1]); print('joined and loaded', sys.argv[1], sum(p.numel() for p in m.parameters()), 'parameters')" "$dest"
  exit 0
fi

MIN="${1:-7}"
OUT="${OUT:?run this through the device tool (it sets OUT), or set OUT yourself}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/python:$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
{ nvidia-smi || true; python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } >"$OUT/gpu.txt" 2>&1
WORKERS="${WORKERS:-$(( $(nproc) > 4 ? $(nproc) - 2 : 2 ))}"
CK=/tmp/pretrain/ckpt.pt
# --steps only bounds the schedule from above: --max-minutes ends it (fully decayed) first
rc=0
python3 -m tsprune.pretrain --device "${DEVICE:-cuda}" --workers "$WORKERS" --max-minutes "$MIN" \
    --steps 1000000 --warmup 300 --ckpt "$CK" --ckpt-minutes 2 ${PRETRAIN_ARGS:-} >/tmp/pretrain.out 2>&1 || rc=$?
grep -E "^(pretrain|error|step +[0-9]*[05]00 )" /tmp/pretrain.out || true
[[ -f "$CK.log.jsonl" ]] && cp "$CK.log.jsonl" "$OUT/pretrain.log.jsonl"
if [[ $rc -ne 0 ]]; then tail -20 /tmp/pretrain.out; exit "$rc"; fi
python3 -m tsprune.pretrain --ckpt "$CK" --export "$OUT/model"
( cd "$OUT/model" && split -b 15M -d model.safetensors model.safetensors.part && rm model.safetensors )
ls -la "$OUT/model"
