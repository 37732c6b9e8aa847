#!/usr/bin/env bash
# The GPU checks of issue 17 in one call (device machine: torch + transformers preinstalled, no registry).
# Wheels for llm-compressor and its missing dependencies travel in .whl/: `bash bench/gpu_wheels.sh` here,
# then carry ".whl" with the device call (it is git-ignored).
#   bash bench/gpu_check.sh OUTDIR
# PARTS picks sections (default all; each call of the device tool has 600 s, all of them 900 s):
#   tests (~70 s: tests/test_cuda.py, bench/gram.py), 7b (~330 s), profile (~90 s), disk (~170 s), speed (~2 x 150 s)
#   e.g. PARTS="tests 7b profile" bash bench/gpu_check.sh OUT, then PARTS="speed disk" ...
set -u
PARTS=${PARTS:-tests 7b profile disk speed}
part() { [[ " $PARTS " == *" $1 "* ]]; }
OUT=${1:-${OUT:-/tmp/qera-gpu-out}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src:$PWD/bench:${PYTHONPATH:-}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch, transformers; print(torch.__version__, torch.version.cuda, transformers.__version__)"; nproc; free -g | head -2; } 2>&1 | tee "$OUT/machine.txt"
FORMATS=${FORMATS:-int4:group=128,mxint4}
if part tests; then
  timeout 90 python3 -m pytest -q -rA -s -p no:cacheprovider tests/test_cuda.py >"$OUT/test_cuda.txt" 2>&1; grep -h "addmm(out_dtype" "$OUT/test_cuda.txt"; tail -3 "$OUT/test_cuda.txt"
  timeout 60 python3 bench/gram.py --device cuda --rows 16384 --calls 4 --repeat 3 2>&1 | tee "$OUT/gram.txt" | grep -v '^{'
fi
if part 7b; then  # llm-compressor logs through loguru on stdout: only the JSON lines go to memory.jsonl
  timeout 330 python3 bench/gpu_7b.py --device cuda --source memory --gpu-memory 24 --compare llmcompressor \
    --formats "$FORMATS" --work /tmp/gpu7b >"$OUT/memory.log" 2>"$OUT/memory.err"
  grep '^{' "$OUT/memory.log" | tee "$OUT/memory.jsonl"; tail -c 1500 "$OUT/memory.err"
fi
if part profile; then  # where record and solve spend their time: 4 blocks under torch.profiler (all blocks alike)
  timeout 90 python3 bench/gpu_7b.py --device cuda --source memory --blocks 4 --formats int4:group=128 \
    --profile "$OUT/profile.txt" --work /tmp/gpu7b-prof >"$OUT/profile.jsonl" 2>"$OUT/profile.err"
  head -c 600 "$OUT/profile.jsonl"
fi
if part disk; then
  timeout 170 python3 bench/gpu_7b.py --device cuda --source disk --formats int4:group=128 --gpu-memory 24 \
    --work /tmp/gpu7b 2>"$OUT/disk.err" | tee "$OUT/disk.jsonl"
  tail -c 1500 "$OUT/disk.err"
fi
# issue 12: packed inference with the fused int4 kernel against bf16 (8 Llama-2-7B-shaped blocks, random weights)
part speed && for fmt in int4:group=128 mxint4; do
  timeout 150 python3 bench/eval_speed.py --device cuda --model random:4096,11008,8 --format "$fmt" --batch 16 \
    --tokens 512 --decode 64 --repeat 3 2>"$OUT/eval_speed_${fmt//:/_}.err" | tee "$OUT/eval_speed_${fmt//:/_}.txt" | grep -v '^{'
done
# the table and issue 17's targets from what this call wrote (memory.jsonl and/or disk.jsonl)
if [ -f "$OUT/memory.jsonl" ] || [ -f "$OUT/disk.jsonl" ]; then
  python3 bench/gpu_summary.py "$OUT" | tee "$OUT/summary.md"
fi
