"""End to end on SmolLM2-135M: wall time and peak RSS of quantize_model per method
(calibration, solve+replace separately), and eval tokens/s of the quantized model vs fp32.

Each method runs in a fresh subprocess so peak RSS is its own.

    python bench/end_to_end.py [--methods w-only,qera-exact] [--calib-samples 128 --calib-seq-len 512]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit  # noqa: E402

METHODS = ["w-only", "zeroquant-v2", "loftq", "lqer", "qera-approx", "qera-exact"]

CHILD = r"""
import json, resource, sys, time, copy, torch
from qera import QuantConfig, collect_statistics, find_targets, load_model, quantize_model
from qera.io.data import calibration_batches, load_text
from qera.quantize.pipeline import stats_kinds_for
a = json.loads(sys.argv[1])
model, tok = load_model(a["model"])
batches = calibration_batches(tok, load_text(None, "calibration"), a["samples"], a["seq_len"], seed=0)
cfg = QuantConfig(format=a["format"], method=a["method"], rank=0 if a["method"] == "w-only" else a["rank"])
g = torch.Generator().manual_seed(1)
ids = torch.randint(0, model.config.vocab_size, (a["eval_batches"], a["eval_len"]), generator=g)
def tok_s(m):
    with torch.no_grad():
        m(input_ids=ids[:1, :64], use_cache=False)
        t = time.perf_counter()
        for row in ids:
            m(input_ids=row[None], use_cache=False)
        return ids.numel() / (time.perf_counter() - t)
fp_tok_s = tok_s(model) if a["eval"] else None
t0 = time.perf_counter()
kinds = stats_kinds_for(cfg)
if kinds:
    stats = collect_statistics(model, batches, list(find_targets(model)), kinds, progress=False)
else:
    stats = None
t_cal = time.perf_counter() - t0
t1 = time.perf_counter()
rep = quantize_model(model, cfg, stats=stats, report_output_error=False, progress=False)
t_solve = time.perf_counter() - t1
q_tok_s = tok_s(model) if a["eval"] else None
print(json.dumps({"method": a["method"], "calibration_s": t_cal, "solve_replace_s": t_solve,
                  "total_s": t_cal + t_solve, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "fp_tok_s": fp_tok_s, "q_tok_s": q_tok_s}))
"""

FWD = r"""
import json, sys, time, torch
from qera import load_model
from qera.io.data import calibration_batches, load_text
a = json.loads(sys.argv[1])
model, tok = load_model(a["model"])
batches = calibration_batches(tok, load_text(None, "calibration"), a["samples"], a["seq_len"], seed=0)
t = time.perf_counter()
with torch.no_grad():
    for b in batches:
        model(input_ids=b["input_ids"], use_cache=False)
print(json.dumps({"forward_s": time.perf_counter() - t}))
"""


def run(code: str, payload: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", code, json.dumps(payload)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--format", default="mxint4")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--eval-len", type=int, default=512)
    args = ap.parse_args()
    base = {"model": args.model, "samples": args.calib_samples, "seq_len": args.calib_seq_len, "format": args.format,
            "rank": args.rank, "eval_batches": args.eval_batches, "eval_len": args.eval_len}
    fwd = run(FWD, base)["forward_s"]
    rows = []
    for i, m in enumerate(args.methods.split(",")):
        r = run(CHILD, {**base, "method": m, "eval": True})
        r["vs_2x_forward"] = r["total_s"] / (2 * fwd)
        r["eval_ratio"] = r["q_tok_s"] / r["fp_tok_s"]
        rows.append(r)
        print(json.dumps(r), file=sys.stderr)
    print(f"# plain forward over the calibration set ({args.calib_samples} x {args.calib_seq_len}): {fwd:.1f} s; "
          f"format {args.format}, rank {args.rank}")
    emit("end_to_end", rows, [
        ("method", "method", "<13s"), ("calibration_s", "calib s", ".1f"), ("solve_replace_s", "solve s", ".1f"),
        ("total_s", "total s", ".1f"), ("vs_2x_forward", "total/(2 fwd)", ".2f"), ("peak_rss_gb", "peak RSS GB", ".2f"),
        ("fp_tok_s", "fp32 tok/s", ".0f"), ("q_tok_s", "quant tok/s", ".0f"), ("eval_ratio", "quant/fp32", ".3f"),
    ])


if __name__ == "__main__":
    main()
