"""Error metrics of a reconstruction ``W ≈ W̃ + B A``, and the per-channel energy of activations."""

from __future__ import annotations

import torch

from qera.util.errors import QeraError
from qera.core.statistics import ActivationStats


def _error(W, W_q, A, B) -> torch.Tensor:
    W = W.detach().to(torch.float64)
    W_q = (W_q.dequantize() if hasattr(W_q, "dequantize") else W_q).detach().to(W.device, torch.float64)
    if W.shape != W_q.shape:
        raise QeraError(f"W has shape {tuple(W.shape)} but W_q has shape {tuple(W_q.shape)}")
    E = W - W_q
    if A is not None and B is not None and A.numel() and B.numel():
        E = E - B.detach().to(W.device, torch.float64) @ A.detach().to(W.device, torch.float64)
    return E


def weight_error(W, W_q, A=None, B=None) -> float:
    """``‖W - W̃ - B A‖_F²`` in float64."""
    E = _error(W, W_q, A, B)
    return float((E * E).sum())


def layer_output_error(W, W_q, A=None, B=None, stats: "ActivationStats | torch.Tensor | None" = None) -> float:
    """``trace(E R Eᵀ) = E_x ‖x Eᵀ‖²`` with ``E = W - W̃ - B A`` and ``R = E[xᵀx]``.

    ``stats`` is an :class:`ActivationStats` holding ``xtx`` or ``R`` itself (in × in).
    """
    if stats is None:
        raise QeraError("layer_output_error needs statistics with the input autocorrelation (xtx)")
    R = stats.autocorrelation() if isinstance(stats, ActivationStats) else stats
    E = _error(W, W_q, A, B)
    R = R.to(E.device, torch.float64)
    if R.shape != (E.shape[1], E.shape[1]):
        raise QeraError(f"autocorrelation has shape {tuple(R.shape)}, expected {(E.shape[1], E.shape[1])}")
    return float(((E @ R) * E).sum())


def channel_energy(y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ_t m_t y_tj²`` ``(hidden,)`` float64 on the CPU, for activations ``y`` ``(..., tokens, hidden)``
    and a 0/1 token mask ``(..., tokens)`` (None, or one whose size does not match the tokens: all count)."""
    sq = y.detach().double().pow(2)
    if mask is not None and mask.numel() == y.shape[:-1].numel():
        sq = sq * mask.reshape(*y.shape[:-1], 1).to(sq.device, sq.dtype)
    return sq.reshape(-1, y.shape[-1]).sum(0).cpu()
