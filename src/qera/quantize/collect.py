"""Calibration statistics of a model within a memory budget: in one pass when they fit, else
recorded block by block into a file and read back one input at a time (the same values either way)."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from qera.util.atomic import Scratch, scratch_dir
from qera.calibrate.forward import group_shared_inputs
from qera.nn.targets import linear_shape
from qera.util.memory import format_size, stats_bytes
from qera.calibrate.store import CalibrationStats, StatsFileWriter
from qera.quantize.blocks import BlockVisit, BlockWalk, propagate_block, record_block, walk_blocks

plan_log = logging.getLogger("qera.plan")


def oneshot_stats_estimate(model: nn.Module, targets: Mapping[str, nn.Module], kinds: Iterable[str],
                           batch: Mapping[str, torch.Tensor] | None) -> int:
    """float64 bytes of every distinct input's statistics at once (the one-shot peak); inputs shared
    by several layers are found on ``batch`` (without one, every layer counts: an upper bound)."""
    reps = set(group_shared_inputs(model, list(targets), batch).values()) if batch is not None else set(targets)
    return stats_bytes((linear_shape(targets[r])[1] for r in reps), kinds)


def collect_statistics_within(
    model: nn.Module,
    batches: Sequence[Mapping[str, torch.Tensor]],
    targets: Mapping[str, nn.Module],
    kinds: Iterable[str],
    budget: int | None,
    path: str | os.PathLike | None = None,
    workdir: str | os.PathLike | None = None,
    precision: str = "mixed",
    progress: bool = True,
    device=None,
    extra: Mapping[str, str] | None = None,
) -> tuple[CalibrationStats, Scratch | None]:
    """Statistics of ``targets``: in memory if they fit ``budget``, else recorded block by block into
    ``path`` (or a scratch folder under ``workdir``) and read back lazily.

    Returns ``(stats, scratch)``; the caller calls ``scratch.remove()`` when done with the statistics
    (None when nothing temporary was written).
    """
    from qera.calibrate.forward import collect_statistics

    kinds = frozenset(kinds)
    batches = list(batches)
    need = oneshot_stats_estimate(model, targets, kinds, batches[0] if batches else None)
    if budget is None or need <= budget:
        return collect_statistics(model, batches, list(targets), kinds, progress=progress, precision=precision), None
    temp = None
    if path is None:
        temp = scratch_dir(Path(workdir) if workdir else Path(tempfile.gettempdir()), "qera-stats-")
        path = temp.path / "stats.safetensors"
    plan_log.info("statistics need %s, over the memory budget of %s: recorded block by block into %s and read "
                  "one layer at a time", format_size(need), format_size(budget), path)
    try:
        stats = record_statistics_by_block(model, batches, targets, kinds, path, precision=precision,
                                           progress=progress, device=device, max_memory=budget, offload_dir=workdir,
                                           extra=dict(extra or {}))
    except BaseException:
        if temp is not None:
            temp.remove()
        raise
    return stats, temp


def record_statistics_by_block(model: nn.Module, batches: list, targets: dict[str, nn.Module], kinds,
                               path, *, precision: str = "mixed", progress: bool = True, device=None, placer=None,
                               max_memory: int | None = None, offload_dir=None, extra: dict | None = None):
    """Statistics of ``targets`` recorded one block at a time and written to ``path`` as each block finishes.

    The values equal :func:`qera.collect_statistics` (each block runs on the original previous
    block's outputs); at most one block's statistics are in memory. Returns the statistics, read
    back lazily from ``path``.
    """
    kinds = frozenset(kinds)
    walk = BlockWalk.prepare(model, dict(targets), list(batches), kinds, device, placer, max_memory, None,
                             offload_dir)
    writer = StatsFileWriter(path)

    def visit(v: BlockVisit) -> None:
        if v.names:
            writer.add(record_block(v.block, v.modules(), v.calls, walk.captured.cache, walk.captured, v.index,
                                    kinds, precision, keep_outputs=True))
        else:
            propagate_block(v.block, v.calls, walk.captured.cache)

    try:
        walk_blocks(walk, visit, desc="calibrating by block", progress=progress)
        writer.finish({"kinds": ",".join(sorted(kinds)), "precision": precision, **(extra or {})})
    except BaseException:
        writer.abort()
        raise
    return CalibrationStats.load(path, lazy=True)
