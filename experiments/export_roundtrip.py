"""SmolLM2-135M: qera checkpoint → compressed-tensors + PEFT LoRA adapter → transformers + PEFT.

For each setting: quantize (qera-exact, small calibration: 16 windows × 256 tokens of the built-in
text, seed 0; skipped when the checkpoint exists), ``qera.export`` it, load it back with
transformers + PEFT only (base decompressed at load: ``CompressedTensorsConfig(dequantize=True)``;
and the lazy path: compressed base, one forward, then PEFT), and compare with qera's own model:
the largest logit difference over one 512-token window relative to the largest logit, the file
sizes, and the perplexity of both on the first 40 windows of 512 tokens of WikiText-2 raw test
(the README's protocol; built-in text if the data are absent).

    python experiments/export_roundtrip.py [--settings int4:group=128@8,mxint4@8] [--work runs/export_roundtrip]
        [--json experiments/results/export_smollm2.json]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from _protocol import DATA
from qera import QuantConfig, load_model, load_quantized, perplexity, quantize_and_save
from qera import export
from qera.util.atomic import write_json
from qera.io.data import calibration_batches, load_text, tokenize


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def hf_peft(out: Path, dequantize: bool, probe: torch.Tensor):
    """transformers + PEFT, no qera code: the base decompressed before the adapter is attached."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    base = AutoModelForCausalLM.from_pretrained(out, **kw)
    if not dequantize:
        with torch.no_grad():
            base(probe[:, :2])  # compressed-tensors decompresses on the first forward
    return PeftModel.from_pretrained(base, out / "adapter").eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def compare(ref: torch.Tensor, got: torch.Tensor) -> dict:
    d = (got - ref).abs()
    return {"max_abs_diff": float(d.max()), "max_abs_logit": float(ref.abs().max()),
            "max_rel_diff": float(d.max() / ref.abs().max()), "argmax_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean())}


def run_setting(fmt: str, rank: int, work: Path, text: str, probe: torch.Tensor, windows: int) -> dict:
    ck = work / f"ck_{fmt.replace(':', '_')}_r{rank}"
    row: dict = {"format": fmt, "rank": rank, "checkpoint": str(ck)}
    if not ck.is_dir():
        model, tok = load_model("smollm2-135m")
        calib = calibration_batches(tok, load_text(None, "calibration"), n_samples=16, seq_len=256, seed=0, batch_size=8)
        t0 = time.perf_counter()
        quantize_and_save(model, QuantConfig(format=fmt, method="qera-exact", rank=rank), ck, tokenizer=tok,
                          calibration=calib, report_output_error=False, progress=False)
        row["quantize_seconds"] = time.perf_counter() - t0
        del model
    qmodel, tok = load_quantized(ck)
    ref = logits(qmodel, probe)
    row["qera_perplexity"] = perplexity(qmodel, tok, text, seq_len=512, max_windows=windows, progress=False).perplexity
    del qmodel
    row["qera_bytes"] = dir_bytes(ck)
    for scale_dtype in (None, "float16"):
        out = work / f"ct_{fmt.replace(':', '_')}_r{rank}_{scale_dtype or 'default'}"
        t0 = time.perf_counter()
        export(ck, out, overwrite=True, scale_dtype=scale_dtype)
        entry = {"export_seconds": time.perf_counter() - t0, "export_bytes": dir_bytes(out),
                 "weights_bytes": (out / "model.safetensors").stat().st_size,
                 "adapter_bytes": dir_bytes(out / "adapter")}
        for dequantize in (True, False):
            pm = hf_peft(out, dequantize, probe)
            entry["dequantize_at_load" if dequantize else "lazy_decompress"] = compare(ref, logits(pm, probe))
            if dequantize and scale_dtype is None:
                entry["peft_perplexity"] = perplexity(pm, tok, text, seq_len=512, max_windows=windows,
                                                      progress=False).perplexity
            del pm
        row[f"scale_dtype={scale_dtype or 'default'}"] = entry
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default="int4:group=128@8,mxint4@8", help="FORMAT@RANK, comma separated")
    ap.add_argument("--work", default="runs/export_roundtrip")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--json", default="experiments/results/export_smollm2.json")
    args = ap.parse_args()
    raw = DATA / "wikitext-2-raw" / "wiki.test.raw"
    text = load_text(str(raw) if raw.is_file() else None, "evaluation")
    _, tok = load_model("smollm2-135m")
    probe = tokenize(tok, text)[:512].view(1, -1)
    rows = []
    for setting in args.settings.split(","):
        fmt, rank = setting.rsplit("@", 1)
        rows.append(run_setting(fmt, int(rank), Path(args.work), text, probe, args.windows))
        print(rows[-1], flush=True)
    import compressed_tensors
    import peft
    import transformers

    write_json(args.json, {"model": "smollm2-135m", "eval": {"text": str(raw) if raw.is_file() else "builtin",
                                                          "seq_len": 512, "windows": args.windows},
                           "calibration": "builtin text, 16 x 256 tokens, seed 0", "method": "qera-exact",
                           "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                        "peft": peft.__version__, "compressed_tensors": compressed_tensors.__version__},
                           "rows": rows})


if __name__ == "__main__":
    main()
