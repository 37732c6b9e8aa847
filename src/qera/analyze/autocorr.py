"""The independence assumption: how far each layer's ``R = E[xᵀx]`` is from diagonal, and what
the exact solve gains over the diagonal one where it is not.

QERA-approx is optimal when input channels are uncorrelated (``R`` diagonal, the paper's
Assumption 1); QERA-exact is optimal for any ``R``. Per layer we measure

- the off-diagonal share of ``‖R'‖_F²`` with ``R' = D^{-1/2} R D^{-1/2}`` (unit diagonal,
  ``D = diag(R)``): 0 for a diagonal ``R``, → 1 when the off-diagonal mass dominates;
- the gap of qera-approx over qera-exact in the output error ``trace(E R Eᵀ)``, same RTN ``W̃``,
  same rank: ``gap_relative = err_approx / err_exact − 1`` (≥ 0: exact is the optimum).
"""

from __future__ import annotations

import logging
import math
from typing import Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from qera.util.errors import QeraError
from qera.core.formats import parse_format
from qera.core.linalg import SolverOptions, weighted_error, weighted_lowrank
from qera.calibrate.store import CalibrationStats
from qera.nn.targets import linear_weight
from qera.analyze.common import layer_depth, layer_kind, type_group

log = logging.getLogger(__name__)

DEAD = 1e-12  # a channel with R_ii <= DEAD · mean(diag R) carries no signal


