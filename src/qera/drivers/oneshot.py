"""The one-shot driver: statistics of every layer from whole-model forwards, then every layer solved."""

from __future__ import annotations

import logging
import time

from tqdm.auto import tqdm

from ..allocation import NEEDS_SENSITIVITY
from ..memory import trim_heap
from ..sensitivity import output_sensitivity
from ..stats_store import collect_statistics_within
from ..errors import QeraError
from . import DRIVERS
from .base import DriverContext, output_metrics

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

    def layer_stats(name: str):
        return stats[name] if stats is not None and name in stats else None

    q = ctx.quantizer
    t0 = time.perf_counter()
    ranks, q0s = {}, {}
    out_metrics = None
    if q.config.output_weight != "none":  # every layer's objective weighs its output channels by the loss
        t1 = time.perf_counter()
        out_metrics = output_metrics(ctx)
        ctx.report.timings["sensitivity"] = time.perf_counter() - t1
    if q.config.allocates:  # one budget over the whole model: every layer's error spectrum first
        sens = None
        norm = q.config.rank_normalize
        if out_metrics is None and (norm in NEEDS_SENSITIVITY or (norm == "auto" and ctx.calibration)):
            t1 = time.perf_counter()  # auto: fisher when there are batches
            try:
                sens = output_sensitivity(ctx.model, ctx.calibration or [], ctx.targets, ctx.progress)
            except QeraError as exc:
                if norm != "auto":
                    raise
                log.info("rank allocation without loss gradients (%s)", exc)  # auto falls back to 'error'
            ctx.report.timings["sensitivity"] = time.perf_counter() - t1
        ranks, q0s, summary = q.allocate(ctx.targets, layer_stats, ctx.progress, sens, out_metrics)
        ctx.report.notes.append(summary)
        log.info("%s", summary)
    for name, module in ctx.targets.items():  # everything checkable is checked before any replacement
        q.check(name, module, stats.info(name) if stats is not None and name in stats else None, ranks.get(name))
    done: set[str] = set()
    for name, module in tqdm(ctx.targets.items(), desc=f"{q.config.method} {q.config.format}", unit="layer",
                             disable=not ctx.progress):
        result = q(name, module, layer_stats(name), ctx.output_error, ranks.get(name), q0s.pop(name, None),
                   out_metrics.pop(name, None) if out_metrics is not None else None)
        ctx.replace(name, ctx.sink(name, module, result))
        ctx.report.layers.append(result.report)
        done.add(name)
        if stats is not None and (own or stats.lazy):
            stats.release(name, done)  # free them as we go (a lazy file keeps them for the next run)
        trim_heap()  # the layer's solve temporaries come from the heap: give them back (1 GiB on SmolLM2)
    ctx.report.solve_seconds = time.perf_counter() - t0
