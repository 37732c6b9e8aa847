"""How much the model's loss feels each layer's output error: mean squared loss gradients.

A small change ``δy`` of a layer's output raises the next-token loss by about ``½ δyᵀ F δy``
(``F`` the Fisher information of the output). Three approximations of ``F`` per layer:

- per output channel, ``f_j = E[(∂L/∂y_j)²]`` (:func:`output_fisher`): the loss cost of the
  remaining error is ``Σ_j f_j (E R Eᵀ)_jj`` — what ``QuantConfig(output_weight="fisher")`` makes
  the solve minimize, by scaling the error's rows by ``√f`` (see :func:`qera.core.linalg.output_sqrt`);
- the whole output factor ``G = E[gᵀg]`` (``full=True``; K-FAC's ``G ⊗ R``): the cost is
  ``trace(G E R Eᵀ)`` (``output_weight="kfac"``);
- one number, ``c = mean_j f_j`` (:func:`output_sensitivity`): the cost is ``c · trace(E R Eᵀ)``,
  which rank allocation uses to put the layers' errors on the loss's scale
  (``rank_normalize="fisher"``).

All three are up to one factor shared by every layer.

**Token weighting.** The cost of an error ``E`` summed token by token is ``Σ_t Σ_j g_tj² (E x_t)_j²``.
Writing it as ``Σ_j f_j (E R Eᵀ)_jj`` averages the gradients and the errors over the tokens
*separately*, which is exact only when a token's gradient energy does not depend on how large its
input is. Behind a normalization that is far from true: an RMSNorm after the layer (Gemma-2/3's
post-attention and post-feedforward norms, Gemma-3's and Qwen3's q/k norms) gives
``‖∂L/∂y_t‖ ∝ 1 / rms(y_t)``, so the gradients are largest exactly on the tokens whose outputs,
and errors, are smallest. On Gemma-3-270M the separate averages overstate the loss cost of the
``down_proj`` errors of blocks 9–15 tens to a thousand times more than the other layers' (against
the token-by-token sum), and the rank allocation starved other layers (issue 28; ``docs/results/gemma3_allocation.md``).
``token_weight="input"`` (the default) therefore averages each token's squared gradient with the
weight ``‖x_t‖²``, the energy of the layer's input at that token:
``f_j = Σ_t ‖x_t‖² g_tj² / Σ_t ‖x_t‖²``. When the error of a token is proportional to its input's
energy (``‖E x_t‖² ∝ ‖x_t‖²``, as for a quantization error spread over the input channels),
``Σ_j f_j (E R Eᵀ)_jj`` is then exactly the token-by-token sum; when the gradients do not depend on
the input's size it is the plain average (``token_weight="none"``).
"""

from __future__ import annotations

import logging
from typing import Callable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from qera.calibrate.forward import model_device
from qera.core.metrics import channel_energy
from qera.util.errors import QeraError
from qera.util.memory import default_budget, format_size
from qera.nn.targets import linear_shape

log = logging.getLogger(__name__)


