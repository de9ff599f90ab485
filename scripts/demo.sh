#!/usr/bin/env bash
# Install llmprune, prune the embedded offline model (SmolLM2-135M-Instruct) and compare it with the
# dense model. Everything runs on a CPU in a few minutes; no Hub access is needed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
LLMPRUNE=.venv/bin/llmprune
OUT=${OUT:-out/demo}

$LLMPRUNE --model smollm2-135m --recipe magnitude --sparsity 0.2 -o "$OUT" --overwrite
$LLMPRUNE eval "$OUT" --data python-docs --seqlen 256 --max-windows 32 --baseline smollm2-135m
$LLMPRUNE inspect "$OUT"
