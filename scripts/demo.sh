#!/usr/bin/env bash
# Install llmprune, prune the embedded offline model (SmolLM2-135M-Instruct) and compare it with the
# dense model. Everything runs on a CPU in a few minutes; no Hub access is needed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
LLMPRUNE=.venv/bin/llmprune
OUT=${OUT:-out/demo}

# FinerCut, exact search: remove the 6 of 60 attention/FFN sublayers whose removal changes the
# next-token distributions least (JS divergence to the dense model on 5 x 64 calibration tokens;
# the paper uses 10 x 256 and 25 %, which takes about an hour on two CPU cores).
$LLMPRUNE --model smollm2-135m --recipe finercut --target-sublayers 0.1 --nsamples 5 --seqlen 64 \
    -o "$OUT" --overwrite
# Before/after: perplexity on text disjoint from the calibration text, dense model as the baseline.
$LLMPRUNE eval "$OUT" --data python-docs --seqlen 256 --max-windows 32 --baseline smollm2-135m
$LLMPRUNE inspect "$OUT"
