"""SmolLM2-135M: the sequential pipeline against one-shot, and quantized-output propagation.

Same protocol as the README's PTQ table: calibration 128 x 512 tokens of WikiText-2 valid (seed 0),
perplexity on the first 40 windows of 512 tokens of WikiText-2 raw test. For each setting the
model is quantized in place three ways — one-shot (statistics collected once, reused),
sequential with ``propagate="fp"`` and with ``propagate="quantized"`` — evaluated, and restored.

    python experiments/ptq_sequential.py [--settings mxint3@8,mxint4@8,mxint3@64] [--out runs/ptq_sequential]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from qera import QuantConfig, collect_statistics, find_targets, load_model, perplexity, quantize_model
from qera.atomic import write_json
from qera.data import calibration_batches, load_text
from qera.targets import replace_module

DATA = Path(os.environ.get("QERA_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--settings", default="mxint3@8,mxint4@8,mxint3@64")
    ap.add_argument("--method", default="qera-exact")
    ap.add_argument("--out", default="runs/ptq_sequential")
    args = ap.parse_args()
    model, tok = load_model(args.model)
    calib = calibration_batches(tok, load_text(str(DATA / "wikitext-2" / "wiki.valid.tokens"), "calibration"),
                                n_samples=128, seq_len=512, seed=0, batch_size=8)
    text = load_text(str(DATA / "wikitext-2-raw" / "wiki.test.raw"), "evaluation")

    def ppl() -> float:
        return perplexity(model, tok, text, seq_len=512, max_windows=40, progress=False).perplexity

    rows = [{"setting": "fp32", "pipeline": "-", "perplexity": ppl()}]
    out = Path(args.out)
    t0 = time.perf_counter()
    stats = collect_statistics(model, calib, list(find_targets(model)), ("xtx",), progress=False)
    calib_s = time.perf_counter() - t0
    for setting in args.settings.split(","):
        fmt, rank = setting.split("@")
        for pipeline, propagate in (("oneshot", "fp"), ("sequential", "fp"), ("sequential", "quantized")):
            cfg = QuantConfig(format=fmt, method=args.method, rank=int(rank), pipeline=pipeline, propagate=propagate)
            originals = dict(find_targets(model, cfg.include, cfg.exclude))
            t1 = time.perf_counter()
            try:
                rep = quantize_model(model, cfg, calibration=None if pipeline == "oneshot" else calib,
                                     stats=stats if pipeline == "oneshot" else None, progress=False)
                seconds = time.perf_counter() - t1 + (calib_s if pipeline == "oneshot" else 0.0)
                p = ppl()
            finally:
                for name, mod in originals.items():
                    replace_module(model, name, mod)
            q = rep.quality()
            rows.append({"setting": setting, "pipeline": pipeline, "propagate": propagate, "perplexity": p,
                         "bits_weight": q["bits_weight"], "bits_total": q["bits_total"],
                         "mean_output_error_ratio": q["mean_output_error_ratio"], "quantize_seconds": seconds})
            print(json.dumps(rows[-1]), flush=True)
            write_json(out / "results.json", {"model": args.model, "method": args.method, "rows": rows})
    print("\n| setting | one-shot | sequential, fp | rel. diff | sequential, quantized | quantize s (1-shot / seq fp / seq q) |")
    print("|---|---:|---:|---:|---:|---:|")
    for setting in args.settings.split(","):
        r = {(x["pipeline"], x.get("propagate")): x for x in rows if x["setting"] == setting}
        o, f, qz = r[("oneshot", "fp")], r[("sequential", "fp")], r[("sequential", "quantized")]
        print(f"| {setting} | {o['perplexity']:.2f} | {f['perplexity']:.2f} | {(f['perplexity'] / o['perplexity'] - 1):+.2e} "
              f"| {qz['perplexity']:.2f} | {o['quantize_seconds']:.0f} / {f['quantize_seconds']:.0f} / {qz['quantize_seconds']:.0f} |")
    print(f"(fp32: {rows[0]['perplexity']:.2f}; one-shot time includes its one calibration pass, {calib_s:.0f} s)")


if __name__ == "__main__":
    main()
