"""Calibration cost on SmolLM2-135M: tokens/s of a plain forward vs forward + each statistic.

Baselines measured in the same run: the full model (with the LM head, what "a forward pass"
usually means) and the decoder alone (what calibration runs: no logits are needed).

    python bench/calibration.py [--batches 6 --batch-size 4 --seq-len 512]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, timed  # noqa: E402

from qera import collect_statistics, find_targets, load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    model, _ = load_model(args.model)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    batches = [{"input_ids": torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=g)} for _ in range(args.batches)]
    tokens = args.batches * args.batch_size * args.seq_len
    targets = list(find_targets(model))

    def plain(module):
        def run():
            with torch.no_grad():
                for b in batches:
                    module(input_ids=b["input_ids"], use_cache=False)
        return run

    plain(model)()  # warm-up
    t_full, _ = timed(plain(model), args.repeat)
    t_dec, _ = timed(plain(model.get_decoder()), args.repeat)
    rows = [
        {"case": "plain forward (full model)", "tok_s": tokens / t_full, "vs_full": 1.0, "vs_decoder": t_full / t_dec},
        {"case": "plain forward (decoder only)", "tok_s": tokens / t_dec, "vs_full": t_dec / t_full, "vs_decoder": 1.0},
    ]
    for kinds in (("abs",), ("sq",), ("abs", "sq"), ("xtx",), ("abs", "sq", "xtx")):
        t, _ = timed(lambda: collect_statistics(model, batches, targets, kinds, progress=False), args.repeat)
        rows.append({"case": "calibrate " + "+".join(kinds), "tok_s": tokens / t, "vs_full": t / t_full, "vs_decoder": t / t_dec})
    print(f"# {tokens} tokens per pass ({args.batches} batches of {args.batch_size} x {args.seq_len})")
    emit("calibration", rows, [("case", "case", "<30s"), ("tok_s", "tokens/s", ".0f"),
                               ("vs_full", "time / full fwd", ".3f"), ("vs_decoder", "time / decoder fwd", ".3f")])


if __name__ == "__main__":
    main()
