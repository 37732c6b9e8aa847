#!/usr/bin/env bash
# Issue 5, experiment 1: model output error before training (QERA paper, Figure 1) for each
# adapter init, over ranks {4,8,16,32} and LoftQ iterations 1..5, at mxint3 and mxint2 (block 16).
# Calibration: WikiText-2 valid; held-out text: WikiText-2 raw test. Needs ../shared/data.
# Usage: bash experiments/qpeft_output_error.sh [OUTDIR]
set -euo pipefail
OUT=${1:-runs/qpeft_output_error}
DATA=${QERA_DATA:-../shared/data}
QERA=${QERA:-.venv/bin/qera}
for model in ${MODELS:-minilm-l6 smollm2-135m}; do
    "$QERA" output-error "$model" --no-progress --overwrite \
        --formats "${FORMATS:-mxint3,mxint2:block=16}" --ranks 4,8,16,32 --loftq-iters 5 \
        --calib-text "$DATA/wikitext-2/wiki.valid.tokens" --calib-samples "${CALIB_SAMPLES:-64}" --calib-seq-len 128 \
        --eval-text "$DATA/wikitext-2-raw/wiki.test.raw" --eval-samples "${EVAL_SAMPLES:-8}" --eval-seq-len 128 \
        --out "$OUT/$model" | tee "$OUT-$model.txt"
done
