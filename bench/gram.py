"""Σxᵀx accumulation: qera's ActivationStats (upper block triangle + mirror) against one full GEMM.

The reference is what a plain implementation does with the same precision: ``acc += xᵀx`` as one
GEMM over the whole d × d product (float32 on the CPU; bf16 inputs with float32 output on a GPU,
tensor cores). Both are timed in the same run on the same rows; the ratio is reference / qera.

    python bench/gram.py [--device cpu|cuda] [--widths 576,1536,4096,11008] [--rows 4096] [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, timed  # noqa: E402

from qera import ActivationStats  # noqa: E402


def _reference(acc: torch.Tensor, x: torch.Tensor) -> None:
    if x.is_cuda:
        acc.add_(torch.mm(x.T, x, out_dtype=torch.float32))
    else:
        acc.addmm_(x.T, x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--widths", default="576,1536,4096,11008")
    ap.add_argument("--rows", type=int, default=4096, help="rows per call (one calibration batch's tokens)")
    ap.add_argument("--calls", type=int, default=4, help="calls timed together")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    rows = []
    for d in (int(w) for w in args.widths.split(",")):
        g = torch.Generator(device="cpu").manual_seed(d)
        xs = [torch.randn(args.rows, d, generator=g).to(dev, dtype) for _ in range(args.calls)]

        def qera_run():
            st = ActivationStats(d, {"xtx"}, precision="mixed", pending=cuda)
            for x in xs:
                st.update(x)
            return st.finish()

        def reference_run():
            acc = torch.zeros(d, d, dtype=torch.float32, device=dev)
            for x in xs:
                _reference(acc, x)
            return acc

        qera_run(), reference_run()  # warm-up (allocations, kernel selection)
        t_q, st = timed(qera_run, args.repeat, sync=cuda)
        t_r, ref = timed(reference_run, args.repeat, sync=cuda)
        full = ref.double()
        err = float((st.sums["xtx"] - full).abs().max() / full.diagonal().max())
        rows.append({"width": d, "rows": args.rows * args.calls, "device": args.device,
                     "qera_ms": 1e3 * t_q, "full_gemm_ms": 1e3 * t_r, "speedup": t_r / t_q, "max_rel_diff": err})
    emit("gram", rows, [("width", "width", "d"), ("rows", "rows", "d"), ("qera_ms", "qera ms", ".1f"),
                        ("full_gemm_ms", "full GEMM ms", ".1f"), ("speedup", "full/qera", ".2f"),
                        ("max_rel_diff", "max rel diff", ".1e")])


if __name__ == "__main__":
    main()
