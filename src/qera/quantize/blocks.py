"""Walking a model one decoder block at a time over its captured block inputs.

:class:`BlockWalk` sets the walk up once (the blocks, each block's targets, the placer, the memory
plan, the captured inputs); :func:`walk_blocks` is the one block loop: onload a block (prefetching the
next), hand it to a visitor, send it home, and on an error send the block in hand home before the
error goes on. The sequential driver's visitor records, solves and replaces a block's layers;
streamed calibration's visitor records the block's statistics to a file. :func:`record_block` and
:func:`propagate_block` are the two ways a visitor runs the cached inputs through a block.
"""

from __future__ import annotations

import functools
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from qera.calibrate.capture import (
    activation_bytes,
    block_output_is_tuple,
    call_bytes,
    capture_block_inputs,
    capture_probe,
)
from qera.calibrate.forward import model_device, runner_for
from qera.calibrate.recording import probe_shared_inputs, record_runs
from qera.io.lazy import canonical_device
from qera.nn.targets import block_index, find_blocks, linear_shape
from qera.quantize.placement import BlockNeeds, Plan, plan_placement
from qera.quantize.placer import Placer
from qera.util.errors import QeraError
from qera.util.memory import trim_heap
from qera.util.timing import PhaseTimer

log = logging.getLogger(__name__)
plan_log = logging.getLogger("qera.plan")


def split_by_block(targets: dict[str, nn.Module], blocks_name: str) -> dict[int, dict[str, nn.Module]]:
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


def block_modules(block: nn.Module, prefix: str, names: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The current module objects of ``names`` (they change when a block is re-materialized)."""
    return {n: block.get_submodule(n[len(prefix):]) for n in names}


class _NoCache:
    def close(self) -> None:
        pass


@dataclass
class NoInputs:
    """The captured inputs of a walk that runs nothing through the blocks: no batches, no cache."""

    calls: list = field(default_factory=list)
    cache: _NoCache = field(default_factory=_NoCache)



@dataclass(frozen=True)
class RefineSize:
    """What the plan counts for block refinement: the low-rank terms' rank (a budget's mean rank) and
    the bytes each weight of ``W̃`` takes while it trains (float32 ``W̃``: 4; with its codes as int64
    for ``scales`` or ``rounding``: 12; with the rounding's anchor, step, offsets and their gradient: 28)."""

    rank: int
    weight_bytes: int = 4

@dataclass
class BlockWalk:
    """What walking a model block by block needs, set up once: the blocks, the targets of each, the
    placer, the plan and the captured block inputs (shared by quantization and streamed calibration)."""

    blocks_name: str
    blocks: nn.ModuleList
    by_block: dict[int, dict[str, nn.Module]]
    placer: Placer
    device: torch.device
    plan: Plan | None
    captured: object
    tokens: int
    notes: list[str]

    @classmethod
    def prepare(cls, model: nn.Module, targets: dict[str, nn.Module], batches: list, kinds, device, placer,
                max_memory: int | None, gpu_memory: int | None, offload_dir, dist=None,
                inputs: bool = True, refine: "RefineSize | None" = None) -> "BlockWalk":
        """Set the walk up; ``inputs=False`` walks the blocks without running anything through them
        (no batches, no captured activations: the statistics come from elsewhere). ``refine``: the
        blocks are refined (the plan counts a second activation stream and the refinement's working
        set, see :class:`RefineSize`)."""
        blocks_name, blocks = find_blocks(model, list(targets))
        by_block = split_by_block(targets, blocks_name)
        if not inputs:
            device = canonical_device(device) if device is not None else model_device(model)
            placer = placer if placer is not None else Placer(device)
            placer.onload(0, blocks[0], f"{blocks_name}.0.")
            return cls(blocks_name, blocks, by_block, placer, device, None, NoInputs(), 0, [])
        if not batches:
            raise QeraError("no calibration batches")
        if dist is not None:
            batches = dist.shard(batches)  # every world-th batch: statistics are summed across ranks
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
                     prefetch=placer.prefetches and len(blocks) > 1, calls=calls, refine=refine)
        plan_log.info("%s", plan.describe())
        captured = capture_block_inputs(runner, blocks, batches, input_device, device, tuple_out, plan.activations,
                                        probe, offload_dir=offload_dir)
        tokens = captured.tokens if dist is None else dist.sum_int(captured.tokens)
        return cls(blocks_name, blocks, by_block, placer, device, plan, captured, tokens,
                   [plan.describe(), *captured.notes])


