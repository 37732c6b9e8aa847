#!/usr/bin/env bash
# The wheels bench/gpu_check.sh installs on the lent GPU machine, which has torch and transformers
# but no package registry: llm-compressor 0.14 (the last to accept transformers 5.17) and what it
# needs beyond that machine's packages. Run here, then pass carry=[".whl"] to the device call.
#   bash bench/gpu_wheels.sh [DIR]   (default .whl; Python 3.12 on x86-64 Linux, like the device)
set -euo pipefail
DIR=${1:-.whl}
mkdir -p "$DIR"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$DIR" \
  llmcompressor==0.14.0 compressed-tensors==0.19.0 auto-round==0.15.1 datasets==5.0.1 loguru==0.7.3 \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-extensions==4.16.0 \
  typing-inspection==0.4.5 dill==0.4.0 multiprocess==0.70.18
ls "$DIR"; du -sh "$DIR"
