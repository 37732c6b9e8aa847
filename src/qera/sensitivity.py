"""How much the model's loss feels each layer's output error: mean squared loss gradients.

A small change ``δy`` of a layer's output raises the next-token loss by about ``½ δyᵀ F δy``
(``F`` the Fisher information of the output). With ``F`` taken as ``c · I`` per layer,
``c = E[‖∂L/∂y‖²] / out`` (mean over tokens and output channels), the loss cost of the layer's
remaining error is ``c · trace(E R Eᵀ)`` up to one factor shared by every layer. Rank allocation
uses ``c`` to put the layers' output errors on the loss's scale (``rank_normalize="fisher"``).
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import model_device
from .errors import QeraError

log = logging.getLogger(__name__)


def _rows(batches: Sequence[Mapping[str, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Every window of every batch as ``(input_ids (1, L), attention_mask (1, L) or None)``."""
    out = []
    for b in batches:
        mask = b.get("attention_mask")
        for i in range(b["input_ids"].shape[0]):
            out.append((b["input_ids"][i:i + 1], mask[i:i + 1] if mask is not None else None))
    return out


def output_sensitivity(
    model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]], targets: Mapping[str, nn.Module],
    progress: bool = False,
) -> dict[str, float]:
    """``{layer: E[‖∂L/∂y‖²] / out}`` over the non-padding tokens of ``batches`` (causal LM loss).

    Gradients flow only to the activations: every parameter's ``requires_grad`` is switched off
    for the passes (and put back), so no weight gradient is ever allocated. Hooks are removed in
    ``finally``. Windows go one at a time (memory: one window's backward graph); the loss is the
    sum of the window's next-token cross-entropies, so a token's gradient does not depend on how
    many tokens share its window or batch.
    """
    if not batches:
        raise QeraError("rank_normalize='fisher' needs calibration batches (the loss gradients come from them)")
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embed is None:
        raise QeraError("rank_normalize='fisher' needs a model with input embeddings and a language-model loss")
    sums = {name: 0.0 for name in targets}  # Python floats: float64 sums
    tokens = 0
    handles = []
    flags = {p: p.requires_grad for p in model.parameters()}
    mask_now: list[torch.Tensor | None] = [None]

    def grad_hook(name: str):
        def on_output(module, args, out):
            if torch.is_tensor(out) and out.requires_grad:
                def acc(g: torch.Tensor) -> None:
                    sq = g.detach().to(torch.float32).pow(2).sum(-1)  # (batch, seq)
                    m = mask_now[0]
                    sums[name] += float((sq * m).sum() if m is not None else sq.sum()) / g.shape[-1]
                out.register_hook(acc)
        return on_output

    def embeds_require_grad(module, args, out):
        return out.requires_grad_() if not out.requires_grad else out

    was_training = model.training
    try:
        for p in flags:
            p.requires_grad_(False)
        model.eval()
        handles.append(embed.register_forward_hook(embeds_require_grad))
        handles += [mod.register_forward_hook(grad_hook(name)) for name, mod in targets.items()]
        device = model_device(model)
        for ids, mask in tqdm(_rows(batches), desc="loss gradients", unit="window", disable=not progress):
            ids = ids.to(device)  # one window at a time: the backward graph of a single window
            mask = mask.to(device) if mask is not None else torch.ones_like(ids)
            labels = ids.masked_fill(mask == 0, -100)
            n_labels = int((labels[:, 1:] != -100).sum())
            if n_labels == 0:
                continue
            mask_now[0] = mask.to(torch.float32)
            with torch.enable_grad():
                out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
                if getattr(out, "loss", None) is None:
                    raise QeraError("rank_normalize='fisher' needs a model that returns a language-model loss")
                (out.loss * n_labels).backward()  # summed token losses: gradients do not depend on the window's length
            tokens += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return {name: s / max(tokens, 1) for name, s in sums.items()}
