#!/usr/bin/env bash
# PTQ table of issue 3: SmolLM2-135M, calibrated once on WikiText-2 valid (128 x 512 tokens),
# perplexity on the first 40 windows of 512 tokens of WikiText-2 raw test.
# Usage: bash experiments/ptq_smollm2.sh [OUTDIR]   (needs ../shared/data; ~45 min on 2 cores)
set -euo pipefail
OUT=${1:-runs/ptq_smollm2}
DATA=${QERA_DATA:-../shared/data}
QERA=${QERA:-.venv/bin/qera}
mkdir -p "$OUT"
[ -f "$OUT/stats.safetensors" ] || "$QERA" calibrate smollm2-135m --no-progress \
    --calib-text "$DATA/wikitext-2/wiki.valid.tokens" --calib-samples 128 --calib-seq-len 512 \
    --kinds abs,sq,xtx --out "$OUT/stats.safetensors"
"$QERA" compare smollm2-135m --no-progress --stats "$OUT/stats.safetensors" \
    --methods w-only,zeroquant-v2,loftq,lqer,qera-approx,qera-exact \
    --settings "${SETTINGS:-mxint4@32,mxint3@64,mxint4@4,mxint3@8}" \
    --eval-text "$DATA/wikitext-2-raw/wiki.test.raw" --seq-len 512 --max-windows 40 \
    --out-json "$OUT/table.json" | tee "$OUT/table.txt"
# Checkpoint sizes for the paper's two settings.
for s in mxint4@32 mxint3@64; do
    fmt=${s%@*}; rank=${s#*@}
    "$QERA" quantize smollm2-135m --no-progress --stats "$OUT/stats.safetensors" --format "$fmt" \
        --method qera-exact --rank "$rank" --out "$OUT/ckpt-$fmt-r$rank" --overwrite
    "$QERA" info "$OUT/ckpt-$fmt-r$rank" | tee "$OUT/info-$fmt-r$rank.txt"
done
