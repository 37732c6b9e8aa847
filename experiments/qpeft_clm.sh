#!/usr/bin/env bash
# Issue 5, experiment 3: SmolLM2-135M causal LM with a 2-bit base: qlora vs loftq (5 it.) vs
# qera-approx vs qera-exact adapters, plus a 16-bit LoRA reference. Train on the first TRAIN windows
# of SEQ tokens of WikiText-2 valid; evaluate perplexity on the first EVAL windows of WikiText-2 raw
# test (a fixed slice), every EVAL_STEPS steps. The budget is identical for every method.
# Then: python experiments/summarize_glue.py OUTDIR   (it reads any task's result.json files)
# EXTRA: more `qera finetune` options for every quantized run, TAG: a suffix for their init's folder, e.g.
#   INITS=qera-exact EXTRA="--refine 24" TAG=-refine24 LORA16=0 bash experiments/qpeft_clm.sh
# Usage: bash experiments/qpeft_clm.sh [OUTDIR]
set -euo pipefail
OUT=${1:-runs/qpeft_clm}
DATA=${QERA_DATA:-../shared/data}
QERA=${QERA:-.venv/bin/qera}
MODEL=${MODEL:-smollm2-135m}; FMT=${FMT:-mxint2:block=16}; RANK=${RANK:-16}
SEEDS=${SEEDS:-0}; TRAIN=${TRAIN:-64}; EVAL=${EVAL:-16}; SEQ=${SEQ:-256}; EPOCHS=${EPOCHS:-1}
EVAL_STEPS=${EVAL_STEPS:-4}; LR=${LR:-5e-4}; BATCH=${BATCH:-4}
common=(--no-progress --overwrite --task clm --train "$DATA/wikitext-2/wiki.valid.tokens"
        --eval "$DATA/wikitext-2-raw/wiki.test.raw" --seq-len "$SEQ" --max-train-samples "$TRAIN"
        --max-eval-samples "$EVAL" --epochs "$EPOCHS" --batch-size "$BATCH" --lr "$LR" --eval-steps "$EVAL_STEPS"
        --logging-steps 1)
for init in ${INITS:-qlora loftq qera-approx qera-exact}; do
  for seed in $SEEDS; do
    dir="$OUT/clm/${FMT//:/_}-r$RANK/$init${TAG:-}/seed$seed"
    [ -f "$dir/result.json" ] && continue
    "$QERA" finetune "$MODEL" "${common[@]}" --init "$init" --format "$FMT" --rank "$RANK" --alpha "$((2 * RANK))" \
        --loftq-iters 5 --calib-text "$DATA/wikitext-2/wiki.valid.tokens" --calib-samples 64 --calib-seq-len 256 \
        --seed "$seed" --out "$dir" ${EXTRA:-}
  done
done
[[ ${LORA16:-1} == 1 ]] || exit 0
for seed in $SEEDS; do  # 16-bit LoRA upper reference
  dir="$OUT/clm/lora16-r$RANK/lora/seed$seed"
  [ -f "$dir/result.json" ] || "$QERA" finetune "$MODEL" "${common[@]}" --init lora --rank "$RANK" \
      --alpha "$((2 * RANK))" --seed "$seed" --out "$dir"
done
