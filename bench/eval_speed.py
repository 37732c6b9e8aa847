"""Inference tokens/s of a quantized SmolLM2-135M (W̃ + rank-32 term) vs the fp32 model.

fp32 and quantized forwards are interleaved in one process, ``--repeat`` rounds, so drift in the
machine's speed hits both alike; the quantized model is timed with the merged cache (default,
one GEMM per layer) and with the separate low-rank branch.

    python bench/eval_speed.py [--repeat 5 --tokens 512 --batch 4]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit  # noqa: E402

from qera import QERALinear, QuantConfig, load_model, quantize_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--format", default="mxint4")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    fp, _ = load_model(args.model)
    merged = copy.deepcopy(fp)
    quantize_model(merged, QuantConfig(format=args.format, method="zeroquant-v2", rank=args.rank), progress=False)
    separate = copy.deepcopy(merged)
    for m in separate.modules():
        if isinstance(m, QERALinear):
            m.merge_lowrank, m._w_cache = False, None
    ids = torch.randint(0, fp.config.vocab_size, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0))
    models = {"fp32": fp, "quantized (merged W̃+BA)": merged, "quantized (separate BA)": separate}
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            m(input_ids=ids[:1, :32], use_cache=False)  # warm-up, fills the caches
        for _ in range(args.repeat):
            for name, m in models.items():
                t = time.perf_counter()
                m(input_ids=ids, use_cache=False)
                times[name].append(time.perf_counter() - t)
    base = statistics.median(times["fp32"])
    rows = [{"model": k, "tok_s": ids.numel() / statistics.median(v), "ratio": base / statistics.median(v)}
            for k, v in times.items()]
    print(f"# {args.repeat} interleaved rounds of {args.batch} x {args.tokens} tokens; medians")
    emit("eval_speed", rows, [("model", "model", "<26s"), ("tok_s", "tokens/s", ".0f"), ("ratio", "vs fp32", ".3f")])


if __name__ == "__main__":
    main()
