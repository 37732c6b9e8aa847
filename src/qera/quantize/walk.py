"""The one per-model solve path: allocate ranks → check every layer → solve each → hand it to a sink.

Both drivers (the one-shot driver over the whole model, the sequential driver over one block), the
rank sweep and anything else that solves layers go through :func:`solve_layers`; what happens to a
solved layer is the caller's sink (replace it by a ``QERALinear``, or keep the result).
"""

from __future__ import annotations

import logging
from typing import Callable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from qera.calibrate.store import CalibrationStats
from qera.quantize.layer import LayerQuantizer, LayerResult, settle_reports
from qera.util.memory import trim_heap

log = logging.getLogger(__name__)

Sink = Callable[[str, nn.Module, LayerResult], None]


def keep_results(into: dict[str, LayerResult]) -> Sink:
    """A sink that keeps each solved layer's result in ``into`` and replaces nothing."""
    return lambda name, module, result: into.__setitem__(name, result)


def _on_gpu(module: nn.Module) -> bool:
    p = next(iter(module.parameters()), None)
    return p is not None and p.device.type == "cuda"


def solve_layers(q: LayerQuantizer, mods: Mapping[str, nn.Module], stats: CalibrationStats | None, sink: Sink, *,
                 output_error: bool = True, sensitivity: Mapping[str, float] | None = None,
                 out_metrics: dict[str, torch.Tensor] | None = None, release: bool = True, dist=None,
                 block: int | None = None, notes: list[str] | None = None, progress: bool = False,
                 desc: str | None = None) -> None:
    """Solve ``mods`` ({name: linear module}) under ``q`` and hand each result to ``sink(name, module, result)``.

    1. With a rank budget, ranks are allocated over ``mods`` (their share of the budget; ``sensitivity``
       and ``out_metrics`` as :meth:`LayerQuantizer.allocate` takes them); the summary goes to ``notes``.
    2. Every layer is checked before any is solved (shapes, ranks, statistics), so a bad layer
       stops the run before anything is replaced.
    3. Layers are solved in order; ``release`` frees each statistic once every layer sharing it is
       done; ``out_metrics`` entries are popped as they are used.
    Under torchrun (``dist``), layer k is solved by rank k mod world and every result is broadcast in
    order, so every rank's sink sees every layer. On a GPU (one process) the reports and NaN checks of
    all layers settle with one synchronization at the end; ``block`` is written into each report.
    """
    def stats_of(name: str):
        return stats[name] if stats is not None and name in stats else None

    ranks, q0s = {}, {}
    if q.config.allocates:
        ranks, q0s, summary = q.allocate(dict(mods), stats_of, progress and block is None, sensitivity, out_metrics)
        summary = summary if block is None else f"block {block}: {summary}"
        if notes is not None:
            notes.append(summary)
        log.info("%s", summary)
    for name, mod in mods.items():  # checked before any layer is replaced
        q.check(name, mod, stats.info(name) if stats is not None and name in stats else None, ranks.get(name))
    names = list(mods)
    owner = {name: (k % dist.world if dist is not None else 0) for k, name in enumerate(names)}
    mine = [n for n in names if dist is None or owner[n] == dist.rank]
    finished: set[str] = set(n for n in names if n not in mine)
    if dist is not None and stats is not None and release:  # statistics no layer of this rank needs go at once
        for n in finished:
            stats.release(n, finished)
    defer = dist is None and bool(mine) and _on_gpu(mods[mine[0]])
    pending, results = [], {}
    bar = tqdm(mine, desc=desc, unit="layer", disable=not progress or block is not None)
    for name in bar:
        result = q(name, mods[name], stats_of(name), output_error, ranks.get(name), q0s.pop(name, None),
                   out_metrics.pop(name, None) if out_metrics is not None else None, settle=not defer)
        result.report.block = block if block is not None else result.report.block
        finished.add(name)
        if stats is not None and release:
            stats.release(name, finished)
        if result.pending is not None:
            pending.append(result.pending)
        if dist is None:
            sink(name, mods[name], result)
        else:
            results[name] = result
        del result
        if not _on_gpu(mods[name]):
            trim_heap()  # per-layer temporaries are tens of MB of host memory: give them back before the next layer
    settle_reports(pending)  # a NaN solve raises here; the caller puts the fp layers back
    if dist is not None:
        from qera.quantize.distributed import broadcast_result

        for name in names:
            result = broadcast_result(dist, results.pop(name, None), owner[name], name, mods[name], q, ranks.get(name))
            sink(name, mods[name], result)
