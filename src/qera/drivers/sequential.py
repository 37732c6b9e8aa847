"""The sequential driver: one decoder block at a time over cached block inputs.

For each block: onload it, run the cached inputs through it with statistics recorded, solve and
replace its layers, free their statistics, and turn the block's outputs into the next block's
inputs — the original block's (``propagate="fp"``: taken from the recording forward itself, so
the result equals the one-shot driver's) or the quantized block's (``propagate="quantized"``: a
second forward, so later layers calibrate on the inputs they will really see). Only one block's
weights and statistics, the activations and the packed output so far are ever in memory.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import model_device, runner_for
from ..capture import activation_bytes, block_output_is_tuple, call_bytes, capture_block_inputs, capture_probe
from ..errors import QeraError
from ..layer import settle_reports
from ..memory import trim_heap
from ..placement import BlockNeeds, Plan, plan_placement
from ..recording import probe_shared_inputs, record_statistics
from ..streaming import Placer, canonical_device
from ..timing import PhaseTimer
from ..targets import block_index, find_blocks, linear_shape
from . import DRIVERS
from .base import DriverContext, output_metrics

log = logging.getLogger(__name__)
plan_log = logging.getLogger("qera.plan")


def _split_by_block(targets: dict[str, nn.Module], blocks_name: str) -> dict[int, dict[str, nn.Module]]:
    by_block: dict[int, dict[str, nn.Module]] = defaultdict(dict)
    outside = []
    for name, mod in targets.items():
        i = block_index(name, blocks_name)
        if i is None:
            outside.append(name)
        else:
            by_block[i][name] = mod
    if outside:
        raise QeraError(
            f"the sequential pipeline quantizes layers inside the decoder blocks ({blocks_name}.N); "
            f"{outside[:3]} are outside them: use pipeline='oneshot' or exclude them"
        )
    return by_block


def _block_modules(block: nn.Module, prefix: str, names: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The current module objects of ``names`` (they change when a block is re-materialized)."""
    return {n: block.get_submodule(n[len(prefix):]) for n in names}


@DRIVERS.register("sequential")
def run_sequential(ctx: DriverContext) -> None:
    """Quantize block by block; see the module docstring."""
    if ctx.calibration is None:
        if ctx.kinds or ctx.quantizer.config.propagate == "quantized":
            raise QeraError("the sequential pipeline needs calibration batches (it records statistics per block)")
    if ctx.stats is not None:
        log.info("sequential pipeline: the given statistics are not used; they are recorded block by block")
    propagate = ctx.quantizer.config.propagate
    writer, q, dist = ctx.writer, ctx.quantizer, ctx.dist
    timer = PhaseTimer(ctx.device)
    out_metrics = None
    if q.config.output_weight != "none":  # the fp model's loss gradients, before any block is quantized
        with timer("sensitivity"):
            out_metrics = output_metrics(ctx)
    with timer("capture"):
        walk = BlockWalk.prepare(ctx.model, ctx.targets, list(ctx.calibration or []), ctx.kinds, ctx.device,
                                 ctx.placer, ctx.max_memory, ctx.gpu_memory, ctx.offload_dir, dist)
    ctx.report.notes.extend(walk.notes)
    ctx.report.calibration_tokens = walk.tokens
    blocks, blocks_name, by_block, placer, captured = walk.blocks, walk.blocks_name, walk.by_block, walk.placer, walk.captured
    timer.device = walk.device
    device, cache = walk.device, walk.captured.cache
    done = writer.done_blocks if writer is not None else 0
    if dist is not None:
        done = dist.broadcast_json(done, 0)
    bar = tqdm(range(len(blocks)), desc=f"{q.config.method} {q.config.format} by block", unit="block",
               disable=not ctx.progress)
    current = None  # (index, block, prefix) of the block on the device, to send home after an error
    try:
        for i in bar:
            block, prefix = blocks[i], f"{blocks_name}.{i}."
            current = (i, block, prefix)
            with timer("onload"):
                if i > 0:
                    placer.onload(i, block, prefix)
                if i + 1 < len(blocks):  # the next block's weights come in while this one computes
                    placer.prefetch(i + 1, blocks[i + 1], f"{blocks_name}.{i + 1}.")
            names = by_block.get(i, {})
            calls = [c[i] for c in captured.calls]
            if i < done:  # resume: replay the finished block to rebuild the next inputs
                with timer("replay"):
                    _replay(ctx, writer, i, block, names, calls, cache, propagate, device)
            elif not names:
                with timer("propagate"):
                    _propagate(block, calls, cache)
                if writer is not None:
                    with timer("write"):
                        writer.add_block(i, prefix, block, [])
            else:
                mods = _block_modules(block, prefix, names)
                with timer("record"):
                    stats = _record(block, mods, calls, cache, captured, i, ctx.kinds, q.config.stats_precision,
                                    keep_outputs=propagate == "fp")
                    if dist is not None:
                        dist.all_reduce_stats(stats)
                with timer("solve"):
                    reports = _solve_block(ctx, mods, stats, i, out_metrics)
                del stats
                if propagate == "quantized":
                    with timer("propagate"):
                        _propagate(block, calls, cache)
                if writer is not None:
                    with timer("write"):
                        writer.add_block(i, prefix, block, reports)
            with timer("offload"):
                _offload(ctx, placer, i, block, prefix, names)
            current = None
            bar.set_postfix(layers=len(ctx.report.layers))
        with timer("offload"):
            placer.drain()  # the last block's background copy home
    except BaseException:
        if current is not None:  # the caller restores the replaced layers; the block goes home first
            i, block, prefix = current
            try:
                _offload(ctx, placer, i, block, prefix, by_block.get(i, {}))
            except Exception:  # never hide the error that brought us here
                log.exception("sending block %d home after an error failed", i)
        raise
    finally:
        placer.close()
        cache.close()
        bar.close()
        ctx.report.timings = timer.as_dict()
        ctx.report.calibration_seconds = timer.total("capture", "onload", "record", "propagate", "replay")
        ctx.report.solve_seconds = timer.total("solve")


