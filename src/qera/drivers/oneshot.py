"""The one-shot driver: statistics of every layer from whole-model forwards, then every layer solved."""

from __future__ import annotations

import logging
import time

from tqdm.auto import tqdm

from ..calibration import collect_statistics
from ..errors import QeraError
from . import DRIVERS
from .base import DriverContext

log = logging.getLogger(__name__)


@DRIVERS.register("oneshot")
def run_oneshot(ctx: DriverContext) -> None:
    """Calibrate the whole model at once (unless statistics are given), then solve layer by layer."""
    stats, own = ctx.stats, False
    if ctx.kinds and stats is None:
        if ctx.calibration is None:
            raise QeraError(f"method {ctx.quantizer.config.method!r} needs calibration data or precomputed statistics")
        t0 = time.perf_counter()
        stats = collect_statistics(ctx.model, ctx.calibration, list(ctx.targets), ctx.kinds, progress=ctx.progress,
                                   precision=ctx.quantizer.config.stats_precision)
        ctx.report.calibration_seconds = time.perf_counter() - t0
        own = True
    if stats is not None:
        ctx.report.calibration_tokens = stats.tokens

    def layer_stats(name: str):
        return stats[name] if stats is not None and name in stats else None

    for name, module in ctx.targets.items():  # everything checkable is checked before any replacement
        ctx.quantizer.check(name, module, layer_stats(name))
    done: set[str] = set()
    t0 = time.perf_counter()
    q = ctx.quantizer
    for name, module in tqdm(ctx.targets.items(), desc=f"{q.config.method} {q.config.format}", unit="layer",
                             disable=not ctx.progress):
        result = q(name, module, layer_stats(name), ctx.output_error)
        ctx.replace(name, ctx.sink(name, module, result))
        ctx.report.layers.append(result.report)
        done.add(name)
        if own:
            stats.release(name, done)  # statistics we collected ourselves: free them as we go
    ctx.report.solve_seconds = time.perf_counter() - t0
