#!/usr/bin/env bash
# The GPU check of issues #21 and #19 (its options: check.py part 5): under 8 minutes on
# one H100/H200. Without CUDA it runs the CPU-safe parts at tiny shapes (the CI smoke
# test). Results: benchmarks/gpu/results/.
#   benchmarks/gpu/run.sh [--out DIR] [--smoke]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-.venv/bin/python}"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m benchmarks.gpu.check "$@"
if [ "$("$PY" -c 'import torch; print(torch.cuda.is_available())')" = True ] &&
   "$PY" -c 'from matryoshka_plugin.adapters.installed_sparsify import detect_clt_training as d; raise SystemExit(d() is None)'; then
  # (4) the clt-training fork adapter's fit() and losses, on CUDA, with the fork installed.
  PYTHONPATH="$PWD/tests:$PWD" timeout 240 "$PY" -m pytest -q tests/test_clt_training_fork.py
else
  echo "(4) clt-training fork adapter: skipped (needs CUDA and the fork installed)"
fi
