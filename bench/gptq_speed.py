"""GPTQ rounding on the CPU: qera's sweep against the textbook recipe, timed in the same run.

The reference is the recipe as usually written: invert ``H`` through its Cholesky factor, factor
the inverse again (upper), and sweep the columns with torch's default intra-op threads. qera's
``round_gptq`` gets the factor from one Cholesky of the reversed ``H`` and a triangular inverse,
and runs the per-column ops on one thread (the lazy-block GEMM keeps all threads). Both give the
same rounded weight (checked). Round-to-nearest of the same layer is shown for scale. Shapes are
SmolLM2-135M's (576 / 1536) and a Llama-7B attention layer (4096).

    python bench/gptq_speed.py [--shapes 576x1536,1536x576,4096x4096] [--format mxint3] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from unittest import mock

import torch

from _common import machine
from qera.core.formats import parse_format
from qera.core.rounding import round_gptq, round_nearest


def textbook_factor(R: torch.Tensor, damp: float, name=None) -> torch.Tensor:
    """chol((R + λ·mean diag·I)⁻¹, upper) by inverting through Cholesky and factoring again."""
    H = R.to(torch.float64).clone()
    H = (H + H.T) / 2
    H[torch.diagonal(H) <= 0, torch.diagonal(H) <= 0] = 1.0
    H += damp * float(torch.diagonal(H).mean()) * torch.eye(H.shape[0], dtype=H.dtype)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)


def reference(W, fmt, R):
    with mock.patch("qera.core.rounding.inverse_hessian_factor", textbook_factor), \
            mock.patch("qera.core.rounding._one_cpu_thread", lambda device: nullcontext()):
        return round_gptq(W, fmt, R)


def best_of(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="576x1536,1536x576,4096x4096")
    ap.add_argument("--format", default="mxint3")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    print(machine())
    fmt = parse_format(args.format)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for spec in args.shapes.split(","):
        out_f, in_f = map(int, spec.split("x"))
        W = torch.randn(out_f, in_f, generator=gen) * 0.02
        X = torch.randn(2 * in_f, in_f, generator=gen) @ (torch.eye(in_f) + torch.randn(in_f, in_f, generator=gen) / in_f**0.5)
        R = (X.T @ X / X.shape[0]).double()
        t_ref, q_ref = best_of(lambda: reference(W, fmt, R), args.repeat)
        t_new, q_new = best_of(lambda: round_gptq(W, fmt, R), args.repeat)
        t_rtn, _ = best_of(lambda: round_nearest(W, fmt), args.repeat)
        a, b = q_ref.dequantize(torch.float32), q_new.dequantize(torch.float32)
        row = {"shape": spec, "format": str(fmt), "textbook_s": t_ref, "qera_s": t_new, "rtn_s": t_rtn,
               "speedup": t_ref / t_new, "gptq_over_rtn": t_new / t_rtn,
               "weights_differing": float((a != b).float().mean())}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n| shape (out×in) | textbook s | qera s | speed-up | qera GPTQ / RTN | weights differing |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['shape']} | {r['textbook_s']:.2f} | {r['qera_s']:.2f} | {r['speedup']:.2f}× | "
              f"{r['gptq_over_rtn']:.0f}× | {r['weights_differing']:.1e} |")


if __name__ == "__main__":
    main()
