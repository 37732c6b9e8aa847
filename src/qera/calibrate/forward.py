"""One-shot calibration: run the whole model over calibration batches with statistics recorded.

The hooks live in :mod:`qera.calibrate.recording`; this module only knows how to run a model from
``input_ids`` (and its ``attention_mask``) and which sub-model to run.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from qera.util.errors import QeraError
from qera.calibrate.recording import probe_shared_inputs, record_runs
from qera.calibrate.store import CalibrationStats
from qera.core.selection import DEFAULT_EXCLUDE, DEFAULT_INCLUDE
from qera.nn.targets import find_targets

log = logging.getLogger(__name__)

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

__all__ = [
    "CalibrationStats", "DEFAULT_EXCLUDE", "DEFAULT_INCLUDE", "collect_statistics", "find_targets",
    "group_shared_inputs", "run_model", "runner_for", "row_mask",
]


def runner_for(model: nn.Module, targets: Iterable[str]) -> nn.Module:
    """The smallest sub-model to run: the decoder when every target lives inside it (skips the LM head)."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if isinstance(decoder, nn.Module) and decoder is not model:
        prefix = next((n for n, m in model.named_modules() if m is decoder), None)
        if prefix and all(t.startswith(prefix + ".") for t in targets):
            return decoder
    return model


@functools.lru_cache(maxsize=None)
def _accepts_use_cache(cls: type) -> bool:
    """Whether ``cls.forward`` takes ``use_cache`` (checked once per class, not per batch)."""
    try:
        return "use_cache" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False


def run_model(module: nn.Module, batch: Mapping[str, torch.Tensor], device: torch.device | str) -> object:
    """``module(**batch)`` with the model inputs moved to ``device`` and the KV cache off."""
    inputs = {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS}
    if _accepts_use_cache(type(module)):
        return module(**inputs, use_cache=False)
    return module(**inputs)


def row_mask(batch: Mapping[str, torch.Tensor], device: torch.device | str) -> torch.Tensor | None:
    """The rows to keep (``attention_mask != 0``), or None when no row is padding."""
    m = batch.get("attention_mask")
    return None if m is None or bool(m.all()) else m.to(device).bool()


def probe_batch(batch: Mapping[str, torch.Tensor], tokens: int = 4) -> dict[str, torch.Tensor]:
    """The first few tokens of the first row: enough to see which layers share an input."""
    return {k: v[:1, : min(v.shape[1], tokens)] for k, v in batch.items() if torch.is_tensor(v) and v.dim() == 2}


def model_device(model: nn.Module) -> torch.device:
    p = next((p for p in model.parameters() if p.device.type != "meta"), None)
    return p.device if p is not None else torch.device("cpu")


def group_shared_inputs(model: nn.Module, names: Sequence[str], batch: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Map each target to the first target (in module order) that receives the identical input tensor."""
    modules = dict(model.named_modules())
    runner = runner_for(model, names)
    return probe_shared_inputs(
        {n: modules[n] for n in names}, lambda: run_model(runner, probe_batch(batch), model_device(model))
    )


def collect_statistics(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    targets: Sequence[str] | Mapping[str, nn.Module] | None = None,
    kinds: Iterable[str] = ("abs", "sq"),
    share_inputs: bool = True,
    progress: bool = True,
    precision: str = "mixed",
) -> CalibrationStats:
    """Run the full-precision model over ``batches`` and accumulate input statistics of ``targets``.

    Args:
        batches: dicts with ``input_ids`` (B, T) and optionally ``attention_mask`` (B, T).
        targets: layer names (default: :func:`find_targets`).
        kinds: statistics to keep (``abs``, ``sq``, ``xtx``).
        precision: ``mixed`` (float32 chunk sums; tensor cores for bf16 on a GPU) or ``float64``.
    """
    batches = list(batches)
    if not batches:
        raise QeraError("no calibration batches")
    names = list(targets) if targets is not None else list(find_targets(model))
    all_modules = dict(model.named_modules())
    missing = [n for n in names if n not in all_modules]
    if missing:
        raise QeraError(f"target layer(s) not in the model: {missing[:5]}")
    modules = {n: all_modules[n] for n in names}
    was_training = model.training
    model.eval()
    device = model_device(model)
    runner = runner_for(model, names)
    try:
        groups = group_shared_inputs(model, names, batches[0]) if share_inputs else {n: n for n in names}
        runs = ((row_mask(b, device), functools.partial(run_model, runner, b, device))
                for b in tqdm(batches, desc="calibrating", unit="batch", disable=not progress))
        stats = record_runs(modules, kinds, groups, runs, precision=precision)
    finally:
        model.train(was_training)
    log.info("collected %s for %d inputs of %d layers", sorted(kinds), len(stats.stats), len(names))
    stats.extra["kinds"] = ",".join(sorted(frozenset(kinds)))
    stats.extra["precision"] = precision
    return stats
