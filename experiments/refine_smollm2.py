"""SmolLM2-135M: block-wise refinement after the closed form, in the sequential pipeline.

The README's PTQ protocol (calibration: 128 × 512 tokens of WikiText-2 valid, seed 0; test: the
first 40 windows of 512 tokens of WikiText-2 raw test), plus validation windows for choosing
settings: ``--val-windows`` windows of 512 tokens of WikiText-2 valid that overlap no calibration
window. Each row quantizes the model in place (sequential pipeline, ``propagate="quantized"``),
is scored on the validation windows (and on the test windows with ``--test``), and is restored.

    python experiments/refine_smollm2.py --rows "mxint3@8;mxint3@8:refine=64,lr=1e-4" --out runs/refine

A row is ``FORMAT@RANK[:key=value,...]`` with keys ``refine`` (steps), ``lr``, ``train``
(``+``-joined parts: ``lowrank``, ``scales``, ``rounding``), ``method``, ``rounding``, ``batch``
(windows per calibration batch = per refinement step), ``budget`` (a rank budget: ranks allocated
per block, ``error`` normalization in the sequential pipeline), ``ow`` (``output_weight``, e.g. ``block``),
``loss`` (``refine_loss``: ``energy``, ``token`` or ``channel``; ``energy`` when not given, the loss the
older rows were measured with, although the library's default is now ``channel``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


from _protocol import DATA, window_perplexity
from qera import QuantConfig, find_targets, load_model, perplexity, quantize_model
from qera.io.data import bos_id, calibration_batches, heldout_windows, load_text, prepend_bos, tokenize
from qera.nn.targets import replace_module
from qera.util.atomic import write_json


def parse_row(spec: str) -> dict:
    fmt, _, rest = spec.partition("@")  # the format spec may hold ':' (int2:group=64:asym@16:refine=24)
    rank, _, opts = rest.partition(":")
    row = {"format": fmt, "rank": int(rank), "refine": 0, "lr": 1e-3, "train": "lowrank", "method": "qera-exact",
           "rounding": "rtn", "batch": 2, "budget": 0.0, "ow": "none", "loss": "energy"}
    for kv in filter(None, opts.split(",")):
        k, v = kv.split("=")
        row[k] = type(row[k])(v) if k in row and not isinstance(row[k], str) else v
    row["train"] = row["train"].replace("+", ",")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", required=True, help="';'-separated rows, see the module docstring")
    ap.add_argument("--val-windows", type=int, default=16)
    ap.add_argument("--calib-samples", type=int, default=128, help="calibration windows of 512 tokens (README: 128)")
    ap.add_argument("--test", action="store_true", help="also score the test windows")
    ap.add_argument("--test-windows", type=int, default=40, help="test windows of 512 tokens (README: 40)")
    ap.add_argument("--out", default="runs/refine")
    args = ap.parse_args()
    model, tok = load_model(args.model)
    valid = load_text(str(DATA / "wikitext-2" / "wiki.valid.tokens"), "calibration")
    val = heldout_windows(tokenize(tok, valid), args.val_windows, 512, calib_samples=args.calib_samples, calib_len=512, seed=0)
    probe = calibration_batches(tok, valid, n_samples=1, seq_len=512, seed=0, batch_size=1)[0]["input_ids"]
    bos = bos_id(tok)
    if bos is not None and int(probe[0, 0]) == bos:
        val = prepend_bos(val, bos)  # the model's windows start with BOS (Gemma-3), as the calibration's do
    test_text = load_text(str(DATA / "wikitext-2-raw" / "wiki.test.raw"), "evaluation")
    rows = []
    fp = {"row": "fp32", "val_ppl": window_perplexity(model, val)}
    if args.test:
        fp["test_ppl"] = perplexity(model, tok, test_text, seq_len=512, max_windows=args.test_windows, progress=False).perplexity
    rows.append(fp)
    print(json.dumps(fp), flush=True)
    for spec in args.rows.split(";"):
        r = parse_row(spec)
        calib = calibration_batches(tok, valid, n_samples=args.calib_samples, seq_len=512, seed=0, batch_size=r["batch"])
        cfg = QuantConfig(format=r["format"], method=r["method"], rank=r["rank"] if r["method"] != "w-only" else 0,
                          rounding=r["rounding"], pipeline="sequential", propagate="quantized",
                          refine_steps=r["refine"], refine_lr=r["lr"], refine_train=r["train"],
                          rank_budget=r["budget"] or None, output_weight=r["ow"], refine_loss=r["loss"])
        originals = dict(find_targets(model, cfg.include, cfg.exclude))
        t0 = time.perf_counter()
        try:
            rep = quantize_model(model, cfg, calibration=calib, progress=False, report_output_error=False)
            seconds = time.perf_counter() - t0
            row = {"row": spec, **r, "bits_total": rep.quality()["bits_total"], "quantize_seconds": seconds,
                   "calibration_seconds": rep.calibration_seconds, "solve_seconds": rep.solve_seconds,
                   "refine_seconds": rep.refine_seconds, "val_ppl": window_perplexity(model, val)}
            if rep.refinement:
                s = rep.summary()
                row.update(refined_blocks=s["refined_blocks"], block_error_before=s["refine_error_before"],
                           block_error_after=s["refine_error_after"])
            if args.test:
                row["test_ppl"] = perplexity(model, tok, test_text, seq_len=512, max_windows=args.test_windows,
                                             progress=False).perplexity
        finally:
            for name, mod in originals.items():
                replace_module(model, name, mod)
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_json(Path(args.out) / "results.json", {"model": args.model, "val_windows": args.val_windows,
                                                     "calib_samples": args.calib_samples, "rows": rows})


if __name__ == "__main__":
    main()
