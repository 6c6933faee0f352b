#!/usr/bin/env bash
# Creates .venv (if missing) and installs tokenloom with its test extras.
# torch is pinned to the CPU wheel this machine ships; an unpinned torch would pull CUDA packages.
# The web page's browser test drives Debian's chromium through the playwright package (never a
# browser that playwright would download): chromium comes from apt-get when it is missing.
# Speech of the shapes world is rendered by Debian's espeak-ng (tokenloom.world.speech), installed the
# same way.
set -euo pipefail
cd "$(dirname "$0")/.."
APT_UPDATED=0
apt_install() {  # apt_install PROGRAM PACKAGE WHAT-SKIPS: install PACKAGE when PROGRAM is missing, as root
    if command -v "$1" >/dev/null 2>&1; then return 0; fi
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        if [ "$APT_UPDATED" = 0 ]; then apt-get update -qq >/dev/null; APT_UPDATED=1; fi
        apt-get install -y -qq --no-install-recommends "$2" >/dev/null
    else
        echo "setup.sh: $1 is missing (install it as root: apt-get install $2); $3" >&2
    fi
}
apt_install chromium chromium "the web page test will skip"
apt_install espeak-ng espeak-ng "speech cannot be rendered and its tests will skip"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
python -c "import torch" 2>/dev/null || pip install -q "torch==${TORCH_VERSION:-2.13.0}"
pip install -q -e ".[test]"
