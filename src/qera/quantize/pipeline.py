"""``quantize_model`` and ``quantize_and_save``: pick a driver, run the per-layer step over a model.

- :func:`quantize_model` quantizes a model in memory, in place (every target becomes a
  :class:`~qera.nn.modules.QERALinear`), with the one-shot or the sequential driver.
- :func:`quantize_and_save` writes a checkpoint; with the sequential pipeline each block is
  written as it finishes, a model in a local safetensors directory is streamed (never whole in
  memory), and ``resume=True`` continues an interrupted run after its last finished block.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import logging
import os
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from qera.core.config import CONFIG_VERSION, LOWRANK_DTYPES, QuantConfig
from qera.quantize.drivers import DRIVERS, DriverContext
from qera.quantize.drivers.base import check_given_stats
from qera.quantize.collect import oneshot_stats_estimate
from qera.util.errors import QeraError
from qera.quantize.layer import LayerQuantizer, ptq_sink
from qera.util.memory import default_budget, format_size, parse_size
from qera.core.methods import METHODS
from qera.nn.moe import unfuse_experts, unfused_names
from qera.core.report import LayerReport, QuantReport
from qera.core.rounding import rounding_needs
from qera.calibrate.store import CalibrationStats
from qera.core.statistics import provided
from qera.nn.targets import find_blocks, find_targets, linear_shape, replace_module

log = logging.getLogger(__name__)
plan_log = logging.getLogger("qera.plan")  # decisions a user should see before slow work (the CLI shows them)

__all__ = [
    "CONFIG_VERSION", "LOWRANK_DTYPES", "LayerReport", "QuantConfig", "QuantReport", "quantize_model",
    "quantize_and_save", "replace_module", "stats_kinds_for", "choose_pipeline", "plan_run", "RunPlan",
    "resolve_device",
]


def stats_kinds_for(config: QuantConfig, report_output_error: bool = False) -> frozenset[str]:
    """Statistics a run collects: what the method needs, plus ``xtx`` for output-error reports."""
    kinds = set(METHODS.get(config.method).needs) | rounding_needs(config.rounding)
    if report_output_error:
        kinds.add("xtx")
    return frozenset(kinds)


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """``auto`` → CUDA when available, else CPU; None stays None (keep the model where it is)."""
    if device is None:
        return None
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QeraError("device cuda was asked for, but no CUDA GPU is available (use --device cpu or auto)")
    return dev


def choose_pipeline(config: QuantConfig, model: nn.Module, targets: Mapping[str, nn.Module], kinds: frozenset[str],
                    calibration, max_memory: int | None, lazy: bool = False) -> tuple[str, str | None]:
    """The pipeline to run for ``config.pipeline == "auto"``: ``(name, why)``."""
    from qera.quantize.distributed import Dist

    if Dist.current() is not None:
        if config.pipeline == "oneshot":
            raise QeraError("several processes (torchrun) need pipeline='sequential' or 'auto', not 'oneshot'")
        return "sequential", ("several processes split the calibration data block by block"
                              if config.pipeline == "auto" else None)
    if config.pipeline != "auto":
        return config.pipeline, None
    if lazy:
        return "sequential", "the model is streamed from its shards, so it is quantized block by block"
    if config.propagate == "quantized":
        return "sequential", "propagate='quantized' needs the sequential pipeline"
    if config.refines:
        return "sequential", "refinement runs block by block"
    if config.output_weight == "block":
        return "sequential", "output_weight='block' is measured block by block"
    budget = max_memory if max_memory is not None else default_budget()
    probe = next(iter(calibration), None) if calibration is not None else None
    need = oneshot_stats_estimate(model, targets, kinds, probe)
    if need > budget:
        return "sequential", (f"one-shot statistics need {format_size(need)}, over the memory budget of "
                              f"{format_size(budget)}: quantizing block by block")
    return "oneshot", f"one-shot statistics need {format_size(need)}, within the budget of {format_size(budget)}"


@dataclass
class RunPlan:
    """What a run decides once, before any slow work: its targets, the statistics it collects, the
    pipeline (``config.pipeline`` resolved; ``why``: the reason when it was chosen, not given) and
    the per-layer step (``quantizer``, which has checked every target's shape against the format)."""

    config: QuantConfig
    targets: dict[str, nn.Module]
    kinds: frozenset[str]
    quantizer: LayerQuantizer
    why: str | None = None


def plan_run(model: nn.Module, config: QuantConfig, calibration: list | None, report_output_error: bool | None,
             max_memory: int | str | None, lazy: bool = False) -> RunPlan:
    """Unfuse MoE experts, find the targets, the statistics kinds and the pipeline, once per run."""
    unfuse_experts(model)
    targets = find_targets(model, config.include, config.exclude)
    kinds = stats_kinds_for(config, bool(report_output_error))
    name, why = choose_pipeline(config, model, targets, kinds, calibration, parse_size(max_memory, "max_memory"), lazy)
    config = dataclasses.replace(config, pipeline=name)
    quantizer = LayerQuantizer(config)
    for tname, mod in targets.items():  # a shape the format cannot store stops the run before any calibration
        quantizer.format_for(tname, linear_shape(mod))
    if why:
        plan_log.info("pipeline %s: %s", name, why)
    return RunPlan(config, targets, kinds, quantizer, why)


def _context(model, plan: RunPlan, calibration, stats, report_output_error, progress, device, max_memory, gpu_memory,
             offload_dir, sink, placer=None, writer=None) -> DriverContext:
    config, name, quantizer = plan.config, plan.config.pipeline, plan.quantizer
    max_memory = parse_size(max_memory, "max_memory")
    gpu_memory = parse_size(gpu_memory, "gpu_memory")
    report = QuantReport(config, pipeline=name)
    if plan.why:
        report.notes.append(f"pipeline {name}: {plan.why}")
    check_given_stats(config, stats)
    if plan.kinds and stats is not None:
        missing = plan.kinds - provided(stats.kinds)
        if missing:
            raise QeraError(f"the given statistics lack {sorted(missing)} needed by {config.method}; recalibrate with them")
    if plan.kinds and stats is None and calibration is None:
        raise QeraError(f"method {config.method!r} needs calibration data or precomputed statistics")
    from qera.quantize.distributed import Dist

    dist = Dist.current()
    if dist is not None and not dist.is_main:
        progress = False
    return DriverContext(
        dist=dist, model=model, targets=plan.targets, quantizer=quantizer, report=report,
        sink=sink or ptq_sink(getattr(torch, config.lowrank_dtype), act_format=config.act_format),
        calibration=calibration, stats=stats,
        kinds=plan.kinds, output_error=report_output_error is not False, progress=progress,
        device=resolve_device(device), max_memory=max_memory if max_memory is not None else default_budget(),
        gpu_memory=gpu_memory, offload_dir=offload_dir, placer=placer, writer=writer,
    )


def quantize_model(
    model: nn.Module,
    config: QuantConfig,
    calibration: Iterable[Mapping[str, torch.Tensor]] | None = None,
    stats: CalibrationStats | None = None,
    report_output_error: bool | None = None,
    progress: bool = True,
    *,
    device: str | torch.device | None = None,
    max_memory: int | str | None = None,
    gpu_memory: int | str | None = None,
    offload_dir: str | os.PathLike | None = None,
    sink=None,
) -> QuantReport:
    """Quantize ``model`` in place: every target linear layer becomes a :class:`QERALinear`.

    Args:
        calibration: batches (dicts with ``input_ids``/``attention_mask``) for the statistics the
            method needs; or pass precomputed ``stats`` (from :func:`collect_statistics`; one-shot only).
        report_output_error: ``True`` also collects ``Σxᵀx`` so the report holds layer output
            errors; ``None`` reports them when the statistics have ``Σxᵀx``; ``False`` never.
        device: where the sequential pipeline computes each block (``auto``, ``cuda``, ``cpu``).
        max_memory: host memory budget (bytes or ``"8GiB"``): ``pipeline="auto"`` chooses from it,
            and cached activations beyond it go to ``offload_dir``. gpu_memory: the same on the GPU.
        sink: builds each replacement module (default: ``QERALinear`` with ``A``, ``B``).
    Returns:
        A :class:`QuantReport` with per-layer errors, bits and timings. If anything fails, every
        replaced layer is put back: the model is never left half-quantized.
    """
    calibration = list(calibration) if calibration is not None else None
    plan = plan_run(model, config, calibration, report_output_error, max_memory)
    ctx = _context(model, plan, calibration, stats, report_output_error, progress, device, max_memory,
                   gpu_memory, offload_dir, sink)
    try:
        DRIVERS.get(ctx.report.pipeline)(ctx)
    except BaseException:
        ctx.restore()
        raise
    _summarize(ctx.report, ctx.dist)
    return ctx.report


def _summarize(report: QuantReport, dist=None) -> None:
    """Warnings about the run as a whole, once: by the one process that speaks for it under torchrun
    (per-layer details are logged at INFO)."""
    line = report.singular_summary()
    if line and (dist is None or dist.is_main):
        log.warning("%s", line)
    fallback = [lr.format for lr in report.layers if lr.format != report.config.format]
    if fallback:
        kinds = sorted(set(fallback))
        line = (f"{len(fallback)} of {len(report.layers)} layers in the fallback format {', '.join(kinds)}: "
                f"{report.config.format} cannot store their input width")
        report.notes.append(line)
        if dist is None or dist.is_main:
            log.info("%s", line)


def _fingerprint(config: QuantConfig, model: nn.Module, calibration, source_id: str) -> str:
    from qera.io.checkpoint import fingerprint_of

    cfg = getattr(model, "config", None)
    parts: list = [config.to_dict(), source_id, cfg.to_dict() if hasattr(cfg, "to_dict") else None]
    for b in calibration or []:
        parts.extend(b[k] for k in sorted(b) if torch.is_tensor(b[k]))
    return fingerprint_of(*parts)


def quantize_and_save(
    model: nn.Module | str | os.PathLike,
    config: QuantConfig,
    out: str | os.PathLike,
    *,
    tokenizer=None,
    calibration: Iterable[Mapping[str, torch.Tensor]] | None = None,
    stats: CalibrationStats | None = None,
    overwrite: bool = False,
    resume: bool = False,
    report_output_error: bool | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    max_memory: int | str | None = None,
    gpu_memory: int | str | None = None,
    offload_dir: str | os.PathLike | None = None,
    dtype: torch.dtype | str | None = None,
) -> QuantReport:
    """Quantize and write a checkpoint to ``out``.

    ``dtype``: storage dtype of the non-quantized weights (embeddings, norms, LM head); None keeps them.

    ``model`` is a model object or the path of a local directory with ``config.json`` and
    safetensors weights. A path with the sequential pipeline (``auto`` chooses it for paths) is
    streamed: the model is built on the meta device and each block's weights are read when the
    block is processed, then dropped. With the sequential pipeline each finished block is written
    at once; ``resume=True`` continues an interrupted run with the same model, configuration and
    calibration after its last finished block (the result is bit-identical to an uninterrupted run).
    """
    from qera.io.checkpoint import CheckpointWriter, buffer_dtypes, rest_tensors, save_quantized
    from qera.io.checkpoint.writer import parse_dtype
    from qera.quantize.placer import StreamingPlacer
    from qera.io.lazy import load_model_lazy

    dtype = parse_dtype(dtype)

    out = Path(out)
    source = None
    lazy = not isinstance(model, nn.Module)
    if lazy:
        path = Path(model)
        lazy_ok = config.pipeline in ("sequential", "auto")
        if not lazy_ok:
            from qera.io.models import load_model

            model, tok = load_model(str(path))
            tokenizer = tokenizer if tokenizer is not None else tok
            lazy = False
        else:
            model, tok, source = load_model_lazy(path)
            tokenizer = tokenizer if tokenizer is not None else tok
    source_id = str(getattr(source, "directory", "") or getattr(getattr(model, "config", None), "_name_or_path", ""))
    calibration = list(calibration) if calibration is not None else None
    dev = resolve_device(device)
    placer = StreamingPlacer(source, dev or torch.device("cpu")) if source is not None else None
    writer = None
    plan = plan_run(model, config, calibration, report_output_error, max_memory, lazy)
    config, pipeline = plan.config, plan.config.pipeline
    from qera.quantize.distributed import Dist

    dist = Dist.current()
    if pipeline == "sequential" and (dist is None or dist.is_main):  # rank 0 alone writes
        writer = CheckpointWriter(out, overwrite=overwrite, resume=resume,
                                  fingerprint=_fingerprint(config, model, calibration, source_id), dtype=dtype)
    elif resume:
        log.info("resume applies to the sequential pipeline only; the one-shot run starts from scratch")
    try:
        ctx = _context(model, plan, calibration, stats, report_output_error, progress, dev, max_memory,
                       gpu_memory, offload_dir, None, placer, writer)
        DRIVERS.get(ctx.report.pipeline)(ctx)
        if dist is not None and not dist.is_main:
            pass
        elif writer is None:
            save_quantized(model, tokenizer, out, overwrite=overwrite, report=ctx.report, dtype=dtype)
        else:
            blocks_name, _ = find_blocks(model, list(ctx.targets))
            rest, tied = rest_tensors(model, f"{blocks_name}.", source)
            writer.finalize(
                rest, tied=tied, quant_config=ctx.report.config, quality=ctx.report.quality(),
                hf_config=getattr(model, "config", None), generation_config=getattr(model, "generation_config", None),
                tokenizer=tokenizer, unfused=unfused_names(model), buffer_dtypes=buffer_dtypes(model),
            )
    except BaseException:
        if writer is not None:
            writer.close(success=False)
        raise
    if dist is not None:
        dist.barrier()  # every rank returns once the checkpoint exists
    _summarize(ctx.report, ctx.dist)
    return ctx.report