def normalized_autocorrelation(R: torch.Tensor, dead: float = DEAD) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R', live)``: ``R'_ij = R_ij / sqrt(R_ii R_jj)`` (shape ``(d, d)``, float64) and the mask of
    live channels (shape ``(d,)``). Rows and columns of dead channels are 0 (no NaN)."""
    if R.ndim != 2 or R.shape[0] != R.shape[1]:
        raise QeraError(f"R must be a square matrix, got shape {tuple(R.shape)}")
    R = R.to(torch.float64)
    diag = torch.diagonal(R).clamp_min(0)
    level = dead * float(diag.mean()) if diag.numel() else 0.0
    live = diag > max(level, 0.0)
    inv = torch.where(live, diag.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), torch.zeros_like(diag))
    return R * inv[:, None] * inv[None, :], live


def offdiag_share(R: torch.Tensor, dead: float = DEAD) -> float:
    """Off-diagonal share of ``‖R'‖_F²`` (see :func:`normalized_autocorrelation`), in ``[0, 1)``.

    ``(‖R'‖_F² − Σ_i R'_ii²) / ‖R'‖_F²`` over live channels; 0 for a diagonal ``R`` and for an
    ``R`` without live channels.
    """
    Rn, live = normalized_autocorrelation(R, dead)
    total = float((Rn * Rn).sum())
    on = float((torch.diagonal(Rn) ** 2).sum())
    return 0.0 if total <= 0 else max(0.0, (total - on) / total)


def offdiag_rms(R: torch.Tensor, dead: float = DEAD) -> float:
    """Root-mean-square off-diagonal correlation ``sqrt(mean_{i≠j} R'_ij²)`` over live channels.

    Unlike :func:`offdiag_share` it does not grow with the width: ``d`` channels with pairwise
    correlation ρ give rms ρ, but share ``(d−1)ρ² / (1 + (d−1)ρ²)``.
    """
    Rn, live = normalized_autocorrelation(R, dead)
    n = int(live.sum())
    if n < 2:
        return 0.0
    off = float((Rn * Rn).sum()) - float((torch.diagonal(Rn) ** 2).sum())
    return math.sqrt(max(0.0, off) / (n * (n - 1)))


def downsample(M: torch.Tensor, max_px: int) -> torch.Tensor:
    """Block-average a ``(d, d)`` matrix to at most ``max_px × max_px`` (shape ``(⌈d/f⌉, ⌈d/f⌉)``)."""
    d = M.shape[0]
    f = max(1, math.ceil(d / max_px))
    if f == 1:
        return M.clone()
    pad = (-d) % f
    X = torch.nn.functional.pad(M[None, None], (0, pad, 0, pad))
    ones = torch.nn.functional.pad(torch.ones_like(M)[None, None], (0, pad, 0, pad))
    s = torch.nn.functional.avg_pool2d(X, f) / torch.nn.functional.avg_pool2d(ones, f).clamp_min(1e-12)
    return s[0, 0]


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation (average ranks for ties); None with fewer than 3 pairs or a constant side."""
    pairs = [(a, b) for a, b in zip(x, y) if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 3:
        return None

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=v.__getitem__)
        out = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for t in range(i, j + 1):
                out[order[t]] = (i + j) / 2
            i = j + 1
        return out

    rx, ry = ranks([a for a, _ in pairs]), ranks([b for _, b in pairs])
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return None if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def approx_exact_gap(W: torch.Tensor, w_q: torch.Tensor, R: torch.Tensor, rank: int) -> dict[str, float]:
    """Output errors ``trace(E R Eᵀ)`` of ``D = W − W̃`` (shape ``(out, in)``) before and after the
    rank-``rank`` diagonal solve (``scale = sqrt(diag R)``, qera-approx) and the exact solve (qera-exact).

    Both solves use the dense float64 eigendecomposition, so ``err_exact`` is the optimum.
    """
    D = W.to(torch.float32) - w_q.to(torch.float32)
    R = R.to(device=D.device, dtype=torch.float64)
    opts = SolverOptions(exact=True)
    scale = torch.diagonal(R).clamp_min(0).sqrt()
    Aa, Ba = weighted_lowrank(D, rank, scale=scale, opts=opts)
    Ae, Be = weighted_lowrank(D, rank, autocorr=R, opts=opts)
    empty = (D.new_zeros(0, D.shape[1]), D.new_zeros(D.shape[0], 0))
    before = weighted_error(D, *empty, R)
    ea, ee = weighted_error(D, Aa, Ba, R), weighted_error(D, Ae, Be, R)
    return {"err_before": before, "err_approx": ea, "err_exact": ee}


def heatmap_layers(names: Sequence[str], stats: CalibrationStats, blocks: Sequence[int] | None = None) -> list[str]:
    """Layers to draw: one per distinct input (the first layer reading it) in the first, middle and
    last block (or ``blocks``)."""
    depths = sorted({d for d in (layer_depth(n) for n in names) if d is not None})
    if not depths:
        return list(dict.fromkeys(stats.groups.get(n, n) for n in names))[:4]
    if blocks is None:
        blocks = sorted({depths[0], depths[len(depths) // 2], depths[-1]})
    missing = [b for b in blocks if b not in depths]
    if missing:
        raise QeraError(f"--heatmap-blocks: block {missing[0]} is not in the model (blocks {depths[0]}..{depths[-1]})")
    seen, out = set(), []
    for n in names:
        key = stats.groups.get(n, n)
        if layer_depth(n) in blocks and key not in seen:
            seen.add(key)
            out.append(n)
    return out


def autocorrelation_analysis(
    targets: Mapping[str, nn.Module],
    stats: CalibrationStats,
    fmt: str,
    rank: int,
    seed: int = 0,
    heatmaps: Sequence[str] = (),
    heatmap_px: int = 256,
    progress: bool = True,
) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Per-layer rows and the downsampled ``|R'|`` of the ``heatmaps`` layers.

    Row: ``layer, kind, group, depth, dim, tokens, offdiag_share, offdiag_rms, dead_channels, err_before,
    err_approx, err_exact, ratio_approx, ratio_exact, gap_relative, gain_ratio_points``. ``R`` is
    formed once per distinct input (q/k/v share one).
    """
    wfmt = parse_format(fmt)
    rows, maps = [], {}
    cache: dict[str, tuple[torch.Tensor, float, float, int]] = {}
    order = list(targets)
    for name in tqdm(order, desc=f"autocorrelation {fmt} r{rank}", unit="layer", disable=not progress):
        if name not in stats:
            raise QeraError(f"no calibration statistics for layer {name}")
        st = stats[name]
        if st.count == 0:
            log.warning("%s: no calibration tokens, skipped", name)
            continue
        key = stats.groups.get(name, name)
        if key not in cache:
            cache.clear()  # consecutive layers share an input: keep one R at a time
            R = st.autocorrelation(torch.float64)
            Rn, live = normalized_autocorrelation(R)
            share, rms = offdiag_share(R), offdiag_rms(R)
            cache[key] = (R, share, rms, int((~live).sum()))
            if name in heatmaps:
                maps[name] = downsample(Rn.abs(), heatmap_px).to(torch.float32)
            del Rn
        R, share, rms, dead = cache[key]
        W = linear_weight(targets[name]).detach()
        if rank > min(W.shape):
            raise QeraError(f"rank {rank} exceeds min{tuple(W.shape)} of layer {name}")
        w_q = wfmt.quantize(W, name).dequantize(torch.float32)
        g = approx_exact_gap(W, w_q, R, rank)
        b = g["err_before"]
        ra = g["err_approx"] / b if b > 0 else float("nan")
        re_ = g["err_exact"] / b if b > 0 else float("nan")
        kind = layer_kind(name)
        rows.append({"layer": name, "kind": kind, "group": type_group(kind), "depth": layer_depth(name),
                     "dim": st.dim, "tokens": st.count, "offdiag_share": share, "offdiag_rms": rms, "dead_channels": dead, **g,
                     "ratio_approx": ra, "ratio_exact": re_,
                     "gap_relative": g["err_approx"] / g["err_exact"] - 1 if g["err_exact"] > 0 else None,
                     "gain_ratio_points": ra - re_})
    return rows, maps


def group_summary(rows: Sequence[Mapping]) -> list[dict]:
    """Mean/median off-diagonal share and gaps per layer group (q/k/v, o, gate/up, down)."""
    import statistics as st

    out = []
    for g in dict.fromkeys(r["group"] for r in rows):
        sel = [r for r in rows if r["group"] == g]
        gaps = [r["gap_relative"] for r in sel if r["gap_relative"] is not None]
        out.append({"group": g, "layers": len(sel),
                    "offdiag_share_mean": st.fmean(r["offdiag_share"] for r in sel),
                    "offdiag_share_min": min(r["offdiag_share"] for r in sel),
                    "offdiag_share_max": max(r["offdiag_share"] for r in sel),
                    "offdiag_rms_mean": st.fmean(r["offdiag_rms"] for r in sel),
                    "gap_relative_mean": st.fmean(gaps) if gaps else None,
                    "gap_relative_median": st.median(gaps) if gaps else None,
                    "ratio_approx_mean": st.fmean(r["ratio_approx"] for r in sel),
                    "ratio_exact_mean": st.fmean(r["ratio_exact"] for r in sel),
                    "gain_ratio_points_mean": st.fmean(r["gain_ratio_points"] for r in sel)})
    return out
