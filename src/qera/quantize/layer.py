"""The per-layer step: quantize ``W`` → reconstruct ``(A, B)`` → report. Both drivers call it.

The step knows nothing about models or how statistics were gathered: it takes a weight
``(out, in)``, an optional bias and the layer's :class:`~qera.core.statistics.ActivationStats`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from qera.core.allocation import (
    NEEDS_SENSITIVITY,
    ErrorCurve,
    allocate_ranks,
    budget_params,
    resolve_normalize,
    summarize,
)
from qera.core.config import QuantConfig
from qera.util.errors import QeraError, where
from qera.core.formats import QuantizedWeight, WeightFormat, parse_format
from qera.core.linalg import error_spectrum, left_apply, metric_energy, output_sqrt
from qera.core.methods import Method, Reconstruction, get_method
from qera.core.report import LayerReport
from qera.core.rounding import ROUNDINGS, rounding_needs
from qera.core.statistics import ActivationStats, provided
from qera.nn.targets import linear_shape, linear_weight
from qera.util.timing import Stopwatch

log = logging.getLogger(__name__)

# Output errors of layers with out·in² above this are computed in float32 (float64 sum).
FLOAT64_REPORT_FLOPS = 2e9


@dataclass
class PendingReport:
    """A layer report whose numbers are still on the solve's device (0-d or 1-d tensors), with the
    check that ``A`` and ``B`` are finite: :func:`settle_reports` turns many into floats at once."""

    report: LayerReport
    method: str
    values: dict[str, torch.Tensor]
    finite: torch.Tensor
    clock: Stopwatch


def settle_reports(pending: Sequence[PendingReport]) -> None:
    """Fill the reports' numbers with one device→host transfer (one host synchronization on a GPU);
    raises a :class:`QeraError` naming the first layer whose solve produced NaN/Inf."""
    parts, index = [], []
    for p in pending:
        for key, t in [("__finite__", p.finite), *p.values.items()]:
            flat = t.detach().reshape(-1).to(torch.float64)
            index.append((p, key, flat.numel()))
            parts.append(flat)
    host = torch.cat([t.to(parts[0].device) for t in parts]).tolist() if parts else []
    at = 0
    for p, key, n in index:
        vals, at = host[at:at + n], at + n
        if key == "__finite__":
            if not vals[0]:
                raise QeraError(f"the {p.method} solve produced NaN/Inf{where(p.report.name)}")
        elif key == "spectrum":
            p.report.spectrum = vals
        elif key == "dead_channels":
            p.report.dead_channels = int(vals[0])
        else:
            setattr(p.report, key, vals[0])
    for p in pending:
        p.report.seconds = p.clock.seconds()


@dataclass
class LayerResult:
    """One solved layer: ``W ≈ W̃ + B A`` with ``A: (rank, in)``, ``B: (out, rank)`` in float32.

    ``pending``: set when the solve was asked not to settle its report (see :func:`settle_reports`)."""

    name: str
    qweight: QuantizedWeight
    A: torch.Tensor
    B: torch.Tensor
    report: LayerReport
    pending: PendingReport | None = None


def _report_dtype(out_f: int, in_f: int) -> torch.dtype:
    return torch.float64 if out_f * in_f * in_f <= FLOAT64_REPORT_FLOPS else torch.float32


ROW_CHUNK = 1024  # rows of D per step of the report (keeps its temporaries to a few chunks)


def dead_channels(R: torch.Tensor) -> torch.Tensor:
    """Input channels with ``R_ii = 0`` (a 0-d tensor on ``R``'s device): no calibration token reached
    them (a zero norm weight, unused embedding rows); any reconstruction is blind there."""
    return (torch.diagonal(R) <= 0).sum()


def spectrum_head(D: torch.Tensor, R: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` largest eigenvalues of ``D R Dᵀ`` over its trace (float64, on ``R``'s device): entry
    ``i`` is the share of the output error the optimal rank-``i+1`` term removes beyond rank ``i``."""
    vals = error_spectrum(D.to(R.dtype), None, R).to(torch.float64)
    total, head = vals.sum(), vals[:k]
    return torch.where(total > 0, head / total.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(head))


def output_errors(
    D: torch.Tensor, A: torch.Tensor, B: torch.Tensor, R: torch.Tensor, rows: int = ROW_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(trace(D R Dᵀ), trace(E R Eᵀ))`` with ``E = D - B A``, one ``D R`` product, row chunk by row chunk.

    ``E R = D R - B (A R)`` costs only thin products beyond ``D R``. Computed in ``R``'s dtype
    (float64 for small layers, float32 products with float64 sums for large ones: relative
    error ~1e-6). Returns 0-d float64 tensors on ``D``'s device (no host synchronization).
    """
    dtype = R.dtype
    has_lr = A.numel() > 0
    Ac, Bc = A.to(D.device, dtype), B.to(D.device, dtype)
    AR = Ac @ R if has_lr else None
    before = after = torch.zeros((), dtype=torch.float64, device=D.device)
    for r in range(0, D.shape[0], rows):
        Dc = D[r:r + rows].to(dtype)
        DR = Dc @ R
        before = before + (DR * Dc).sum(dtype=torch.float64)
        if has_lr:
            Bc_r = Bc[r:r + rows]
            DR.sub_(Bc_r @ AR)
            Dc = Dc - Bc_r @ Ac
            after = after + (DR * Dc).sum(dtype=torch.float64)
    return before, (after if has_lr else before)


def weight_errors(D0: torch.Tensor, D: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                  dtype: torch.dtype, rows: int = ROW_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """``(‖D0‖², ‖D − B A‖²)`` in ``dtype`` with float64 sums (0-d tensors on ``D``'s device);
    ``D0 = W − W̃₀``, ``D = W − W̃``."""
    before = after = torch.zeros((), dtype=torch.float64, device=D.device)
    Ac, Bc = A.to(D.device, dtype), B.to(D.device, dtype)
    for r in range(0, D.shape[0], rows):
        e0 = D0[r:r + rows].to(dtype)
        before = before + (e0 * e0).sum(dtype=torch.float64)
        e = D[r:r + rows].to(dtype)
        if A.numel():
            e = e - Bc[r:r + rows] @ Ac
        after = after + (e * e).sum(dtype=torch.float64)
    return before, after


class LayerQuantizer:
    """Quantize and reconstruct one layer at a time under a :class:`QuantConfig`."""

    def __init__(self, config: QuantConfig) -> None:
        self.config = config
        self.fmt = parse_format(config.format)
        self.fallback = parse_format(config.format_fallback) if config.format_fallback else None
        self.method = get_method(config.method, **config.solver_options())
        self.lowrank_bits = torch.finfo(getattr(torch, config.lowrank_dtype)).bits

    def format_for(self, name: str, shape: tuple[int, int]) -> WeightFormat:
        """The layer's weight format: the config's, or ``format_fallback`` for a shape it cannot
        store (a :class:`QeraError` naming the layer and width when neither can)."""
        if self.fmt.stores(shape) or self.fallback is None:
            self.fmt.check_shape(tuple(shape), name)
            return self.fmt
        self.fallback.check_shape(tuple(shape), name)
        return self.fallback

    @property
    def needs(self) -> frozenset[str]:
        """Statistics the step reads: the method's, plus ``Σxᵀx`` for GPTQ rounding."""
        return frozenset(self.method.needs) | rounding_needs(self.config.rounding)

    def round(self, name: str, W: torch.Tensor, stats: ActivationStats | None) -> QuantizedWeight:
        """The rounding stage: ``W̃`` on the format's grid (RTN, or GPTQ with the layer's ``R``)."""
        fmt = self.format_for(name, tuple(W.shape))
        if not rounding_needs(self.config.rounding) or stats is None or stats.count == 0:
            return fmt.quantize(W, name)  # no tokens reached the layer: GPTQ has nothing to weigh by
        R = stats.autocorrelation(torch.float64).to(W.device)
        return ROUNDINGS.get(self.config.rounding)(W, fmt, R, name=name, damp=self.config.gptq_damp)

    def rank_for(self, name: str) -> int:
        return self.config.rank_for(name) if self.method.uses_rank else 0

    def error_curve(self, name: str, module: nn.Module, stats: ActivationStats | None,
                    out_metric: torch.Tensor | None = None) -> tuple[QuantizedWeight, ErrorCurve]:
        """``(W̃, curve)``: the rounded weight and what each rank unit would remove from its error,
        in the method's metric (the weight error where no calibration tokens reached the layer),
        with the output channels weighted by ``out_metric`` ((out,) or (out, out)) when given."""
        W = linear_weight(module).detach()
        q0 = self.round(name, W, stats)
        D = W.to(torch.float32) - q0.dequantize(torch.float32).to(W.device)
        if out_metric is not None:
            S, _ = output_sqrt(out_metric, name=name)
            D, W = left_apply(S, D), left_apply(S, W.to(torch.float32))
        if self.needs and stats is not None and stats.count > 0:
            scale, R = self.method.metric(stats, name)
        else:
            scale, R = None, None
        R = R.to(W.device) if R is not None else None
        # on the host: the greedy allocation reads the gains one rank unit at a time
        curve = ErrorCurve(name, error_spectrum(D, scale, R).cpu(), sum(D.shape), metric_energy(W, scale, R),
                           fixed=self.config.fixed_rank(name))
        return q0, curve

    def allocate(self, mods: dict[str, nn.Module], stats_of: Callable[[str], ActivationStats | None],
                 progress: bool = False, sensitivity: Mapping[str, float] | None = None,
                 out_metrics: Mapping[str, torch.Tensor] | None = None,
                 ) -> tuple[dict[str, int], dict[str, QuantizedWeight], str]:
        """Ranks for ``mods`` under the config's budget (their share of it), the rounded weights
        (so the solve does not round again) and a one-line summary for the report.

        ``sensitivity``: ``{layer: E‖∂L/∂y‖²/out}``, needed by the ``fisher`` normalization.
        ``out_metrics``: ``{layer: (out,) or (out, out)}`` output metrics of the objective
        (``output_weight="fisher"``): the gains are then in the loss's units and ``auto`` means ``none``."""
        cfg = self.config
        if out_metrics is not None and cfg.rank_normalize == "auto":
            normalize = "none"
        else:
            normalize = resolve_normalize(cfg.rank_normalize, sensitivity is not None)
        if normalize in NEEDS_SENSITIVITY and sensitivity is None:
            raise QeraError(f"rank_normalize={cfg.rank_normalize!r} needs the loss gradients of the whole model: "
                            "use the one-shot pipeline with calibration batches")
        shapes = {n: linear_shape(m) for n, m in mods.items()}
        budget = budget_params(shapes, cfg.rank_budget, cfg.extra_bits, self.lowrank_bits)
        q0s, curves = {}, []
        for name, mod in tqdm(mods.items(), desc="error spectra", unit="layer", disable=not progress):
            q0s[name], curve = self.error_curve(name, mod, stats_of(name),
                                                out_metrics.get(name) if out_metrics is not None else None)
            curve.sensitivity = sensitivity.get(name) if sensitivity is not None else None
            curves.append(curve)
        ranks = allocate_ranks(curves, budget, normalize)
        return ranks, q0s, summarize(ranks, curves, budget, normalize)

    def check(self, name: str, module: nn.Module, stats: ActivationStats | None, rank: int | None = None) -> None:
        """Everything that can be checked before any layer is replaced (shape, rank, statistics).

        ``rank``: the layer's rank when it was allocated (default: the config's rank for the layer)."""
        out_f, in_f = linear_shape(module)
        self.format_for(name, (out_f, in_f))
        rank = self.rank_for(name) if rank is None else rank
        Method.check_rank(rank, (out_f, in_f), name, allow_zero=True)  # 0: quantization alone (an override)
        if (rank == 0 and not rounding_needs(self.config.rounding)) or not self.needs:
            return
        if stats is not None and stats.count == 0:
            return  # no tokens reached this layer (a rarely routed expert): the solve falls back, see __call__
        if stats is None:
            raise QeraError(f"method {self.config.method!r} needs calibration statistics{where(name)}")
        missing = self.needs - provided(stats.kinds)
        if missing:
            raise QeraError(f"the statistics lack {sorted(missing)} needed by {self.config.method}{where(name)}")
        if stats.dim != in_f:
            raise QeraError(f"statistics width {stats.dim} != in_features {in_f}{where(name)}")

    def __call__(
        self, name: str, module: nn.Module, stats: ActivationStats | None, output_error: bool = True,
        rank: int | None = None, q0: QuantizedWeight | None = None, out_metric: torch.Tensor | None = None,
        settle: bool = True,
    ) -> LayerResult:
        """Solve one layer; ``rank`` and ``q0`` (its already rounded weight) come from :meth:`allocate`;
        ``out_metric`` ((out,) or (out, out)) weighs the output channels in the objective (``output_weight``).

        ``settle=False`` leaves the report's numbers and the finiteness check on the device
        (``result.pending``) so that a GPU driver settles a whole block's with one synchronization."""
        W = linear_weight(module).detach()
        rank = self.rank_for(name) if rank is None else rank
        clock = Stopwatch(W.device)
        q0 = self.round(name, W, stats) if q0 is None else q0
        note = None
        fmt = q0.fmt
        if fmt is not self.fmt:
            note = f"format {fmt}: {self.fmt} cannot store input width {W.shape[1]} (format_fallback)"
        if rank == 0:  # w-only, or a rank override of 0: quantization alone
            w_q = q0.dequantize(torch.float32)
            rec = Reconstruction(w_q.new_zeros(0, W.shape[1]), w_q.new_zeros(W.shape[0], 0), w_q, q0)
        elif self.needs and stats is not None and stats.count == 0:
            empty = "no calibration tokens reached this layer: its low-rank term minimizes the weight error"
            log.warning("%s: %s", name, empty)
            note = empty if note is None else f"{note}; {empty}"
            rec = self.method.without_data().solve(W, q0, rank, None, fmt, name, out_metric)
        else:
            self.method.check(W, rank, stats, name)
            rec = self.method.solve(W, q0, rank, stats, fmt, name, out_metric)
        finite = torch.isfinite(rec.A).all() & torch.isfinite(rec.B).all()
        clock.stop()
        report, values = self._report(name, W, q0, rec, stats, output_error)
        report.note = note
        pending = PendingReport(report, self.config.method, values, finite, clock)
        if settle:
            settle_reports([pending])
            pending = None
        return LayerResult(name, rec.qweight, rec.A, rec.B, report, pending)

    def _report(self, name, W, q0, rec: Reconstruction, stats,
                output_error: bool) -> tuple[LayerReport, dict[str, torch.Tensor]]:
        """The layer's report with its numbers still to be filled from the returned device tensors."""
        out_f, in_f = W.shape
        dtype = _report_dtype(out_f, in_f)
        D = W.to(torch.float32) - rec.w_q.to(W.device)
        # LoftQ replaces W̃: "before" is measured against the first W̃
        D0 = D if rec.qweight is q0 else W.to(torch.float32) - q0.dequantize(torch.float32).to(W.device)
        values = dict(zip(("weight_error_before", "weight_error_after"), weight_errors(D0, D, rec.A, rec.B, dtype)))
        if output_error and stats is not None and "xtx" in stats.kinds and stats.count > 0:
            R = stats.autocorrelation(dtype).to(W.device)
            if D0 is D:
                values["output_error_before"], values["output_error_after"] = output_errors(D, rec.A, rec.B, R)
            else:
                values["output_error_before"], _ = output_errors(D0, rec.A[:0], rec.B[:, :0], R)
                _, values["output_error_after"] = output_errors(D, rec.A, rec.B, R)
            values["dead_channels"] = dead_channels(R)
            if self.config.report_spectrum:
                values["spectrum"] = spectrum_head(D0, R, self.config.report_spectrum)
            del R
        r = rec.rank
        nan = float("nan")
        fmt = rec.qweight.fmt
        report = LayerReport(
            name=name, shape=(out_f, in_f), format=str(fmt), rank=r,
            bits_weight=fmt.bits_per_weight,
            bits_total=fmt.bits_per_weight + self.lowrank_bits * r * (in_f + out_f) / (in_f * out_f),
            weight_error_before=nan, weight_error_after=nan, output_error_before=None, output_error_after=None,
            seconds=nan, tokens=stats.count if stats is not None else None,
        )
        return report, values


class LayerSink(Protocol):
    """Builds the module that replaces a solved layer (PTQ: a QERALinear with A, B)."""

    def __call__(self, name: str, module: nn.Module, result: LayerResult) -> nn.Module: ...


def ptq_sink(lowrank_dtype: torch.dtype, cache_weight: bool = True,
             act_format: str | None = None) -> Callable[[str, nn.Module, LayerResult], nn.Module]:
    """The PTQ sink: ``QERALinear(W̃, A, B)`` on the layer's device, A/B stored in ``lowrank_dtype``
    (``act_format``: the quantized GEMM's input is fake-quantized, e.g. ``mxint8`` for W4A8)."""
    from qera.nn.modules import QERALinear

    def sink(name: str, module: nn.Module, result: LayerResult) -> nn.Module:
        return QERALinear.from_result(module, result, lowrank_dtype, cache_weight, act_format=act_format)

    return sink
