"""Helpers shared by the analyses: parsing integer lists, bits, layer names."""

from __future__ import annotations

import re
from typing import Callable, Mapping, Sequence

from torch import nn

from qera.util.errors import QeraError

Evaluate = Callable[[nn.Module], float]  # model -> perplexity


def parse_int_list(spec: str | Sequence[int], flag: str, minimum: int = 0) -> list[int]:
    """``"0,4,8"`` → ``[0, 4, 8]``; strictly increasing integers ``>= minimum``, else a QeraError."""
    if isinstance(spec, str):
        items = [s.strip() for s in spec.split(",") if s.strip()]
        try:
            values = [int(s) for s in items]
        except ValueError:
            raise QeraError(f"{flag} must be a comma list of integers, got {spec!r}") from None
    else:
        values = [int(v) for v in spec]
    if not values:
        raise QeraError(f"{flag} is empty")
    bad = [v for v in values if v < minimum]
    if bad:
        raise QeraError(f"{flag} entries must be integers >= {minimum}, got {bad[0]}")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise QeraError(f"{flag} must be strictly increasing, got {','.join(map(str, values))}")
    return values


def parse_names(spec: str, flag: str) -> list[str]:
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise QeraError(f"{flag} is empty")
    if len(set(names)) != len(names):
        raise QeraError(f"{flag} lists a name twice: {spec!r}")
    return names


_BLOCK = re.compile(r"\.(\d+)\.")


def layer_kind(name: str) -> str:
    """The layer type: the last component of the module name (``q_proj``, ``down_proj`` ...)."""
    return name.rsplit(".", 1)[-1]


def layer_depth(name: str) -> int | None:
    """The decoder block index in ``name`` (``model.layers.7.mlp.up_proj`` → 7), or None."""
    m = _BLOCK.search("." + name + ".")
    return int(m.group(1)) if m else None


def type_group(kind: str) -> str:
    """Coarse layer group for summaries: ``q/k/v``, ``o``, ``gate/up``, ``down`` or the kind itself."""
    k = kind.lower()
    if k in ("q_proj", "k_proj", "v_proj", "query", "key", "value", "c_attn", "qkv_proj", "wqkv"):
        return "q/k/v"
    if k in ("o_proj", "out_proj", "dense", "c_proj_attn", "wo"):
        return "o"
    if k in ("gate_proj", "up_proj", "c_fc", "fc1", "w1", "w3", "gate_up_proj"):
        return "gate/up"
    if k in ("down_proj", "fc2", "w2", "c_proj"):
        return "down"
    return kind


def bits_per_weight(shapes: Mapping[str, tuple[int, int]], weight_bits: float, rank: int,
                    lowrank_bits: int = 16) -> float:
    """Parameter-weighted mean of ``weight_bits + lowrank_bits · k (m + n) / (m n)`` over layers
    of shape ``(m, n)`` = (out, in), as :meth:`qera.core.report.QuantReport.quality` averages ``bits_total``."""
    total = sum(m * n for m, n in shapes.values())
    if total == 0:
        return float(weight_bits)
    extra = sum(lowrank_bits * min(rank, m, n) * (m + n) for m, n in shapes.values())
    return float(weight_bits) + extra / total
