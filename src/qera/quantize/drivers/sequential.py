"""The sequential driver: one decoder block at a time over cached block inputs.

For each block: onload it, run the cached inputs through it with statistics recorded, solve and
replace its layers, free their statistics, and turn the block's outputs into the next block's
inputs — the original block's (``propagate="fp"``: taken from the recording forward itself, so
the result equals the one-shot driver's) or the quantized block's (``propagate="quantized"``: a
second forward, so later layers calibrate on the inputs they will really see). Only one block's
weights and statistics, the activations and the packed output so far are ever in memory.

Given statistics (``qera calibrate``, or ``--stats``) are statistics of the full-precision model, so
with ``propagate="fp"`` they are used as they are: nothing runs through the blocks, each block is
onloaded, solved from them and written. With ``propagate="quantized"`` they are refused.

With ``refine_steps`` each block's solved layers are then trained against the full-precision block
(:mod:`qera.quantize.refine`) before the block's outputs are propagated and the block is written. The
targets need the full-precision model's activations beside the run's own: with
``propagate="quantized"`` a second activation cache carries them from block to block.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from qera.calibrate.capture import ActivationCache
from qera.calibrate.sensitivity import block_output_fisher
from qera.quantize.blocks import BlockVisit, BlockWalk, RefineSize, propagate_block, record_block, walk_blocks
from qera.quantize.drivers import DRIVERS
from qera.quantize.drivers.base import DriverContext, check_given_stats, output_metrics
from qera.quantize.refine import LOSSES, BlockData, RefineSettings, refine_block
from qera.nn.targets import linear_weight
from qera.quantize.walk import solve_layers
from qera.util.errors import QeraError
from qera.util.timing import PhaseTimer

log = logging.getLogger(__name__)


@DRIVERS.register("sequential")
def run_sequential(ctx: DriverContext) -> None:
    """Quantize block by block; see the module docstring."""
    propagate = ctx.quantizer.config.propagate
    given = ctx.stats  # statistics of the fp model (one-shot or streamed): exactly what propagate="fp" records
    check_given_stats(ctx.quantizer.config, given)
    if ctx.calibration is None and given is None and (ctx.kinds or propagate == "quantized"):
        raise QeraError("the sequential pipeline needs calibration batches (it records statistics per block)")
    writer, q, dist = ctx.writer, ctx.quantizer, ctx.dist
    refine = RefineSettings.from_config(q.config) if q.config.refines else None
    if refine is not None and dist is not None:
        raise QeraError("refine_steps is not supported with several processes (torchrun): each process would "
                        "train on its own share of the calibration batches")
    if refine is not None and ctx.calibration is None:
        raise QeraError("refine_steps needs calibration batches: the blocks are trained on their cached inputs")
    per_block = q.config.output_weight == "block"
    if per_block and (dist is not None or ctx.calibration is None or given is not None):
        raise QeraError("output_weight='block' needs calibration batches, not given statistics, in one process "
                        "(each block's gradients come from its cached inputs)")
    timer = PhaseTimer(ctx.device)
    out_metrics = None
    if q.config.output_weight != "none":  # the fp model's loss gradients, before any block is quantized
        with timer("sensitivity"):
            out_metrics = output_metrics(ctx)
    with timer("capture"):
        walk = BlockWalk.prepare(ctx.model, ctx.targets, list(ctx.calibration or []), ctx.kinds, ctx.device,
                                 ctx.placer, ctx.max_memory, ctx.gpu_memory, ctx.offload_dir, dist,
                                 inputs=given is None or refine is not None,
                                 refine=_refine_size(q.config) if refine is not None else None)
    ctx.report.notes.extend(walk.notes)
    ctx.report.calibration_tokens = walk.tokens if given is None else given.tokens
    if given is not None:
        ctx.report.notes.append("statistics given: blocks solved from them, nothing recorded")
    timer.device = walk.device
    cache = walk.captured.cache
    # refinement's targets: the fp block's outputs, on the fp model's inputs (a copy of block 0's inputs)
    fp_stream = _second_cache(cache, ctx.offload_dir, copy=propagate == "quantized") if refine is not None else None
    done = writer.done_blocks if writer is not None else 0
    if dist is not None:
        done = dist.broadcast_json(done, 0)

    def visit(v: BlockVisit) -> None:
        i, block, prefix, names, calls = v.index, v.block, v.prefix, v.names, v.calls
        if i < done:  # resume: replay the finished block to rebuild the next inputs
            with timer("replay"):
                _replay(ctx, writer, i, block, names, calls, cache, propagate, walk.device, fp_stream)
        elif not names:
            with timer("propagate"):
                propagate_block(block, calls, cache)
                if fp_stream is not None and propagate == "quantized":
                    propagate_block(block, calls, fp_stream)
            if writer is not None:
                with timer("write"):
                    writer.add_block(i, prefix, block, [])
        else:
            mods = v.modules()
            if given is None:
                with timer("record"):
                    stats = record_block(block, mods, calls, cache, walk.captured, i, ctx.kinds,
                                         q.config.stats_precision, keep_outputs=propagate == "fp" and refine is None)
                    if dist is not None:
                        dist.all_reduce_stats(stats)
            else:
                stats = given
            metrics = out_metrics
            if per_block:  # the block output's Gauss-Newton diagonal at each layer, before any layer is replaced
                with timer("sensitivity"):
                    metrics = block_output_fisher(block, calls, cache.get, mods, walk.captured.masks,
                                                  seed=q.config.seed * 1_000_003 + i,
                                                  channel_weights=LOSSES[q.config.refine_loss].channel_weights)
            if fp_stream is not None:
                with timer("targets"):  # the fp block's outputs on the fp model's inputs
                    with torch.no_grad():
                        src = cache if propagate == "fp" else fp_stream
                        for b, call in enumerate(calls):
                            fp_stream.put(b, call(block, src.get(b)))
            with timer("solve"):
                # given statistics are the caller's: freed as used only when lazy (the file keeps them)
                solve_layers(q, mods, stats, ctx.keep, output_error=ctx.output_error, out_metrics=metrics,
                             dist=dist, block=i, notes=ctx.report.notes, release=given is None or given.lazy)
                reports = ctx.report.layers[-len(mods):]
            del stats
            if refine is not None:
                with timer("refine"):
                    _refine(ctx, v, cache, fp_stream, walk.captured.masks, refine)
            if propagate == "quantized":
                with timer("propagate"):
                    propagate_block(block, calls, cache)
            elif fp_stream is not None:  # the fp outputs are the next block's inputs
                with timer("propagate"):
                    for b in range(len(calls)):
                        cache.put(b, fp_stream.get(b))
            if writer is not None:
                with timer("write"):
                    writer.add_block(i, prefix, block, reports,
                                     refinement=ctx.report.refinement[-1] if refine is not None else None)

    try:
        walk_blocks(walk, visit, desc=f"{q.config.method} {q.config.format} by block", progress=ctx.progress,
                    timer=timer, keep=lambda v: [ctx.replaced[n] for n in v.names if n in ctx.replaced],
                    postfix=lambda: {"layers": len(ctx.report.layers)})
    finally:
        if fp_stream is not None:
            fp_stream.close()
        ctx.report.timings = timer.as_dict()
        ctx.report.calibration_seconds = timer.total("capture", "onload", "record", "propagate", "replay")
        ctx.report.solve_seconds = timer.total("solve")
        ctx.report.refine_seconds = timer.total("targets", "refine")


def _refine_size(config) -> RefineSize:
    """What the plan sizes the refinement's working set for: the rank (a budget's mean rank, or the
    largest fixed one) and the bytes per weight of ``W̃``'s training copies."""
    rank = int(config.rank_budget) if config.rank_budget is not None else max([config.rank, *config.rank_overrides.values()])
    parts = config.refine_train.split(",")
    codes = "scales" in parts or "rounding" in parts
    return RefineSize(rank, 4 + (8 if codes else 0) + (16 if "rounding" in parts else 0))


