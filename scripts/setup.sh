#!/usr/bin/env bash
# Creates .venv (if missing) and installs tokenloom with its test extras.
# torch is pinned to the CPU wheel this machine ships; an unpinned torch would pull CUDA packages.
# The web page's browser test drives Debian's chromium through the playwright package (never a
# browser that playwright would download): chromium comes from apt-get when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null
        apt-get install -y -qq --no-install-recommends chromium >/dev/null
    else
        echo "setup.sh: chromium is missing (install it as root: apt-get install chromium); the web page test will skip" >&2
    fi
fi
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
python -c "import torch" 2>/dev/null || pip install -q "torch==${TORCH_VERSION:-2.13.0}"
pip install -q -e ".[test]"
