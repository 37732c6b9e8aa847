#!/usr/bin/env bash
# LQER's W4A8 setting on SmolLM2-135M: mxint4 weights, mxint8 activations into the quantized GEMM,
# rank 32; same protocol as experiments/ptq_smollm2.sh (calibration 128 x 512 WikiText-2 valid,
# perplexity on the first 40 windows of 512 tokens of WikiText-2 raw test), W4A16 beside it.
# Usage: [ACTS="mxint8 none"] bash experiments/ptq_w4a8.sh [OUTDIR]   (needs ../shared/data)
set -euo pipefail
OUT=${1:-runs/ptq_w4a8}
DATA=${QERA_DATA:-../shared/data}
QERA=${QERA:-.venv/bin/qera}
mkdir -p "$OUT"
[ -f "$OUT/stats.safetensors" ] || "$QERA" calibrate smollm2-135m --no-progress \
    --calib-text "$DATA/wikitext-2/wiki.valid.tokens" --calib-samples 128 --calib-seq-len 512 \
    --kinds abs,sq,xtx --out "$OUT/stats.safetensors"
for act in ${ACTS:-mxint8 none}; do
    extra=(); [ "$act" = none ] || extra=(--act-format "$act")
    "$QERA" compare smollm2-135m --no-progress --stats "$OUT/stats.safetensors" \
        --methods w-only,lqer,qera-approx,qera-exact --settings mxint4@32 "${extra[@]}" \
        --eval-text "$DATA/wikitext-2-raw/wiki.test.raw" --seq-len 512 --max-windows 40 \
        --out-json "$OUT/table-$act.json" | tee "$OUT/table-$act.txt"
done
