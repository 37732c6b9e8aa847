"""Fused dequantize-matmul for ``QERALinear``'s packed inference mode (4-bit formats).

PyTorch ships a tiled int4 weight-only GEMM ("tinygemm"; ``torch._weight_int4pack_mm`` on CUDA
sm80+ with bf16 inputs, ``torch._weight_int4pack_mm_for_cpu`` on the CPU for fp32/fp16/bf16). It
computes ``y = x Wᵀ`` with ``W = (q − 8)·s + z``, ``q ∈ [0, 16)`` and one ``(s, z)`` per group of
``G ∈ {32, 64, 128, 256}`` input columns, reading the 4-bit codes straight from memory: the dense
weight never exists. qera's 4-bit formats map onto it (:data:`INT4_MAPS`):

- ``int4`` (symmetric, group G): ``value = s·(code − 7)`` → ``q = code + 1``, ``z = 0``;
- ``int4:asym``: ``value = min + s·code`` → ``q = code``, ``z = min + 8·s``;
- ``mxint4`` (block 32): ``value = ±k·2^e`` → ``q = 8 ± k``, ``s = 2^e``, ``z = 0``.

The operands are exact for symmetric int4 and mxint4 (:class:`Int4Operands`); the kernel takes
``(s, z)`` in the input dtype, so in bf16 only mxint4's power-of-two scales stay exact (int4's
fp16 scales round to bf16's 8-bit mantissa, as they do when such a model dequantizes to bf16).

The kernel's layout depends on the device, so a layer is prepared where it will run
(:func:`qera.nn.inference.prepare_inference`), and the prepared layer keeps only the kernel's copy of its codes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch.torch_version import TorchVersion

from qera.util.registry import Registry
from qera.util.errors import QeraError
from qera.core.formats import QuantizedWeight

log = logging.getLogger(__name__)

GROUPS = (32, 64, 128, 256)  # group sizes the int4 kernels take
ROW_STEP = 1024  # rows of codes unpacked at a time while preparing (bounds the temporaries)


@dataclass
class Int4Operands:
    """A weight in the kernel's terms: ``W[n, k] = (q[n, k] − 8)·scales[n, k // group] + zeros[n, k // group]``.

    ``q``: ``(N, K)`` uint8 in ``[0, 16)``; ``scales``, ``zeros``: ``(N, K // group)`` float32.
    """

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group: int

    def dense(self) -> torch.Tensor:
        """The float32 weight ``(N, K)`` these operands stand for (tests and checks)."""
        s = self.scales.repeat_interleave(self.group, dim=1)
        z = self.zeros.repeat_interleave(self.group, dim=1)
        return (self.q.to(torch.float32) - 8.0) * s + z


# format family → (format, stored tensors, rows, cols) → operands; only 4-bit formats are registered
INT4_MAPS: Registry[Callable[..., Int4Operands]] = Registry("int4 kernel mapping")


def _codes_4bit(packed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """qera's 4-bit codes ``(rows, cols)`` uint8 from its packed stream (low nibble first), a slice at a time."""
    per_row = cols // 2
    flat = packed.reshape(rows, per_row)
    out = torch.empty(rows, cols, dtype=torch.uint8, device=packed.device)
    for r in range(0, rows, ROW_STEP):
        b = flat[r:r + ROW_STEP]
        out[r:r + ROW_STEP, 0::2] = b & 0xF
        out[r:r + ROW_STEP, 1::2] = b >> 4
    return out


@INT4_MAPS.register("int")
def _int_operands(fmt, tensors: dict[str, torch.Tensor], rows: int, cols: int) -> Int4Operands:
    codes = _codes_4bit(tensors["codes"], rows, cols)
    scales = tensors["scales"].to(torch.float32)
    if fmt.asym:
        return Int4Operands(codes, scales, tensors["mins"].to(torch.float32) + 8.0 * scales, fmt.group)
    return Int4Operands(codes.add_(1), scales, torch.zeros_like(scales), fmt.group)


@INT4_MAPS.register("mxint")
def _mxint_operands(fmt, tensors: dict[str, torch.Tensor], rows: int, cols: int) -> Int4Operands:
    codes = _codes_4bit(tensors["codes"], rows, cols)
    magnitude = (codes & 0x7).to(torch.int16)
    q = torch.where(codes >= 8, 8 - magnitude, 8 + magnitude).to(torch.uint8)
    exps = tensors["exponents"].to(torch.int32) - 127 - (fmt.bits - 2)
    scales = torch.ldexp(torch.ones(exps.shape, device=exps.device), exps)
    return Int4Operands(q, scales, torch.zeros_like(scales), fmt.block)


def int4_operands(qw: QuantizedWeight) -> Int4Operands:
    """The kernel's operands of a 4-bit weight (raises :class:`QeraError` for other formats)."""
    reason = _format_reason(qw)
    if reason:
        raise QeraError(reason)
    rows, cols = qw.shape
    return INT4_MAPS.get(qw.fmt.family)(qw.fmt, qw.tensors, rows, cols)


def _format_reason(qw: QuantizedWeight) -> str | None:
    fmt = qw.fmt
    if fmt.bits != 4 or fmt.family not in INT4_MAPS:
        return f"format {fmt} has no fused kernel (4-bit int and mxint formats have: int4:group=G, mxint4)"
    if len(qw.shape) != 2:
        return f"weight shape {qw.shape} is not 2-D"
    group = fmt.group_width
    if group not in GROUPS:
        return f"group {group} of {fmt} is not one the kernel takes ({', '.join(map(str, GROUPS))})"
    if qw.shape[1] % group:
        return f"in_features {qw.shape[1]} is not a multiple of the group {group}"
    return None


def unsupported(qw: QuantizedWeight, device: torch.device, dtype: torch.dtype, slow_ok: bool = False) -> str | None:
    """Why the fused kernel cannot (or should not) run this weight on ``device`` with ``dtype`` inputs, or None.

    ``slow_ok``: also accept the CPU kernel's float32/float16 paths, exact but far slower than
    dequantizing per layer (bench/eval_speed.py on SmolLM2: 11 against 416 tokens/s in fp32)."""
    reason = _format_reason(qw)
    if reason:
        return reason
    out_f, in_f = qw.shape
    if TorchVersion(torch.__version__) < (2, 5):  # older versions take another code layout
        return f"the int4 kernels need torch >= 2.5, this is {torch.__version__}"
    if device.type == "cuda":
        if dtype != torch.bfloat16:
            return f"the CUDA int4 kernel takes bfloat16 inputs, not {dtype}"
        if torch.cuda.get_device_capability(device) < (8, 0):
            return "the CUDA int4 kernel needs compute capability 8.0 or newer"
        if out_f % 8 or in_f % 32:
            return f"the CUDA int4 kernel needs out_features % 8 == 0 and in_features % 32 == 0, got {out_f}x{in_f}"
    elif device.type == "cpu":
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"the CPU int4 kernel takes float32, float16 or bfloat16 inputs, not {dtype}"
        if dtype != torch.bfloat16 and not slow_ok:
            return f"the CPU int4 kernel is fast only for bfloat16 inputs ({dtype} is slower than dequantizing)"
        if out_f % 16:
            return f"the CPU int4 kernel needs out_features % 16 == 0, got {out_f}"
    else:
        return f"no int4 kernel on {device.type}"
    return None


def _inner_k_tiles(in_f: int) -> int:
    return next(t for t in (8, 4, 2) if in_f % (t * 16) == 0)


class Int4Kernel:
    """One layer's weight in the int4 kernel's device-specific layout; ``kernel(x)`` is ``x W̃ᵀ``.

    ``x``: ``(..., in)`` in ``dtype`` on ``device``; returns ``(..., out)`` in ``dtype``.
    """

    def __init__(self, qw: QuantizedWeight, device: torch.device, dtype: torch.dtype) -> None:
        reason = unsupported(qw, device, dtype, slow_ok=True)
        if reason:
            raise QeraError(reason)
        ops = int4_operands(QuantizedWeight(qw.fmt, qw.shape, qw.dtype, {k: v.to(device) for k, v in qw.tensors.items()}))
        self.out_features, self.in_features = qw.shape
        self.group, self.dtype, self.device = ops.group, dtype, device
        if device.type == "cuda":  # (N, K/2) bytes, even column in the high nibble
            packed = (ops.q[:, 0::2] << 4) | ops.q[:, 1::2]
            self.tiles = torch._convert_weight_to_int4pack(packed.contiguous(), _inner_k_tiles(self.in_features))
            self._mm = torch._weight_int4pack_mm
        else:
            self.tiles = torch._convert_weight_to_int4pack_for_cpu(ops.q.to(torch.int32), 1)
            self._mm = torch._weight_int4pack_mm_for_cpu
        # (K/G, N, 2): scale and zero of one group next to each other
        self.scales_zeros = torch.stack([ops.scales.T, ops.zeros.T], dim=-1).to(dtype).contiguous()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.tiles, self.scales_zeros))

    def release(self) -> None:
        """Free the device copies (they become meta tensors, like a released module's parameters); the
        layer stays marked as prepared, so it still refuses to be saved or moved."""
        self.tiles = self.tiles.to("meta")
        self.scales_zeros = self.scales_zeros.to("meta")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype or x.device != self.device:
            raise QeraError(f"this layer was prepared for {self.dtype} inputs on {self.device}; got {x.dtype} on "
                            f"{x.device} (prepare the model again after moving or casting it)")
        lead = x.shape[:-1]
        y = self._mm(x.reshape(-1, self.in_features).contiguous(), self.tiles, self.group, self.scales_zeros)
        return y.reshape(*lead, self.out_features)
