"""Calibration: find target layers, group layers that share an input, collect statistics.

Hooks are forward pre-hooks on the target ``nn.Linear`` modules, always removed in ``finally``.
Layers fed the very same input tensor (q/k/v; gate/up) share one :class:`ActivationStats`,
found by a one-token probe forward. Rows where ``attention_mask == 0`` are excluded.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import QeraError
from .statistics import ActivationStats, load_stats, load_stats_extra, save_stats

log = logging.getLogger(__name__)

# Every nn.Linear inside numbered decoder blocks (model.layers.N, model.decoder.layers.N,
# transformer.h.N, blocks.N, encoder.layer.N); never the LM head or embeddings.
DEFAULT_INCLUDE = (r"(^|\.)(layers|layer|h|blocks)\.\d+\.",)
DEFAULT_EXCLUDE = (r"(^|\.)lm_head$", r"embed", r"(^|\.)(classifier|score|pooler)(\.|$)")


def find_targets(
    model: nn.Module, include: Sequence[str] | None = None, exclude: Sequence[str] | None = None
) -> dict[str, nn.Linear]:
    """Named ``nn.Linear`` modules whose name matches an ``include`` regex and no ``exclude`` regex."""
    inc = [re.compile(p) for p in (include or DEFAULT_INCLUDE)]
    exc = [re.compile(p) for p in (DEFAULT_EXCLUDE if exclude is None else exclude)]
    out = {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and any(p.search(name) for p in inc) and not any(p.search(name) for p in exc)
    }
    if not out:
        raise QeraError(
            f"no nn.Linear layer matches the target patterns {[p.pattern for p in inc]} "
            f"(excluding {[p.pattern for p in exc]})"
        )
    return out


@dataclass
class CalibrationStats:
    """Statistics per distinct layer input; ``groups`` maps every layer name to its input's key."""

    stats: dict[str, ActivationStats]
    groups: dict[str, str]
    extra: dict = field(default_factory=dict)

    def __getitem__(self, layer: str) -> ActivationStats:
        try:
            return self.stats[self.groups[layer]]
        except KeyError:
            raise QeraError(f"no calibration statistics for layer {layer}") from None

    def __contains__(self, layer: str) -> bool:
        return layer in self.groups and self.groups[layer] in self.stats

    @property
    def kinds(self) -> frozenset[str]:
        return frozenset.intersection(*(s.kinds for s in self.stats.values())) if self.stats else frozenset()

    @property
    def tokens(self) -> int:
        return max((s.count for s in self.stats.values()), default=0)

    def release(self, layer: str, done: set[str]) -> None:
        """Free a statistic once every layer sharing it is in ``done``."""
        key = self.groups.get(layer)
        if key is not None and all(l in done for l, k in self.groups.items() if k == key):
            self.stats.pop(key, None)

    def save(self, path: str | os.PathLike) -> None:
        save_stats(self.stats, path, extra={**self.extra, "groups": json.dumps(self.groups)})

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "CalibrationStats":
        stats = load_stats(path, device)
        extra = load_stats_extra(path)
        groups = json.loads(extra.pop("groups", "{}")) or {k: k for k in stats}
        return cls(stats, groups, extra)


class _InputCapture:
    """Pre-hook target: records inputs (probe) or updates statistics (collection)."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None

    @staticmethod
    def first_input(args: tuple, kwargs: dict) -> torch.Tensor:
        return args[0] if args else kwargs["input"]


def _runner(model: nn.Module, targets: Iterable[str]) -> nn.Module:
    """The smallest sub-model to run: the decoder when every target lives inside it (skips the LM head)."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if isinstance(decoder, nn.Module) and decoder is not model:
        prefix = next((n for n, m in model.named_modules() if m is decoder), None)
        if prefix and all(t.startswith(prefix + ".") for t in targets):
            return decoder
    return model


def _forward(module: nn.Module, batch: Mapping[str, torch.Tensor], device: torch.device) -> None:
    inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    module(**inputs, use_cache=False) if _accepts_use_cache(type(module)) else module(**inputs)


@functools.lru_cache(maxsize=None)
def _accepts_use_cache(cls: type) -> bool:
    """Whether ``cls.forward`` takes ``use_cache`` (checked once per class, not per batch)."""
    try:
        return "use_cache" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False


def group_shared_inputs(model: nn.Module, names: Sequence[str], batch: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Map each target to the first target (in module order) that receives the identical input tensor."""
    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    handles = []
    probe = {k: v[:1, : min(v.shape[1], 4)] for k, v in batch.items() if torch.is_tensor(v) and v.dim() == 2}
    try:
        for name in names:
            def hook(mod, args, kwargs, name=name):
                seen[name] = _InputCapture.first_input(args, kwargs)
            handles.append(modules[name].register_forward_pre_hook(hook, with_kwargs=True))
        with torch.no_grad():
            _forward(_runner(model, names), probe, next(model.parameters()).device)
    finally:
        for h in handles:
            h.remove()
    groups: dict[str, str] = {}
    reps: list[str] = []
    for name in names:
        x = seen.get(name)
        rep = next((r for r in reps if x is not None and seen.get(r) is x), None)
        if rep is None:
            reps.append(name)
            rep = name
        groups[name] = rep
    return groups


def collect_statistics(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    targets: Sequence[str] | Mapping[str, nn.Module] | None = None,
    kinds: Iterable[str] = ("abs", "sq"),
    share_inputs: bool = True,
    progress: bool = True,
) -> CalibrationStats:
    """Run the full-precision model over ``batches`` and accumulate input statistics of ``targets``.

    Args:
        batches: dicts with ``input_ids`` (B, T) and optionally ``attention_mask`` (B, T).
        targets: layer names (default: :func:`find_targets`).
        kinds: statistics to keep (``abs``, ``sq``, ``xtx``).
    """
    batches = list(batches)
    if not batches:
        raise QeraError("no calibration batches")
    names = list(targets) if targets is not None else list(find_targets(model))
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise QeraError(f"target layer(s) not in the model: {missing[:5]}")
    was_training = model.training
    model.eval()
    groups = group_shared_inputs(model, names, batches[0]) if share_inputs else {n: n for n in names}
    stats = {
        rep: ActivationStats(modules[rep].in_features, frozenset(kinds), name=rep) for rep in dict.fromkeys(groups.values())
    }
    capture = _InputCapture()
    handles = []
    device = next(model.parameters()).device
    runner = _runner(model, names)
    try:
        for rep, st in stats.items():
            def hook(mod, args, kwargs, st=st):
                x = _InputCapture.first_input(args, kwargs).detach()
                mask = capture.mask
                if mask is not None and tuple(mask.shape) != tuple(x.shape[:-1]):
                    raise QeraError(
                        f"attention_mask shape {tuple(mask.shape)} does not match the input of {st.name} "
                        f"{tuple(x.shape[:-1])}"
                    )
                st.update(x, mask)
            handles.append(modules[rep].register_forward_pre_hook(hook, with_kwargs=True))
        with torch.no_grad():
            for batch in tqdm(batches, desc="calibrating", unit="batch", disable=not progress):
                m = batch.get("attention_mask")
                capture.mask = None if m is None or bool(m.all()) else m.to(device).bool()
                _forward(runner, batch, device)
    finally:
        for h in handles:
            h.remove()
        capture.mask = None
        model.train(was_training)
    log.info("collected %s for %d inputs of %d layers", sorted(kinds), len(stats), len(names))
    return CalibrationStats(stats, groups, {"kinds": ",".join(sorted(kinds))})
