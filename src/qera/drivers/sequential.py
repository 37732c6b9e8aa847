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
import time
from collections import defaultdict

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import model_device, runner_for
from ..capture import activation_bytes, block_output_is_tuple, capture_block_inputs, capture_probe
from ..errors import QeraError
from ..memory import trim_heap
from ..placement import BlockNeeds, Plan, plan_placement
from ..recording import probe_shared_inputs, record_statistics
from ..streaming import Placer, release
from ..targets import block_index, find_blocks, linear_shape
from . import DRIVERS
from .base import DriverContext

log = logging.getLogger(__name__)
plan_log = logging.getLogger("qera.plan")


def _split_by_block(ctx: DriverContext, blocks_name: str) -> dict[int, dict[str, nn.Module]]:
    by_block: dict[int, dict[str, nn.Module]] = defaultdict(dict)
    outside = []
    for name, mod in ctx.targets.items():
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
    model = ctx.model
    blocks_name, blocks = find_blocks(model, list(ctx.targets))
    by_block = _split_by_block(ctx, blocks_name)
    runner = runner_for(model, ctx.targets)
    input_device = model_device(model)
    device = torch.device(ctx.device) if ctx.device is not None else input_device
    placer = ctx.placer if ctx.placer is not None else Placer(device)
    propagate = ctx.quantizer.config.propagate
    writer = ctx.writer
    q = ctx.quantizer
    batches = list(ctx.calibration or [])
    if not batches:
        raise QeraError("no calibration batches")
    dist = ctx.dist
    if dist is not None:
        batches = dist.shard(batches)  # every world-th batch: statistics are summed across ranks
    t_cal = time.perf_counter()
    prefix0 = f"{blocks_name}.0."
    placer.onload(0, blocks[0], prefix0)
    tuple_out = block_output_is_tuple(runner, blocks, batches[0], input_device, device)
    probe = capture_probe(runner, blocks, batches[0], input_device, device, tuple_out)
    plan = _plan(ctx, blocks[0], prefix0, by_block.get(0, {}), probe, batches, device)
    plan_log.info("%s", plan.describe())
    ctx.report.notes.append(plan.describe())
    captured = capture_block_inputs(runner, blocks, batches, input_device, device, tuple_out, plan.activations, probe,
                                    offload_dir=ctx.offload_dir)
    ctx.report.notes.extend(captured.notes)
    ctx.report.calibration_tokens = captured.tokens if dist is None else dist.sum_int(captured.tokens)
    cache = captured.cache
    done = writer.done_blocks if writer is not None else 0
    if dist is not None:
        done = dist.broadcast_json(done, 0)
    solve_s = 0.0
    ctx.report.calibration_seconds = time.perf_counter() - t_cal
    bar = tqdm(range(len(blocks)), desc=f"{q.config.method} {q.config.format} by block", unit="block",
               disable=not ctx.progress)
    try:
        for i in bar:
            block, prefix = blocks[i], f"{blocks_name}.{i}."
            if i > 0:
                placer.onload(i, block, prefix)
            names = by_block.get(i, {})
            calls = [c[i] for c in captured.calls]
            t0 = time.perf_counter()
            if i < done:  # resume: replay the finished block to rebuild the next inputs
                _replay(ctx, writer, i, block, names, calls, cache, propagate, device)
                ctx.report.calibration_seconds += time.perf_counter() - t0
            elif not names:
                _propagate(block, calls, cache)
                if writer is not None:
                    writer.add_block(i, prefix, block, [])
            else:
                mods = _block_modules(block, prefix, names)
                stats = _record(ctx, block, mods, calls, cache, captured, i, propagate == "fp")
                if dist is not None:
                    dist.all_reduce_stats(stats)
                ctx.report.calibration_seconds += time.perf_counter() - t0
                t1 = time.perf_counter()
                reports = _solve_block(ctx, mods, stats, i)
                solve_s += time.perf_counter() - t1
                if propagate == "quantized":
                    t2 = time.perf_counter()
                    _propagate(block, calls, cache)
                    ctx.report.calibration_seconds += time.perf_counter() - t2
                if writer is not None:
                    writer.add_block(i, prefix, block, reports)
            _offload(ctx, placer, i, block, prefix, names)
            bar.set_postfix(layers=len(ctx.report.layers))
    finally:
        cache.close()
        bar.close()
    ctx.report.solve_seconds = solve_s


