#!/usr/bin/env bash
# The README's main-job command: set up, then run the demo on the embedded default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
tokenloom demo --out out/demo "$@"
