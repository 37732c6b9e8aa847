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

from qera.util.errors import QeraError
from qera.core.formats.base import FORMATS, WeightFormat, block_grid
from qera.core.formats.packing import packed_nbytes


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

    @property
    def group_width(self) -> int:
        return self.group

    def fit(self, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.asym:
            lo = _fp16_param(blocks.amin(dim=-1), "minimum")
            span = blocks.amax(dim=-1) - lo.float()
            return {"scales": _fp16_param(span / ((1 << self.bits) - 1), "scale"), "mins": lo}
        return {"scales": _fp16_param(blocks.abs().amax(dim=-1) / ((1 << (self.bits - 1)) - 1), "scale")}

    def codes(self, blocks: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        scale = params["scales"].float()
        s = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)
        if self.asym:
            qmax = (1 << self.bits) - 1
            return torch.round((blocks - params["mins"].float().unsqueeze(-1)) / s).clamp_(0, qmax).to(torch.int64)
        qmax = (1 << (self.bits - 1)) - 1
        return (torch.round(blocks / s).clamp_(-qmax, qmax) + qmax).to(torch.int64)

    def grid_step(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return params["scales"].float().unsqueeze(-1)

    def values(self, codes: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        q = codes.to(torch.float32)
        scale = params["scales"].float().unsqueeze(-1)
        if self.asym:
            return params["mins"].float().unsqueeze(-1) + scale * q
        return scale * (q - ((1 << (self.bits - 1)) - 1))

    def stored_shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        rows, ng = block_grid(shape, self.group)
        out = {"codes": ((packed_nbytes(rows * ng * self.group, self.bits),), torch.uint8),
               "scales": ((rows, ng), torch.float16)}
        if self.asym:
            out["mins"] = ((rows, ng), torch.float16)
        return out