def _propagate(block: nn.Module, calls, cache) -> None:
    """Replace each batch's cached input by the block's output."""
    with torch.no_grad():
        for b, call in enumerate(calls):
            cache.put(b, call(block, cache.get(b)))


def _record(ctx: DriverContext, block: nn.Module, mods: dict[str, nn.Module], calls, cache, captured, i: int,
            keep_outputs: bool):
    """Run the cached inputs through the block with statistics recorded; with ``keep_outputs`` the
    outputs replace the inputs (``propagate="fp"``: no second forward). Returns the statistics."""
    probe_call = captured.probe_calls[i]
    groups = probe_shared_inputs(mods, lambda: probe_call(block, captured.probe_hidden))
    precision = ctx.quantizer.config.stats_precision
    with record_statistics(mods, ctx.kinds, groups, precision=precision) as rec, torch.no_grad():
        for b, call in enumerate(calls):
            rec.mask = captured.masks[b]
            out = call(block, cache.get(b))
            if keep_outputs:
                cache.put(b, out)
            del out
        return rec.stats


def _solve_block(ctx: DriverContext, mods: dict[str, nn.Module], stats, i: int) -> list:
    """Check every layer of the block, then solve and replace them one by one, freeing statistics as they go.

    Under torchrun, layer k of the block is solved by rank k mod world; then every result is
    broadcast in block order and every rank replaces every layer.
    """
    q, dist = ctx.quantizer, ctx.dist
    for name, mod in mods.items():  # checked before any layer of the block is replaced
        q.check(name, mod, stats[name] if name in stats else None)
    names = list(mods)
    owner = {name: (k % dist.world if dist is not None else 0) for k, name in enumerate(names)}
    mine = [n for n in names if dist is None or owner[n] == dist.rank]
    if dist is not None:  # statistics no layer of this rank needs are dropped at once
        for n in names:
            if n not in mine:
                stats.release(n, set(names) - set(mine))
    finished: set[str] = set(n for n in names if n not in mine)
    results = {}
    for name in mine:
        result = q(name, mods[name], stats[name] if name in stats else None, ctx.output_error)
        result.report.block = i
        finished.add(name)
        stats.release(name, finished)
        if dist is None:
            ctx.replace(name, ctx.sink(name, mods[name], result))
            ctx.report.layers.append(result.report)
            del result
        else:
            results[name] = result
        trim_heap()  # per-layer temporaries are tens of MB: give them back before the next layer
    if dist is not None:
        from ..distributed import broadcast_result

        for name in names:
            result = broadcast_result(dist, results.pop(name, None), owner[name], name, mods[name], q)
            ctx.replace(name, ctx.sink(name, mods[name], result))
            ctx.report.layers.append(result.report)
    return ctx.report.layers[-len(names):]


def _offload(ctx: DriverContext, placer, i: int, block: nn.Module, prefix: str, names) -> None:
    placer.offload(i, block, prefix)
    if getattr(placer, "drops", False):  # the replaced fp layers of a streamed block go too
        for name in names:
            if name in ctx.replaced:
                release(ctx.replaced[name])
    trim_heap()


def _plan(ctx: DriverContext, block: nn.Module, prefix: str, names: dict[str, nn.Module], probe, batches,
          device: torch.device) -> Plan:
    """Size one block's work (block 0 stands for all) and place the activations within the budgets."""
    probe_hidden, probe_calls = probe
    mods = _block_modules(block, prefix, names)
    groups = probe_shared_inputs(mods, lambda: probe_calls[0](block, probe_hidden)) if mods else {}
    widths = [linear_shape(mods[r])[1] for r in set(groups.values())]
    stats = sum(8 * w * w if "xtx" in ctx.kinds else 8 * w * len(ctx.kinds) for w in widths)
    solve = max((4 * i * i + 28 * o * i for o, i in (linear_shape(m) for m in mods.values())), default=0)
    weights = sum(p.numel() * p.element_size() for p in block.parameters())
    needs = BlockNeeds(weights, stats, solve, activation_bytes(batches, probe_hidden.shape[-1], probe_hidden.dtype))
    gpu_budget = ctx.gpu_memory
    if device.type == "cuda" and gpu_budget is None:
        free, _ = torch.cuda.mem_get_info(device)
        gpu_budget = int(0.9 * free)
    return plan_placement(str(device), needs, gpu_budget, ctx.max_memory)


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
