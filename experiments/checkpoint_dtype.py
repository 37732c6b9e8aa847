"""Checkpoint size of SmolLM2-135M with the non-quantized weights in fp32 vs bf16 (issue 12, section 2).

mxint4, zeroquant-v2 rank 8 (no calibration needed: the storage of the non-quantized weights is what
changes). Prints one JSON line: bytes of each checkpoint, of its embedding, and perplexity of each
loaded back on the first 8 × 512 tokens of WikiText-2 test.

    python experiments/checkpoint_dtype.py [--work runs/checkpoint_dtype]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _protocol import DATA  # noqa: E402

from qera import QuantConfig, load_model, load_quantized, perplexity, quantize_model, save_quantized  # noqa: E402
from qera.io.data import load_text  # noqa: E402


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--work", default="runs/checkpoint_dtype")
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    model, tok = load_model(args.model)
    quantize_model(model, QuantConfig(format="mxint4", method="zeroquant-v2", rank=8), progress=False)
    text = load_text(str(DATA / "wikitext-2-raw" / "wiki.test.raw"), "evaluation")
    row = {"model": args.model, "setting": "mxint4 zeroquant-v2 r8"}
    for dt in ("float32", "bfloat16"):
        save_quantized(model, tok, work / dt, dtype=dt)
        back, _ = load_quantized(work / dt)
        row[f"{dt}_bytes"] = dir_bytes(work / dt)
        row[f"{dt}_embedding_bytes"] = back.model.embed_tokens.weight.nbytes
        row[f"{dt}_ppl"] = round(perplexity(back, tok, text, seq_len=512, max_windows=8, progress=False).perplexity, 4)
    row["ratio"] = round(row["bfloat16_bytes"] / row["float32_bytes"], 4)
    print(json.dumps(row))
    Path("experiments/results/checkpoint_dtype.json").write_text(json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()