def _plan(block: nn.Module, prefix: str, names: dict[str, nn.Module], probe, batches, device: torch.device, kinds,
          gpu_memory: int | None, max_memory: int | None, prefetch: bool = False, calls: int = 0,
          refine: "RefineSize | None" = None) -> Plan:
    """Size one block's work (block 0 stands for all) and place the activations within the budgets
    (``calls``: bytes of every batch's block-call tensors, see :func:`~qera.calibrate.capture.call_bytes`;
    ``refine``: see :meth:`BlockWalk.prepare`)."""
    probe_hidden, probe_calls = probe
    mods = block_modules(block, prefix, names)
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
    activations = activation_bytes(batches, probe_hidden.shape[-1], probe_hidden.dtype)
    refining = 0
    if refine is not None:
        shapes = [linear_shape(m) for m in mods.values()]
        tokens = max(b["input_ids"].numel() for b in batches)
        inter = max((max(o, i) for o, i in shapes), default=0)
        # W̃'s training copies per layer; A, B, their gradients and Adam's moments (4 float32 copies);
        # autograd's saved activations of one batch, ~(16·hidden + 4·intermediate) float32 values per token (estimate)
        refining = sum(refine.weight_bytes * o * i + 16 * refine.rank * (o + i) for o, i in shapes) \
            + 4 * tokens * (16 * probe_hidden.shape[-1] + 4 * inter)
        activations *= 2
    needs = BlockNeeds(weights, stats, solve, activations, ahead, calls, refining)
    gpu_budget = gpu_memory
    if device.type == "cuda" and gpu_budget is None:
        free, _ = torch.cuda.mem_get_info(device)
        gpu_budget = int(0.9 * free)
    return plan_placement(str(device), needs, gpu_budget, max_memory)




@dataclass
class BlockVisit:
    """One block of a walk, handed to the visitor: its index, module, name prefix (``model.layers.3.``),
    its targets (as found when the walk was set up) and each batch's call of it."""

    index: int
    block: nn.Module
    prefix: str
    names: dict[str, nn.Module]
    calls: list

    def modules(self) -> dict[str, nn.Module]:
        """The block's targets as they are now (a streamed block is re-materialized on onload)."""
        return block_modules(self.block, self.prefix, self.names)


def walk_blocks(walk: BlockWalk, visit: Callable[[BlockVisit], None], *, desc: str, progress: bool = True,
                timer: PhaseTimer | None = None, keep: Callable[[BlockVisit], list] | None = None,
                postfix: Callable[[], dict] | None = None) -> None:
    """The block loop: for each block, onload it (and prefetch the next), ``visit`` it, send it home.

    ``keep(visit)``: modules of the block that go home with it (the quantized layers that replaced
    its targets); ``timer`` times the ``onload`` and ``offload`` phases (the visitor times its own).
    On an error the block in hand goes home before the error goes on; the placer and the activation
    cache are closed in every case.
    """
    timer = timer if timer is not None else PhaseTimer(walk.device)
    blocks, name = walk.blocks, walk.blocks_name

    def send_home(v: BlockVisit) -> None:
        walk.placer.offload(v.index, v.block, v.prefix, keep(v) if keep is not None else ())
        trim_heap()

    bar = tqdm(range(len(blocks)), desc=desc, unit="block", disable=not progress)
    current = None
    try:
        for i in bar:
            current = BlockVisit(i, blocks[i], f"{name}.{i}.", walk.by_block.get(i, {}),
                                 [c[i] for c in walk.captured.calls])
            with timer("onload"):
                if i > 0:
                    walk.placer.onload(i, blocks[i], current.prefix)
                if i + 1 < len(blocks):  # the next block's weights come in while this one computes
                    walk.placer.prefetch(i + 1, blocks[i + 1], f"{name}.{i + 1}.")
            visit(current)
            with timer("offload"):
                send_home(current)
            current = None
            if postfix is not None:
                bar.set_postfix(**postfix())
        with timer("offload"):
            walk.placer.drain()  # the last block's background copy home
    except BaseException:
        if current is not None:  # the caller restores replaced layers; the block goes home first
            try:
                send_home(current)
            except Exception:  # never hide the error that brought us here
                log.exception("sending block %d home after an error failed", current.index)
        raise
    finally:
        walk.placer.close()
        walk.captured.cache.close()
        bar.close()


def propagate_block(block: nn.Module, calls, cache) -> None:
    """Replace each batch's cached input by the block's output."""
    with torch.no_grad():
        for b, call in enumerate(calls):
            cache.put(b, call(block, cache.get(b)))


def record_block(block: nn.Module, mods: dict[str, nn.Module], calls, cache, captured, i: int, kinds, precision: str,
                 keep_outputs: bool):
    """Run the cached inputs through the block with statistics recorded; with ``keep_outputs`` the
    outputs replace the inputs (``propagate="fp"``: no second forward). Returns the statistics."""
    probe_call = captured.probe_calls[i]
    groups = probe_shared_inputs(mods, lambda: probe_call(block, captured.probe_hidden))

    def run(b: int, call) -> None:
        out = call(block, cache.get(b))
        if keep_outputs:
            cache.put(b, out)

    runs = ((captured.masks[b], functools.partial(run, b, call)) for b, call in enumerate(calls))
    return record_runs(mods, kinds, groups, runs, precision=precision, pending=True)
