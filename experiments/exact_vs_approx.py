"""Why does qera-exact lose to qera-approx on some models (issue 15)? One measurement per variant.

Calibration: ``--calib`` windows × 512 tokens of WikiText-2 valid (seed 0). Evaluation: perplexity on
the first ``--windows`` × 512 tokens of WikiText-2 raw test and of an other-domain text (MRPC news
sentences, test file). Statistics are collected once per calibration variant and shared by the
methods. Each variant prints one JSON line and appends it to ``--out``.

Variants (comma-separated ``--variants``):
  ``fp``                       the unquantized model
  ``M``                        method M (lqer, qera-approx, qera-exact, ...) one-shot, fp statistics
  ``M@bos``                    the same, calibration windows that start with BOS like the evaluation's
  ``M@seq``, ``M@seqbos``       sequential pipeline, statistics of the quantized model's inputs
  ``qera-exact/approx=G``      qera-exact except qera-approx on layer group G (qkv, o, gateup, down)
  ``M:key=value``              method option (e.g. ``qera-exact:shrink=0.3``)

    python experiments/exact_vs_approx.py --model gemma3-270m --format mxint3 --rank 8 \
        --variants fp,lqer,qera-approx,qera-exact,qera-exact@bos,qera-approx@bos
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _protocol import DATA  # noqa: E402

from qera import QuantConfig, find_targets, load_model, perplexity, quantize_model  # noqa: E402
from qera.calibrate.forward import collect_statistics  # noqa: E402
from qera.io.data import bos_id, calibration_batches, load_text, prepend_bos  # noqa: E402
from qera.nn.targets import replace_module  # noqa: E402

GROUPS = {"qkv": [r"\.(q|k|v)_proj$"], "o": [r"\.o_proj$"], "gateup": [r"\.(gate|up)_proj$"],
          "down": [r"\.down_proj$"]}


def other_domain_text() -> str:
    """MRPC test sentences (news), one per line, in file order: text from outside Wikipedia."""
    lines = (DATA / "glue" / "MRPC" / "msr_paraphrase_test.txt").read_text(encoding="utf-8").splitlines()[1:]
    return "\n".join(s for line in lines for s in line.split("\t")[3:5])


def parse_variant(v: str) -> dict:
    """``method[:k=v,...][@calib][/approx=G]`` → parts."""
    swap = None
    if "/approx=" in v:
        v, swap = v.split("/approx=")
    calib = "plain"
    if "@" in v:
        v, calib = v.split("@")
    method, *opts = v.split(":")
    options = {}
    for o in opts:
        k, val = o.split("=")
        options[k] = float(val) if any(c.isdigit() for c in val) else val
    return {"method": method, "options": options, "calib": calib, "swap": swap}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--format", default="mxint3")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--variants", default="fp,lqer,qera-approx,qera-exact")
    ap.add_argument("--out", default="experiments/results/exact_vs_approx.jsonl")
    args = ap.parse_args()

    model, tok = load_model(args.model)
    texts = {"wikitext2": load_text(str(DATA / "wikitext-2-raw" / "wiki.test.raw"), "evaluation"),
             "mrpc-news": other_domain_text()}
    plain = calibration_batches(tok, load_text(str(DATA / "wikitext-2" / "wiki.valid.tokens"), "calibration"),
                                n_samples=args.calib, seq_len=512, seed=0, batch_size=8, bos=False)
    # the same windows shifted right by BOS: exactly what calibration_batches' default does for this tokenizer
    bos = bos_id(tok)
    calibs = {"plain": plain, "bos": plain if bos is None else [
        {"input_ids": prepend_bos(b["input_ids"], bos), "attention_mask": b["attention_mask"]} for b in plain]}
    stats_cache: dict[str, object] = {}

    def ppls() -> dict[str, float]:
        return {k: round(perplexity(model, tok, t, seq_len=512, max_windows=args.windows, progress=False).perplexity, 3)
                for k, t in texts.items()}

    for variant in args.variants.split(","):
        t0 = time.perf_counter()
        row = {"model": args.model, "format": args.format, "rank": args.rank, "calib": args.calib, "variant": variant}
        if variant == "fp":
            row.update(ppls())
        else:
            v = parse_variant(variant)
            originals = dict(find_targets(model))
            try:
                if v["calib"] in ("seq", "seqbos"):
                    cfg = QuantConfig(format=args.format, method=v["method"], rank=args.rank,
                                      method_options=v["options"], pipeline="sequential", propagate="quantized")
                    batches = calibs["bos" if v["calib"] == "seqbos" else "plain"]
                    reports = [quantize_model(model, cfg, calibration=batches, progress=False)]
                else:
                    if v["calib"] not in stats_cache:
                        stats_cache[v["calib"]] = collect_statistics(model, calibs[v["calib"]], kinds=("abs", "xtx"),
                                                                     progress=False)
                    stats = stats_cache[v["calib"]]
                    swap = GROUPS[v["swap"]] if v["swap"] else []
                    cfg = QuantConfig(format=args.format, method=v["method"], rank=args.rank,
                                      method_options=v["options"],
                                      exclude=QuantConfig().exclude + swap)
                    reports = [quantize_model(model, cfg, stats=stats, progress=False)]
                    if swap:
                        cfg2 = QuantConfig(format=args.format, method="qera-approx", rank=args.rank, include=swap)
                        reports.append(quantize_model(model, cfg2, stats=stats, progress=False))
                errs = [lay.output_error_after / lay.output_error_before for rep in reports for lay in rep.layers
                        if lay.output_error_before]
                if errs:
                    row["mean_output_error_rel"] = round(sum(errs) / len(errs), 5)
                row.update(ppls())
            finally:
                for name, mod in originals.items():
                    replace_module(model, name, mod)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(row), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
