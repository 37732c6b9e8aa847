"""What every driver receives: the model, its targets, the per-layer step and the run options."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from qera.quantize.layer import LayerQuantizer, LayerResult
from qera.core.report import QuantReport
from qera.calibrate.store import CalibrationStats
from qera.nn.targets import replace_module, restore_modules
from qera.core.config import QuantConfig
from qera.util.errors import QeraError


@dataclass
class DriverContext:
    """Inputs of one quantization run.

    calibration: batches (``input_ids``/``attention_mask``) or None when ``stats`` are given.
    kinds: statistics to collect (the method's needs, plus ``xtx`` when output errors are reported).
    output_error: report layer output errors where ``Σxᵀx`` is available.
    sink: builds each replacement module from a :class:`~qera.quantize.layer.LayerResult`.
    device: where blocks are computed (sequential); None keeps the model where it is.
    max_memory / gpu_memory: budgets (bytes) for host and device placement decisions.
    offload_dir: where cached activations go when they exceed the host budget.
    placer: onloads/offloads blocks (in memory, or streamed from shards).
    writer: streaming checkpoint writer (sequential), or None.
    """

    model: nn.Module
    targets: dict[str, nn.Module]
    quantizer: LayerQuantizer
    report: QuantReport
    sink: Callable[[str, nn.Module, LayerResult], nn.Module]
    calibration: Sequence[Mapping[str, torch.Tensor]] | None = None
    stats: CalibrationStats | None = None
    kinds: frozenset[str] = frozenset()
    output_error: bool = True
    progress: bool = True
    device: torch.device | None = None
    max_memory: int | None = None
    gpu_memory: int | None = None
    offload_dir: str | os.PathLike | None = None
    placer: object | None = None
    writer: object | None = None
    dist: object | None = None  # qera.quantize.distributed.Dist when running under torchrun (sequential only)
    replaced: dict[str, nn.Module] = field(default_factory=dict)

    def replace(self, name: str, new: nn.Module) -> None:
        """Swap a layer, remembering the original so that a failed run can put it back."""
        old = replace_module(self.model, name, new)
        self.replaced.setdefault(name, old)

    def keep(self, name: str, module: nn.Module, result: LayerResult) -> None:
        """The drivers' sink: replace the layer by ``self.sink``'s module and keep its report."""
        self.replace(name, self.sink(name, module, result))
        self.report.layers.append(result.report)

    def restore(self) -> None:
        """Put every replaced layer back (the caller's model is never left half-quantized)."""
        restore_modules(self.model, self.replaced)
        self.replaced.clear()


def check_given_stats(config: QuantConfig, stats: CalibrationStats | None) -> None:
    """Given statistics are those of the full-precision model: every run can use them except one that
    propagates the quantized model's activations (sequential, ``propagate="quantized"``), whose block
    inputs exist only during the run."""
    if stats is not None and config.propagate == "quantized" and config.pipeline != "oneshot":
        raise QeraError("given statistics cannot be used with propagate='quantized': each block's inputs come from "
                        "the blocks quantized before it, so they are recorded during the run (drop the statistics "
                        "file, or use propagate='fp')")


def output_metrics(ctx: DriverContext) -> dict[str, torch.Tensor] | None:
    """The layers' output metrics of ``output_weight`` (None for ``none``): one loss-gradient pass
    of the whole full-precision model over the calibration batches, before any layer is replaced.
    Both drivers call it; it needs the whole model in memory, in one process."""
    from qera.calibrate import sensitivity

    ow = ctx.quantizer.config.output_weight
    if ow in ("none", "block"):  # block: measured per block by the sequential driver
        return None
    if ctx.dist is not None:
        raise QeraError(f"output_weight={ow!r} is not supported with several processes (torchrun)")
    if any(p.device.type == "meta" for p in ctx.model.parameters()):
        raise QeraError(f"output_weight={ow!r} needs the whole model's loss gradients, so the whole model in memory: "
                        "it cannot be streamed from its shards")
    return sensitivity.output_fisher(ctx.model, ctx.calibration or [], ctx.targets, ctx.progress, full=ow == "kfac")
