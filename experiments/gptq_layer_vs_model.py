"""SmolLM2-135M: is GPTQ's lower layer output error real on held-out text? (README, fidelity table)

For the 35 linear layers of blocks 0, 8, 15, 22 and 29, round W with RTN and with GPTQ (using the
calibration R: 128 × 512 WikiText-2 valid, the file ``ptq_allocation.py --stats`` writes), and
measure trace(D R Dᵀ) under the calibration R and under an R taken from the first 40 × 512
evaluation windows (WikiText-2 raw test). Prints each layer's GPTQ / RTN ratio under both, then
the sums.

    python experiments/gptq_layer_vs_model.py [--stats runs/smollm2_xtx_128x512.safetensors]
"""

from __future__ import annotations

import argparse
import re

import torch

from _protocol import DATA
from qera import CalibrationStats, collect_statistics, find_targets, load_model
from qera.io.data import load_text, tokenize
from qera.core.formats import parse_format
from qera.quantize.layer import output_errors
from qera.core.rounding import ROUNDINGS


def output_error(D: torch.Tensor, R: torch.Tensor) -> float:
    D = D.double()
    return float(output_errors(D, D.new_zeros(0, D.shape[1]), D.new_zeros(D.shape[0], 0), R)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stats", default="runs/smollm2_xtx_128x512.safetensors")
    args = ap.parse_args()
    model, tok = load_model("smollm2-135m")
    stats = CalibrationStats.load(args.stats)
    targets = {n: m for n, m in find_targets(model).items() if re.search(r"layers\.(0|8|15|22|29)\.", n)}
    ids = tokenize(tok, load_text(str(DATA / "wikitext-2-raw" / "wiki.test.raw"), "evaluation"))
    win = ids[: 40 * 512].view(40, 512)
    held = collect_statistics(model, [{"input_ids": win[i:i + 8]} for i in range(0, 40, 8)], list(targets),
                              ("xtx",), progress=False)
    for fmt_name in ("mxint4", "mxint3"):
        fmt = parse_format(fmt_name)
        tot = {k: 0.0 for k in ("rtn_cal", "gptq_cal", "rtn_held", "gptq_held")}
        for name, mod in targets.items():
            W = mod.weight.detach().float()
            R, Rh = stats[name].autocorrelation(torch.float64), held[name].autocorrelation(torch.float64)
            errs = {}
            for r in ("rtn", "gptq"):
                D = W - ROUNDINGS.get(r)(W, fmt, R, name).dequantize(torch.float32)
                errs[r] = (output_error(D, R), output_error(D, Rh))
                tot[r + "_cal"] += errs[r][0]
                tot[r + "_held"] += errs[r][1]
            print(fmt_name, name, f"GPTQ/RTN: calibration R {errs['gptq'][0] / errs['rtn'][0]:.3f}, "
                  f"evaluation R {errs['gptq'][1] / errs['rtn'][1]:.3f}", flush=True)
        print(fmt_name, "sums: calibration R", round(tot["gptq_cal"] / tot["rtn_cal"], 3),
              "evaluation R", round(tot["gptq_held"] / tot["rtn_held"], 3), flush=True)


if __name__ == "__main__":
    main()
