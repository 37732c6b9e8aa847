"""llama.cpp's GGUF block formats as qera formats: ``q4_0 q4_1 q5_0 q5_1 q8_0`` and the k-quants
``q2_k q3_k q4_k q5_k q6_k``.

Spec: ``q<bits>_<kind>``; kind ``0``/``1`` are GGML's blocks of 32, ``k`` its super-blocks of 256
(``q4``, ``q5``, ``q8`` alone mean ``_0``; ``q2``, ``q3``, ``q6`` mean ``_k``). Each format stores
the values of one GGML type exactly: :meth:`GGUFFormat.to_gguf_bytes` turns the stored tensors into
the type's block bytes, :meth:`GGUFFormat.from_gguf_bytes` reads them back, and :meth:`decode`
computes, in float32 and in the same order, what gguf-py's reference dequantization computes from
those bytes (bit for bit). ``c`` is the stored code, ``d``/``dmin``/``m`` fp16, ``sc``/``mn`` the
small integer sub-block scales and mins:

==========  =======  ==============================  ======================  ===========
type        weights  parameters per (super-)block    value                   bits/weight
==========  =======  ==============================  ======================  ===========
q4_0        32       d                               d·(c − 8)               4.5
q4_1        32       d, m                            d·c + m                 5.0
q5_0        32       d                               d·(c − 16)              5.5
q5_1        32       d, m                            d·c + m                 6.0
q8_0        32       d                               d·(c − 128)             8.5
q2_k        256      d, dmin; 16 × (sc, mn) 4-bit    (d·sc)·c − dmin·mn      2.625
q3_k        256      d; 16 × sc 6-bit signed         (d·sc)·(c − 4)          3.4375
q4_k        256      d, dmin; 8 × (sc, mn) 6-bit     (d·sc)·c − dmin·mn      4.5
q5_k        256      d, dmin; 8 × (sc, mn) 6-bit     (d·sc)·c − dmin·mn      5.5
q6_k        256      d; 16 × sc int8                 (d·sc)·(c − 32)         6.5625
==========  =======  ==============================  ======================  ===========

The group of qera's rounding (``group_width``) is the whole (super-)block: :meth:`fit` chooses all
its parameters at once, and :meth:`column_params` hands GPTQ the sub-block scale of one column.
The fit searches each (sub-)block's scale (and offset) for the least squared error, quantizes the
sub-block scales against the super-block's fp16 scale, then refits that scale by least squares
(the approach of llama.cpp's reference quantizers, re-implemented here with plain weights).

A width that is not a whole number of blocks is refused (GGUF stores whole blocks; llama.cpp's
own quantizer falls back to another type there).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar

import numpy as np
import torch

from qera.util.errors import QeraError, where
from qera.core.formats.base import FORMATS, WeightFormat, block_grid
from qera.core.formats.packing import pack_bits, packed_nbytes, unpack_bits

QK_K = 256
SCALE_STEPS = tuple(0.1 * i for i in range(-9, 10))  # relative changes of the first guess of a scale
OFFSET_STEPS = tuple(0.1 * i for i in range(-10, 11))
BYTES_CHUNK_ELEMS = 1 << 20  # weights converted to GGUF bytes at a time


@dataclass(frozen=True)
class BlockType:
    """One GGML block type: geometry, grid and byte layout.

    ``signed``: codes are ``q + half`` for ``q`` in ``[-half, half)`` times a signed scale; else
    unsigned levels ``0..2**bits-1`` with a scale and an offset. ``sub``: weights per sub-block
    sharing one small integer scale (``== block`` for the 32-weight types). ``sub_bits``: bits of
    a sub-block scale (and min) in the file.
    """

    name: str
    bits: int
    block: int
    type_size: int
    signed: bool
    sub: int
    sub_bits: int = 0

    @property
    def half(self) -> int:
        return 1 << (self.bits - 1)

    @property
    def top(self) -> int:
        return (1 << self.bits) - 1

    @property
    def nsub(self) -> int:
        return self.block // self.sub

    @property
    def kquant(self) -> bool:
        return self.block == QK_K

    def param_shapes(self, rows: int, groups: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shapes and dtypes of the stored parameters; ``d`` comes first (qera's decode reads its shape)."""
        two = ((rows, groups), torch.float16)
        if not self.kquant:
            return {"d": two} if self.signed else {"d": two, "m": two}
        subs = (rows, groups, self.nsub)
        if self.signed:
            return {"d": two, "sub_scales": (subs, torch.int8)}
        return {"d": two, "dmin": two, "sub_mins": (subs, torch.uint8), "sub_scales": (subs, torch.uint8)}


