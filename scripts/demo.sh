#!/usr/bin/env bash
# Set up if needed, then run the main job on the built-in model SmolLM2-135M: prune it to 50% with
# SparseGPT (128 x 512 C4 calibration windows) and show dense against sparse WikiText-2 perplexity.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
sc=.venv/bin/sparsecraft
out=runs/demo-sparsegpt50
if $sc prune --help >/dev/null 2>&1; then
    [ -f "$out/config.json" ] || $sc prune smollm2-135m --method sparsegpt --sparsity 0.5 --calib c4 \
        --nsamples 128 --seqlen 512 --seed 0 --out "$out"
    $sc inspect "$out" --quiet
    $sc eval smollm2-135m "$out" --ppl wikitext2 --seqlen 512 --windows 40 --json runs/demo-eval.json
else
    $sc eval smollm2-135m --ppl wikitext2 --seqlen 512 --windows 40 --json runs/demo-eval.json
fi
