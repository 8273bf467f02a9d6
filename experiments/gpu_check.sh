#!/usr/bin/env bash
# FlexDraft GPU check: one prepared command for one GPU (at most ~8 minutes, an H100 took 4; no downloads, no installs).
#
#   experiments/gpu_check.sh                 # tests (bf16 too), autotune, kernel benchmarks, forward steps
#   experiments/gpu_check.sh --dry-run       # the same pipeline on CPU under the Triton interpreter, tiny shapes
#   experiments/gpu_check.sh --stages kernels,forward --budget-scale 0.5
#   FLEXDRAFT_GIT_COMMIT=<sha> experiments/gpu_check.sh   # on the lent machine, whose .git is the session start's
#
# Results go to $OUT (default ./gpu_out): gpu_check.json, gpu_check.md, gpu_check.log, tests/, autotune/.
# See experiments/gpu_check.py for what each stage does.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"

has_cuda() { "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }

# The Python whose torch sees the GPU (a CPU-only project venv copied along must not win); any Python for a dry run.
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for candidate in python3 python .venv/bin/python; do
    if command -v "$candidate" >/dev/null 2>&1 && has_cuda "$candidate"; then PY="$candidate"; break; fi
  done
fi
if [ -z "$PY" ]; then
  if [[ " $* " == *" --dry-run "* ]]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
  else
    echo "gpu_check: no Python with a CUDA-enabled torch found (set PYTHON=...), or pass --dry-run" >&2
    exit 2
  fi
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # kernels/, autotune/ without an install
export PYTHONUNBUFFERED=1
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"   # triton >= 3.9 warns when unset
# as a module from the repository root: the script folder on sys.path would let experiments/*.py shadow modules
"$PY" -m experiments.gpu_check --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
