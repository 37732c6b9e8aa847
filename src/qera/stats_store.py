"""Statistics that do not fit in memory: written block by block to a file, read one input at a time.

:class:`StatsFileWriter` writes each block's statistics to a part file as the block finishes and
merges the parts into one safetensors file (raw bytes, constant memory; atomic) with the usual
header, which :meth:`qera.CalibrationStats.load` reads back lazily. :func:`collect_statistics_within`
is the policy the one-shot driver and the CLI use: in memory when the statistics fit the budget,
streamed to disk block by block otherwise — the same values either way (the block-by-block
recording uses the original blocks' outputs, exactly what a whole-model forward computes).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from .atomic import Scratch, check_parent, cleanup_stale, scratch_dir, write_file
from .memory import format_size
from .statistics import CalibrationStats

log = logging.getLogger(__name__)
plan_log = logging.getLogger("qera.plan")


class StatsFileWriter:
    """Block statistics → part files beside ``path`` → one safetensors file at ``path`` on :meth:`finish`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        check_parent(self.path)
        cleanup_stale(self.path)  # part folders of a killed run
        self.parts_dir = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-{os.getpid()}-parts-", dir=self.path.parent))
        self.parts: list[Path] = []
        self.meta: dict[str, dict] = {}
        self.groups: dict[str, str] = {}

    def add(self, stats: CalibrationStats) -> None:
        from .checkpoint.files import write_safetensors

        tensors = {}
        for key, st in stats.stats.items():
            st.finish()
            self.meta[key] = {"dim": st.dim, "kinds": sorted(st.kinds), "count": st.count}
            for kind, value in st.sums.items():
                tensors[f"{key}::{kind}"] = value.detach().to("cpu").contiguous()
        self.groups.update(stats.groups)
        part = self.parts_dir / f"{len(self.parts):05d}.safetensors"
        write_safetensors(tensors, part)
        self.parts.append(part)

    def finish(self, extra: Mapping[str, str] | None = None) -> Path:
        from .checkpoint.files import merge_safetensors

        header = {"qera_stats": json.dumps({"layers": self.meta,
                                            "extra": {**(extra or {}), "groups": json.dumps(self.groups)}})}
        try:
            write_file(self.path, lambda tmp: merge_safetensors(self.parts, tmp, metadata=header))
        finally:
            self.abort()
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self.parts_dir, ignore_errors=True)


def oneshot_stats_estimate(model: nn.Module, targets: Mapping[str, nn.Module], kinds: Iterable[str],
                           batch: Mapping[str, torch.Tensor] | None) -> int:
    """float64 bytes of every distinct input's statistics at once (the one-shot peak)."""
    from .calibration import group_shared_inputs
    from .memory import stats_bytes
    from .targets import linear_shape

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
    from .calibration import collect_statistics
    from .drivers.sequential import record_statistics_by_block

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