def _propagate(block: nn.Module, calls, cache) -> None:
    """Replace each batch's cached input by the block's output."""
    with torch.no_grad():
        for b, call in enumerate(calls):
            cache.put(b, call(block, cache.get(b)))


def _record(block: nn.Module, mods: dict[str, nn.Module], calls, cache, captured, i: int, kinds, precision: str,
            keep_outputs: bool):
    """Run the cached inputs through the block with statistics recorded; with ``keep_outputs`` the
    outputs replace the inputs (``propagate="fp"``: no second forward). Returns the statistics."""
    probe_call = captured.probe_calls[i]
    groups = probe_shared_inputs(mods, lambda: probe_call(block, captured.probe_hidden))
    with record_statistics(mods, kinds, groups, precision=precision, pending=True) as rec, torch.no_grad():
        for b, call in enumerate(calls):
            rec.mask = captured.masks[b]
            out = call(block, cache.get(b))
            if keep_outputs:
                cache.put(b, out)
            del out
        return rec.stats


def _solve_block(ctx: DriverContext, mods: dict[str, nn.Module], stats, i: int, out_metrics=None) -> list:
    """Check every layer of the block, then solve and replace them one by one, freeing statistics as they go.

    Under torchrun, layer k of the block is solved by rank k mod world; then every result is
    broadcast in block order and every rank replaces every layer. ``out_metrics``: the layers'
    output metrics (``output_weight``), popped as they are used.
    """
    q, dist = ctx.quantizer, ctx.dist
    ranks, q0s = {}, {}
    if q.config.allocates:  # the block's share of the budget, spread over the block's layers
        ranks, q0s, summary = q.allocate(mods, lambda n: stats[n] if n in stats else None,
                                         out_metrics=out_metrics)
        ctx.report.notes.append(f"block {i}: {summary}")
        log.info("block %d: %s", i, summary)
    for name, mod in mods.items():  # checked before any layer of the block is replaced
        q.check(name, mod, stats[name] if name in stats else None, ranks.get(name))
    names = list(mods)
    owner = {name: (k % dist.world if dist is not None else 0) for k, name in enumerate(names)}
    mine = [n for n in names if dist is None or owner[n] == dist.rank]
    if dist is not None:  # statistics no layer of this rank needs are dropped at once
        for n in names:
            if n not in mine:
                stats.release(n, set(names) - set(mine))
    finished: set[str] = set(n for n in names if n not in mine)
    results = {}
    # on a GPU the layers are solved back to back: their reports (and NaN checks) settle once per block
    defer = dist is None and bool(mine) and _on_gpu(mods[mine[0]])
    pending = []
    for name in mine:
        result = q(name, mods[name], stats[name] if name in stats else None, ctx.output_error,
                   ranks.get(name), q0s.pop(name, None),
                   out_metrics.pop(name, None) if out_metrics is not None else None, settle=not defer)
        result.report.block = i
        finished.add(name)
        stats.release(name, finished)
        if result.pending is not None:
            pending.append(result.pending)
        if dist is None:
            ctx.replace(name, ctx.sink(name, mods[name], result))
            ctx.report.layers.append(result.report)
            del result
        else:
            results[name] = result
        if not _on_gpu(mods[name]):
            trim_heap()  # per-layer temporaries are tens of MB of host memory: give them back before the next layer
    settle_reports(pending)  # a NaN solve raises here; the caller puts the block's fp layers back
    if dist is not None:
        from ..distributed import broadcast_result

        for name in names:
            result = broadcast_result(dist, results.pop(name, None), owner[name], name, mods[name], q,
                                      ranks.get(name))
            ctx.replace(name, ctx.sink(name, mods[name], result))
            ctx.report.layers.append(result.report)
    return ctx.report.layers[-len(names):]


