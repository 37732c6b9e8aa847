"""SmolLM2-135M: GPTQ rounding against round-to-nearest, alone (w-only), under qera-exact and qera-iter.

Same protocol as the README's PTQ table: calibration 128 x 512 tokens of WikiText-2 valid (seed 0),
perplexity on the first 40 windows of 512 tokens of WikiText-2 raw test. One calibration pass
(Σxᵀx of every layer) serves every run; each run quantizes the model in place, is evaluated and
restored.

    python experiments/ptq_gptq.py [--settings mxint3@8,mxint4@8,mxint3@64] [--methods w-only,qera-exact,qera-iter]
        [--out runs/ptq_gptq]
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
    ap.add_argument("--methods", default="w-only,qera-exact,qera-iter")
    ap.add_argument("--iter-roundings", default="rtn",
                    help="re-rounding inside qera-iter (gptq re-rounding is slow on a CPU and was not better in tests)")
    ap.add_argument("--out", default="runs/ptq_gptq")
    args = ap.parse_args()
    pr = Protocol.load(args.model)
    out = Path(args.out)
    rows = [{"method": "fp32", "perplexity": pr.ppl()}]
    t0 = time.perf_counter()
    stats = collect_statistics(pr.model, pr.calib, list(find_targets(pr.model)), ("xtx",), progress=False)
    calib_s = time.perf_counter() - t0
    runs = []
    methods = args.methods.split(",")
    for setting in args.settings.split(","):
        fmt, rank = setting.split("@")
        for method in methods:
            r = 0 if method == "w-only" else int(rank)
            if method == "qera-iter":  # the first W̃ is RTN or GPTQ as the run's rounding; re-rounding as --iter-roundings
                runs += [(method, fmt, r, rd) for rd in args.iter_roundings.split(",") if (method, fmt, r, rd) not in runs]
            else:
                runs += [(method, fmt, r, rd) for rd in ("rtn", "gptq") if (method, fmt, r, rd) not in runs]
    for method, fmt, rank, rounding in runs:
        cfg = QuantConfig(format=fmt, method=method, rank=rank, rounding=rounding)
        rep, seconds, p = pr.run(cfg, stats=stats)
        q = rep.quality()
        rows.append({"method": method, "format": fmt, "rank": rank, "rounding": rounding, "perplexity": p,
                     "bits_total": q["bits_total"], "mean_output_error_ratio": q["mean_output_error_ratio"],
                     "solve_seconds": seconds})
        print(json.dumps(rows[-1]), flush=True)
        write_json(out / "results.json", {"model": args.model, "calibration_seconds": calib_s, "rows": rows})
    if len(rows) == 1:
        return
    print("\n| method | format | rank | RTN | GPTQ | solve s (RTN / GPTQ) |")
    print("|---|---|---:|---:|---:|---:|")
    done = set()
    for r in rows[1:]:
        key = (r["method"], r["format"], r["rank"])
        if key in done:
            continue
        done.add(key)
        pair = {x["rounding"]: x for x in rows[1:] if (x["method"], x["format"], x["rank"]) == key}
        cell = lambda rd, k, f: f.format(pair[rd][k]) if rd in pair else "–"  # noqa: E731
        print(f"| {key[0]} | {key[1]} | {key[2]} | {cell('rtn', 'perplexity', '{:.2f}')} | "
              f"{cell('gptq', 'perplexity', '{:.2f}')} | {cell('rtn', 'solve_seconds', '{:.0f}')} / "
              f"{cell('gptq', 'solve_seconds', '{:.0f}')} |")
    print(f"(fp32: {rows[0]['perplexity']:.2f}; one calibration pass, {calib_s:.0f} s)")


if __name__ == "__main__":
    main()
