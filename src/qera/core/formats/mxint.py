"""MX integer format (OCP Microscaling, integer elements), as used by the QERA and LQER papers.

Each block of ``block`` consecutive values along the last dimension shares a power-of-two scale
stored as an 8-bit biased exponent. Elements are ``bits``-bit sign-magnitude integers:

    E = floor(log2(max |x| over the block)),  scale = 2**(E - (bits - 2))
    k = clamp(round_half_even(|x| / scale), 0, 2**(bits-1) - 1),  value = sign(x) * k * scale

Storage: ``bits`` per element + 8 per block, e.g. 4.25 bits/weight for mxint4 with block 32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from qera.util.errors import QeraError
from qera.core.formats.base import FORMATS, WeightFormat, block_grid
from qera.core.formats.packing import packed_nbytes

EXP_BIAS = 127


@FORMATS.register("mxint")
@dataclass(frozen=True)
class MXIntFormat(WeightFormat):
    """``mxint{bits}[:block=N]``: shared 8-bit power-of-two exponent per block (default 32)."""

    block: int = 32
    family: ClassVar[str] = "mxint"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.block, int) or self.block < 1:
            raise QeraError(f"mxint: block must be a positive integer, got {self.block!r}")

    def options(self) -> dict[str, Any]:
        return {} if self.block == 32 else {"block": self.block}

    @property
    def bits_per_weight(self) -> float:
        return self.bits + 8 / self.block

    @property
    def max_level(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def group_width(self) -> int:
        return self.block

    def fit(self, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
        amax = blocks.abs().amax(dim=-1)  # (rows, nb)
        _, e = torch.frexp(amax)  # amax = m * 2**e, m in [0.5, 1)
        exp = torch.where(amax > 0, e - 1, torch.full_like(e, -EXP_BIAS)).clamp(-EXP_BIAS, EXP_BIAS)
        return {"exponents": (exp + EXP_BIAS).to(torch.uint8)}

    def _scale(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        exps = params["exponents"].to(torch.int32) - EXP_BIAS
        return torch.ldexp(torch.ones(exps.shape, device=exps.device), exps - (self.bits - 2)).unsqueeze(-1)

    def grid_step(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._scale(params)

    def codes(self, blocks: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        k = torch.round(blocks.abs() / self._scale(params)).clamp_(0, self.max_level)
        sign = ((blocks < 0) & (k > 0)).to(torch.int64)
        return (sign << (self.bits - 1)) | k.to(torch.int64)

    def values(self, codes: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        codes = codes.to(torch.int32)
        k = (codes & self.max_level).to(torch.float32)
        sign = 1.0 - 2.0 * (codes >> (self.bits - 1)).to(torch.float32)
        return sign * k * self._scale(params)

    def stored_shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        rows, nb = block_grid(shape, self.block)
        return {"codes": ((packed_nbytes(rows * nb * self.block, self.bits),), torch.uint8),
                "exponents": ((rows, nb), torch.uint8)}
