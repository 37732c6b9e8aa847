"""A guard for recipes that cannot be proven better: keep one only if it beats plain qera-exact.

Rank allocation, output weighting, GPTQ rounding, qera-iter and refinement each lower the
perplexity on average, but none is optimal for the model's loss, and each has made some model
worse (issue 28: the fisher allocation nearly tripled Gemma-3's perplexity). The guard holds out
one calibration batch in eight, quantizes the model twice on the others, once with the recipe and
once with its baseline (RTN → qera-exact, every layer at the uniform rank whose A/B parameters fit
the same budget, no weighting, no refinement), scores both on the held-out batches by the model's
own loss, and keeps the lower. The kept run's report says what was compared
(:attr:`QuantReport.guard`).

Cost: two solves (the one-shot statistics are recorded once and shared) or, in the sequential
pipeline, two runs; plus two loss passes over the held-out batches. The kept model was calibrated
on 7/8 of the batches.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Mapping, Sequence

import torch
from torch import nn

from qera.calibrate.forward import collect_statistics, model_device
from qera.core.allocation import budget_params
from qera.core.config import QuantConfig
from qera.core.report import QuantReport
from qera.nn.targets import linear_shape, replace_module, restore_modules
from qera.quantize.pipeline import plan_run, quantize_model, stats_kinds_for
from qera.quantize.refine import split_batches
from qera.util.errors import QeraError

log = logging.getLogger(__name__)

MIN_BATCHES = 4  # fewer: nothing could be held out


def baseline_config(config: QuantConfig, shapes: Mapping[str, tuple[int, int]]) -> QuantConfig | None:
    """RTN → qera-exact at the same A/B parameters or fewer: the uniform rank ``⌊budget / Σ(out+in)⌋``
    when ranks are allocated, else ``config.rank``; no output weighting, no refinement. None when
    ``config`` is that already, or has no low-rank term (nothing to compare at the same bits).

    shapes: ``{layer: (out, in)}`` of the targets.
    """
    if config.rank == 0:
        return None
    rank = config.rank
    if config.allocates:
        bits = torch.finfo(getattr(torch, config.lowrank_dtype)).bits  # as LayerQuantizer.lowrank_bits
        params = budget_params(shapes, config.rank_budget, config.extra_bits, bits)
        rank = max(1, params // sum(o + i for o, i in shapes.values()))
    base = dataclasses.replace(config, method="qera-exact", rank=rank, rank_budget=None, extra_bits=None,
                               rank_normalize="auto", output_weight="none", rounding="rtn", method_options={},
                               refine_steps=0)
    if base.pipeline == "sequential" and base.propagate == "fp":
        base = dataclasses.replace(base, pipeline="oneshot")  # the same statistics, shared with the recipe
    same = dataclasses.replace(config, pipeline=base.pipeline, refine_lr=base.refine_lr,
                               refine_train=base.refine_train)
    return None if same == base else base


def heldout_loss(model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]]) -> float:
    """Mean next-token loss of ``model`` over ``batches`` (padding excluded), summed in float64."""
    dev = model_device(model)
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            ids = b["input_ids"].to(dev)
            mask = b.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else mask.to(dev)
            labels = ids.masked_fill(mask == 0, -100)
            for r in range(ids.shape[0]):  # one row at a time: the logits of a large vocabulary stay small
                n = int((labels[r, 1:] != -100).sum())
                if n == 0:
                    continue
                out = model(input_ids=ids[r:r + 1], attention_mask=mask[r:r + 1], labels=labels[r:r + 1],
                            use_cache=False)
                loss = getattr(out, "loss", None)
                if loss is None:
                    raise QeraError(f"the guard scores held-out batches by the model's loss, but "
                                    f"{type(model).__name__} returns none for labels (it needs a causal language model)")
                total += float(loss.double()) * n
                count += n
    if count == 0:
        raise QeraError("the guard's held-out batches have no token to score")
    return total / count


def quantize_guarded(model: nn.Module, config: QuantConfig, calibration: Sequence[Mapping[str, torch.Tensor]],
                     *, progress: bool = True, **kwargs) -> QuantReport:
    """Quantize ``model`` in place with ``config`` or with its :func:`baseline_config`, whichever has the
    lower loss on held-out calibration batches (ties keep ``config``). ``kwargs`` go to
    :func:`~qera.quantize.pipeline.quantize_model` (not ``stats``: the guard records its own).
    Without a baseline the run is plain :func:`quantize_model` on every batch.
    """
    if kwargs.get("stats") is not None:
        raise QeraError("the guard records its own statistics from the calibration batches: do not pass stats")
    kwargs.pop("stats", None)
    calibration = list(calibration or [])
    max_memory = kwargs.get("max_memory")
    plan = plan_run(model, config, calibration, None, max_memory)  # unfuses MoE experts first: all targets
    targets = plan.targets
    base = baseline_config(config, {n: linear_shape(m) for n, m in targets.items()})
    if base is None:
        log.info("guard: %s %s is plain qera-exact already; nothing to compare", config.method, config.format)
        return quantize_model(model, config, calibration, progress=progress, **kwargs)
    if len(calibration) < MIN_BATCHES:
        raise QeraError(f"the guard holds out one calibration batch in eight and needs at least {MIN_BATCHES} batches, "
                        f"got {len(calibration)}")
    train_i, held_i = split_batches(len(calibration))
    train, held = [calibration[i] for i in train_i], [calibration[i] for i in held_i]
    pipelines = [plan_run(model, c, train, None, max_memory).config.pipeline for c in (config, base)]
    stats = None
    if all(p == "oneshot" for p in pipelines):  # recorded once, for both solves
        kinds = stats_kinds_for(config) | stats_kinds_for(base)
        stats = collect_statistics(model, train, list(targets), kinds, progress=progress,
                                   precision=config.stats_precision)
    originals = dict(targets)
    runs: list[tuple[QuantReport, dict[str, nn.Module], float]] = []
    try:
        for cfg in (config, base):
            rep = quantize_model(model, cfg, train, stats=stats, progress=progress, **kwargs)
            loss = heldout_loss(model, held)
            runs.append((rep, {n: model.get_submodule(n) for n in originals}, loss))
            restore_modules(model, originals)
    except BaseException:
        restore_modules(model, originals)
        raise
    best = min(range(len(runs)), key=lambda i: (runs[i][2], i))
    rep, layers, _ = runs[best]
    for name, mod in layers.items():
        replace_module(model, name, mod)
    rep.guard = {"kept": "recipe" if best == 0 else "baseline", "recipe_loss": runs[0][2], "baseline_loss": runs[1][2],
                 "baseline": {"method": base.method, "rank": base.rank, "rounding": base.rounding},
                 "heldout_batches": len(held), "train_batches": len(train)}
    line = (f"guard: kept the {rep.guard['kept']} (held-out loss {runs[0][2]:.4f} with the recipe, {runs[1][2]:.4f} "
            f"with RTN -> qera-exact at uniform rank {base.rank}; perplexity {math.exp(runs[0][2]):.2f} vs "
            f"{math.exp(runs[1][2]):.2f}) on {len(held)} held-out calibration batches")
    rep.notes.append(line)
    log.info("%s", line)
    return rep


def quantize_guarded_and_save(model: nn.Module | str | os.PathLike, config: QuantConfig, out: str | os.PathLike, *,
                              tokenizer=None, calibration=None, stats=None, overwrite: bool = False,
                              resume: bool = False, dtype=None, **kwargs) -> QuantReport:
    """:func:`quantize_guarded`, then the kept run written to ``out`` (like
    :func:`~qera.quantize.pipeline.quantize_and_save`, but in memory: no streaming, no resume).
    ``model``: a model or a local model directory; ``kwargs`` go to :func:`quantize_guarded`."""
    from qera.io.checkpoint import save_quantized
    from qera.io.checkpoint.writer import parse_dtype
    from qera.quantize.distributed import Dist
    from qera.util.atomic import refuse_existing

    if resume:
        raise QeraError("guard compares two whole runs in memory, so it cannot resume (drop --resume or --guard)")
    if stats is not None:
        raise QeraError("guard records its statistics from the calibration batches: drop the statistics file")
    if calibration is None:
        raise QeraError("guard needs calibration batches (it holds one in eight out to compare the runs)")
    if Dist.current() is not None:
        raise QeraError("guard is not supported with several processes (torchrun)")
    if not isinstance(model, nn.Module):
        from qera.io.models import load_model

        model, tok = load_model(str(model))
        tokenizer = tokenizer if tokenizer is not None else tok
    out = refuse_existing(out, overwrite)  # before the slow work, not after it
    report = quantize_guarded(model, config, calibration, **kwargs)
    save_quantized(model, tokenizer, out, overwrite=overwrite, report=report, dtype=parse_dtype(dtype))
    return report