def _on_gpu(module: nn.Module) -> bool:
    p = next(iter(module.parameters()), None)
    return p is not None and p.device.type == "cuda"


def _offload(ctx: DriverContext, placer, i: int, block: nn.Module, prefix: str, names) -> None:
    placer.offload(i, block, prefix, [ctx.replaced[n] for n in names if n in ctx.replaced])
    trim_heap()


@dataclass
class BlockWalk:
    """What walking a model block by block needs, set up once: the blocks, the targets of each, the
    placer, the plan and the captured block inputs (shared by quantization and streamed calibration)."""

    blocks_name: str
    blocks: nn.ModuleList
    by_block: dict[int, dict[str, nn.Module]]
    placer: Placer
    device: torch.device
    plan: Plan
    captured: object
    tokens: int
    notes: list[str]

    @classmethod
    def prepare(cls, model: nn.Module, targets: dict[str, nn.Module], batches: list, kinds, device, placer,
                max_memory: int | None, gpu_memory: int | None, offload_dir, dist=None) -> "BlockWalk":
        if not batches:
            raise QeraError("no calibration batches")
        if dist is not None:
            batches = dist.shard(batches)  # every world-th batch: statistics are summed across ranks
        blocks_name, blocks = find_blocks(model, list(targets))
        by_block = _split_by_block(targets, blocks_name)
        runner = runner_for(model, targets)
        input_device = model_device(model)
        device = canonical_device(device) if device is not None else input_device
        placer = placer if placer is not None else Placer(device)
        prefix0 = f"{blocks_name}.0."
        placer.onload(0, blocks[0], prefix0)
        tuple_out = block_output_is_tuple(runner, blocks, batches[0], input_device, device)
        probe = capture_probe(runner, blocks, batches[0], input_device, device, tuple_out)
        calls = call_bytes(runner, blocks, batches, input_device, tuple_out)
        plan = _plan(blocks[0], prefix0, by_block.get(0, {}), probe, batches, device, kinds, gpu_memory, max_memory,
                     prefetch=placer.prefetches and len(blocks) > 1, calls=calls)
        plan_log.info("%s", plan.describe())
        captured = capture_block_inputs(runner, blocks, batches, input_device, device, tuple_out, plan.activations,
                                        probe, offload_dir=offload_dir)
        tokens = captured.tokens if dist is None else dist.sum_int(captured.tokens)
        return cls(blocks_name, blocks, by_block, placer, device, plan, captured, tokens,
                   [plan.describe(), *captured.notes])


