"""Which modules are quantized, how to read their weight, and where the decoder blocks are.

A *target* is a linear-like module inside a numbered decoder block: ``nn.Linear`` and GPT-2's
``Conv1D`` (whose weight is stored transposed, ``(in, out)``). Every target is read through
:func:`linear_weight` as an ``(out, in)`` matrix, so the math never sees the difference.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from qera.util.registry import Registry
from qera.util.errors import QeraError
from qera.util.memory import trim_heap
from qera.core.selection import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, compile_patterns

@dataclass(frozen=True)
class LinearKind:
    """How to read one family of linear-like modules as ``y = x Wᵀ + b`` with ``W: (out, in)``."""

    matches: Callable[[nn.Module], bool]
    weight: Callable[[nn.Module], torch.Tensor]


LINEAR_KINDS: Registry[LinearKind] = Registry("linear kind")
LINEAR_KINDS.register("linear")(LinearKind(lambda m: isinstance(m, nn.Linear), lambda m: m.weight))


def _is_conv1d(m: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D: y = x W + b with W: (in, out); checked by name to avoid importing it
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and isinstance(getattr(m, "weight", None), torch.Tensor)


LINEAR_KINDS.register("conv1d")(LinearKind(_is_conv1d, lambda m: m.weight.T))


def linear_kind(module: nn.Module) -> LinearKind | None:
    for name in LINEAR_KINDS:
        kind = LINEAR_KINDS.get(name)
        if kind.matches(module):
            return kind
    return None


def is_linear(module: nn.Module) -> bool:
    return linear_kind(module) is not None


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as ``(out, in)`` (a view for ``Conv1D``; no copy)."""
    kind = linear_kind(module)
    if kind is None:
        raise QeraError(f"{type(module).__name__} is not a linear layer qera can quantize")
    return kind.weight(module)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` without touching the weight's data (works on meta)."""
    w = linear_weight(module)
    return int(w.shape[0]), int(w.shape[1])


def find_targets(
    model: nn.Module, include: Sequence[str] | None = None, exclude: Sequence[str] | None = None
) -> dict[str, nn.Module]:
    """Named linear-like modules whose name matches an ``include`` regex and no ``exclude`` regex."""
    inc = compile_patterns(include or DEFAULT_INCLUDE, "include")
    exc = compile_patterns(DEFAULT_EXCLUDE if exclude is None else exclude, "exclude")
    out = {
        name: mod
        for name, mod in model.named_modules()
        if is_linear(mod) and any(p.search(name) for p in inc) and not any(p.search(name) for p in exc)
    }
    if not out:
        raise QeraError(
            f"no linear layer matches the target patterns {[p.pattern for p in inc]} "
            f"(excluding {[p.pattern for p in exc]})"
        )
    return out


def find_blocks(model: nn.Module, targets: Sequence[str]) -> tuple[str, nn.ModuleList]:
    """The ``ModuleList`` of decoder blocks holding the targets: ``(its name, the list)``.

    The list chosen is the one whose children contain the most targets (``model.layers``,
    ``transformer.h``, ``model.decoder.layers`` ...).
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        prefix = f"{name}." if name else ""
        hits = sum(1 for t in targets if t.startswith(prefix) and t[len(prefix):].split(".", 1)[0].isdigit())
        if hits and (best is None or hits > best[0]):
            best = (hits, name, mod)
    if best is None:
        raise QeraError("found no ModuleList of decoder blocks holding the target layers")
    return best[1], best[2]


def block_index(name: str, blocks_name: str) -> int | None:
    """Index of the block holding module ``name``, or None when it is outside the blocks."""
    prefix = f"{blocks_name}." if blocks_name else ""
    if not name.startswith(prefix):
        return None
    head = name[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``name`` inside ``model``; returns the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def restore_modules(model: nn.Module, originals: Mapping[str, nn.Module]) -> None:
    """Put ``originals`` ({qualified name: module}) back into ``model``."""
    for name, mod in originals.items():
        replace_module(model, name, mod)


@contextmanager
def restoring(model: nn.Module, originals: Mapping[str, nn.Module]) -> Iterator[None]:
    """Put the original (full-precision) ``originals`` back into ``model`` on exit, whatever happened."""
    try:
        yield
    finally:
        restore_modules(model, originals)
        trim_heap()
