#!/usr/bin/env bash
# Creates .venv (if missing) and installs tokenloom with its test extras.
# torch is pinned to the CPU wheel this machine ships; an unpinned torch would pull CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
python -c "import torch" 2>/dev/null || pip install -q "torch==${TORCH_VERSION:-2.13.0}"
pip install -q -e ".[test]"