def _plan(block: nn.Module, prefix: str, names: dict[str, nn.Module], probe, batches, device: torch.device, kinds,
          gpu_memory: int | None, max_memory: int | None, prefetch: bool = False, calls: int = 0) -> Plan:
    """Size one block's work (block 0 stands for all) and place the activations within the budgets
    (``calls``: bytes of every batch's block-call tensors, see :func:`~qera.capture.call_bytes`)."""
    probe_hidden, probe_calls = probe
    mods = _block_modules(block, prefix, names)
    groups = probe_shared_inputs(mods, lambda: probe_calls[0](block, probe_hidden)) if mods else {}
    widths = [linear_shape(mods[r])[1] for r in set(groups.values())]
    # float64 accumulators; bf16/fp16 on a GPU add the float32 pending Σxᵀx of the tensor-core path
    pending = 4 if device.type == "cuda" and probe_hidden.dtype in (torch.bfloat16, torch.float16) else 0
    stats = sum((8 + pending) * w * w if "xtx" in kinds else 8 * w * len(kinds) for w in widths)
    solve = max((4 * i * i + 28 * o * i for o, i in (linear_shape(m) for m in mods.values())), default=0)
    weights = sum(p.numel() * p.element_size() for p in block.parameters())
    # with prefetch on a GPU the previous block may still be on its way home: its quantized layers are
    # bounded by the block's own size, so count one more block (the next one and the previous one)
    ahead = (2 if device.type == "cuda" else 1) * weights if prefetch else 0
    needs = BlockNeeds(weights, stats, solve, activation_bytes(batches, probe_hidden.shape[-1], probe_hidden.dtype),
                       ahead, calls)
    gpu_budget = gpu_memory
    if device.type == "cuda" and gpu_budget is None:
        free, _ = torch.cuda.mem_get_info(device)
        gpu_budget = int(0.9 * free)
    return plan_placement(str(device), needs, gpu_budget, max_memory)


def _replay(ctx: DriverContext, writer, i: int, block: nn.Module, names: dict[str, nn.Module], calls, cache,
            propagate: str, device: torch.device) -> None:
    """A block finished by an interrupted run: put its saved layers in and recompute its outputs."""
    if ctx.dist is not None:
        from ..distributed import broadcast_stored_block

        stored, reports = broadcast_stored_block(ctx.dist, writer, i, device) if names else ({}, [])
    else:
        stored = writer.stored_layers(i) if names else {}
        reports = writer.stored_reports(i)

    def swap_in() -> None:
        dev = next(iter(block.parameters())).device
        for name, new in stored.items():
            ctx.replace(name, new.to(dev))

    if propagate == "quantized":
        swap_in()
    _propagate(block, calls, cache)
    if propagate == "fp":
        swap_in()
    ctx.report.layers.extend(reports)


def record_statistics_by_block(model: nn.Module, batches: list, targets: dict[str, nn.Module], kinds,
                               path, *, precision: str = "mixed", progress: bool = True, device=None, placer=None,
                               max_memory: int | None = None, offload_dir=None, extra: dict | None = None):
    """Statistics of ``targets`` recorded one block at a time and written to ``path`` as each block finishes.

    The values equal :func:`qera.collect_statistics` (each block runs on the original previous
    block's outputs); at most one block's statistics are in memory. Returns the statistics, read
    back lazily from ``path``.
    """
    from ..statistics import CalibrationStats
    from ..stats_store import StatsFileWriter

    kinds = frozenset(kinds)
    walk = BlockWalk.prepare(model, dict(targets), list(batches), kinds, device, placer, max_memory, None,
                             offload_dir)
    writer = StatsFileWriter(path)
    cache = walk.captured.cache
    try:
        for i in tqdm(range(len(walk.blocks)), desc="calibrating by block", unit="block", disable=not progress):
            block, prefix = walk.blocks[i], f"{walk.blocks_name}.{i}."
            if i > 0:
                walk.placer.onload(i, block, prefix)
            if i + 1 < len(walk.blocks):
                walk.placer.prefetch(i + 1, walk.blocks[i + 1], f"{walk.blocks_name}.{i + 1}.")
            names = walk.by_block.get(i, {})
            calls = [c[i] for c in walk.captured.calls]
            if names:
                mods = _block_modules(block, prefix, names)
                stats = _record(block, mods, calls, cache, walk.captured, i, kinds, precision, keep_outputs=True)
                writer.add(stats)
                del stats
            else:
                _propagate(block, calls, cache)
            walk.placer.offload(i, block, prefix)
            trim_heap()
        walk.placer.drain()
        writer.finish({"kinds": ",".join(sorted(kinds)), "precision": precision, **(extra or {})})
    except BaseException:
        writer.abort()
        raise
    finally:
        walk.placer.close()
        cache.close()
    return CalibrationStats.load(path, lazy=True)
