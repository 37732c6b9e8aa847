"""Streaming float64 accumulators of one layer input's statistics.

For inputs ``x`` of shape ``(..., d)`` (rows masked out by padding excluded) we keep:

- ``count``  N, the number of rows seen
- ``abs``    Σ|x_i|          → mean |x| per channel (LQER)          shape (d,)
- ``sq``     Σx_i²           → E[x_i²] per channel (QERA-approx)     shape (d,)
- ``xtx``    Σxᵀx            → R = E[xᵀx] (QERA-exact)               shape (d, d)

Per chunk of rows the sums are formed in float32 (one fused pass per diagonal statistic, one GEMM for
``Σxᵀx``) and added into float64 accumulators, so streaming equals one-shot
to float32 rounding of one chunk. Accumulators live on the device of the first
batch: no host↔device copy per batch.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch

from .errors import QeraError, where

log = logging.getLogger(__name__)

STAT_KINDS = ("abs", "sq", "xtx")
CHUNK_ROWS = 4096  # rows per fp32 product before adding into the float64 accumulator


def _check_kinds(kinds: Iterable[str]) -> frozenset[str]:
    kinds = frozenset(kinds)
    bad = kinds - set(STAT_KINDS)
    if bad:
        raise QeraError(f"unknown statistic(s) {sorted(bad)}; known: {', '.join(STAT_KINDS)}")
    return kinds


@dataclass
class ActivationStats:
    """Statistics of one layer input of width ``dim``; only ``kinds`` are accumulated."""

    dim: int
    kinds: frozenset[str] = frozenset({"abs", "sq"})
    name: str | None = None
    count: int = 0
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    _R: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.kinds = _check_kinds(self.kinds)
        if not isinstance(self.dim, int) or self.dim < 1:
            raise QeraError(f"statistics dimension must be a positive integer, got {self.dim!r}")

    # -- accumulation ---------------------------------------------------------------------------
    def _zeros(self, kind: str, device: torch.device) -> torch.Tensor:
        shape = (self.dim, self.dim) if kind == "xtx" else (self.dim,)
        return torch.zeros(shape, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add rows of ``x`` (shape ``(..., dim)``); ``mask`` (shape ``x.shape[:-1]``) keeps True rows."""
        if x.shape[-1] != self.dim:
            raise QeraError(f"activation width {x.shape[-1]} != expected {self.dim}{where(self.name)}")
        rows = x.reshape(-1, self.dim)
        if mask is not None:
            if mask.numel() != rows.shape[0]:
                raise QeraError(
                    f"mask has {mask.numel()} entries but the activation has {rows.shape[0]} rows{where(self.name)}"
                )
            rows = rows[mask.reshape(-1).to(device=rows.device, dtype=torch.bool)]
        if rows.shape[0] == 0:
            return
        self._R = None
        for kind in self.kinds:
            if kind not in self.sums:
                self.sums[kind] = self._zeros(kind, rows.device)
        for chunk in rows.split(CHUNK_ROWS):
            c = chunk.to(torch.float32)
            # One fused pass per statistic; NaN/Inf in x always reach these partial sums, so checking
            # them (d or d² values) replaces a full pass over x.
            parts: dict[str, torch.Tensor] = {}
            if "xtx" in self.kinds:
                parts["xtx"] = c.T @ c
            if "sq" in self.kinds:
                parts["sq"] = torch.linalg.vector_norm(c, 2, dim=0).square()
            if "abs" in self.kinds:
                parts["abs"] = torch.linalg.vector_norm(c, 1, dim=0)
            for kind, part in parts.items():
                if not torch.isfinite(part).all():
                    raise QeraError(f"activation contains NaN/Inf{where(self.name)}")
            for kind, part in parts.items():
                self.sums[kind].add_(part)
        self.count += int(rows.shape[0])

    def merge(self, other: "ActivationStats") -> "ActivationStats":
        """Add another accumulator of the same width and kinds into this one (returns self)."""
        if other.dim != self.dim or other.kinds != self.kinds:
            raise QeraError(
                f"cannot merge statistics of width {other.dim} / kinds {sorted(other.kinds)} into "
                f"width {self.dim} / kinds {sorted(self.kinds)}{where(self.name)}"
            )
        for kind, value in other.sums.items():
            if kind in self.sums:
                self.sums[kind].add_(value.to(self.sums[kind].device))
            else:
                self.sums[kind] = value.clone()
        self.count += other.count
        self._R = None
        return self

    # -- accessors ------------------------------------------------------------------------------
    def _sum(self, kind: str) -> torch.Tensor:
        if kind not in self.kinds:
            raise QeraError(
                f"statistic {kind!r} was not collected{where(self.name)} (have: {', '.join(sorted(self.kinds))})"
            )
        if self.count == 0:
            raise QeraError(f"no activation rows were collected{where(self.name)}")
        return self.sums[kind]

    def mean_abs(self) -> torch.Tensor:
        """E|x_i|, float64, shape (dim,)."""
        return self._sum("abs") / self.count

    def mean_sq(self) -> torch.Tensor:
        """E[x_i²], float64, shape (dim,). Taken from the diagonal of Σxᵀx when only that is kept."""
        if "sq" not in self.kinds and "xtx" in self.kinds:
            return torch.diagonal(self._sum("xtx")).clone() / self.count
        return self._sum("sq") / self.count

    def autocorrelation(self) -> torch.Tensor:
        """R = E[xᵀx], float64, symmetric, shape (dim, dim) (cached until the next update)."""
        if self._R is None:
            r = self._sum("xtx") / self.count
            self._R = (r + r.T) / 2
        return self._R

    def to(self, device: torch.device | str) -> "ActivationStats":
        return ActivationStats(self.dim, self.kinds, self.name, self.count, {k: v.to(device) for k, v in self.sums.items()})


# -- persistence -------------------------------------------------------------------------------
def save_stats(stats: Mapping[str, ActivationStats], path: str | os.PathLike, extra: dict | None = None) -> None:
    """Write named statistics to one safetensors file, atomically (temp file + rename)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    meta = {}
    for key, st in stats.items():
        meta[key] = {"dim": st.dim, "kinds": sorted(st.kinds), "count": st.count}
        for kind, value in st.sums.items():
            tensors[f"{key}::{kind}"] = value.detach().to("cpu").contiguous()
    header = {"qera_stats": json.dumps({"layers": meta, "extra": extra or {}})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=header)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_stats(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, ActivationStats]:
    """Read statistics written by :func:`save_stats`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise QeraError(f"statistics file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            header = json.loads((f.metadata() or {})["qera_stats"])
            out = {}
            for key, m in header["layers"].items():
                st = ActivationStats(m["dim"], frozenset(m["kinds"]), key, m["count"])
                for kind in m["kinds"]:
                    name = f"{key}::{kind}"
                    if name in f.keys():
                        st.sums[kind] = f.get_tensor(name)
                out[key] = st
    except (KeyError, TypeError, json.JSONDecodeError, OSError, SafetensorError) as exc:  # not our file
        raise QeraError(f"{path} is not a qera statistics file ({type(exc).__name__}: {exc})") from None
    return out


def load_stats_extra(path: str | os.PathLike) -> dict:
    """The ``extra`` dictionary stored with :func:`save_stats` (model name, calibration settings)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {})["qera_stats"]).get("extra", {})
