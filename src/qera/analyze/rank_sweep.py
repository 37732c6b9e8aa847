"""Rank sweep: perplexity against total bits per weight, one calibration and one solve per
(format, method, layer).

Each layer is solved once at the largest rank K with the dense (exact) solver. Its solution
``B A = U_K U_Kᵀ D`` has nested eigenvectors and individually balanced rank-one terms
(``A[i] = u_iᵀ D / c_i``, ``B[:, i] = c_i u_i``), so ``A[:k]``, ``B[:, :k]`` is exactly the rank-k
solution ``U_k U_kᵀ D`` — the rank-k optimum in the method's metric. Rank 0 is the rounded weight
alone (the same for every method with RTN rounding).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from qera.core.config import QuantConfig
from qera.core.methods import Method
from qera.util.errors import QeraError
from qera.quantize.layer import LayerQuantizer, LayerResult
from qera.quantize.walk import keep_results
from qera.quantize.walk import solve_layers as walk_solve
from qera.nn.modules import QERALinear
from qera.calibrate.store import CalibrationStats
from qera.nn.targets import linear_shape, linear_weight, replace_module
from qera.analyze.common import Evaluate, bits_per_weight
from qera.nn.targets import restoring

log = logging.getLogger(__name__)


def truncate_result(result: LayerResult, k: int) -> LayerResult:
    """The rank-``k`` prefix of a solved layer: ``A[:k]`` (k, in), ``B[:, :k]`` (out, k), same ``W̃``."""
    if not 0 <= k <= result.A.shape[0]:
        raise QeraError(f"cannot truncate a rank-{result.A.shape[0]} solution to rank {k}")
    return LayerResult(result.name, result.qweight, result.A[:k].contiguous(), result.B[:, :k].contiguous(),
                       result.report)


def truncated_output_errors(D: torch.Tensor, A: torch.Tensor, B: torch.Tensor, R: torch.Tensor,
                            ranks: Sequence[int]) -> list[float]:
    """``trace(E_k R E_kᵀ)`` with ``E_k = D − B[:, :k] A[:k]`` for each k in ``ranks``, float64.

    ``D``: (out, in), ``A``: (K, in), ``B``: (out, K), ``R``: (in, in). One ``D R`` product:
    ``tr(E R Eᵀ) = tr(D R Dᵀ) − 2 Σ_{i<k} B[:, i]ᵀ (D R A[i]ᵀ) + Σ_{i,j<k} (A R Aᵀ)_ij (BᵀB)_ij``.
    """
    D64, A64, B64 = D.to(torch.float64), A.to(torch.float64), B.to(torch.float64)
    R64 = R.to(device=D.device, dtype=torch.float64)
    AR = A64 @ R64                                   # (K, in)
    base = float(((D64 @ R64) * D64).sum())
    cross = ((D64 @ AR.T) * B64).sum(0)             # (K,): B[:, i]ᵀ D R A[i]ᵀ
    M = (AR @ A64.T) * (B64.T @ B64)                 # (K, K)
    out = []
    for k in ranks:
        if k > A.shape[0]:
            raise QeraError(f"rank {k} exceeds the solved rank {A.shape[0]}")
        out.append(base - 2 * float(cross[:k].sum()) + float(M[:k, :k].sum()))
    return out


def solve_layers(
    targets: Mapping[str, nn.Module],
    stats: CalibrationStats | None,
    config: QuantConfig,
    progress: bool = True,
) -> dict[str, LayerResult]:
    """Each target layer solved once at ``config.rank`` (the sweep's largest rank); no replacement."""
    out: dict[str, LayerResult] = {}
    walk_solve(LayerQuantizer(config), targets, stats, keep_results(out), output_error=False, release=False,
               progress=progress, desc=f"{config.method} {config.format} r{config.rank}")
    return out


def install(model: nn.Module, targets: Mapping[str, nn.Module], results: Mapping[str, LayerResult], k: int,
            lowrank_dtype: torch.dtype = torch.float16) -> None:
    """Replace every target by ``QERALinear(W̃, A[:k], B[:, :k])`` (restore with :func:`restoring`)."""
    for name, mod in targets.items():
        replace_module(model, name, QERALinear.from_result(mod, truncate_result(results[name], k), lowrank_dtype))


def _output_error_ratios(targets, stats, results, ranks) -> dict[int, float | None]:
    """Mean over layers of ``err_k / err_0`` (the output error of each truncation over W̃ alone)."""
    if stats is None or "xtx" not in stats.kinds:
        return {k: None for k in ranks}
    sums = {k: 0.0 for k in ranks}
    n = 0
    for name, mod in targets.items():
        st = stats[name]
        if st.count == 0:
            continue
        res = results[name]
        W = linear_weight(mod).detach()
        D = W.to(torch.float32) - res.qweight.dequantize(torch.float32).to(W.device)
        errs = truncated_output_errors(D, res.A, res.B, st.autocorrelation(torch.float64), [0, *ranks])
        if errs[0] <= 0:
            continue
        n += 1
        for k, e in zip(ranks, errs[1:]):
            sums[k] += e / errs[0]
    return {k: (sums[k] / n if n else None) for k in ranks}


def rank_sweep(
    model: nn.Module,
    targets: Mapping[str, nn.Module],
    stats: CalibrationStats | None,
    formats: Sequence[str],
    methods: Sequence[str],
    ranks: Sequence[int],
    evaluate: Evaluate,
    seed: int = 0,
    lowrank_dtype: str = "float16",
    progress: bool = True,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Rows ``{format, method, rank, bits_weight, bits_total, perplexity, mean_output_error_ratio, ...}``.

    Rank 0 appears once per format with ``method = "w-only"``. The model is restored after each
    evaluation. ``ranks`` must be strictly increasing and non-negative.
    """
    from qera.core.formats import parse_format

    if list(ranks) != sorted(set(ranks)) or (ranks and ranks[0] < 0):
        raise QeraError(f"ranks must be strictly increasing integers >= 0, got {list(ranks)}")
    shapes = {n: linear_shape(m) for n, m in targets.items()}
    top = max(ranks) if ranks else 0
    for name, shape in shapes.items():  # the sweep's largest rank must fit every layer
        Method.check_rank(top, shape, name, allow_zero=True)
    positive = [k for k in ranks if k > 0]
    lr_bits = torch.finfo(getattr(torch, lowrank_dtype)).bits
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        log.info("%s %s r%d: perplexity %.4f", row["format"], row["method"], row["rank"], row["perplexity"])
        if on_row is not None:
            on_row(row)

    for fmt in formats:
        wbits = parse_format(fmt).bits_per_weight
        w_only_done = False
        for method in methods:
            cfg = QuantConfig(format=fmt, method=method, rank=max(top, 1), seed=seed, lowrank_dtype=lowrank_dtype,
                              method_options={"exact": True})
            t0 = time.perf_counter()
            results = solve_layers(targets, stats, cfg, progress) if positive else \
                solve_layers(targets, stats, QuantConfig(format=fmt, method="w-only", rank=0), progress)
            solve_s = time.perf_counter() - t0
            ratios = _output_error_ratios(targets, stats, results, positive) if positive else {}
            for k in ranks:
                if k == 0 and w_only_done:
                    continue
                t1 = time.perf_counter()
                with restoring(model, dict(targets)):
                    install(model, targets, results, k, getattr(torch, lowrank_dtype))
                    ppl = evaluate(model)
                emit({"format": fmt, "method": "w-only" if k == 0 else method, "rank": k,
                      "bits_weight": bits_per_weight(shapes, wbits, 0),
                      "bits_total": bits_per_weight(shapes, wbits, k, lr_bits), "perplexity": ppl,
                      "mean_output_error_ratio": 1.0 if k == 0 else ratios.get(k),
                      "solve_seconds": solve_s,  # the (format, method) solve at the largest rank
                      "eval_seconds": time.perf_counter() - t1})
                w_only_done = w_only_done or k == 0
            del results
    return rows
