"""Which modules are quantized, how to read their weight, and where the decoder blocks are.

A *target* is a linear-like module inside a numbered decoder block: ``nn.Linear`` and GPT-2's
``Conv1D`` (whose weight is stored transposed, ``(in, out)``). Every target is read through
:func:`linear_weight` as an ``(out, in)`` matrix, so the math never sees the difference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from ._registry import Registry
from .errors import QeraError

# Every linear layer inside numbered decoder blocks (model.layers.N, model.decoder.layers.N,
# transformer.h.N, blocks.N, encoder.layer.N); never the LM head or embeddings.
DEFAULT_INCLUDE = (r"(^|\.)(layers|layer|h|blocks)\.\d+\.",)
DEFAULT_EXCLUDE = (
    r"(^|\.)lm_head$", r"embed", r"(^|\.)(classifier|score|pooler)(\.|$)",
    r"(^|\.)(gate|router|shared_expert_gate)$",  # mixture-of-experts routers: tiny, and routing is fragile
)


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


def compile_patterns(patterns: Sequence[str], what: str) -> list[re.Pattern]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as exc:
            raise QeraError(f"invalid {what} regex {p!r}: {exc}") from None
    return out


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
