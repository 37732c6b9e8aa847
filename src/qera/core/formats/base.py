"""Common pieces of the weight formats: the format interface and the ``QuantizedWeight`` container.

All formats quantize along the last dimension (``in_features`` for an ``nn.Linear`` weight of
shape ``(out, in)``) in blocks/groups; the last dimension is zero-padded to a whole block.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import torch

from qera.util.registry import Registry
from qera.util.errors import QeraError

FORMATS: Registry[type] = Registry("weight format")  # family -> WeightFormat subclass

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def as_rows(w: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    """View ``w`` (any shape) as float32 blocks.

    Returns ``(blocks, cols)`` where ``blocks`` has shape ``(rows, nblocks, block)`` with the last
    dimension of ``w`` zero-padded to a multiple of ``block`` and ``cols`` the unpadded width.
    """
    cols = w.shape[-1] if w.dim() else 1
    x = w.detach().reshape(-1, cols).to(torch.float32)
    pad = (-cols) % block
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.view(x.shape[0], -1, block), cols


CHUNK_ELEMS = 1 << 22  # weights encoded/decoded at a time (4M: 16 MB of float32 per temporary)
DENSE_CHUNK_ELEMS = 1 << 20  # weights per block when a dense W̃ (+ B A) is built in another dtype


def _row_chunks(shape: tuple[int, ...], chunk_elems: int) -> tuple[int, int, int]:
    """``(rows, cols, rows per chunk)``; chunks hold a multiple of 8 rows so packed codes concatenate."""
    cols = shape[-1] if len(shape) else 1
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    step = max(8, (chunk_elems // max(cols, 1)) // 8 * 8)
    return rows, cols, step


def block_grid(shape: tuple[int, ...], block: int) -> tuple[int, int]:
    """``(rows, blocks per row)`` of :func:`as_rows` for a weight of ``shape``."""
    cols = shape[-1] if len(shape) else 1
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    return rows, -(-cols // block)


def from_rows(blocks: torch.Tensor, shape: torch.Size, cols: int) -> torch.Tensor:
    """Inverse of :func:`as_rows`: drop the padding and restore ``shape``."""
    rows = blocks.shape[0]
    return blocks.reshape(rows, -1)[:, :cols].reshape(shape)


def check_weight(w: torch.Tensor, name: str | None = None) -> None:
    """Raise a clear error for non-float or non-finite weights."""
    where = f" in layer {name}" if name else ""
    if not isinstance(w, torch.Tensor) or w.dtype not in FLOAT_DTYPES:
        raise QeraError(f"weight{where} must be a floating-point tensor, got {getattr(w, 'dtype', type(w))}")
    if w.numel() == 0:
        raise QeraError(f"weight{where} is empty (shape {tuple(w.shape)})")
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise QeraError(f"weight{where} has {bad} NaN/Inf value(s); cannot quantize")


@dataclass(frozen=True)
class WeightFormat(ABC):
    """A weight format: configuration plus the quantize/dequantize rules.

    Subclasses are frozen dataclasses registered in :data:`qera.core.formats.FORMATS` under their
    ``family`` name. ``str(fmt)`` gives a canonical spec that :func:`parse_format` reads back.
    """

    bits: int
    family: ClassVar[str] = ""
    min_bits: ClassVar[int] = 2
    max_bits: ClassVar[int] = 8

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not self.min_bits <= self.bits <= self.max_bits:
            raise QeraError(
                f"{self.family}: bits must be an integer in {self.min_bits}..{self.max_bits}, "
                f"got {self.bits!r}"
            )

    # -- spec ---------------------------------------------------------------------------------
    @abstractmethod
    def options(self) -> dict[str, Any]:
        """Non-default options as they appear in the spec string."""

    def __str__(self) -> str:
        opts = self.options()
        parts = [f"{self.family}{self.bits}"]
        for key, value in opts.items():
            parts.append(key if value is True else f"{key}={value}")
        return ":".join(parts)

    # -- math ---------------------------------------------------------------------------------
    @property
    @abstractmethod
    def bits_per_weight(self) -> float:
        """Storage bits per weight including scales, for a width that is a whole number of blocks."""

    # Every format is "fit the parameters of each group, then round each value with them", so
    # GPTQ-style rounding (qera.core.rounding) can fit a group's parameters once and round column by column.
    @property
    @abstractmethod
    def group_width(self) -> int:
        """Consecutive values along the last dimension that share one set of parameters."""

    @abstractmethod
    def fit(self, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
        """Parameters (as stored, e.g. fp16 scales) of each group of ``blocks`` ``(rows, groups, width)``;
        each tensor has shape ``(rows, groups)``."""

    @abstractmethod
    def codes(self, blocks: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Integer codes ``(rows, groups, n)`` of values ``blocks`` ``(rows, groups, n)`` under ``params``
        ``(rows, groups)``; ``n`` may be less than the group width (a column at a time)."""

    @abstractmethod
    def values(self, codes: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The float32 values of ``codes`` ``(rows, groups, n)`` under ``params`` ``(rows, groups)``."""

    def column_params(self, params: dict[str, torch.Tensor], start: int, n: int) -> dict[str, torch.Tensor]:
        """The parameters that round values ``start .. start + n - 1`` of each group (GPTQ rounds a column
        at a time). Formats whose parameters are the same across a group return ``params`` unchanged."""
        return params

    def check_shape(self, shape: tuple[int, ...], name: str | None = None) -> None:
        """Raise a :class:`QeraError` naming the layer if a weight of ``shape`` cannot be stored (any can, here)."""

    def stores(self, shape: tuple[int, ...]) -> bool:
        """Whether a weight of ``shape`` can be stored (:meth:`check_shape` passes)."""
        try:
            self.check_shape(tuple(shape))
        except QeraError:
            return False
        return True

    @property
    def fallback(self) -> str | None:
        """The spec ``format_fallback="auto"`` takes for the shapes this format cannot store (None: it stores any)."""
        return None

    def grid_step(self, params: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The distance between neighbouring levels, broadcastable to ``(rows, groups, width)``, for
        formats whose levels are evenly spaced within a group (None otherwise: ``nf``'s are not)."""
        return None

    def round_to_grid(self, blocks: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Nearest representable values of ``blocks`` ``(rows, groups, n)`` under fixed ``params``."""
        return self.values(self.codes(blocks, params), params)

    def encode(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Quantize ``w`` (any shape, float) and return the stored tensors (packed codes, parameters)."""
        blocks, _ = as_rows(w, self.group_width)
        return self.encode_with(blocks, self.fit(blocks))

    def encode_with(self, blocks: torch.Tensor, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Stored tensors of ``blocks`` ``(rows, groups, width)`` rounded under given ``params``."""
        from qera.core.formats.packing import pack_bits

        return {"codes": pack_bits(self.codes(blocks, params), self.bits), **params}

    def decode(self, tensors: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
        """Dequantize stored tensors back to a float32 tensor of ``shape``."""
        from qera.core.formats.packing import unpack_bits

        params = {k: v for k, v in tensors.items() if k != "codes"}
        rows, groups = next(iter(params.values())).shape
        codes = unpack_bits(tensors["codes"], self.bits, rows * groups * self.group_width)
        out = self.values(codes.view(rows, groups, self.group_width), params)
        cols = shape[-1] if len(shape) else 1
        return from_rows(out, shape, cols)

    @abstractmethod
    def stored_shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of each stored tensor for a weight of ``shape`` (no data touched)."""

    def quantize(self, w: torch.Tensor, name: str | None = None, chunk_elems: int = CHUNK_ELEMS) -> "QuantizedWeight":
        """Quantize ``w``; large weights are encoded ``chunk_elems`` at a time (rows are independent,
        so the stored tensors are bit-identical to one-shot encoding, with far smaller temporaries)."""
        check_weight(w, name)
        self.check_shape(tuple(w.shape), name)
        try:
            rows, cols, step = _row_chunks(w.shape, chunk_elems)
            if rows <= step:
                tensors = self.encode(w)
            else:
                w2 = w.reshape(rows, cols)
                parts = [self.encode(w2[r:r + step]) for r in range(0, rows, step)]
                tensors = {k: torch.cat([p[k] for p in parts], dim=0) for k in parts[0]}
        except QeraError as exc:
            raise QeraError(f"{exc}{f' (layer {name})' if name else ''}") from None
        return QuantizedWeight(fmt=self, shape=tuple(w.shape), dtype=w.dtype, tensors=tensors)

    def decode_chunked(self, tensors: dict[str, torch.Tensor], shape: torch.Size,
                       chunk_elems: int = CHUNK_ELEMS) -> torch.Tensor:
        """:meth:`decode` a slice of rows at a time into one float32 output (same values)."""
        rows, cols, step = _row_chunks(tuple(shape), chunk_elems)
        if rows <= step:
            return self.decode(tensors, shape)
        out = torch.empty(rows, cols, dtype=torch.float32, device=next(iter(tensors.values())).device)
        for r, block in self.decode_rows(tensors, shape, chunk_elems):
            out[r:r + block.shape[0]] = block
        return out.reshape(shape)

    def decode_rows(self, tensors: dict[str, torch.Tensor], shape: torch.Size,
                    chunk_elems: int = CHUNK_ELEMS) -> Iterator[tuple[int, torch.Tensor]]:
        """``(first row, float32 block (n, cols))`` over the rows of the 2-D view of ``shape``,
        about ``chunk_elems`` weights per block (a multiple of 8 rows, so packed codes split cleanly)."""
        rows, cols, step = _row_chunks(tuple(shape), chunk_elems)
        if rows <= step:
            yield 0, self.decode(tensors, shape).reshape(rows, cols)
            return
        offsets = {k: 0 for k in tensors}
        for r in range(0, rows, step):
            n = min(step, rows - r)
            want = self.stored_shapes((n, cols))
            part = {}
            for k, t in tensors.items():
                size = want[k][0][0]
                part[k] = t[offsets[k]:offsets[k] + size]
                offsets[k] += size
            yield r, self.decode(part, torch.Size((n, cols)))

    def check_stored(self, tensors: dict[str, torch.Tensor], shape: tuple[int, ...], what: str = "") -> None:
        """Raise a clear error unless ``tensors`` are exactly what :meth:`encode` stores for ``shape``."""
        want = self.stored_shapes(tuple(shape))
        label = f"{what}: " if what else ""
        if set(tensors) != set(want):
            raise QeraError(
                f"{label}format {self} stores tensors {sorted(want)}, found {sorted(tensors)}"
            )
        for key, (shp, dt) in want.items():
            t = tensors[key]
            if tuple(t.shape) != tuple(shp) or t.dtype != dt:
                raise QeraError(
                    f"{label}{key} is {tuple(t.shape)} {t.dtype}, but format {self} for a weight of shape "
                    f"{tuple(shape)} stores {tuple(shp)} {dt}"
                )

    def fake_quantize(self, w: torch.Tensor, name: str | None = None) -> torch.Tensor:
        """``dq(q(w))`` in the dtype of ``w``."""
        return self.quantize(w, name).dequantize()


@dataclass
class QuantizedWeight:
    """A quantized tensor: its format, logical shape and dtype, and the stored (packed) tensors."""

    fmt: WeightFormat
    shape: tuple[int, ...]
    dtype: torch.dtype
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def dequantize(self, dtype: torch.dtype | None = None,
                   lowrank: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Return ``W̃`` with the original shape, in ``dtype`` (default: the original dtype).

        ``lowrank=(B, A)`` (``B: (out, r)``, ``A: (r, in)``) returns ``W̃ + B A`` instead, summed in
        float32. A non-float32 result is filled a block of rows at a time, so no full-size float32
        temporary exists (on the CPU such temporaries stay in the heap between layers).
        """
        dtype = dtype or self.dtype
        if dtype == torch.float32 and lowrank is None:
            return self.fmt.decode_chunked(self.tensors, torch.Size(self.shape))
        shape = torch.Size(self.shape)
        rows, cols = _row_chunks(tuple(shape), 1)[:2]
        out = torch.empty(rows, cols, dtype=dtype, device=next(iter(self.tensors.values())).device)
        A = lowrank[1].to(out.device, torch.float32) if lowrank is not None else None
        for r, block in self.fmt.decode_rows(self.tensors, shape, DENSE_CHUNK_ELEMS):
            if A is not None:
                block.addmm_(lowrank[0][r:r + block.shape[0]].to(out.device, torch.float32), A)
            out[r:r + block.shape[0]] = block
        return out.reshape(shape)

    @property
    def bits_per_weight(self) -> float:
        """Nominal storage bits per weight of the format (codes + scales)."""
        return self.fmt.bits_per_weight

    @property
    def storage_bytes(self) -> int:
        """Bytes actually held by the stored tensors (including block padding)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        return QuantizedWeight(self.fmt, self.shape, self.dtype, {k: v.to(device) for k, v in self.tensors.items()})

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Stored tensors only; the format, shape and dtype go in :meth:`metadata`."""
        return dict(self.tensors)

    def metadata(self) -> dict[str, Any]:
        return {"format": str(self.fmt), "shape": list(self.shape), "dtype": str(self.dtype).replace("torch.", "")}

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> "QuantizedWeight":
        """Rebuild from :meth:`state_dict` and :meth:`metadata`."""
        from qera.core.formats import parse_format

        dtype = getattr(torch, metadata["dtype"])
        return cls(parse_format(metadata["format"]), tuple(metadata["shape"]), dtype, dict(tensors))