def _rows(batches: Sequence[Mapping[str, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Every window of every batch as ``(input_ids (1, L), attention_mask (1, L) or None)``."""
    out = []
    for b in batches:
        mask = b.get("attention_mask")
        for i in range(b["input_ids"].shape[0]):
            out.append((b["input_ids"][i:i + 1], mask[i:i + 1] if mask is not None else None))
    return out


TOKEN_WEIGHTS = ("input", "none")


def output_sensitivity(
    model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]], targets: Mapping[str, nn.Module],
    progress: bool = False, token_weight: str = "input",
) -> dict[str, float]:
    """``{layer: E[‖∂L/∂y‖²] / out}``: the mean over output channels of :func:`output_fisher`
    (token-weighted by the layer's input energy unless ``token_weight="none"``)."""
    return {name: float(f.mean())
            for name, f in output_fisher(model, batches, targets, progress, token_weight=token_weight).items()}


def output_fisher(
    model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]], targets: Mapping[str, nn.Module],
    progress: bool = False, full: bool = False, token_weight: str = "input",
) -> dict[str, torch.Tensor]:
    """``{layer: f}``, ``f`` (out,) float64 on the CPU: ``E[(∂L/∂y_j)²]`` per output channel, over
    the non-padding tokens of ``batches`` (causal LM loss); with ``full``, ``E[gᵀg]`` (out, out).

    ``token_weight``: ``input`` (default) weighs each token's squared gradient by the energy
    ``‖x_t‖²`` of the layer's input at that token, ``none`` counts every token the same (see the
    module docstring: the input weighting keeps the gradients and the errors of the same tokens
    together, which a normalization after the layer otherwise tears apart).

    Gradients flow only to the activations: every parameter's ``requires_grad`` is switched off
    for the passes (and put back), so no weight gradient is ever allocated. Hooks are removed in
    ``finally``. Windows go one at a time (memory: one window's backward graph, plus one number
    per token and layer for the input energies); the loss is the sum of the window's next-token
    cross-entropies, so a token's gradient does not depend on how many tokens share its window or batch.
    """
    grads = _GradSums(full, token_weight)  # checks token_weight before any work
    if not batches:
        raise QeraError("the loss gradients (rank_normalize or output_weight 'fisher') need calibration batches")
    if full:  # an (out, out) float64 sum per layer: refuse before any work when it cannot fit
        need = sum(8 * linear_shape(m)[0] ** 2 for m in targets.values())
        budget = default_budget()
        if need > budget:
            raise QeraError(f"output_weight='kfac' keeps an (out x out) float64 matrix per layer: {format_size(need)} "
                            f"for these layers, over the memory budget of {format_size(budget)} "
                            "($QERA_MAX_MEMORY or 60% of the free RAM); use output_weight='fisher' (its diagonal)")
        log.info("output_weight='kfac': %s of gradient covariances", format_size(need))
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embed is None:
        raise QeraError("the loss gradients (rank_normalize or output_weight 'fisher') need a model with input "
                        "embeddings and a language-model loss")
    handles = []
    flags = {p: p.requires_grad for p in model.parameters()}

    def embeds_require_grad(module, args, out):
        return out.requires_grad_() if not out.requires_grad else out

    was_training = model.training
    try:
        for p in flags:
            p.requires_grad_(False)
        model.eval()
        handles.append(embed.register_forward_hook(embeds_require_grad))
        handles += [mod.register_forward_hook(grads.hook(name)) for name, mod in targets.items()]
        device = model_device(model)
        for ids, mask in tqdm(_rows(batches), desc="loss gradients", unit="window", disable=not progress):
            ids = ids.to(device)  # one window at a time: the backward graph of a single window
            mask = mask.to(device) if mask is not None else torch.ones_like(ids)
            labels = ids.masked_fill(mask == 0, -100)
            n_labels = int((labels[:, 1:] != -100).sum())
            if n_labels == 0:
                continue
            grads.mask = mask.to(torch.float32)
            with torch.enable_grad():
                out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
                if getattr(out, "loss", None) is None:
                    raise QeraError("the loss gradients (rank_normalize or output_weight 'fisher') need a model "
                                    "that returns a language-model loss")
                (out.loss * n_labels).backward()  # summed token losses: gradients do not depend on the window's length
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return grads.result(targets)


class _GradSums:
    """``Σ_t w_t g_t²`` (or ``Σ_t w_t g_tᵀ g_t`` with ``full``) per layer, from hooks on the layers'
    outputs; ``w_t`` is 0/1 from :attr:`mask` (padding) times ``‖x_t‖²`` with ``token_weight="input"``."""

    def __init__(self, full: bool, token_weight: str) -> None:
        if token_weight not in TOKEN_WEIGHTS:
            raise QeraError(f"token_weight must be one of {', '.join(TOKEN_WEIGHTS)}, got {token_weight!r}")
        self.full, self.token_weight = full, token_weight
        self.sums: dict[str, torch.Tensor] = {}  # float64 sums, a layer's from its first gradient on
        self.weights: dict[str, float] = {}  # Σ_t w_t over the tokens each layer's sums hold
        self.mask: torch.Tensor | None = None  # the current window's or batch's 0/1 mask

    def hook(self, name: str):
        """A forward hook for layer ``name`` that registers the accumulation on its output's gradient."""
        def on_output(module, args, out):
            if not (torch.is_tensor(out) and out.requires_grad):
                return
            m = self.mask
            tokens = out.shape[:-1].numel()
            if m is not None and m.numel() == tokens:  # a 0/1 mask: padding tokens weigh nothing
                w = m.to(out.device, torch.float32).flatten()
            else:  # rows that are not the window's tokens (routed to an expert): every row counts
                w = torch.ones(tokens, dtype=torch.float32, device=out.device)
            if self.token_weight == "input":
                x = args[0] if args and torch.is_tensor(args[0]) else None
                if x is None or x.shape[:-1].numel() != tokens:
                    raise QeraError(f"token_weight='input' needs the input of {name} token for token with its output; "
                                    "use token_weight='none'")
                w = w * x.detach().to(torch.float32).pow(2).sum(-1).flatten()  # (tokens,): ‖x_t‖², 0 on padding

            def acc(g: torch.Tensor) -> None:
                g32 = g.detach().to(torch.float32).flatten(0, -2)  # (tokens, out)
                if self.full:  # one window's float32 GEMM, summed in float64 across windows
                    part = ((g32 * w[:, None]).T @ g32).to(torch.float64)
                else:
                    part = (g32.pow(2) * w[:, None]).sum(0, dtype=torch.float64)
                self.weights[name] = self.weights.get(name, 0.0) + float(w.sum(dtype=torch.float64))
                if name in self.sums:
                    self.sums[name].add_(part.cpu())  # in place: a new (out, out) sum per window would churn the heap
                else:
                    self.sums[name] = part.cpu()  # a fresh tensor: nothing else holds it
            out.register_hook(acc)
        return on_output

    def result(self, targets: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
        """``{layer: sums / Σ w}`` (zeros for a layer no gradient reached)."""
        out = {}
        for name, mod in targets.items():
            n = linear_shape(mod)[0]
            s = self.sums[name] if name in self.sums else torch.zeros((n, n) if self.full else n, dtype=torch.float64)
            w = self.weights.get(name, 0.0)
            out[name] = s / w if w > 0 else s  # a layer whose inputs were all zero: its errors are zero too
        return out


def _output_energy(block: nn.Module, calls, inputs, masks) -> torch.Tensor:
    """The block outputs' energy per channel ``Σ_t m_t z_tj²`` ``(hidden,)`` float64 over all batches."""
    if not calls:
        raise QeraError("no batches to measure the block output's channel energy on")
    with torch.no_grad():
        return sum(channel_energy(call(block, inputs(b)), masks[b] if masks is not None else None)
                   for b, call in enumerate(calls))


def block_output_fisher(
    block: nn.Module, calls: Sequence[Callable[[nn.Module, torch.Tensor], torch.Tensor]],
    inputs: Callable[[int], torch.Tensor],
    targets: Mapping[str, nn.Module], masks: Sequence[torch.Tensor | None] | None = None, seed: int = 0,
    token_weight: str = "input", channel_weights: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """``{layer: f}``, ``f`` (out,) float64: the diagonal of the block output's Gauss-Newton matrix
    at each layer's output, ``f_j = E‖∂z/∂y_j‖²`` (``z`` the block's output, ``y`` the layer's), the
    block-level stand-in for :func:`output_fisher` when the whole model's loss gradients are out of
    reach (a model streamed block by block).

    ``calls[b](block, x)`` computes the block's output on batch ``b``'s cached input ``inputs(b)``
    (the layers in ``targets``, modules of ``block``, still full-precision). One Hutchinson probe per batch: with ``v`` standard
    normal on the output (0 on the padding rows of ``masks[b]``), the gradient of ``Σ v·z`` at ``y``
    is ``Jᵀv``, and ``E[(Jᵀv)_j²] = (JᵀJ)_jj``. Tokens are weighted as in :func:`output_fisher`.
    ``channel_weights``: maps the block outputs' energy per channel ``Σ_t z_tj²`` ``(hidden,)``
    float64 to weights ``w`` ``(hidden,)`` of the output error ``Σ_j w_j Δz_j²`` (the refinement's
    block loss, :data:`qera.quantize.refine.LOSSES`); the probe is then ``√w ⊙ v`` (one more
    forward pass per batch measures the energy). None: every channel weighs 1.
    Gradients flow only to the activations (the input is made a leaf; the block's parameters are
    frozen for the pass and put back); hooks are removed in ``finally``.
    """
    grads = _GradSums(False, token_weight)
    gen = torch.Generator().manual_seed(seed)
    params = {p: p.requires_grad for p in block.parameters()}
    handles = []
    try:
        for p in params:
            p.requires_grad_(False)
        scale = None
        if channel_weights is not None:
            scale = channel_weights(_output_energy(block, calls, inputs, masks)).sqrt()
        handles = [mod.register_forward_hook(grads.hook(name)) for name, mod in targets.items()]
        for b, call in enumerate(calls):
            mask = masks[b] if masks is not None else None
            grads.mask = mask
            with torch.enable_grad():
                z = call(block, inputs(b).detach().requires_grad_())
                v = torch.randn(z.shape, generator=gen, dtype=torch.float32).to(z.device, z.dtype)
                if mask is not None and mask.numel() == z.shape[:-1].numel():
                    v = v * mask.reshape(*z.shape[:-1], 1).to(v.device, v.dtype)
                if scale is not None:
                    v = v * scale.to(v.device, v.dtype)
                (z * v).sum().backward()
    finally:
        for h in handles:
            h.remove()
        for p, flag in params.items():
            p.requires_grad_(flag)
        grads.mask = None
    return grads.result(targets)
