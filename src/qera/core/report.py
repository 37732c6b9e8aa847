"""Per-layer and per-run reports: data, not printout (JSON round trip, summaries)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from qera._version import __version__
from qera.core.config import QuantConfig
from qera.core.methods import METHODS
from qera.core.rounding import rounding_needs


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    format: str
    rank: int
    bits_weight: float  # bits per weight of W̃ (codes + scales)
    bits_total: float  # including A and B at their storage dtype
    weight_error_before: float
    weight_error_after: float
    output_error_before: float | None  # trace(E R Eᵀ); None without the autocorrelation
    output_error_after: float | None
    seconds: float
    tokens: int | None = None  # calibration rows behind this layer's statistics
    block: int | None = None  # decoder block index (sequential pipeline)
    note: str | None = None  # e.g. a fallback taken for this layer
    dead_channels: int | None = None  # input channels no calibration token reached (R's diagonal is 0)
    # leading eigenvalues of D R Dᵀ (D = W − W̃ before the low-rank term) over its trace: the share of
    # the output error each rank unit of the optimal (qera-exact) term removes; config.report_spectrum
    spectrum: list[float] | None = None


@dataclass
class QuantReport:
    config: QuantConfig
    layers: list[LayerReport] = field(default_factory=list)
    calibration_seconds: float = 0.0
    solve_seconds: float = 0.0
    calibration_tokens: int = 0
    pipeline: str = "oneshot"
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase (sequential: capture, onload, ...)
    refine_seconds: float = 0.0
    refinement: list[dict[str, Any]] = field(default_factory=list)  # per block: held-out error before/after, kept
    guard: dict[str, Any] | None = None  # qera.quantize.guard: which run was kept, both held-out losses

    def quality(self) -> dict[str, Any]:
        """The deterministic part of the summary (no timings): bits and output-error ratio."""
        n = sum(l.shape[0] * l.shape[1] for l in self.layers) or 1

        def wavg(attr: str) -> float:
            return sum(getattr(l, attr) * l.shape[0] * l.shape[1] for l in self.layers) / n

        pairs = [(l.output_error_after, l.output_error_before) for l in self.layers
                 if l.output_error_before is not None and l.output_error_after is not None]
        ratios = [a / b for a, b in pairs if b > 0]
        return {
            "layers": len(self.layers),
            "params": n,
            "bits_weight": wavg("bits_weight"),
            "bits_total": wavg("bits_total"),
            "mean_output_error_ratio": sum(ratios) / len(ratios) if ratios else None,
            "calibration_tokens": self.calibration_tokens,
        }

    def singular_layers(self) -> list[LayerReport]:
        """Layers whose input autocorrelation ``R`` is singular (fewer calibration tokens than input
        channels, or input channels no token reached), for methods and roundings that read ``R``."""
        if "xtx" not in METHODS.get(self.config.method).needs | rounding_needs(self.config.rounding):
            return []
        return [l for l in self.layers if l.tokens is not None and l.rank > 0
                and (l.tokens < l.shape[1] or (l.dead_channels or 0) > 0)]

    def singular_summary(self) -> str | None:
        """One line for the whole run about singular autocorrelations (None when there are none)."""
        layers = self.singular_layers()
        if not layers:
            return None
        kinds = list(dict.fromkeys(l.name.rsplit(".", 1)[-1] for l in layers))
        few = sum(l.tokens < l.shape[1] for l in layers)
        dead = sum((l.dead_channels or 0) > 0 for l in layers)
        return (f"input autocorrelation singular on {len(layers)} of {len(self.layers)} layers "
                f"({', '.join(kinds[:6])}{', ...' if len(kinds) > 6 else ''}): {few} with fewer calibration tokens "
                f"than input channels, {dead} with input channels no token reached; the low-rank term stays finite "
                "and optimal on the observed subspace (-v names each layer)")

    def summary(self) -> dict[str, Any]:
        out = {**self.quality(), "calibration_seconds": self.calibration_seconds,
               "solve_seconds": self.solve_seconds, "pipeline": self.pipeline, "timings": dict(self.timings)}
        if self.refinement:
            out.update(refine_seconds=self.refine_seconds, refined_blocks=sum(r["kept"] for r in self.refinement),
                       refine_error_before=sum(r["loss_before"] for r in self.refinement) / len(self.refinement),
                       refine_error_after=sum(r["loss_after"] if r["kept"] else r["loss_before"] for r in self.refinement)
                       / len(self.refinement))
        if self.guard is not None:
            out["guard"] = dict(self.guard)
        return out

    def to_dict(self) -> dict[str, Any]:
        out = {"config": self.config.to_dict(), "summary": self.summary(), "notes": list(self.notes),
               "layers": [dataclasses.asdict(l) for l in self.layers], "qera_version": __version__}
        if self.refinement:
            out["refinement"] = [dict(r) for r in self.refinement]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)
