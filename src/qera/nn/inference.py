"""Switching a model's quantized layers to the fused int4 kernel for inference (in place)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from qera.nn.modules import QERALinear

log = logging.getLogger(__name__)


def prepare_inference(model: nn.Module, dtype: torch.dtype | None = None, slow_ok: bool = False) -> dict[str, str]:
    """Switch every ``QERALinear`` of ``model`` that the fused int4 kernel can run to it (in place).

    Run it after the model is on its device and in its dtype: the kernel's layout is device-specific,
    and a prepared layer keeps only the kernel's copy of its codes (it can no longer be saved or
    moved; load the checkpoint again for that). ``dtype``: the inputs' dtype (default: the dtype of
    the model's first floating-point parameter outside the quantized layers). Returns
    ``{layer: "int4 kernel" | reason it keeps dequantizing}``. ``slow_ok``: see :func:`unsupported`.
    """
    if dtype is None:
        quantized = {id(p) for m in model.modules() if isinstance(m, QERALinear) for p in m.parameters()}
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point() and id(p) not in quantized),
                     torch.float32)
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QERALinear):
            reason = mod.use_kernel(dtype, slow_ok)
            out[name] = reason or "int4 kernel"
    fused = sum(v == "int4 kernel" for v in out.values())
    log.info("fused int4 kernel on %d of %d quantized layers (%s inputs)", fused, len(out), dtype)
    for name, why in out.items():
        if why != "int4 kernel":
            log.info("%s keeps dequantizing per forward: %s", name, why)
    return out
