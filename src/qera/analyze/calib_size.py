"""Calibration size: quality of the methods as the calibration set grows, from ONE pass.

The statistics are float64 running sums, so the statistics of the first ``N`` windows are a
snapshot of the sums after those windows. :func:`prefix_statistics` runs the model over the
windows segment by segment (``[0, s1)``, ``[s1, s2)`` ...) adding into one set of accumulators and
yields it at each size; the caller quantizes, evaluates and restores the model before the next
segment is added. Only one copy of the statistics ever exists.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from qera.calibrate.forward import group_shared_inputs, model_device, row_mask, run_model, runner_for
from qera.core.config import QuantConfig
from qera.util.errors import QeraError
from qera.quantize.pipeline import quantize_model
from qera.calibrate.recording import record_runs
from qera.calibrate.store import CalibrationStats
from qera.analyze.common import Evaluate
from qera.nn.targets import restoring

log = logging.getLogger(__name__)


def split_windows(batches: Sequence[Mapping[str, torch.Tensor]], sizes: Sequence[int], batch_size: int
                  ) -> list[list[dict[str, torch.Tensor]]]:
    """Re-batch the windows of ``batches`` into segments ending exactly at each of ``sizes``.

    Returns one list of batches (at most ``batch_size`` windows each) per size; segment ``i`` holds
    windows ``[sizes[i-1], sizes[i])``. Raises QeraError when ``sizes[-1]`` exceeds the windows given.
    """
    keys = list(batches[0]) if batches else []
    cat = {k: torch.cat([b[k] for b in batches]) for k in keys}
    have = int(cat["input_ids"].shape[0]) if cat else 0
    if not sizes or sizes[-1] > have:
        raise QeraError(f"calibration sizes go up to {sizes[-1] if sizes else 0} windows but only {have} are available")
    out, start = [], 0
    for end in sizes:
        seg = {k: v[start:end] for k, v in cat.items()}
        out.append([{k: v[i:i + batch_size] for k, v in seg.items()} for i in range(0, end - start, batch_size)])
        start = end
    return out


def prefix_statistics(
    model: nn.Module,
    segments: Sequence[Sequence[Mapping[str, torch.Tensor]]],
    targets: Mapping[str, nn.Module],
    kinds: frozenset[str],
    precision: str = "mixed",
    progress: bool = True,
) -> Iterator[tuple[int, CalibrationStats]]:
    """Yield ``(windows so far, statistics of those windows)`` after each segment.

    The yielded :class:`CalibrationStats` is the live accumulator: it is only valid until the
    generator is resumed (the next segment adds into it). Hooks are off while the caller holds it,
    so quantizing and evaluating the model in between does not touch it.
    """
    if not segments or not segments[0]:
        raise QeraError("no calibration windows")
    names = list(targets)
    device = model_device(model)
    runner = runner_for(model, names)
    was_training = model.training
    model.eval()
    try:
        groups = group_shared_inputs(model, names, segments[0][0])
    finally:
        model.train(was_training)
    stats: CalibrationStats | None = None
    seen = 0
    total = sum(int(b["input_ids"].shape[0]) for seg in segments for b in seg)
    bar = tqdm(total=total, desc="calibrating", unit="window", disable=not progress)
    try:
        for seg in segments:
            def runs(seg=seg):
                nonlocal seen
                for batch in seg:
                    yield row_mask(batch, device), functools.partial(run_model, runner, batch, device)
                    seen += int(batch["input_ids"].shape[0])
                    bar.update(int(batch["input_ids"].shape[0]))

            model.eval()
            try:
                stats = record_runs(targets, kinds, groups, runs(), stats=stats, precision=precision)
            finally:
                model.train(was_training)
            stats.extra["kinds"] = ",".join(sorted(kinds))
            yield seen, stats
    finally:
        bar.close()


def crossing(rows: Sequence[Mapping], challenger: str, baseline: str, key: str = "perplexity") -> int | None:
    """The first calibration size at which ``challenger`` is better (lower ``key``) than ``baseline``
    and stays better at every larger size; None if it never does."""
    by = {(r["method"], r["samples"]): r[key] for r in rows if r.get(key) is not None}
    sizes = sorted({s for m, s in by if m == challenger} & {s for m, s in by if m == baseline})
    wins = [by[(challenger, s)] < by[(baseline, s)] for s in sizes]
    for i, s in enumerate(sizes):
        if all(wins[i:]):
            return s
    return None


def calib_size_sweep(
    model: nn.Module,
    segments: Sequence[Sequence[Mapping[str, torch.Tensor]]],
    targets: Mapping[str, nn.Module],
    configs: Sequence[QuantConfig],
    evaluate: Evaluate,
    precision: str = "mixed",
    progress: bool = True,
    on_row: Callable[[dict], None] | None = None,
    on_stats: Callable[[CalibrationStats], None] | None = None,
) -> list[dict]:
    """Rows ``{method, samples, tokens, perplexity, mean_output_error_ratio, ...}`` for each
    config at each prefix size (the end of each segment), from one calibration pass.

    ``evaluate(model) -> perplexity``. The model is quantized in place with each config and
    restored before the next. ``on_stats`` gets the final (largest) statistics, e.g. to save them.
    The output-error ratio is measured with the prefix's own ``R`` (in-sample).
    """
    from qera.quantize.pipeline import stats_kinds_for

    # all three kinds (abs and sq cost O(d)): the saved statistics then serve every method
    kinds = frozenset({"abs", "sq", "xtx"}).union(*(stats_kinds_for(c, True) for c in configs))
    rows: list[dict] = []
    t_cal, t0 = 0.0, time.perf_counter()
    stats = None
    for samples, stats in prefix_statistics(model, segments, targets, kinds, precision, progress):
        t_cal += time.perf_counter() - t0
        for cfg in configs:
            t1 = time.perf_counter()
            with restoring(model, dict(targets)):
                report = quantize_model(model, cfg, stats=stats, report_output_error=True, progress=False)
                t_solve = time.perf_counter() - t1
                ppl = evaluate(model)
            s = report.summary()
            row = {"method": cfg.method, "format": cfg.format, "rank": cfg.rank, "samples": samples,
                   "tokens": stats.tokens, "perplexity": ppl,
                   "mean_output_error_ratio": s["mean_output_error_ratio"], "bits_total": s["bits_total"],
                   "solve_seconds": t_solve, "eval_seconds": time.perf_counter() - t1 - t_solve}
            log.info("%s at %d windows: perplexity %.4f", cfg.method, samples, ppl)
            rows.append(row)
            if on_row is not None:
                on_row(row)
        t0 = time.perf_counter()
    if on_stats is not None and stats is not None:
        on_stats(stats)
    for r in rows:
        r["calibration_seconds_total"] = t_cal
    return rows
