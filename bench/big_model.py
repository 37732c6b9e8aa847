"""A model larger than this machine's RAM, quantized end to end on the CPU: peak RSS, wall time, output size.

Writes a Llama-2-13B-shaped model with random bf16 weights (≈26 GB of safetensors shards) once,
then runs ``quantize_and_save`` with the sequential pipeline in a fresh process: the model is
streamed from its shards one block at a time and each finished block is written at once. A
second process loads the result (meta-device build, packed weights only) and runs one forward
on a few tokens, so the output is shown to be a working model. Peak RSS is sampled by the kernel
(``ru_maxrss``) and compared with the formula of ``bench/scale.py``.

    python bench/big_model.py [--shape llama-2-13b] [--samples 4 --seq-len 512] [--format int4:group=128 --rank 32]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402
from random_model import SHAPES, write_random_llama  # noqa: E402
from scale import BASE, run, sequential_formula  # noqa: E402

QUANT = r"""
import json, sys, time, torch
def _peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
from qera import QuantConfig, quantize_and_save
a = json.loads(sys.argv[1])
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, a["vocab"], (a["samples"], a["seq_len"]), generator=g)
batches = [{"input_ids": ids[i:i + 1], "attention_mask": torch.ones_like(ids[i:i + 1])} for i in range(a["samples"])]
t0 = time.perf_counter()
rep = quantize_and_save(a["src"], QuantConfig(format=a["format"], method="qera-exact", rank=a["rank"], pipeline="sequential"),
                        a["out"], calibration=batches, overwrite=True, progress=True, report_output_error=a["report"])
wall = time.perf_counter() - t0
size = sum(p.stat().st_size for p in __import__("pathlib").Path(a["out"]).iterdir())
print(json.dumps({"wall_s": wall, "calibration_s": rep.calibration_seconds, "solve_s": rep.solve_seconds,
                  "layers": len(rep.layers), "bits_weight": rep.quality()["bits_weight"],
                  "bits_total": rep.quality()["bits_total"],
                  "peak_rss_gib": _peak(), "out_bytes": size}))
"""

LOAD = r"""
import json, sys, time, torch
def _peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
from qera import load_quantized
t0 = time.perf_counter()
model, _ = load_quantized(sys.argv[1], cache_weight=False)
t_load = time.perf_counter() - t0
ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1))
t1 = time.perf_counter()
with torch.no_grad():
    logits = model(ids).logits
print(json.dumps({"load_s": t_load, "forward_s": time.perf_counter() - t1, "finite": bool(torch.isfinite(logits).all()),
                  "peak_rss_gib": _peak()}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-2-13b", choices=sorted(SHAPES))
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--format", default="int4:group=128")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--report", action="store_true", help="also compute per-layer output errors (≈+60%% time)")
    ap.add_argument("--work", default="bench_work/big")
    args = ap.parse_args()
    h, i, layers, heads, kv, vocab = SHAPES[args.shape]
    work = Path(args.work)
    src, out = work / args.shape, work / f"{args.shape}-qera"
    if not (src / "config.json").is_file():
        t0 = time.perf_counter()
        write_random_llama(src, h, i, layers, heads, kv, vocab)
        print(json.dumps({"phase": "generate", "seconds": time.perf_counter() - t0}), flush=True)
    src_bytes = sum(p.stat().st_size for p in src.iterdir())
    base = run(BASE)["peak_rss_gib"]
    q = run(QUANT, {"src": str(src), "out": str(out), "vocab": vocab, "samples": args.samples, "seq_len": args.seq_len,
                    "format": args.format, "rank": args.rank, "report": args.report})
    print(json.dumps({"phase": "quantize", **q}), flush=True)
    ld = subprocess.run([sys.executable, "-c", LOAD, str(out)], capture_output=True, text=True)
    loaded = json.loads(ld.stdout.strip().splitlines()[-1]) if ld.returncode == 0 else {"error": ld.stderr[-2000:]}
    print(json.dumps({"phase": "load+forward", **loaded}), flush=True)
    formula = sequential_formula(h, i, vocab, args.samples * args.seq_len, base, kv_heads=kv, heads=heads)
    print(f"# {machine()}")
    print(f"# {args.shape}: source {src_bytes / 1e9:.1f} GB bf16 shards; calibration {args.samples} x {args.seq_len} "
          f"random tokens; {args.format}, qera-exact r{args.rank}; output errors {'on' if args.report else 'off'}")
    print(f"# quantize: wall {q['wall_s'] / 60:.1f} min ({q['wall_s'] / layers:.0f} s/block), peak RSS "
          f"{q['peak_rss_gib']:.2f} GiB (formula {formula['total_gib']:.2f} GiB), output {q['out_bytes'] / 1e9:.2f} GB "
          f"({q['bits_total']:.3f} bits/weight of the quantized layers incl. A, B)")
    print("# formula parts (GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in formula.items()))


if __name__ == "__main__":
    main()
