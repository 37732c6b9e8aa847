"""Activation quantization (the LQER W4A8 setting): the input of the quantized GEMM is fake-quantized.

The input ``x`` (shape ``(..., in)``) is quantized along its channel axis in the format's blocks
(e.g. ``mxint8``: a shared power-of-two scale per 32 channels) and dequantized again. The
low-rank branch ``(x Aᵀ) Bᵀ`` keeps the high-precision input, as LQER does. Gradients pass
straight through the rounding.
"""

from __future__ import annotations

import torch

from qera.core.formats import WeightFormat
from qera.core.formats.base import as_rows, from_rows


def fake_quantize_activations(x: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    """``dq(q(x))`` per block of ``fmt.group_width`` channels, in ``x``'s dtype, shape ``x.shape``."""
    blocks, cols = as_rows(x.detach(), fmt.group_width)
    xq = from_rows(fmt.round_to_grid(blocks, fmt.fit(blocks)), x.shape, cols).to(x.dtype)
    return x + (xq - x).detach() if x.requires_grad else xq
