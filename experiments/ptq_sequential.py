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
import time
from pathlib import Path

from _protocol import Protocol
from qera import QuantConfig, collect_statistics, find_targets
from qera.util.atomic import write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--settings", default="mxint3@8,mxint4@8,mxint3@64")
    ap.add_argument("--method", default="qera-exact")
    ap.add_argument("--out", default="runs/ptq_sequential")
    args = ap.parse_args()
    pr = Protocol.load(args.model)
    rows = [{"setting": "fp32", "pipeline": "-", "perplexity": pr.ppl()}]
    out = Path(args.out)
    t0 = time.perf_counter()
    stats = collect_statistics(pr.model, pr.calib, list(find_targets(pr.model)), ("xtx",), progress=False)
    calib_s = time.perf_counter() - t0
    for setting in args.settings.split(","):
        fmt, rank = setting.split("@")
        for pipeline, propagate in (("oneshot", "fp"), ("sequential", "fp"), ("sequential", "quantized")):
            cfg = QuantConfig(format=fmt, method=args.method, rank=int(rank), pipeline=pipeline, propagate=propagate)
            rep, seconds, p = pr.run(cfg, calibration=None if pipeline == "oneshot" else pr.calib,
                                     stats=stats if pipeline == "oneshot" else None)
            seconds += calib_s if pipeline == "oneshot" else 0.0
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
