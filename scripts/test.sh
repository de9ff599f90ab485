#!/usr/bin/env bash
# Install everything and run the whole test suite (unit tests on tiny models + the SmolLM2 integration test).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/python -m pytest -q "$@"