TYPES: dict[tuple[int, str], BlockType] = {
    (4, "0"): BlockType("Q4_0", 4, 32, 18, True, 32),
    (4, "1"): BlockType("Q4_1", 4, 32, 20, False, 32),
    (5, "0"): BlockType("Q5_0", 5, 32, 22, True, 32),
    (5, "1"): BlockType("Q5_1", 5, 32, 24, False, 32),
    (8, "0"): BlockType("Q8_0", 8, 32, 34, True, 32),
    (2, "k"): BlockType("Q2_K", 2, QK_K, 84, False, 16, 4),
    (3, "k"): BlockType("Q3_K", 3, QK_K, 110, True, 16, 6),
    (4, "k"): BlockType("Q4_K", 4, QK_K, 144, False, 32, 6),
    (5, "k"): BlockType("Q5_K", 5, QK_K, 176, False, 32, 6),
    (6, "k"): BlockType("Q6_K", 6, QK_K, 210, True, 16, 8),
}
KNOWN = ", ".join(f"q{b}_{k}" for b, k in TYPES)
FALLBACKS: dict[str, str] = {"Q2_K": "q4_0", "Q3_K": "q4_0", "Q4_K": "q5_0", "Q5_K": "q5_1", "Q6_K": "q8_0"}
"""llama.cpp's own fallback (``llama-quant.cpp``) for a tensor whose width is no multiple of 256."""


# -- fitting ----------------------------------------------------------------------------------------
def _fp16(t: torch.Tensor, what: str) -> torch.Tensor:
    """``t`` rounded to fp16 as stored; refuses overflow."""
    h = t.to(torch.float16)
    if not torch.isfinite(h).all():
        raise QeraError(f"GGUF format: a block {what} overflows fp16 (|value| > 65504); weights too large")
    return h


def _safe(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t != 0, t, torch.ones_like(t))


def signed_scale(x: torch.Tensor, half: int) -> torch.Tensor:
    """Least-squares scale ``s`` of each row of ``x`` ``(..., n)`` for codes ``round(x/s)`` in ``[-half, half)``.

    Candidates put the value of largest magnitude at ``-(half + step)`` (the extra negative level goes
    to its side); for each, the codes are fixed and ``s`` solved; the lowest error wins. Shape ``(...)``.
    """
    peak = x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)
    safe = _safe(peak)
    best_s = torch.zeros_like(peak)
    best = torch.full_like(peak, -1.0)
    q = torch.empty_like(x)
    for step in SCALE_STEPS:
        torch.mul(x, (-(half + step) / safe).unsqueeze(-1), out=q)
        q.round_().clamp_(-half, half - 1)
        sqq = (q * q).sum(-1).clamp_min_(1)  # 0 only where x is all zero (then peak = 0)
        sxq = q.mul_(x).sum(-1)
        score = sxq * sxq / sqq  # the squared error is Σx² − score
        better = score > best
        best_s = torch.where(better, sxq / sqq, best_s)
        best = torch.where(better, score, best)
    return torch.where(peak != 0, best_s, torch.zeros_like(best_s))


