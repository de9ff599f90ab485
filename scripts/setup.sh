#!/usr/bin/env bash
# Create .venv (once) and install llmprune with its test extra.
# torch is pinned here, and only here: 2.13.0 installs a CPU build from local disk on our CI machines,
# while an unpinned `torch` would pull a multi-GB CUDA build. Users may use any torch >= 2.4.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
