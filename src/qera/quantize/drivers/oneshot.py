"""The one-shot driver: statistics of every layer from whole-model forwards, then every layer solved."""

from __future__ import annotations

import logging
import time

from qera.core.allocation import NEEDS_SENSITIVITY
from qera.calibrate.sensitivity import output_sensitivity
from qera.quantize.collect import collect_statistics_within
from qera.util.errors import QeraError
from qera.quantize.drivers import DRIVERS
from qera.quantize.drivers.base import DriverContext, output_metrics
from qera.quantize.walk import solve_layers

log = logging.getLogger(__name__)


@DRIVERS.register("oneshot")
def run_oneshot(ctx: DriverContext) -> None:
    """Calibrate the whole model at once (unless statistics are given), then solve layer by layer."""
    stats, own, temp = ctx.stats, False, None
    try:
        if ctx.kinds and stats is None:
            if ctx.calibration is None:
                raise QeraError(f"method {ctx.quantizer.config.method!r} needs calibration data or precomputed statistics")
            t0 = time.perf_counter()
            budget = None if ctx.max_memory is None else max(0, ctx.max_memory - resident_bytes(ctx.model))
            stats, temp = collect_statistics_within(
                ctx.model, ctx.calibration, ctx.targets, ctx.kinds, budget, workdir=ctx.offload_dir,
                precision=ctx.quantizer.config.stats_precision, progress=ctx.progress,
            )
            ctx.report.calibration_seconds = time.perf_counter() - t0
            own = True
            if stats.lazy:
                ctx.report.notes.append("statistics over the memory budget: recorded block by block to disk, "
                                        "read one layer at a time")
        _solve_all(ctx, stats, own)
    finally:
        if temp is not None:
            temp.remove()


def resident_bytes(model) -> int:
    """Bytes of the model's parameters and buffers that are really in memory (not on the meta device)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if t.device.type != "meta")


def _solve_all(ctx: DriverContext, stats, own: bool) -> None:
    if stats is not None:
        ctx.report.calibration_tokens = stats.tokens

    q = ctx.quantizer
    t0 = time.perf_counter()
    out_metrics = sens = None
    if q.config.output_weight != "none":  # every layer's objective weighs its output channels by the loss
        t1 = time.perf_counter()
        out_metrics = output_metrics(ctx)
        ctx.report.timings["sensitivity"] = time.perf_counter() - t1
    norm = q.config.rank_normalize
    if q.config.allocates and out_metrics is None and (norm in NEEDS_SENSITIVITY or (norm == "auto" and ctx.calibration)):
        t1 = time.perf_counter()  # one budget over the whole model; auto: fisher when there are batches
        try:
            sens = output_sensitivity(ctx.model, ctx.calibration or [], ctx.targets, ctx.progress)
        except QeraError as exc:
            if norm != "auto":
                raise
            log.info("rank allocation without loss gradients (%s)", exc)  # auto falls back to 'error'
        ctx.report.timings["sensitivity"] = time.perf_counter() - t1
    # given statistics are freed as they are used only when this run owns them (a lazy file keeps them)
    solve_layers(q, ctx.targets, stats, ctx.keep, output_error=ctx.output_error, sensitivity=sens,
                 out_metrics=out_metrics, release=stats is not None and (own or stats.lazy), notes=ctx.report.notes,
                 progress=ctx.progress, desc=f"{q.config.method} {q.config.format}")
    ctx.report.solve_seconds = time.perf_counter() - t0