def affine_scale(x: torch.Tensor, top: int, offset_le0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares ``(s, o)`` of each row of ``x`` ``(..., n)`` for values ``s·q + o``, ``q`` in ``0..top``.

    ``offset_le0``: the offset must be ≤ 0 (the k-quants store ``−o`` unsigned). Candidates stretch the
    min..max range by ``step`` levels; codes are fixed per candidate and ``(s, o)`` solved; the lowest
    error wins. Shapes ``(...)``.
    """
    lo, hi = x.amin(-1), x.amax(-1)
    if offset_le0:
        lo = lo.clamp(max=0)
    span = hi - lo
    safe = _safe(span)
    n = x.shape[-1]
    sx, sxx = x.sum(-1), (x * x).sum(-1)
    xs = x - lo.unsqueeze(-1)
    best_s, best_o = span / top, lo.clone()
    q = torch.empty_like(x)
    best = torch.full_like(span, float("inf"))
    for step in (None, *OFFSET_STEPS):  # None: the plain min..max grid
        scale = (top / safe) if step is None else ((top + step) / safe)
        torch.mul(xs, scale.unsqueeze(-1), out=q)
        q.round_().clamp_(0, top)
        sq, sqq = q.sum(-1), (q * q).sum(-1)
        sxq = (q * x).sum(-1)
        if step is None:
            s, o = best_s, best_o
            ok = torch.ones_like(span, dtype=torch.bool)
        else:
            det = n * sqq - sq * sq
            ok = det > 0
            det = torch.where(ok, det, torch.ones_like(det))
            s = (n * sxq - sx * sq) / det
            o = (sqq * sx - sq * sxq) / det
            if offset_le0:
                pos = o > 0
                o = torch.where(pos, torch.zeros_like(o), o)
                s = torch.where(pos, sxq / sqq.clamp_min(1), s)
        # Σ(s·q + o − x)² from the sums, without another pass over the block
        err = s * s * sqq + 2 * s * o * sq + n * o * o - 2 * s * sxq - 2 * o * sx + sxx
        better = ok & (err < best)
        best_s, best_o, best = torch.where(better, s, best_s), torch.where(better, o, best_o), torch.where(better, err, best)
    flat = span <= 0
    return torch.where(flat, torch.zeros_like(best_s), best_s), torch.where(flat, lo, best_o)


def _per_column(t: torch.Tensor, n: int) -> torch.Tensor:
    """Sub-block parameters ``(rows, groups, k)`` spread over ``n`` columns (each sub-block covers ``n / k``)."""
    k = t.shape[-1]
    if k == 1:
        return t
    if n % k:
        raise ValueError(f"{n} columns do not split evenly over {k} sub-blocks")
    return t.repeat_interleave(n // k, dim=-1)


# -- byte layout ------------------------------------------------------------------------------------
@cache
def _bit_map(kind: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(byte index, bit shift)`` of element ``e`` of a block for one packed field of GGML's layouts."""
    e = torch.arange(n)
    if kind == "nib32":  # 4-bit, 32 weights in 16 bytes: byte e % 16, low nibble for the first half
        return e % 16, 4 * (e // 16)
    if kind == "bit32":  # 1 bit of 32 weights in a little-endian uint32
        return e // 8, e % 8
    if kind == "bit256":  # 1 bit of 256 weights in 32 bytes: byte e % 32, bit e // 32
        return e % 32, e // 32
    if kind == "crumb256":  # 2 bits, two halves of 128: byte 32·h + r % 32, shift 2·(r // 32)
        h, r = e // 128, e % 128
        return 32 * h + r % 32, 2 * (r // 32)
    if kind == "nib256":  # 4 bits, four chunks of 64: byte 32·c + r % 32, shift 4·(r // 32)
        c, r = e // 64, e % 64
        return 32 * c + r % 32, 4 * (r // 32)
    if kind == "nib256h":  # q6_k's low nibbles, two halves of 128: byte 64·h + r % 64, shift 4·(r // 64)
        h, r = e // 128, e % 128
        return 64 * h + r % 64, 4 * (r // 64)
    raise ValueError(kind)


def _put(out: torch.Tensor, at: int, values: torch.Tensor, kind: str, nbytes: int) -> None:
    """OR the fields ``values`` ``(N, n)`` into ``out[:, at:at+nbytes]`` (int64) at :func:`_bit_map` places."""
    idx, shift = _bit_map(kind, values.shape[1])
    seg = torch.zeros(values.shape[0], nbytes, dtype=torch.int64)
    seg.scatter_add_(1, idx.expand(values.shape[0], -1), values << shift)
    out[:, at:at + nbytes] |= seg


def _take(raw: torch.Tensor, at: int, kind: str, n: int, width: int) -> torch.Tensor:
    """Fields of ``width`` bits of ``n`` elements read from ``raw[:, at:]`` (int64) at :func:`_bit_map` places."""
    idx, shift = _bit_map(kind, n)
    return (raw[:, at + idx] >> shift) & ((1 << width) - 1)


def _put_half(out: torch.Tensor, at: int, t: torch.Tensor) -> None:
    out[:, at:at + 2] = t.to(torch.float16).contiguous().view(torch.uint8).view(-1, 2).to(torch.int64)


def _take_half(raw: torch.Tensor, at: int) -> torch.Tensor:
    return raw[:, at:at + 2].to(torch.uint8).contiguous().view(torch.float16).view(-1)


def _put_k4_scales(out: torch.Tensor, at: int, sc: torch.Tensor, mn: torch.Tensor) -> None:
    """Q4_K/Q5_K's eight 6-bit scales and mins in 12 bytes: the first four of each whole in bytes 0..7,
    the last four's low nibbles in bytes 8..11 and their top 2 bits in the top of bytes 0..7."""
    o = out[:, at:at + 12]
    o[:, 0:4] |= sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    o[:, 4:8] |= mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    o[:, 8:12] |= (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)


def _take_k4_scales(raw: torch.Tensor, at: int) -> tuple[torch.Tensor, torch.Tensor]:
    b = raw[:, at:at + 12]
    sc = torch.cat([b[:, 0:4] & 63, (b[:, 8:12] & 15) | ((b[:, 0:4] >> 6) << 4)], dim=1)
    mn = torch.cat([b[:, 4:8] & 63, (b[:, 8:12] >> 4) | ((b[:, 4:8] >> 6) << 4)], dim=1)
    return sc, mn


def _put_k3_scales(out: torch.Tensor, at: int, sc: torch.Tensor) -> None:
    """Sixteen signed 6-bit scales stored ``+ 32``: low nibbles in bytes 0..7, top 2 bits in 8..11."""
    v = sc + 32
    j = torch.arange(16)
    low = torch.zeros(v.shape[0], 12, dtype=torch.int64)
    low.scatter_add_(1, (j % 8).expand(v.shape[0], -1), (v & 15) << (4 * (j // 8)))
    low.scatter_add_(1, (8 + j % 4).expand(v.shape[0], -1), (v >> 4) << (2 * (j // 4)))
    out[:, at:at + 12] |= low


def _take_k3_scales(raw: torch.Tensor, at: int) -> torch.Tensor:
    j = torch.arange(16)
    b = raw[:, at:at + 12]
    v = ((b[:, j % 8] >> (4 * (j // 8))) & 15) | (((b[:, 8 + j % 4] >> (2 * (j // 4))) & 3) << 4)
    return v - 32


def pack_blocks(t: BlockType, codes: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """GGML block bytes ``(N, type_size)`` uint8 of codes ``(N, block)`` and per-block parameters ``(N[, nsub])``."""
    c = codes.to(torch.int64)
    out = torch.zeros(c.shape[0], t.type_size, dtype=torch.int64)
    name = t.name
    if name in ("Q4_0", "Q5_0", "Q8_0", "Q4_1", "Q5_1"):
        _put_half(out, 0, p["d"])
        at = 2
        if not t.signed:
            _put_half(out, 2, p["m"])
            at = 4
        if name == "Q8_0":
            out[:, at:] = c ^ 128  # the int8 byte of c − 128
        else:
            if t.bits == 5:
                _put(out, at, c >> 4, "bit32", 4)
                at += 4
            _put(out, at, c & 15, "nib32", 16)
    elif name == "Q2_K":
        out[:, 0:16] = p["sub_scales"].long() | (p["sub_mins"].long() << 4)
        _put(out, 16, c, "crumb256", 64)
        _put_half(out, 80, p["d"])
        _put_half(out, 82, p["dmin"])
    elif name == "Q3_K":
        _put(out, 0, c >> 2, "bit256", 32)
        _put(out, 32, c & 3, "crumb256", 64)
        _put_k3_scales(out, 96, p["sub_scales"].long())
        _put_half(out, 108, p["d"])
    elif name in ("Q4_K", "Q5_K"):
        _put_half(out, 0, p["d"])
        _put_half(out, 2, p["dmin"])
        _put_k4_scales(out, 4, p["sub_scales"].long(), p["sub_mins"].long())
        at = 16
        if name == "Q5_K":
            _put(out, at, c >> 4, "bit256", 32)
            at += 32
        _put(out, at, c & 15, "nib256", 128)
    elif name == "Q6_K":
        _put(out, 0, c & 15, "nib256h", 128)
        _put(out, 128, c >> 4, "crumb256", 64)
        out[:, 192:208] = p["sub_scales"].long() & 255
        _put_half(out, 208, p["d"])
    else:  # pragma: no cover - TYPES lists only the above
        raise ValueError(name)
    return out.to(torch.uint8)


def unpack_blocks(t: BlockType, raw: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Inverse of :func:`pack_blocks`: ``(codes (N, block) int64, parameters)`` from bytes ``(N, type_size)``."""
    r = raw.to(torch.int64)
    name = t.name
    p: dict[str, torch.Tensor] = {}
    if name in ("Q4_0", "Q5_0", "Q8_0", "Q4_1", "Q5_1"):
        p["d"] = _take_half(r, 0)
        at = 2
        if not t.signed:
            p["m"] = _take_half(r, 2)
            at = 4
        if name == "Q8_0":
            return r[:, at:] ^ 128, p
        high = 0
        if t.bits == 5:
            high = _take(r, at, "bit32", 32, 1) << 4
            at += 4
        return _take(r, at, "nib32", 32, 4) | high, p
    if name == "Q2_K":
        p = {"d": _take_half(r, 80), "dmin": _take_half(r, 82), "sub_mins": (r[:, 0:16] >> 4).to(torch.uint8),
             "sub_scales": (r[:, 0:16] & 15).to(torch.uint8)}
        return _take(r, 16, "crumb256", QK_K, 2), p
    if name == "Q3_K":
        p = {"d": _take_half(r, 108), "sub_scales": _take_k3_scales(r, 96).to(torch.int8)}
        return _take(r, 32, "crumb256", QK_K, 2) | (_take(r, 0, "bit256", QK_K, 1) << 2), p
    if name in ("Q4_K", "Q5_K"):
        sc, mn = _take_k4_scales(r, 4)
        p = {"d": _take_half(r, 0), "dmin": _take_half(r, 2), "sub_mins": mn.to(torch.uint8),
             "sub_scales": sc.to(torch.uint8)}
        if name == "Q5_K":
            return _take(r, 48, "nib256", QK_K, 4) | (_take(r, 16, "bit256", QK_K, 1) << 4), p
        return _take(r, 16, "nib256", QK_K, 4), p
    if name == "Q6_K":
        p = {"d": _take_half(r, 208), "sub_scales": r[:, 192:208].to(torch.uint8).view(torch.int8)}
        return _take(r, 0, "nib256h", QK_K, 4) | (_take(r, 128, "crumb256", QK_K, 2) << 4), p
    raise ValueError(name)  # pragma: no cover


# -- the format -------------------------------------------------------------------------------------
@FORMATS.register("q")
@dataclass(frozen=True)
class GGUFFormat(WeightFormat):
    """``q{bits}_{kind}``: one of llama.cpp's GGUF block types (see the module docstring)."""

    kind: str = ""
    family: ClassVar[str] = "q"
    min_bits: ClassVar[int] = 2
    max_bits: ClassVar[int] = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        kind = str(self.kind).lower()
        if not kind:
            kind = "0" if (self.bits, "0") in TYPES else "k"
        if (self.bits, kind) not in TYPES:
            raise QeraError(f"q{self.bits}_{self.kind}: not a GGUF block type this qera stores; known: {KNOWN}")
        object.__setattr__(self, "kind", kind)

    # -- spec ---------------------------------------------------------------------------------------
    def options(self) -> dict[str, Any]:
        return {}

    def __str__(self) -> str:
        return f"q{self.bits}_{self.kind}"

    @property
    def block_type(self) -> BlockType:
        return TYPES[(self.bits, self.kind)]

    @property
    def ggml_type(self) -> str:
        """GGML's name of the type (``Q4_K``), as in ``gguf.GGMLQuantizationType``."""
        return self.block_type.name

    @property
    def bits_per_weight(self) -> float:
        t = self.block_type
        return 8 * t.type_size / t.block

    @property
    def group_width(self) -> int:
        return self.block_type.block

    @property
    def fallback(self) -> str | None:
        return FALLBACKS.get(self.block_type.name)

    # -- shapes -------------------------------------------------------------------------------------
    def check_shape(self, shape: tuple[int, ...], name: str | None = None) -> None:
        width = shape[-1] if len(shape) else 1
        block = self.block_type.block
        if width % block:
            hint = (f"quantize such layers as llama.cpp does with --format-fallback auto ({self.fallback}), "
                    if self.fallback else "")
            raise QeraError(
                f"{self} stores whole GGUF blocks of {block} weights along the input dimension, but the width is "
                f"{width}{where(name)}; {hint}leave them out (--exclude), or use a 32-weight type (q4_0, q5_0, "
                f"q8_0) if the width is a multiple of 32"
            )

    def stored_shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        self.check_shape(tuple(shape))
        t = self.block_type
        rows, groups = block_grid(shape, t.block)
        return {"codes": ((packed_nbytes(rows * groups * t.block, t.bits),), torch.uint8),
                **t.param_shapes(rows, groups)}

    # -- math ---------------------------------------------------------------------------------------
    def fit(self, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
        t = self.block_type
        x = blocks.to(torch.float32)
        if not t.kquant:
            if t.signed:
                return {"d": _fp16(signed_scale(x, t.half), "scale")}
            s, o = affine_scale(x, t.top, offset_le0=False)
            return {"d": _fp16(s, "scale"), "m": _fp16(o, "minimum")}
        sub = x.view(*x.shape[:-1], t.nsub, t.sub)
        levels = 1 << (t.sub_bits - 1) if t.signed else (1 << t.sub_bits) - 1
        if t.signed:
            s = signed_scale(sub, t.half)  # (rows, groups, nsub)
            peak = s.gather(-1, s.abs().argmax(-1, keepdim=True)).squeeze(-1)
            d = _fp16(-peak / levels, "scale")
            sc = torch.round(s / _safe(d.float()).unsqueeze(-1)).clamp_(-levels, levels - 1)
            sc = torch.where(d.float().unsqueeze(-1) != 0, sc, torch.zeros_like(sc))
            params = {"d": d, "sub_scales": sc.to(torch.int8)}
        else:
            s, o = affine_scale(sub, t.top, offset_le0=True)
            s, mn = s.clamp(min=0), (-o).clamp(min=0)
            d = _fp16(s.amax(-1) / levels, "scale")
            dmin = _fp16(mn.amax(-1) / levels, "minimum")
            sc = torch.round(s / _safe(d.float()).unsqueeze(-1)).clamp_(0, levels)
            m = torch.round(mn / _safe(dmin.float()).unsqueeze(-1)).clamp_(0, levels)
            params = {"d": d, "dmin": dmin, "sub_mins": m.to(torch.uint8), "sub_scales": sc.to(torch.uint8)}
        return self._refit(x, params)

    def _refit(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """With the sub-block integers fixed, solve the fp16 super-block scale(s) by least squares on the
        codes they give; each super-block keeps whichever of the two has the lower squared error."""
        t = self.block_type
        q = self.codes(x, params).to(torch.float32)
        err0 = ((self.values(q, params) - x) ** 2).sum(-1)
        sc = _per_column(params["sub_scales"].to(torch.float32), t.block)
        if t.signed:
            a = sc * (q - t.half)
            aa = (a * a).sum(-1)
            d = (a * x).sum(-1) / aa.clamp_min(1e-30)
            new = dict(params, d=torch.where(aa > 0, d, params["d"].float()).to(torch.float16))
        else:
            a = sc * q
            b = _per_column(params["sub_mins"].to(torch.float32), t.block)
            aa, ab, bb = (a * a).sum(-1), (a * b).sum(-1), (b * b).sum(-1)
            ax, bx = (a * x).sum(-1), (b * x).sum(-1)
            det = aa * bb - ab * ab
            ok = det > 1e-12 * aa * bb
            det = torch.where(ok, det, torch.ones_like(det))
            d = torch.where(ok, (bb * ax - ab * bx) / det, params["d"].float())
            dmin = torch.where(ok, -(aa * bx - ab * ax) / det, params["dmin"].float())
            new = dict(params, d=d.to(torch.float16), dmin=dmin.to(torch.float16))
        finite = torch.isfinite(new["d"]) & torch.isfinite(new.get("dmin", new["d"]))
        err1 = ((self.round_to_grid(x, new) - x) ** 2).sum(-1)
        keep = ~(finite & (err1 < err0))
        return {k: torch.where(keep, v, new[k]) if k in ("d", "dmin") else v for k, v in params.items()}

    def column_params(self, params: dict[str, torch.Tensor], start: int, n: int) -> dict[str, torch.Tensor]:
        t = self.block_type
        if not t.kquant:
            return params
        i0, i1 = start // t.sub, (start + n - 1) // t.sub + 1
        return {k: v[..., i0:i1] if k.startswith("sub_") else v for k, v in params.items()}

    def _scales(self, params: dict[str, torch.Tensor], n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-column float32 ``(scale, offset)`` ``(rows, groups, n | 1)`` in the reference's arithmetic order."""
        t = self.block_type
        d = params["d"].to(torch.float32).unsqueeze(-1)
        if not t.kquant:
            return d, None if t.signed else params["m"].to(torch.float32).unsqueeze(-1)
        scale = _per_column(d * params["sub_scales"].to(torch.float32), n)
        if t.signed:
            return scale, None
        dmin = params["dmin"].to(torch.float32).unsqueeze(-1)
        return scale, _per_column(dmin * params["sub_mins"].to(torch.float32), n)

    def grid_step(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._scales(params, self.block_type.block)[0].abs()  # the (sub-)block's scale (q4_0's may be negative)

    def codes(self, blocks: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        t = self.block_type
        scale, offset = self._scales(params, blocks.shape[-1])
        s = _safe(scale)
        if t.signed:
            q = torch.round(blocks / s).clamp_(-t.half, t.half - 1) + t.half
        elif t.kquant:  # value = s·q − offset
            q = torch.round((blocks + offset) / s).clamp_(0, t.top)
        else:  # value = d·q + m
            q = torch.round((blocks - offset) / s).clamp_(0, t.top)
        zero = torch.zeros_like(q) + (t.half if t.signed else 0)
        return torch.where(scale != 0, q, zero).to(torch.int64)

    def values(self, codes: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        t = self.block_type
        scale, offset = self._scales(params, codes.shape[-1])
        if t.signed:
            return scale * (codes.to(torch.float32) - t.half)
        q = codes.to(torch.float32)
        return scale * q - offset if t.kquant else scale * q + offset

    # -- GGUF bytes ---------------------------------------------------------------------------------
    def to_gguf_bytes(self, tensors: dict[str, torch.Tensor], shape: tuple[int, ...], name: str | None = None) -> np.ndarray:
        """The GGML block bytes of a stored weight of ``shape``: uint8 ``(*shape[:-1], width / block · type_size)``,
        the array gguf-py's writer takes with ``raw_dtype`` set to :attr:`ggml_type`."""
        shape = tuple(shape)
        self.check_shape(shape, name)
        t = self.block_type
        self.check_stored(tensors, shape, f"layer {name}" if name else "")
        rows, groups = block_grid(shape, t.block)
        out = np.empty((rows * groups, t.type_size), dtype=np.uint8)
        step = max(1, BYTES_CHUNK_ELEMS // (groups * t.block))
        step = max(8, step // 8 * 8)  # whole bytes of the packed codes
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            n = (r1 - r0) * groups * t.block
            start = r0 * groups * t.block * t.bits // 8
            codes = unpack_bits(tensors["codes"][start:start + packed_nbytes(n, t.bits)].cpu(), t.bits, n)
            p = {k: v[r0:r1].cpu().reshape(n // t.block, *v.shape[2:]) for k, v in tensors.items() if k != "codes"}
            raw = pack_blocks(t, codes.view(-1, t.block), p)
            out[r0 * groups:r1 * groups] = raw.numpy()
        return out.reshape(*shape[:-1], groups * t.type_size)

    def from_gguf_bytes(self, data: np.ndarray, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """Stored tensors of a weight of ``shape`` from its GGML block bytes (inverse of :meth:`to_gguf_bytes`)."""
        shape = tuple(shape)
        self.check_shape(shape)
        t = self.block_type
        rows, groups = block_grid(shape, t.block)
        raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
        if raw.size != rows * groups * t.type_size:
            raise QeraError(f"{self}: {raw.size} bytes, expected {rows * groups * t.type_size} for a weight of shape {shape}")
        codes, params = unpack_blocks(t, torch.from_numpy(raw.copy()).view(rows * groups, t.type_size))
        out = {"codes": pack_bits(codes, t.bits)}
        for k, (shp, dt) in t.param_shapes(rows, groups).items():
            out[k] = params[k].reshape(shp).to(dt)
        return out


__all__ = ["QK_K", "TYPES", "BlockType", "GGUFFormat", "affine_scale", "pack_blocks", "signed_scale", "unpack_blocks"]
