"""Inference tokens/s and weight memory of a quantized SmolLM2-135M (W̃ + rank-32 term) vs fp32 and bf16.

All forwards are interleaved in one process, ``--repeat`` rounds, so drift in the machine's speed
hits every mode alike. Modes: the fp32 and bf16 models; the quantized model with the dense cache
(``W̃ + BA`` merged, one GEMM per layer, fp32) and in packed mode (``cache_weight=False``: only the
packed codes live in memory, each layer is dequantized when it runs and dropped, the low-rank
branch separate). Weight memory = bytes of parameters, buffers and dense caches after a forward.

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
    packed = copy.deepcopy(merged)
    for m in packed.modules():
        if isinstance(m, QERALinear):
            m.merge_lowrank, m.cache_weight, m._w_cache = False, False, None
    ids = torch.randint(0, fp.config.vocab_size, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0))
    models = {"fp32": fp, "bf16": copy.deepcopy(fp).to(torch.bfloat16), "quantized dense cache (fp32)": merged,
              "quantized packed": packed}
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
    mem = {k: weight_bytes(m) for k, m in models.items()}
    rows = [{"model": k, "tok_s": ids.numel() / statistics.median(v), "ratio": base / statistics.median(v),
             "weight_mb": mem[k] / 1e6, "mem_vs_bf16": mem[k] / mem["bf16"]} for k, v in times.items()]
    print(f"# {args.repeat} interleaved rounds of {args.batch} x {args.tokens} tokens; medians")
    emit("eval_speed", rows, [("model", "model", "<30s"), ("tok_s", "tokens/s", ".0f"), ("ratio", "vs fp32", ".3f"),
                              ("weight_mb", "weights MB", ".1f"), ("mem_vs_bf16", "vs bf16", ".3f")])


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of distinct parameters and buffers, plus the dense weight caches of quantized layers."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    for m in model.modules():
        c = getattr(m, "_w_cache", None) if isinstance(m, QERALinear) else None
        if c is not None:
            total += c.numel() * c.element_size()
    return total


if __name__ == "__main__":
    main()
