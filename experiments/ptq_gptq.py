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
    ap.add_argument("--methods", default="w-only,qera-exact,qera-iter")
    ap.add_argument("--iter-roundings", default="rtn",
                    help="re-rounding inside qera-iter (gptq re-rounding is slow on a CPU and was not better in tests)")
    ap.add_argument("--out", default="runs/ptq_gptq")
    args = ap.parse_args()
    model, tok = load_model(args.model)
    calib = calibration_batches(tok, load_text(str(DATA / "wikitext-2" / "wiki.valid.tokens"), "calibration"),
                                n_samples=128, seq_len=512, seed=0, batch_size=8)
    text = load_text(str(DATA / "wikitext-2-raw" / "wiki.test.raw"), "evaluation")

    def ppl() -> float:
        return perplexity(model, tok, text, seq_len=512, max_windows=40, progress=False).perplexity

    out = Path(args.out)
    rows = [{"method": "fp32", "perplexity": ppl()}]
    t0 = time.perf_counter()
    stats = collect_statistics(model, calib, list(find_targets(model)), ("xtx",), progress=False)
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
        originals = dict(find_targets(model, cfg.include, cfg.exclude))
        t1 = time.perf_counter()
        try:
            rep = quantize_model(model, cfg, stats=stats, progress=False)
            seconds = time.perf_counter() - t1
            p = ppl()
        finally:
            for name, mod in originals.items():
                replace_module(model, name, mod)
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
