"""Normal-float (NF) codebook format with per-block absmax scaling (QLoRA's NF4 generalized).

The ``2**b`` levels are quantiles of a standard normal, built as in the QLoRA paper:
``2**(b-1)`` positive levels, ``2**(b-1) - 1`` negative levels and an exact zero, normalized to
``[-1, 1]``. Each block of ``block`` values stores its absmax in fp16 → ``b + 16/block`` bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

import torch

from qera.util.errors import QeraError
from qera.core.formats.base import FORMATS, WeightFormat, block_grid
from qera.core.formats.packing import packed_nbytes


@lru_cache(maxsize=None)
def _levels_tuple(bits: int) -> tuple[float, ...]:
    n = 1 << bits
    # Probability offset halfway between the two natural choices for 2**b - 1 and 2**b levels.
    offset = 0.5 * ((1 - 1 / (2 * (n - 1))) + (1 - 1 / (2 * n)))
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, n // 2 + 1, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, n // 2, dtype=torch.float64)[:-1])
    levels = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
    return tuple((levels / levels.abs().max()).tolist())


def nf_levels(bits: int) -> torch.Tensor:
    """The ``2**bits`` sorted NF levels in ``[-1, 1]`` as float32, shape ``(2**bits,)``."""
    return torch.tensor(_levels_tuple(bits), dtype=torch.float32)


@FORMATS.register("nf")
@dataclass(frozen=True)
class NFFormat(WeightFormat):
    """``nf{bits}[:block=N]``: normal-float codebook, fp16 absmax per block (default 64)."""

    block: int = 64
    family: ClassVar[str] = "nf"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.block, int) or self.block < 1:
            raise QeraError(f"nf: block must be a positive integer, got {self.block!r}")

    def options(self) -> dict[str, Any]:
        return {} if self.block == 64 else {"block": self.block}

    @property
    def bits_per_weight(self) -> float:
        return self.bits + 16 / self.block

    @property
    def group_width(self) -> int:
        return self.block

    def fit(self, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
        absmax = blocks.abs().amax(dim=-1).to(torch.float16)
        if not torch.isfinite(absmax).all():
            raise QeraError("nf format: block absmax overflows fp16 (|value| > 65504)")
        return {"absmax": absmax}

    def codes(self, blocks: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        s = params["absmax"].float()
        s = torch.where(s > 0, s, torch.ones_like(s)).unsqueeze(-1)
        levels = nf_levels(self.bits).to(blocks.device)
        mids = (levels[1:] + levels[:-1]) / 2
        return torch.bucketize((blocks / s).clamp_(-1, 1), mids)

    def values(self, codes: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        levels = nf_levels(self.bits).to(codes.device)
        return levels[codes.long()] * params["absmax"].float().unsqueeze(-1)

    def stored_shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        rows, nb = block_grid(shape, self.block)
        return {"codes": ((packed_nbytes(rows * nb * self.block, self.bits),), torch.uint8),
                "absmax": ((rows, nb), torch.float16)}
