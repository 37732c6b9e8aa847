"""Refinement settings on SmolLM2-135M's first decoder blocks, judged on held-out calibration batches.

A cheap probe for choosing ``refine_lr`` / ``refine_train`` / steps before a whole-model run: the
model is cut to its first ``--blocks`` decoder blocks, quantized in the sequential pipeline
(``propagate="quantized"``) with each setting, and each block's relative output error on its
held-out calibration batches (one in eight) is reported before and after refinement. No test data
is read.

    python experiments/refine_blocks.py --settings 1e-3/lowrank/32,3e-3/lowrank/32 --out runs/refine_blocks.json
"""

from __future__ import annotations

import argparse
import json
import time

from _protocol import DATA
from qera import QuantConfig, find_targets, load_model, quantize_model
from qera.io.data import calibration_batches, load_text
from qera.nn.targets import replace_module
from qera.util.atomic import write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--format", default="mxint3")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2, help="windows per calibration batch (= per refinement step)")
    ap.add_argument("--settings", default="1e-3/lowrank/32", help="comma list of LR/TRAIN/STEPS (TRAIN: lowrank, "
                                                                   "scales or lowrank+scales)")
    ap.add_argument("--out", default="runs/refine_blocks.json")
    args = ap.parse_args()
    model, tok = load_model(args.model)
    model.model.layers = model.model.layers[:args.blocks]
    model.config.num_hidden_layers = args.blocks
    valid = load_text(str(DATA / "wikitext-2" / "wiki.valid.tokens"), "calibration")
    calib = calibration_batches(tok, valid, n_samples=args.calib_samples, seq_len=512, seed=0, batch_size=args.batch)
    rows = []
    for spec in args.settings.split(","):
        lr, train, steps = spec.split("/")
        cfg = QuantConfig(format=args.format, rank=args.rank, pipeline="sequential", propagate="quantized",
                          refine_steps=int(steps), refine_lr=float(lr), refine_train=train.replace("+", ","))
        originals = dict(find_targets(model))
        t0 = time.perf_counter()
        try:
            rep = quantize_model(model, cfg, calibration=calib, progress=False, report_output_error=False)
        finally:
            for name, mod in originals.items():
                replace_module(model, name, mod)
        rows.append({"setting": spec, "seconds": time.perf_counter() - t0, "timings": rep.timings,
                     "blocks": rep.refinement})
        print(json.dumps(rows[-1]), flush=True)
        write_json(args.out, {"model": args.model, "blocks": args.blocks, "format": args.format, "rank": args.rank,
                              "calib_samples": args.calib_samples, "batch": args.batch, "rows": rows})


if __name__ == "__main__":
    main()
