"""``QERALinear``: a linear layer with a packed low-bit weight plus a high-precision low-rank term.

    y = x W̃ᵀ + (x Aᵀ) Bᵀ + b,     W̃: (out, in) packed,  A: (rank, in),  B: (out, rank)

By default the dense ``W̃ + B A`` is cached (per dtype/device): inference then costs exactly one
GEMM, like the original layer, for the memory of one dense weight. ``merge_lowrank=False`` caches
``W̃`` alone and applies the low-rank term as two thin GEMMs; ``cache_weight=False`` keeps only
the packed weight and dequantizes in every forward (the QPEFT base, where memory matters).
:meth:`QERALinear.use_kernel` (or :func:`qera.nn.inference.prepare_inference` for a whole model) runs
4-bit weights through a fused dequantize-matmul instead: no dense weight at all, for inference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qera.nn.activations import fake_quantize_activations
from qera.nn.kernels import Int4Kernel, unsupported
from qera.util.errors import QeraError
from qera.core.formats import QuantizedWeight, WeightFormat, parse_format
from qera.core.methods import Reconstruction
from qera.nn.targets import linear_weight

QPREFIX = "qweight_"


class QERALinear(nn.Module):
    """Quantized weight (buffers ``qweight_*``), low-rank ``A``/``B`` parameters and optional bias."""

    def __init__(
        self,
        qweight: QuantizedWeight,
        A: torch.Tensor,
        B: torch.Tensor,
        bias: torch.Tensor | None = None,
        cache_weight: bool = True,
        merge_lowrank: bool = True,
        act_format: WeightFormat | str | None = None,
    ) -> None:
        super().__init__()
        out_f, in_f = qweight.shape
        if A.shape != (A.shape[0], in_f) or B.shape != (out_f, A.shape[0]):
            raise ValueError(f"A {tuple(A.shape)} / B {tuple(B.shape)} do not fit a {out_f}x{in_f} weight")
        self.in_features, self.out_features = in_f, out_f
        self.fmt: WeightFormat = qweight.fmt
        self.weight_dtype = qweight.dtype
        self._qkeys = sorted(qweight.tensors)
        for key in self._qkeys:
            self.register_buffer(QPREFIX + key, qweight.tensors[key])
        self.A = nn.Parameter(A, requires_grad=False)
        self.B = nn.Parameter(B, requires_grad=False)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        if self.bias is not None and self.bias.shape != (out_f,):
            raise ValueError(f"bias {tuple(self.bias.shape)} does not fit {out_f} outputs")
        self.cache_weight = cache_weight
        self.merge_lowrank = merge_lowrank
        # W4A8: the quantized GEMM's input is fake-quantized in this format; the low-rank branch is not
        self.act_format: WeightFormat | None = parse_format(act_format) if act_format else None
        self._w_cache: torch.Tensor | None = None
        self._kernel = None  # qera.nn.kernels.Int4Kernel once use_kernel() switched this layer to it

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_linear(
        cls, linear: nn.Linear, rec: Reconstruction, lowrank_dtype: torch.dtype = torch.float16, cache_weight: bool = True
    ) -> "QERALinear":
        if rec.qweight is None:
            raise ValueError("the reconstruction carries no quantized weight")
        dev = linear.weight.device
        return cls(
            rec.qweight.to(dev), rec.A.to(dev, lowrank_dtype), rec.B.to(dev, lowrank_dtype),
            linear.bias, cache_weight,
        )

    @classmethod
    def from_result(
        cls, module: nn.Module, result, lowrank_dtype: torch.dtype = torch.float16, cache_weight: bool = True,
        act_format: WeightFormat | str | None = None,
    ) -> "QERALinear":
        """Replacement of a linear-like ``module`` (``nn.Linear``, GPT-2 ``Conv1D``) from a :class:`~qera.quantize.layer.LayerResult`."""
        dev = linear_weight(module).device
        return cls(
            result.qweight.to(dev), result.A.to(dev, lowrank_dtype), result.B.to(dev, lowrank_dtype),
            getattr(module, "bias", None), cache_weight, act_format=act_format,
        )

    @classmethod
    def from_stored(
        cls, meta: dict, tensors: dict[str, torch.Tensor], cache_weight: bool = True
    ) -> "QERALinear":
        """Rebuild from checkpoint tensors (``qweight_*``, ``A``, ``B``, ``bias``) and the layer's JSON entry."""
        fmt = parse_format(meta["format"])
        shape = (int(meta["out_features"]), int(meta["in_features"]))
        q = {k[len(QPREFIX):]: v for k, v in tensors.items() if k.startswith(QPREFIX)}
        qw = QuantizedWeight(fmt, shape, getattr(torch, meta["weight_dtype"]), q)
        return cls(qw, tensors["A"], tensors["B"], tensors.get("bias"), cache_weight,
                   act_format=meta.get("act_format"))

    @classmethod
    def empty(
        cls, in_features: int, out_features: int, fmt: str | WeightFormat, rank: int, bias: bool,
        weight_dtype: torch.dtype, lowrank_dtype: torch.dtype,
    ) -> "QERALinear":
        """A placeholder with correctly shaped buffers, to be filled by ``load_state_dict``."""
        fmt = parse_format(fmt)
        qw = fmt.quantize(torch.zeros(out_features, in_features, dtype=weight_dtype))
        A = torch.zeros(rank, in_features, dtype=lowrank_dtype)
        B = torch.zeros(out_features, rank, dtype=lowrank_dtype)
        b = torch.zeros(out_features, dtype=weight_dtype) if bias else None
        return cls(qw, A, B, b)

    # -- views ----------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def _not_prepared(self, what: str) -> None:
        if self._kernel is not None:
            raise QeraError(f"cannot {what}: this layer was prepared for the fused int4 kernel, which keeps its codes "
                            "in the kernel's own layout; load the checkpoint again to save, move or export it")

    @property
    def packed_weight(self) -> QuantizedWeight:
        self._not_prepared("read the packed weight")
        tensors = {k: getattr(self, QPREFIX + k) for k in self._qkeys}
        return QuantizedWeight(self.fmt, (self.out_features, self.in_features), self.weight_dtype, tensors)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.packed_weight.dequantize(dtype or self.weight_dtype)

    @property
    def weight(self) -> torch.Tensor:
        """``W̃ + B A`` as a dense tensor (for analysis and for code that reads ``.weight``).

        A layer prepared for the fused kernel has no dense weight: ``AttributeError``, so that
        ``getattr(layer, "weight", None)`` (PEFT, HF utilities) reads None."""
        if self._kernel is not None:
            raise AttributeError("weight")
        return self.dequantized_weight() + (self.B.float() @ self.A.float()).to(self.weight_dtype)

    def storage_bits(self) -> dict[str, int]:
        if self._kernel is not None:
            lr = self.A.numel() * self.A.element_size() + self.B.numel() * self.B.element_size()
            return {"weight": 8 * self._kernel.nbytes(), "lowrank": 8 * lr}
        q = sum(getattr(self, QPREFIX + k).numel() * getattr(self, QPREFIX + k).element_size() for k in self._qkeys)
        lr = self.A.numel() * self.A.element_size() + self.B.numel() * self.B.element_size()
        return {"weight": 8 * q, "lowrank": 8 * lr}

    # -- forward --------------------------------------------------------------------------------
    @property
    def _merged(self) -> bool:
        return self.cache_weight and self.merge_lowrank and self.rank > 0 and self.act_format is None

    def _w(self, dtype: torch.dtype) -> torch.Tensor:
        c = self._w_cache
        if c is not None and c.dtype == dtype and c.device == self.A.device:
            return c
        if self._merged:  # W̃ + B A summed in float32 and cast, a block of rows at a time
            w = self.packed_weight.dequantize(dtype, lowrank=(self.B, self.A))
        else:
            w = self.dequantized_weight(dtype)
        if self.cache_weight:
            self._w_cache = w
        return w

    def use_kernel(self, dtype: torch.dtype, slow_ok: bool = False) -> str | None:
        """Run this layer through the fused int4 kernel for ``dtype`` inputs on its current device
        (``slow_ok``: see :func:`qera.nn.kernels.unsupported`).

        Returns None when switched, else why it cannot be (it then keeps its current mode). Once
        switched, the packed codes live only in the kernel's layout: the layer computes
        ``kernel(x) + (x Aᵀ) Bᵀ + b`` and can no longer be saved or moved (inference only).
        """
        if self._kernel is not None:
            if self._kernel.dtype != dtype:
                raise QeraError(f"this layer was prepared for the fused kernel with {self._kernel.dtype} inputs; "
                                f"load the checkpoint again to prepare it for {dtype}")
            return None
        qw = self.packed_weight
        reason = unsupported(qw, self.A.device, dtype, slow_ok)
        if reason:
            return reason
        self._kernel = Int4Kernel(qw, self.A.device, dtype)
        for k in self._qkeys:  # the kernel holds the codes now
            del self._buffers[QPREFIX + k]
        self._w_cache = None
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = x if self.act_format is None else fake_quantize_activations(x, self.act_format)
        if self._kernel is not None:
            y = self._kernel(xq)
            if self.bias is not None:
                y = y + self.bias.to(x.dtype)
            if self.rank:
                y = y + F.linear(F.linear(x, self.A.to(x.dtype)), self.B.to(x.dtype))
            return y
        y = F.linear(xq, self._w(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if self.rank and not self._merged:
            y = y + F.linear(F.linear(x, self.A.to(x.dtype)), self.B.to(x.dtype))
        return y

    def _apply(self, fn, recurse=True):
        # Moving the module moves the packed buffers but never changes their dtype (scales are
        # stored in fp16 and exponents in uint8 by definition of the format).
        if self._kernel is not None:  # the kernel's layout is tied to its device
            probe = fn(torch.empty(0, device=self.A.device))
            if probe.device != self.A.device:
                self._not_prepared(f"move it to {probe.device}")
            return super()._apply(fn, recurse)
        saved = {k: getattr(self, QPREFIX + k) for k in self._qkeys}
        super()._apply(fn, recurse)
        for k, old in saved.items():
            new = getattr(self, QPREFIX + k)
            if new.dtype != old.dtype:
                setattr(self, QPREFIX + k, old.to(new.device))
        self._w_cache = None
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._not_prepared("save it")
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt}, "
            f"rank={self.rank}, bias={self.bias is not None}"
            + (f", act_format={self.act_format}" if self.act_format is not None else "")
            + (", int4 kernel" if self._kernel is not None else "")
        )
