"""Per-layer QERA-exact solve time: qera's solver vs the reference recipe, in the same run.

Reference recipe (as in the QERA paper's code): float64 ``scipy.linalg.sqrtm(R)``, full SVD of
``D R^{1/2}``, ``B A = U_k S_k V_kᵀ R^{-1/2}``. qera: randomized block Krylov on ``G = D R Dᵀ``
(default path) and the dense float64 path (``exact=True``). Also prints the machine-limit ratio:
qera's solve time / (one n×n×n fp32 GEMM + one float64 Cholesky of R).

    python bench/solver.py                      # all shapes; reference up to in_features 4096
    python bench/solver.py --shapes 2048x2048 --ranks 32
    python bench/solver.py --device cuda        # GPU (reference stays on the CPU)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, timed  # noqa: E402

from qera import SolverOptions, weighted_lowrank  # noqa: E402
from qera.core.formats import quantize_weight  # noqa: E402
from qera.core.linalg import lowrank_objective, optimal_objective  # noqa: E402

SHAPES = ["576x576", "2048x2048", "4096x4096", "2048x8192", "8192x2048"]  # out x in


def make_problem(out_f: int, in_f: int, seed: int, device: str):
    """Quantization error of an mxint3 weight and R from correlated heavy-tailed inputs."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g) * in_f**-0.5
    D = W - quantize_weight(W, "mxint3").dequantize()
    n_tok = in_f + 2048
    mix = torch.randn(in_f, in_f, generator=g) * in_f**-0.5
    mix.diagonal().add_(1.0)
    z = torch.randn(n_tok, in_f, generator=g)
    z /= (torch.distributions.Chi2(torch.tensor(4.0)).sample((n_tok, 1)) / 4).sqrt()
    x = z @ mix
    x[:, torch.randperm(in_f, generator=g)[:8]] *= 20
    R = torch.zeros(in_f, in_f, dtype=torch.float64)
    for c in x.split(4096):
        R += (c.T @ c).double()
    R /= n_tok
    return D.to(device), ((R + R.T) / 2).to(device)


def reference_factor(D: torch.Tensor, R: torch.Tensor):
    """The expensive, rank-independent part of the reference: sqrtm(R) and a full SVD of D R^{1/2}."""
    import numpy as np
    import scipy.linalg

    root = scipy.linalg.sqrtm(R.cpu().numpy())
    if np.iscomplexobj(root):  # the reference code silently drops the imaginary part
        root = root.real
    U, S, Vt = np.linalg.svd(D.cpu().double().numpy() @ root, full_matrices=False)
    return U, S, Vt, root


def reference_solve(factors, k: int) -> torch.Tensor:
    """``B A = U_k S_k V_kᵀ R^{-1/2}`` (applied with a linear solve rather than an explicit inverse)."""
    import numpy as np

    U, S, Vt, root = factors
    return torch.from_numpy((U[:, :k] * S[:k]) @ np.linalg.solve(root.T, Vt[:k].T).T)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--ranks", default="32,64")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reference-max", type=int, default=4096, help="largest in_features for the sqrtm reference")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    sync = args.device.startswith("cuda")
    rows = []
    for shape in args.shapes.split(","):
        out_f, in_f = map(int, shape.split("x"))
        D, R = make_problem(out_f, in_f, 0, args.device)
        n = max(out_f, in_f)
        a = torch.randn(n, n, device=args.device)
        t_gemm, _ = timed(lambda: a @ a, 3, sync)
        t_chol, _ = timed(lambda: torch.linalg.cholesky(R), 2, sync)
        t_factor, factors = (None, None)
        if in_f <= args.reference_max:
            t_factor, factors = timed(lambda: reference_factor(D, R), 1)
        for k in map(int, args.ranks.split(",")):
            opt = optimal_objective(D, k, R)
            t_fast, (A, B) = timed(lambda: weighted_lowrank(D, k, autocorr=R, opts=SolverOptions(exact=False)), args.repeat, sync)
            t_exact, (Ax, Bx) = timed(lambda: weighted_lowrank(D, k, autocorr=R, opts=SolverOptions(exact=True)), 1, sync)
            row = {
                "shape": shape, "rank": k, "device": args.device,
                "qera_s": t_fast, "qera_exact_s": t_exact,
                "gap": (lowrank_objective(D, A, B, R) - opt) / opt,
                "gap_exact": (lowrank_objective(D, Ax, Bx, R) - opt) / opt,
                "gemm_s": t_gemm, "chol64_s": t_chol, "limit_ratio": t_fast / (t_gemm + t_chol),
            }
            if factors is not None:
                t_solve, BA = timed(lambda: reference_solve(factors, k), 1)
                E = D.cpu().double() - BA
                row.update({
                    "reference_s": t_factor + t_solve,
                    "speedup": (t_factor + t_solve) / t_fast,
                    "gap_reference": (float(((E @ R.cpu()) * E).sum()) - opt) / opt,
                })
            rows.append(row)
            print(f"{shape} r{k}: qera {t_fast:.3f}s, exact {t_exact:.3f}s, reference {row.get('reference_s')}", file=sys.stderr)
    emit("solver", rows, [
        ("shape", "shape", "s"), ("rank", "rank", "d"), ("qera_s", "qera s", ".3f"),
        ("reference_s", "ref s", ".2f"), ("speedup", "speed-up", ".1f"), ("gap", "gap", ".1e"),
        ("qera_exact_s", "exact s", ".2f"), ("gap_exact", "gap exact", ".1e"), ("gap_reference", "gap ref", ".1e"),
        ("gemm_s", "gemm s", ".3f"), ("chol64_s", "chol s", ".3f"), ("limit_ratio", "qera/(gemm+chol)", ".2f"),
    ])


if __name__ == "__main__":
    main()