def _second_cache(cache: ActivationCache, offload_dir, copy: bool) -> ActivationCache:
    """A second activation cache, where ``cache`` keeps its entries (holding a copy of them with ``copy``)."""
    second = ActivationCache(len(cache), cache.location, cache.device, offload_dir)
    try:
        for b in range(len(cache) if copy else 0):
            second.put(b, cache.get(b))
    except BaseException:
        second.close()
        raise
    return second


def _refine(ctx: DriverContext, v: BlockVisit, cache: ActivationCache, fp_stream: ActivationCache, masks,
            settings: RefineSettings) -> None:
    """Refine the block's solved layers on its cached inputs against the fp outputs; keep the result."""
    mods = v.modules()
    local = {name[len(v.prefix):]: m for name, m in mods.items()}
    data = BlockData(v.calls, cache.get, fp_stream.get, masks)
    weights = None
    if "rounding" in settings.train:  # the offsets start from the full-precision weights
        weights = {name: linear_weight(ctx.replaced[v.prefix + name]) for name in local}
    kept, result = refine_block(v.block, local, data, settings, v.index, weights)
    for name, m in kept.items():
        ctx.replace(v.prefix + name, m)
    ctx.report.refinement.append(result.as_dict())


def _replay(ctx: DriverContext, writer, i: int, block: nn.Module, names: dict[str, nn.Module], calls, cache,
            propagate: str, device: torch.device, fp_stream: ActivationCache | None = None) -> None:
    """A block finished by an interrupted run: put its saved layers in and recompute its outputs."""
    if ctx.dist is not None:
        from qera.quantize.distributed import broadcast_stored_block

        stored, reports = broadcast_stored_block(ctx.dist, writer, i, device) if names else ({}, [])
    else:
        stored = writer.stored_layers(i) if names else {}
        reports = writer.stored_reports(i)
        refined = writer.stored_refinement(i)
        if refined is not None:
            ctx.report.refinement.append(refined)

    def swap_in() -> None:
        dev = next(iter(block.parameters())).device
        for name, new in stored.items():
            ctx.replace(name, new.to(dev))

    if propagate == "quantized":
        if fp_stream is not None:  # refinement's fp stream goes on through the original block
            propagate_block(block, calls, fp_stream)
        swap_in()
    propagate_block(block, calls, cache)
    if propagate == "fp":
        swap_in()
    ctx.report.layers.extend(reports)


