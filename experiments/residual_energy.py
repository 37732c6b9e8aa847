"""Who holds the residual stream's energy? Per decoder block, the share of ``Σ_t ‖y_t‖²`` (the
refinement loss's denominator and, in its numerator, the weight each token's error gets) held by
the first position of each window, by the largest token, and (over the other positions) by the
largest hidden channel, with the gain the next block's input norm gives that channel against the
median channel's gain (the norm applied to a vector of ones).

    python experiments/residual_energy.py --model gemma3-270m --windows 4

Calibration windows as the refinement sees them (WikiText-2 valid, 512 tokens, seed 0; BOS first
where the model's convention has it). Prints one JSON line per block and a summary line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _protocol import DATA  # noqa: E402

from qera import load_model  # noqa: E402
from qera.io.data import calibration_batches, load_text  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--out", default=None, help="write the rows here as JSON")
    args = ap.parse_args()
    model, tok = load_model(args.model)
    model.eval()
    valid = load_text(str(DATA / "wikitext-2" / "wiki.valid.tokens"), "calibration")
    batch = calibration_batches(tok, valid, n_samples=args.windows, seq_len=512, seed=0, batch_size=args.windows)[0]
    with torch.no_grad():
        hs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True,
                   use_cache=False).hidden_states
    rows = []
    blocks = model.get_decoder().layers
    for i, h in enumerate(hs[1:]):  # each block's output
        e = h.double().pow(2).sum(-1)  # (windows, L): ‖y_t‖²
        total = float(e.sum())
        ch = h[:, 1:].double().pow(2).sum((0, 1))  # (hidden,): each channel's energy after the first position
        row = {"block": i, "first_position_share": float(e[:, 0].sum()) / total,
               "largest_token_share": float(e.max()) / total,
               "first_over_median": float(e[:, 0].mean() / e[:, 1:].median()),
               "largest_channel": int(ch.argmax()), "largest_channel_share": float(ch.max() / ch.sum())}
        if i + 1 < len(blocks) and hasattr(blocks[i + 1], "input_layernorm"):
            with torch.no_grad():
                gain = blocks[i + 1].input_layernorm(torch.ones(1, h.shape[-1], dtype=h.dtype))[0].double().abs()
            row["next_norm_gain_ratio"] = float(gain[int(ch.argmax())] / gain.median())
        rows.append(row)
        print(json.dumps(rows[-1]), flush=True)
    first = [r["first_position_share"] for r in rows]
    chan = [r["largest_channel_share"] for r in rows[:-1]]  # the last output is after the final norm
    summary = {"model": args.model, "windows": args.windows, "tokens_per_window": int(batch["input_ids"].shape[1]),
               "bos_first": bool(batch["input_ids"][0, 0] == getattr(tok, "bos_token_id", -1)),
               "first_position_share_mean": sum(first) / len(first), "first_position_share_max": max(first),
               "largest_channel_share_mean": sum(chan) / len(chan), "largest_channel_share_min": min(chan),
               "uniform_share": 1 / batch["input_ids"].shape[1]}
    print(json.dumps(summary), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "blocks": rows}, indent=1))


if __name__ == "__main__":
    main()
