"""Mixture-of-experts blocks with fused expert weights, made quantizable expert by expert.

transformers 5 stores a block's experts as two 3-D parameters, ``gate_up_proj: (E, 2I, H)`` and
``down_proj: (E, H, I)``. :func:`unfuse_experts` replaces such a module by
:class:`UnfusedExperts`, a ``ModuleList`` with one ``gate_up_proj`` / ``down_proj`` ``nn.Linear``
per expert whose weights are views of the fused tensors (no copy) and whose forward is the same
routing loop. Each expert's layers are then ordinary targets (``…mlp.experts.3.gate_up_proj``):
their statistics see exactly the tokens routed to that expert, so the report shows each
expert's token count, and a checkpoint records which modules were unfused so the loader can do
the same before filling them.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from qera.util.errors import QeraError

log = logging.getLogger(__name__)


def is_fused_experts(module: nn.Module) -> bool:
    """The standard fused layout: 3-D ``gate_up_proj`` (gate then up) and ``down_proj``, no bias, no norm."""
    gu, dn = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (
        isinstance(gu, nn.Parameter) and isinstance(dn, nn.Parameter) and gu.dim() == 3 and dn.dim() == 3
        and hasattr(module, "act_fn") and getattr(module, "has_gate", True)
        and not getattr(module, "has_bias", False) and not getattr(module, "has_post_expert_norm", False)
        and not getattr(module, "is_transposed", False) and getattr(module, "is_concatenated", True)
        and gu.shape[0] == dn.shape[0] and gu.shape[2] == dn.shape[1] and gu.shape[1] == 2 * dn.shape[2]
    )


def _default_gate(module: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return module.act_fn(gate) * up


class Expert(nn.Module):
    """One expert: ``down_proj(gate(gate_up_proj(x)))``."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(gate_up.shape[1], gate_up.shape[0], bias=False, device="meta")
        self.down_proj = nn.Linear(down.shape[1], down.shape[0], bias=False, device="meta")
        self.gate_up_proj.weight = nn.Parameter(gate_up, requires_grad=False)
        self.down_proj.weight = nn.Parameter(down, requires_grad=False)


class UnfusedExperts(nn.ModuleList):
    """Per-expert linear layers with the fused module's routing forward ``(hidden, top_k_index, top_k_weights)``.

    While an expert runs, its two layers carry ``qera_rows`` (the flat token indices routed to
    it), so statistics recording can drop padding rows from an expert's input.
    """

    def __init__(self, fused: nn.Module) -> None:
        gu, dn = fused.gate_up_proj, fused.down_proj
        super().__init__(Expert(gu[e], dn[e]) for e in range(gu.shape[0]))
        self.num_experts = gu.shape[0]
        object.__setattr__(self, "act_fn", fused.act_fn)  # not a child: the list holds experts only
        gate = getattr(type(fused), "_apply_gate", None)
        self._gate = gate if callable(gate) else _default_gate
        self.fused_class = type(fused).__name__

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in expert_hit:
            e = int(e[0])
            if e == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(expert_mask[e])
            expert = self[e]
            expert.gate_up_proj.qera_rows = expert.down_proj.qera_rows = token_idx
            try:
                h = self._gate(self, expert.gate_up_proj(hidden_states[token_idx]))
                h = expert.down_proj(h) * top_k_weights[token_idx, top_k_pos, None]
            finally:
                expert.gate_up_proj.qera_rows = expert.down_proj.qera_rows = None
            final.index_add_(0, token_idx, h.to(final.dtype))
        return final

    def materialize_from(self, source: Any, prefix: str, device: torch.device | str, dtype: torch.dtype | None) -> int:
        """Fill meta expert weights from ``source``: the fused ``prefix + gate_up_proj``/``down_proj``
        tensors, or a per-expert layout (``experts.N.w1/w3/w2``, ``experts.N.gate_proj/up_proj/down_proj``)."""
        total = 0
        for part in ("gate_up_proj", "down_proj"):
            todo = [e for e, ex in enumerate(self)
                    if isinstance(getattr(ex, part), nn.Linear) and getattr(ex, part).weight.device.type == "meta"]
            if not todo:
                continue
            fused = source.get(prefix + part, device) if prefix + part in source else None
            if fused is not None and fused.shape[0] != len(self):
                raise QeraError(f"{prefix}{part} holds {fused.shape[0]} experts, the model has {len(self)}")
            for e in todo:
                w = fused[e] if fused is not None else source.legacy_expert(prefix, e, part, device)
                if w is None:
                    raise QeraError(f"the checkpoint has neither {prefix}{part} nor per-expert weights of expert {e}")
                lin = getattr(self[e], part)
                if tuple(w.shape) != tuple(lin.weight.shape):
                    raise QeraError(f"{prefix}{e}.{part} is {tuple(w.shape)} in the checkpoint, the model expects "
                                    f"{tuple(lin.weight.shape)}")
                if dtype is not None:
                    w = w.to(dtype)
                lin.weight = nn.Parameter(w, requires_grad=False)
                total += w.numel() * w.element_size()
        return total


def unfuse_experts(model: nn.Module) -> list[str]:
    """Replace every fused experts module in ``model`` by :class:`UnfusedExperts`; returns their names."""
    from qera.nn.targets import replace_module

    names = [n for n, m in model.named_modules() if n and is_fused_experts(m)]
    for n in names:
        replace_module(model, n, UnfusedExperts(model.get_submodule(n)))
    if names:
        log.info("unfused %d mixture-of-experts module(s) into per-expert linear layers", len(names))
    return names


def unfused_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, UnfusedExperts)]
