"""Issue 15, mechanism: layer output errors measured on the inference distribution.

Collects ``R = E[xᵀx]`` of every target layer twice over the same WikiText-2 valid windows: as
calibrated until now (windows of text tokens only) and with BOS first (as every perplexity
window and prompt starts for BOS tokenizers). For each layer, W̃ = round-to-nearest, and the
rank-k corrections of qera-approx and qera-exact are fitted on the *plain* statistics; both are
scored by ``trace(E R Eᵀ)`` under the plain ``R`` (what the fit sees) and under the BOS ``R``
(what inference sees), and under ``R`` of the BOS rows alone (position 0, the attention sink every
later token attends to), relative to the w-only error under the same ``R``. qera-exact fitted on
the BOS statistics is scored the same way.

    python experiments/exact_vs_approx_shift.py --model gemma3-270m --format mxint3 --rank 8
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _protocol import DATA  # noqa: E402

from qera import find_targets, load_model  # noqa: E402
from qera.calibrate.forward import collect_statistics  # noqa: E402
from qera.io.data import calibration_batches, load_text  # noqa: E402
from qera.core.formats import quantize_weight  # noqa: E402
from qera.core.linalg import weighted_error, weighted_lowrank  # noqa: E402


@torch.no_grad()
def bos_row_autocorrelation(model, batches: list[dict], targets: dict) -> dict[str, torch.Tensor]:
    """``Σ x₀ᵀx₀ / n`` of each target's input at position 0 (the BOS rows), float64, shape (in, in)."""
    sums: dict[str, torch.Tensor] = {}
    n = 0

    def hook(name):
        def h(mod, args):
            x0 = args[0][:, 0].double()
            sums[name] = sums.get(name, 0) + x0.T @ x0
        return h

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in targets.items()]
    try:
        for b in batches:  # the decoder alone: the LM head's logits are not needed
            getattr(model, "model", model)(input_ids=b["input_ids"], use_cache=False)
            n += b["input_ids"].shape[0]
    finally:
        for h in handles:
            h.remove()
    return {k: v / n for k, v in sums.items()}


@torch.no_grad()
def shared_token_nll(model, batches: list[dict], bos: bool) -> float:
    """Mean NLL of text tokens 1 … L−2 of each window: the tokens both window kinds predict."""
    total, n = 0.0, 0
    for b in batches:
        ids = b["input_ids"]
        logits = model(input_ids=ids, use_cache=False).logits.float()
        # plain window w_0..w_{L-1}: predict w_1..w_{L-2} at positions 0..L-3
        # BOS window BOS,w_0..w_{L-2}: the same targets sit at positions 2..L-1, predicted at 1..L-2
        pred, tgt = (logits[:, 1:-1], ids[:, 2:]) if bos else (logits[:, :-2], ids[:, 1:-1])
        total += float(torch.nn.functional.cross_entropy(pred.reshape(-1, pred.shape[-1]), tgt.reshape(-1),
                                                         reduction="sum"))
        n += tgt.numel()
    return total / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--format", default="mxint3")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--out", default="experiments/results/exact_vs_approx_shift.json")
    args = ap.parse_args()

    model, tok = load_model(args.model)
    text = load_text(str(DATA / "wikitext-2" / "wiki.valid.tokens"), "calibration")
    targets = find_targets(model)
    stats = {bos: collect_statistics(model, calibration_batches(tok, text, args.calib, 512, seed=0, bos=bos),
                                     targets, kinds=("xtx",), progress=False)
             for bos in (False, True)}
    fp_nll = {bos: shared_token_nll(model, calibration_batches(tok, text, 8, 512, seed=0, batch_size=1, bos=bos), bos)
              for bos in (False, True)}
    print("fp NLL of the same text tokens, windows without / with BOS:", fp_nll)
    bos_rows = bos_row_autocorrelation(model, calibration_batches(tok, text, args.calib, 512, seed=0, bos=True),
                                       targets)
    rows, by_type = {}, {}
    for name, mod in targets.items():
        W = mod.weight.detach().float()
        D = W - quantize_weight(W, args.format, name=name).dequantize(torch.float32)
        R = {bos: stats[bos][name].autocorrelation() for bos in (False, True)}
        fits = {"qera-approx": weighted_lowrank(D, args.rank, scale=torch.diagonal(R[False]).clamp_min(0).sqrt()),
                "qera-exact": weighted_lowrank(D, args.rank, autocorr=R[False]),
                "qera-exact(bos-fit)": weighted_lowrank(D, args.rank, autocorr=R[True])}
        R["bos-row"] = bos_rows[name]
        empty = torch.zeros(0, D.shape[1]), torch.zeros(D.shape[0], 0)
        row = {}
        for where, bos in (("fit", False), ("inference", True), ("bos-row", "bos-row")):
            base = weighted_error(D, *empty, R[bos])
            for m, (A, B) in fits.items():
                row[f"{m}:{where}"] = weighted_error(D, A, B, R[bos]) / base
        rows[name] = row
        by_type.setdefault(name.rsplit(".", 1)[-1], []).append(row)
    summary = {t: {k: sum(r[k] for r in v) / len(v) for k in v[0]} for t, v in by_type.items()}
    for t, s in summary.items():
        print(t, " ".join(f"{k}={v:.3f}" for k, v in s.items()))
    Path(args.out).write_text(json.dumps({"args": vars(args), "fp_nll_without_bos": fp_nll[False],
                                          "fp_nll_with_bos": fp_nll[True], "per_type_mean_error_ratio": summary,
                                          "per_layer": rows}, indent=1))


if __name__ == "__main__":
    main()
