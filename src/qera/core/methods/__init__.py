"""Reconstruction methods: a registry and the two public entry points.

Names (used by the CLI): ``w-only``, ``zeroquant-v2``, ``loftq``, ``lqer``, ``qera-approx``,
``qera-exact``.
"""

from __future__ import annotations

from typing import Any

import torch

from qera.core.formats import QuantizedWeight, WeightFormat, parse_format
from qera.core.statistics import ActivationStats
from qera.core.methods.base import METHODS, Method, Reconstruction
from qera.core.methods import basic, scaled, loftq  # noqa: F401  (registration)


def method_names(uses_rank: bool | None = None) -> list[str]:
    """Registered method names in their listing order (``Method.order``), optionally only those that
    do (``uses_rank=True``) or do not add a low-rank term."""
    names = [n for n in METHODS.names() if uses_rank is None or METHODS.get(n).uses_rank == uses_rank]
    return sorted(names, key=lambda n: (METHODS.get(n).order, n))


def get_method(method: "str | Method", **options: Any) -> Method:
    """Instantiate a registered method by name (options validated), or pass an instance through."""
    if isinstance(method, Method):
        return method
    return METHODS.get(method)(**options)


def reconstruct(
    W: torch.Tensor,
    W_q: "torch.Tensor | QuantizedWeight",
    method: "str | Method",
    rank: int,
    stats: ActivationStats | None = None,
    *,
    name: str | None = None,
    **options: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-rank ``(A, B)`` with ``W ≈ W_q + B @ A``; ``A: (rank, in)``, ``B: (out, rank)``.

    For ``loftq`` (which changes ``W_q``) use :func:`quantize_and_reconstruct` to get the final
    quantized weight too; here it needs ``W_q`` as a :class:`QuantizedWeight` or ``fmt=``.
    """
    fmt = options.pop("fmt", None)
    m = get_method(method, **options)
    m.check(W, rank, stats, name)
    rec = m.solve(W, W_q, rank, stats, parse_format(fmt) if fmt is not None else None, name)
    return rec.A, rec.B


def quantize_and_reconstruct(
    W: torch.Tensor,
    fmt: "str | WeightFormat",
    method: "str | Method",
    rank: int,
    stats: ActivationStats | None = None,
    *,
    name: str | None = None,
    **options: Any,
) -> Reconstruction:
    """Quantize ``W`` to ``fmt`` and solve the low-rank term; returns the final quantized weight."""
    fmt = parse_format(fmt)
    m = get_method(method, **options)
    m.check(W, rank, stats, name)
    return m.solve(W, fmt.quantize(W, name), rank, stats, fmt, name)


__all__ = ["METHODS", "Method", "Reconstruction", "get_method", "method_names", "reconstruct", "quantize_and_reconstruct"]
