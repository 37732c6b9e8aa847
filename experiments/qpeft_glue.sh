#!/usr/bin/env bash
# Issue 5, experiment 2: MiniLM-L6 on MRPC and STS-B with a quantized base:
# qlora vs loftq (5 it.) vs qera-approx (vs qera-exact at 2 bits), plus a 16-bit LoRA reference,
# SEEDS seeds each. Budget (2 CPU cores): TRAIN training examples, EVAL evaluation examples,
# EPOCHS epochs, identical for every method. Then summarize with experiments/summarize_glue.py.
# Other overrides: TASKS, SETTINGS ("FORMAT RANK,FORMAT RANK"), INITS, LORA16=0 (skip the reference),
# EVAL_STEPS (evaluate every N steps instead of every epoch).
# Usage: bash experiments/qpeft_glue.sh [OUTDIR]
set -euo pipefail
OUT=${1:-runs/qpeft_glue}
DATA=${QERA_DATA:-../shared/data}
QERA=${QERA:-.venv/bin/qera}
SEEDS=${SEEDS:-"0 1 2"}
TRAIN=${TRAIN:-512}; EVAL=${EVAL:-408}; EPOCHS=${EPOCHS:-3}
declare -A TRAINF=([mrpc]="$DATA/glue/MRPC/msr_paraphrase_train.txt" [stsb]="$DATA/glue/STS-B/train.tsv")
declare -A EVALF=([mrpc]="$DATA/glue/MRPC/msr_paraphrase_test.txt" [stsb]="$DATA/glue/STS-B/dev.tsv")
for task in ${TASKS:-mrpc stsb}; do
  IFS=',' read -ra settings <<< "${SETTINGS:-mxint3 8,mxint2:block=16 64}"  # "FORMAT RANK,FORMAT RANK"
  for setting in "${settings[@]}"; do
    set -- $setting; fmt=$1; rank=$2
    inits=${INITS:-"qlora loftq qera-approx"}
    [[ -z ${INITS:-} && $fmt == mxint2* ]] && inits="$inits qera-exact"
    for init in $inits; do
      for seed in $SEEDS; do
        dir="$OUT/$task/${fmt//:/_}-r$rank/$init/seed$seed"
        [ -f "$dir/result.json" ] && continue
        "$QERA" finetune minilm-l6 --no-progress --overwrite --task "$task" \
            --train "${TRAINF[$task]}" --eval "${EVALF[$task]}" --max-train-samples "$TRAIN" --max-eval-samples "$EVAL" \
            --init "$init" --format "$fmt" --rank "$rank" --alpha "$((2 * rank))" --loftq-iters 5 \
            --calib-text "$DATA/wikitext-2/wiki.valid.tokens" --calib-samples 64 --calib-seq-len 128 \
            --epochs "$EPOCHS" --batch-size 16 --lr 5e-4 --seed "$seed" ${EVAL_STEPS:+--eval-steps $EVAL_STEPS} --out "$dir"
      done
    done
  done
  [[ ${LORA16:-1} == 1 ]] || continue
  for seed in $SEEDS; do  # 16-bit LoRA upper reference
    dir="$OUT/$task/lora16-r8/lora/seed$seed"
    [ -f "$dir/result.json" ] || "$QERA" finetune minilm-l6 --no-progress --overwrite --task "$task" \
        --train "${TRAINF[$task]}" --eval "${EVALF[$task]}" --max-train-samples "$TRAIN" --max-eval-samples "$EVAL" \
        --init lora --rank 8 --alpha 16 --epochs "$EPOCHS" --batch-size 16 --lr 5e-4 --seed "$seed" ${EVAL_STEPS:+--eval-steps $EVAL_STEPS} --out "$dir"
  done
done
