"""Per-group uniform integer format, symmetric or asymmetric, with fp16 group parameters.

Symmetric (default): ``q = clamp(round(x / s), -(2**(b-1) - 1), 2**(b-1) - 1)``, ``x̃ = s * q``,
``s = max|x| / (2**(b-1) - 1)`` stored in fp16 → ``b + 16/group`` bits per weight.

Asymmetric (``:asym``): ``q = clamp(round((x - m) / s), 0, 2**b - 1)``, ``x̃ = m + s * q`` with
``m = min x`` and ``s = (max x - min x) / (2**b - 1)``, both fp16 (the GGML Q4_1 layout)
→ ``b + 32/group`` bits per weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import QeraError
from .base import FORMATS, WeightFormat, as_rows, block_grid, from_rows
from .packing import pack_bits, packed_nbytes, unpack_bits


def _fp16_param(t: torch.Tensor, what: str) -> torch.Tensor:
    """Round a group parameter to fp16 (as stored) and refuse overflow."""
    h = t.to(torch.float16)
    if not torch.isfinite(h).all():
        raise QeraError(f"int format: group {what} overflows fp16 (|value| > 65504); weights too large")
    return h


@FORMATS.register("int")
@dataclass(frozen=True)
class IntFormat(WeightFormat):
    """``int{bits}[:group=N][:asym]``: uniform integer grid per group (default group 128)."""

    group: int = 128
    asym: bool = False
    family: ClassVar[str] = "int"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.group, int) or self.group < 1:
            raise QeraError(f"int: group must be a positive integer, got {self.group!r}")

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {} if self.group == 128 else {"group": self.group}
        if self.asym:
            opts["asym"] = True
        return opts

    @property
    def bits_per_weight(self) -> float:
        return self.bits + (32 if self.asym else 16) / self.group

    def encode(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        blocks, _ = as_rows(w, self.group)  # (rows, ng, group)
        if self.asym:
            qmax = (1 << self.bits) - 1
            lo = _fp16_param(blocks.amin(dim=-1), "minimum")
            span = blocks.amax(dim=-1) - lo.float()
            scale = _fp16_param(span / qmax, "scale")
            s = torch.where(scale.float() > 0, scale.float(), torch.ones_like(span)).unsqueeze(-1)
            q = torch.round((blocks - lo.float().unsqueeze(-1)) / s).clamp_(0, qmax)
            return {"codes": pack_bits(q.to(torch.int64), self.bits), "scales": scale, "mins": lo}
        qmax = (1 << (self.bits - 1)) - 1
        scale = _fp16_param(blocks.abs().amax(dim=-1) / qmax, "scale")
        s = torch.where(scale.float() > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
        q = torch.round(blocks / s.unsqueeze(-1)).clamp_(-qmax, qmax)
        return {"codes": pack_bits((q + qmax).to(torch.int64), self.bits), "scales": scale}

    def stored_shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        rows, ng = block_grid(shape, self.group)
        out = {"codes": ((packed_nbytes(rows * ng * self.group, self.bits),), torch.uint8),
               "scales": ((rows, ng), torch.float16)}
        if self.asym:
            out["mins"] = ((rows, ng), torch.float16)
        return out

    def decode(self, tensors: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
        scale = tensors["scales"].float()  # (rows, ng)
        rows, ng = scale.shape
        q = unpack_bits(tensors["codes"], self.bits, rows * ng * self.group)
        q = q.view(rows, ng, self.group).to(torch.float32)
        if self.asym:
            out = tensors["mins"].float().unsqueeze(-1) + scale.unsqueeze(-1) * q
        else:
            out = scale.unsqueeze(-1) * (q - ((1 << (self.bits - 1)) - 1))
        cols = shape[-1] if len(shape) else 1
        return from_rows(out, shape, cols)
