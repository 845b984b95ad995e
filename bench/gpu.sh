#!/usr/bin/env bash
# The GPU benchmark (bench/gpu.py) as run on a lent GPU machine: what the machine is, then the
# benchmark under an 8-minute limit. Downloads nothing (such machines have no internet).
#   bash bench/gpu.sh            # ResNet50, 224 px, batch 256
#   bash bench/gpu.sh --tiny     # CPU smoke test
# PYTHON picks the interpreter (default: the repo's .venv if there is one, else python).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
if command -v nvidia-smi >/dev/null; then
    nvidia-smi
fi
"$PYTHON" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU available: {torch.cuda.is_available()}")'
PYTHONUNBUFFERED=1 exec timeout 480 "$PYTHON" bench/gpu.py "$@"
