"""Layer output error of every method on one 2048×2048 weight with realistic correlated inputs.

The inputs mimic LLM hidden states: a power-law covariance spectrum (eigenvalues ∝ i^-1.2) in a
random basis, Student-t(4) tails, and a few "massive activation" channels 30× larger than the rest.
The weight is Gaussian with a few outlier input columns. Statistics come from 16,384 tokens;
the error is measured on those statistics (the quantity QERA minimizes) and on 8,192 held-out
tokens drawn from the same distribution.

    python bench/layer_error.py            # table + JSON lines
    python bench/layer_error.py --size 1024 --tokens 8192   # quicker
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from qera import ActivationStats, layer_output_error, quantize_and_reconstruct, weight_error

METHODS = ["w-only", "zeroquant-v2", "loftq", "lqer", "qera-approx", "qera-exact"]


def make_inputs(n: int, d: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Return a sampler-mixing matrix ``C`` (d × d) and ``n`` rows ``x = t C``."""
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    spectrum = torch.arange(1, d + 1, dtype=torch.float32) ** -0.6  # sqrt of i^-1.2
    C = (basis * spectrum) @ basis.T
    outliers = torch.randperm(d, generator=gen)[:6]
    C[:, outliers] *= 30.0
    return C, sample(n, C, gen)


def sample(n: int, C: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    z = torch.randn(n, C.shape[0], generator=gen)
    chi = torch.distributions.Chi2(torch.tensor(4.0)).sample((n, 1)) / 4.0
    return (z / chi.sqrt()) @ C


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--settings", default="mxint3:64,mxint4:32", help="comma list of FORMAT:RANK")
    args = ap.parse_args()

    gen = torch.Generator().manual_seed(args.seed)
    d = args.size
    C, x = make_inputs(args.tokens, d, gen)
    held_out = sample(args.tokens // 2, C, gen)
    W = torch.randn(d, d, generator=gen) * d**-0.5
    W[:, torch.randperm(d, generator=gen)[:8]] *= 6.0

    stats = ActivationStats(d, {"abs", "sq", "xtx"}, name="bench")
    for chunk in x.split(2048):
        stats.update(chunk)
    test_stats = ActivationStats(d, {"xtx"})
    test_stats.update(held_out)

    rows = []
    for setting in args.settings.split(","):
        fmt, rank = setting.rsplit(":", 1)
        for method in METHODS:
            r = 0 if method == "w-only" else int(rank)
            t0 = time.perf_counter()
            rec = quantize_and_reconstruct(W, fmt, method, r, stats)
            dt = time.perf_counter() - t0
            rows.append({
                "format": fmt, "rank": r, "method": method,
                "output_error": layer_output_error(W, rec.w_q, rec.A, rec.B, stats),
                "heldout_output_error": layer_output_error(W, rec.w_q, rec.A, rec.B, test_stats),
                "weight_error": weight_error(W, rec.w_q, rec.A, rec.B),
                "seconds": dt,
            })
    base = {(r["format"]): r["output_error"] for r in rows if r["method"] == "w-only"}
    print(f"{'format':<8} {'rank':>4} {'method':<13} {'output err':>11} {'rel w-only':>10} "
          f"{'held-out':>11} {'weight err':>10} {'time s':>7}")
    for r in rows:
        print(f"{r['format']:<8} {r['rank']:>4} {r['method']:<13} {r['output_error']:>11.5g} "
              f"{r['output_error'] / base[r['format']]:>10.4f} {r['heldout_output_error']:>11.5g} "
              f"{r['weight_error']:>10.5g} {r['seconds']:>7.2f}")
    for r in rows:
        print(json.dumps({"bench": "layer_error", "size": d, "tokens": args.tokens, **r}))


if __name__ == "__main__":
    main()
