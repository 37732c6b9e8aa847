"""Peak memory and time per block of one-shot vs sequential quantization as models get deeper.

Llama-shaped models with random bf16 weights of one width at several depths are written as
safetensors shards once (``--work``); each (depth, pipeline) runs in a fresh process so its peak
RSS is its own. One-shot loads the whole model and holds every layer's statistics; sequential
streams one block at a time from the shards and writes each finished block at once. The script
fits peak RSS against depth for both and prints the sequential peak next to the formula

    peak ≈ base + trunk + block + statistics + activations + solve temporaries

(base: Python + torch + transformers; trunk: embeddings and LM head; block: one block's weights;
statistics: float64 Σxᵀx of the block's distinct inputs still alive; activations: the cached block
inputs; solve: R in float32 and about seven float32 copies of the layer being solved).

    python bench/scale.py [--hidden 1024 --inter 2816 --heads 16 --blocks 4,8,16 --samples 8 --seq-len 512]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit  # noqa: E402

CHILD = r"""
import json, sys, time, torch
def _peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
from qera import QuantConfig, quantize_and_save
a = json.loads(sys.argv[1])
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, a["vocab"], (a["samples"], a["seq_len"]), generator=g)
batches = [{"input_ids": ids[i:i + a["batch"]], "attention_mask": torch.ones_like(ids[i:i + a["batch"]])}
           for i in range(0, a["samples"], a["batch"])]
cfg = QuantConfig(format=a["format"], method="qera-exact", rank=a["rank"], pipeline=a["pipeline"])
t0 = time.perf_counter()
if a["pipeline"] == "oneshot":
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(a["src"], dtype=torch.bfloat16)
    t_load = time.perf_counter() - t0
else:
    model, t_load = a["src"], 0.0
rep = quantize_and_save(model, cfg, a["out"], calibration=batches, overwrite=True, progress=False,
                        report_output_error=a["report"])
wall = time.perf_counter() - t0
size = sum(p.stat().st_size for p in __import__("pathlib").Path(a["out"]).iterdir())
print(json.dumps({"wall_s": wall, "load_s": t_load, "calibration_s": rep.calibration_seconds, "solve_s": rep.solve_seconds,
                  "peak_rss_gib": _peak(), "out_gb": size / 1e9}))
"""

BASE = r"""
import json, torch, transformers, qera
def _peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
from transformers import LlamaConfig, LlamaForCausalLM
LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4, vocab_size=300))
print(json.dumps({"peak_rss_gib": _peak()}))
"""


def run(code: str, payload: dict | None = None) -> dict:
    argv = [sys.executable, "-c", code] + ([json.dumps(payload)] if payload is not None else [])
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def sequential_formula(h: int, i: int, vocab: int, tokens: int, base_gib: float, heads: int = 1,
                       kv_heads: int = 1) -> dict[str, float]:
    """Predicted sequential peak (GiB) and its parts for a Llama block with bf16 weights.

    The per-layer step holds, beyond the statistics still alive, R in float32 and about seven
    float32 copies of the layer (W, W̃, D and temporaries of the solve), plus ~0.15 GiB of fixed
    overhead (measured per layer, bench/README.md). The peak is the larger of: all four statistics while
    q_proj is solved, or down_proj's alone while it is solved.
    """
    gib = 2**30
    kv = h * kv_heads // heads
    stats = {"attn": 8 * h * h, "o": 8 * h * h, "mlp": 8 * h * h, "down": 8 * i * i}

    def step(out_f: int, in_f: int) -> float:
        return 4 * in_f * in_f + 7 * 4 * out_f * in_f + 0.15 * gib

    parts = {
        "base": base_gib,
        "trunk": 2 * vocab * h * 2 / gib,  # embed + untied lm_head, bf16
        "block": (2 * h * h + 2 * h * kv + 3 * h * i) * 2 / gib,
        "activations": tokens * h * 2 / gib,
        "statistics+solve": max(sum(stats.values()) + step(h, h), stats["down"] + step(h, i),
                                stats["down"] + stats["mlp"] + step(i, h)) / gib,
    }
    parts["total_gib"] = sum(parts.values())
    return parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=2816)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--blocks", default="4,8,16")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--format", default="int4:group=128")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--pipelines", default="oneshot,sequential")
    ap.add_argument("--report", action="store_true", help="also compute per-layer output errors (slower)")
    ap.add_argument("--work", default="bench_work/scale", help="where the random models and outputs go")
    args = ap.parse_args()
    from random_model import write_random_llama

    work = Path(args.work)
    base = run(BASE)["peak_rss_gib"]
    rows = []
    for n in [int(b) for b in args.blocks.split(",")]:
        src = work / f"llama-h{args.hidden}-i{args.inter}-b{n}"
        if not (src / "config.json").is_file():
            write_random_llama(src, args.hidden, args.inter, n, args.heads, vocab=args.vocab, max_positions=max(4096, args.seq_len))
        for pipeline in args.pipelines.split(","):
            r = run(CHILD, {"src": str(src), "out": str(work / f"out-{pipeline}-b{n}"), "pipeline": pipeline,
                            "vocab": args.vocab, "samples": args.samples, "seq_len": args.seq_len, "batch": args.batch,
                            "format": args.format, "rank": args.rank, "report": args.report})
            r.update(pipeline=pipeline, blocks=n, s_per_block=(r["wall_s"] - r["load_s"]) / n)
            if pipeline == "sequential":
                r["formula_gib"] = sequential_formula(args.hidden, args.inter, args.vocab,
                                                     args.samples * args.seq_len, base)["total_gib"]
            rows.append(r)
            print(json.dumps(r), file=sys.stderr)
    print(f"# width {args.hidden}/{args.inter}, {args.heads} heads, vocab {args.vocab}; calibration "
          f"{args.samples} x {args.seq_len} tokens; {args.format}, qera-exact r{args.rank}; base process {base:.2f} GiB")
    emit("scale", rows, [
        ("pipeline", "pipeline", "<10s"), ("blocks", "blocks", "d"), ("peak_rss_gib", "peak RSS GiB", ".2f"),
        ("formula_gib", "formula GiB", ".2f"), ("wall_s", "wall s", ".1f"), ("s_per_block", "s/block", ".2f"),
        ("out_gb", "output GB", ".3f"),
    ])
    for pipeline in args.pipelines.split(","):
        pts = [(r["blocks"], r["peak_rss_gib"]) for r in rows if r["pipeline"] == pipeline]
        if len(pts) >= 2:
            mx = sum(x for x, _ in pts) / len(pts)
            my = sum(y for _, y in pts) / len(pts)
            slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
            print(f"# {pipeline}: peak RSS slope {slope * 1024:.1f} MiB per block "
                  f"(least squares over {', '.join(str(x) for x, _ in pts)} blocks)")
    parts = sequential_formula(args.hidden, args.inter, args.vocab, args.samples * args.seq_len, base)
    print("# sequential formula (GiB): " + ", ".join(f"{k} {v:.3f}" for k, v in parts.items()))


if __name__ == "__main__":
    main()
