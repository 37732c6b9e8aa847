"""Rank allocation under a parameter budget: more rank where a rank unit removes more error.

Each layer's reconstruction objective at rank k is ``trace(D M Dᵀ) − Σ_{i<k} λ_i`` with ``λ`` the
eigenvalues of ``D M Dᵀ`` in the method's metric ``M`` (``R`` for qera-exact), so the gain of the
(k+1)-th rank unit is ``λ_k`` and costs ``out + in`` parameters. The gains of one layer never grow
with k, so taking the best gain per parameter first (greedy) is the optimum of the fractional
problem and loses at most the last, partially affordable unit of the integer one.

Layers' errors live on different scales; each layer's gains are divided by a normalizer
(:data:`NORMALIZERS`): its output energy ``trace(W M Wᵀ)`` (default: relative output error),
its error before the low-rank term ``trace(D M Dᵀ)``, nothing (absolute error), or the inverse of
the loss's sensitivity to the layer's output (``fisher``: gains in units of loss, see
:mod:`qera.calibrate.sensitivity`; the sensitivity weighs each token's gradient by that token's
input energy, so that it goes with the token's own error — averaged apart, behind Gemma-3's
post-norms, they misjudged the loss's weights by up to 1000×, issue 28).

Every layer keeps at least a floor (:data:`FLOOR_SHARE` of the mean rank) before the greedy
spends the rest: the guard for what the local loss model cannot promise.
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from qera.util.registry import Registry

log = logging.getLogger(__name__)

NORMALIZERS: Registry[Callable[["ErrorCurve"], float]] = Registry("rank normalization")
NORMALIZERS.register("output")(lambda c: c.energy)
NORMALIZERS.register("error")(lambda c: float(c.gains.sum()))
NORMALIZERS.register("none")(lambda c: 1.0)
# the loss's view: gains weighted by E‖∂L/∂y‖²/out (see qera.calibrate.sensitivity); a layer the loss never feels gets nothing
NORMALIZERS.register("fisher")(lambda c: 1.0 / c.sensitivity if c.sensitivity else 0.0)
NEEDS_SENSITIVITY = frozenset({"fisher"})


def resolve_normalize(name: str, have_sensitivity: bool) -> str:
    """``auto`` → ``fisher`` when the loss gradients are available, else ``error`` (the better of the
    two normalizations without them on SmolLM2); any other name is returned as is."""
    if name != "auto":
        return name
    return "fisher" if have_sensitivity else "error"


@dataclass
class ErrorCurve:
    """What one layer's rank buys.

    gains: (min(out, in),) float64, non-increasing — the objective drop of each further rank unit.
    cost: parameters per rank unit (``out + in``).
    energy: ``trace(W M Wᵀ)``, the layer's output energy in the same metric.
    fixed: a rank set by the user for this layer (not allocated, but paid from the budget).
    sensitivity: ``E‖∂L/∂y‖² / out`` of the layer's output (``fisher`` normalization only).
    """

    name: str
    gains: torch.Tensor
    cost: int
    energy: float
    fixed: int | None = None
    sensitivity: float | None = None

    def error_at(self, rank: int) -> float:
        """The objective at ``rank``: the sum of the gains not taken."""
        return float(self.gains[rank:].sum())


def budget_params(shapes: Mapping[str, tuple[int, int]], rank_budget: float | None = None,
                  extra_bits: float | None = None, lowrank_bits: int = 16) -> int:
    """A/B parameters the budget allows: ``rank_budget`` × Σ(out + in), or ``extra_bits`` × Σ out·in / lowrank_bits."""
    if (rank_budget is None) == (extra_bits is None):
        raise ValueError("give exactly one of rank_budget and extra_bits")
    if rank_budget is not None:
        return int(rank_budget * sum(o + i for o, i in shapes.values()))
    return int(extra_bits * sum(o * i for o, i in shapes.values()) / lowrank_bits)


FLOOR_SHARE = 0.25
"""The default floor: every allocated layer keeps at least this share of the mean rank (rank 2 of a
budget of rank 8). The gains come from a local model of the loss (each layer's errors weighted by
how much the loss feels them); a layer it misjudges as unimportant would otherwise be left with its
whole rounding error, where that model is least accurate. Issue 28 (Gemma-3-270M, mxint3, budget
of rank 8): with the loss weights misjudged by up to 1000×, 48 of 126 layers got rank 0 and the
perplexity rose from 111 to 433; see ``docs/results/gemma3_allocation.md`` for what the floor costs
and saves."""


def floor_rank(curves: list[ErrorCurve], budget: int, share: float) -> int:
    """The rank every allocated layer keeps at least: ``share`` × the mean rank the budget affords
    (its parameters over the allocated layers' cost per rank unit), rounded down."""
    if not 0 <= share <= 1:
        raise ValueError(f"the floor's share of the mean rank must be in [0, 1], got {share!r}")
    free = [c for c in curves if c.fixed is None and c.gains.numel()]
    left = budget - sum(c.fixed * c.cost for c in curves if c.fixed)
    cost = sum(c.cost for c in free)
    return int(share * max(left, 0) / cost) if cost else 0


def allocate_ranks(curves: list[ErrorCurve], budget: int, normalize: str = "output",
                   floor: int | None = None) -> dict[str, int]:
    """Ranks maximizing the total normalized gain within ``budget`` parameters (greedy by gain per parameter).

    Fixed layers take their rank first, then every other layer its ``floor`` (at most its full
    rank), whatever its normalized gains; the rest of the budget goes greedily. ``None``: the
    default floor, :data:`FLOOR_SHARE` of the mean rank (:func:`floor_rank`); ``0``: none. A unit
    that no longer fits is skipped and cheaper layers go on filling the budget.
    Returns ``{name: rank}`` for every curve.
    """
    norm_of = NORMALIZERS.get(normalize)
    if floor is None:
        floor = floor_rank(curves, budget, FLOOR_SHARE)
    ranks = {c.name: (c.fixed or 0) for c in curves}
    left = budget - sum(c.fixed * c.cost for c in curves if c.fixed)
    if left < 0:
        log.warning("the fixed ranks alone take %d parameters more than the budget", -left)
    if floor > 0:
        for c in curves:
            if c.fixed is None:
                ranks[c.name] = min(floor, c.gains.numel())
                left -= ranks[c.name] * c.cost
        if left < 0:
            raise ValueError(f"a floor of rank {floor} on every layer takes {-left} parameters more than the budget")
    heap: list[tuple[float, int, int]] = []  # (-gain per parameter, curve index, next rank)
    scaled: list[torch.Tensor | None] = []
    for j, c in enumerate(curves):
        norm = norm_of(c)
        start = ranks[c.name]
        if c.fixed is not None or norm <= 0 or start >= c.gains.numel():
            scaled.append(None)
            continue
        scaled.append(c.gains / (norm * c.cost))
        heapq.heappush(heap, (-float(scaled[j][start]), j, start))
    while heap and left > 0:
        neg, j, k = heapq.heappop(heap)
        c = curves[j]
        if neg >= 0 or c.cost > left:
            continue  # nothing left to gain here, or this layer's unit no longer fits
        ranks[c.name] = k + 1
        left -= c.cost
        if k + 1 < scaled[j].numel():
            heapq.heappush(heap, (-float(scaled[j][k + 1]), j, k + 1))
    return ranks


def summarize(ranks: Mapping[str, int], curves: list[ErrorCurve], budget: int, normalize: str) -> str:
    """One line for the report: the normalization, parameters used and the rank range."""
    by_name = {c.name: c for c in curves}
    used = sum(r * by_name[n].cost for n, r in ranks.items())
    vals = sorted(ranks.values())
    return (f"ranks allocated ({normalize} normalization) under a budget of {budget:,} A/B parameters: {used:,} used, "
            f"ranks {vals[0]}..{vals[-1]} (median {vals[len(vals) // 2]}) over {len(vals)} layers")
