"""Does the recipe guard choose right? (issue 28, item 0.) The guard's steps, spelled out, with every score.

For each recipe row: the calibration batches are split as :func:`qera.quantize.guard.quantize_guarded`
splits them (one in eight held out); the recipe and its baseline (RTN → qera-exact at the uniform
rank within the same A/B parameters) are each quantized on the rest and scored on the held-out
batches (the guard's criterion), on validation windows (WikiText-2 valid, sharing no token with
the calibration) and on the test windows (WikiText-2 raw test). The guard's choice is the lower
held-out loss; the table says whether the validation windows agree, and what the choice costs or
saves on test. The baseline is run once per distinct baseline.

    python experiments/guard_recipes.py --model gemma3-270m --calib 32 --windows 16 \\
        --rows "mxint3@8:budget=8,ow=fisher;mxint3@8:budget=8,ow=fisher,rounding=gptq,method=qera-iter"

A row is ``FORMAT@RANK[:key=value,...]`` with keys ``budget`` (rank budget), ``ow`` (output_weight),
``rounding``, ``method``, ``iters`` (qera-iter), ``refine`` (steps: sequential pipeline, quantized
propagation) and ``train`` (``+``-joined refinement parts).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _protocol import DATA, window_perplexity  # noqa: E402

from qera import QuantConfig, find_targets, load_model, perplexity, quantize_model  # noqa: E402
from qera.io.data import bos_id, calibration_batches, heldout_windows, load_text, prepend_bos, tokenize  # noqa: E402
from qera.nn.targets import linear_shape, replace_module  # noqa: E402
from qera.quantize.guard import baseline_config, heldout_loss  # noqa: E402
from qera.quantize.refine import split_batches  # noqa: E402
from qera.util.atomic import write_json  # noqa: E402


def parse_row(spec: str) -> QuantConfig:
    fmt, _, rest = spec.partition("@")
    rank, _, opts = rest.partition(":")
    kw: dict = {"format": fmt, "rank": int(rank), "method": "qera-exact"}
    iters = None
    for item in filter(None, opts.split(",")):
        k, v = item.split("=")
        if k == "budget":
            kw["rank_budget"] = float(v)
        elif k == "ow":
            kw["output_weight"] = v
        elif k == "iters":
            iters = int(v)
        elif k == "refine":
            kw.update(refine_steps=int(v), pipeline="sequential", propagate="quantized")
        elif k == "train":
            kw["refine_train"] = v.replace("+", ",")
        else:
            kw[k] = v
    if iters is not None:
        kw["method_options"] = {"iters": iters}
    return QuantConfig(**kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", required=True)
    ap.add_argument("--calib", type=int, default=32, help="calibration windows of 512 tokens")
    ap.add_argument("--batch", type=int, default=4, help="windows per calibration batch (one in eight batches held out)")
    ap.add_argument("--val", type=int, default=16, help="validation windows of 512 tokens")
    ap.add_argument("--windows", type=int, default=40, help="test windows of 512 tokens")
    ap.add_argument("--out", default="runs/guard")
    args = ap.parse_args()
    model, tok = load_model(args.model)
    model.eval()
    valid = load_text(str(DATA / "wikitext-2" / "wiki.valid.tokens"), "calibration")
    calib = calibration_batches(tok, valid, n_samples=args.calib, seq_len=512, seed=0, batch_size=args.batch)
    val = heldout_windows(tokenize(tok, valid), args.val, 512, calib_samples=args.calib, calib_len=512, seed=0)
    bos = bos_id(tok)
    if bos is not None and bool((calib[0]["input_ids"][:, 0] == bos).all()):
        val = prepend_bos(val, bos)  # as the calibration windows start
    test_text = load_text(str(DATA / "wikitext-2-raw" / "wiki.test.raw"), "evaluation")
    train_i, held_i = split_batches(len(calib))
    train, held = [calib[i] for i in train_i], [calib[i] for i in held_i]

    def test_ppl() -> float:
        return perplexity(model, tok, test_text, seq_len=512, max_windows=args.windows, progress=False).perplexity

    out = {"model": args.model, "calib_windows": args.calib, "train_batches": len(train), "heldout_batches": len(held),
           "val_windows": args.val, "test_windows": args.windows, "fp": {"val_ppl": window_perplexity(model, val, rows=1)}, "rows": []}
    print(json.dumps(out["fp"]), flush=True)
    scored: dict[str, dict] = {}

    def score(cfg: QuantConfig) -> dict:
        key = json.dumps(cfg.to_dict(), sort_keys=True)
        if key in scored:
            return scored[key]
        originals = dict(find_targets(model, cfg.include, cfg.exclude))
        t0 = time.perf_counter()
        try:
            rep = quantize_model(model, cfg, train, progress=False, report_output_error=False)
            r = {"seconds": time.perf_counter() - t0, "bits_total": rep.quality()["bits_total"],
                 "heldout_loss": heldout_loss(model, held), "val_ppl": window_perplexity(model, val, rows=1), "test_ppl": test_ppl()}
        finally:
            for name, mod in originals.items():
                replace_module(model, name, mod)
        scored[key] = r
        print(json.dumps({"config": cfg.to_dict()["method"], **r}), flush=True)
        return r

    for spec in args.rows.split(";"):
        cfg = parse_row(spec)
        shapes = {n: linear_shape(m) for n, m in find_targets(model, cfg.include, cfg.exclude).items()}
        base = baseline_config(cfg, shapes)
        rec, bas = score(cfg), score(base)
        guard = "recipe" if rec["heldout_loss"] <= bas["heldout_loss"] else "baseline"
        by_val = "recipe" if rec["val_ppl"] <= bas["val_ppl"] else "baseline"
        kept = rec if guard == "recipe" else bas
        row = {"row": spec, "baseline_rank": base.rank, "recipe": rec, "baseline": bas, "guard_keeps": guard,
               "validation_prefers": by_val, "kept_test_ppl": kept["test_ppl"],
               "kept_not_worse_than_baseline_on_test": kept["test_ppl"] <= bas["test_ppl"]}
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
        write_json(Path(args.out) / "results.json", out)


if __name__ == "__main__":
    main()
