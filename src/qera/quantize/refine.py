"""Block-wise refinement: train a decoder block's correction against the full-precision block.

After a block's closed-form solve, its quantized layers (``W̃ + B A``) are trained for a few hundred
Adam steps to lower the block's output error

    L = Σ_tokens ‖block_q(x) − y_fp‖² / Σ_tokens ‖y_fp‖²

over the cached calibration inputs ``x`` (the quantized model's own inputs with
``propagate="quantized"``) and the full-precision block's outputs ``y_fp`` (on the full-precision
model's inputs). With ``refine_loss="token"`` the loss is instead the mean over tokens of
``‖block_q(x_t) − y_fp,t‖² / ‖y_fp,t‖²``; with ``refine_loss="channel"`` each hidden channel's
squared error is weighted by ``min(1, ẽ / e_j)`` (``e_j`` the channel's energy in the targets, ``ẽ``
the median over channels), so that a massive-activation channel, which the next RMSNorm mostly
divides away, cannot own the loss (:data:`LOSSES`). One cached calibration batch per step.
What is trained (``refine_train``):

- ``lowrank``: ``A`` and ``B`` (float32 masters, stored back in the checkpoint's low-rank dtype);
- ``scales``: the float group parameters of ``W̃`` with its integer codes fixed
  (:mod:`qera.core.formats.trainable`), stored back in the format's dtype (fp16);
- ``rounding``: AutoRound-style rounding offsets ``V ∈ [-½, ½]`` per weight, so that each code may
  move by one level (``codes(anchor + V·step)``, see :func:`qera.core.formats.trainable.rounding_anchor`);
  trained by signed gradient descent with AutoRound's step ``1/steps`` (cosine-decayed), through a
  straight-through estimate of the rounding. Needs the layers' full-precision weights.

Whatever is trained is cast to what the checkpoint stores before it is used, so the refined model
in memory and the saved checkpoint compute the same logits. The result is kept only if it lowers
the loss on held-out calibration batches (one in eight, when there are at least four batches);
otherwise the closed-form layers stay. Deterministic for a given seed and block index.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from qera.core import metrics
from qera.core.formats import trainable
from qera.core.formats.base import from_rows
from qera.nn.modules import QERALinear
from qera.nn.targets import replace_module
from qera.util.errors import QeraError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefineSettings:
    """steps: optimizer steps; lr: Adam's peak learning rate (cosine decay to 0); train: the parts
    trained (``lowrank``, ``scales``, ``rounding``); seed: seeds the batch order (with the block
    index); loss: how token errors are summed (:data:`LOSSES`)."""

    steps: int
    lr: float = 1e-3
    train: tuple[str, ...] = ("lowrank",)
    seed: int = 0
    loss: str = "channel"

    @classmethod
    def from_config(cls, config) -> "RefineSettings":
        return cls(config.refine_steps, config.refine_lr, tuple(config.refine_train.split(",")), config.seed,
                   config.refine_loss)


@dataclass
class RefineResult:
    """One block's refinement: held-out loss before and after, whether it was kept, steps and batches used."""

    block: int
    loss_before: float
    loss_after: float
    kept: bool
    steps: int
    train_batches: int
    heldout_batches: int
    first_train_loss: float
    last_train_loss: float

    def as_dict(self) -> dict:
        """JSON-ready: a non-finite loss (diverged, or not computed) becomes None."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


@dataclass
class BlockData:
    """The data one block is refined on: per batch, the block's call, its input, its target and the
    rows that count (None: all)."""

    calls: Sequence[Callable[[nn.Module, torch.Tensor], torch.Tensor]]
    inputs: Callable[[int], torch.Tensor]
    targets: Callable[[int], torch.Tensor]
    masks: Sequence[torch.Tensor | None]

    def __len__(self) -> int:
        return len(self.calls)


class TrainableLinear(nn.Module):
    """A :class:`QERALinear`'s computation with its trained parts as float32 parameters.

    ``y = x W̃ᵀ + (x Aᵀ) Bᵀ + b`` where ``W̃`` is a fixed dense buffer, or, when ``scales`` or
    ``rounding`` are trained, ``values(codes, params)`` rebuilt each forward (codes fixed, or
    ``codes(anchor + V·step)`` with the rounding offsets ``V``).
    ``weight``: the layer's full-precision ``(out, in)`` weight, needed for ``rounding``.
    """

    def __init__(self, layer: QERALinear, train: Sequence[str], weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self._source = (layer,)  # not a submodule: the block sees only this layer while it trains
        dev = layer.A.device
        self.A = nn.Parameter(layer.A.detach().to(torch.float32).clone(), requires_grad="lowrank" in train)
        self.B = nn.Parameter(layer.B.detach().to(torch.float32).clone(), requires_grad="lowrank" in train)
        self.bias = None if layer.bias is None else layer.bias.detach()
        qw = layer.packed_weight
        self.trains_scales = "scales" in train
        self.trains_rounding = "rounding" in train
        if self.trains_scales or self.trains_rounding:
            codes, params = trainable.split(qw)
            names = set(trainable.float_params(qw.fmt)) if self.trains_scales else set()
            self.register_buffer("codes", codes)
            self.fixed = {k: v for k, v in params.items() if k not in names}
            self.params = nn.ParameterDict({k: nn.Parameter(v.to(torch.float32).clone()) for k, v in params.items()
                                            if k in names})
            self.offsets = None
            if self.trains_rounding:
                if weight is None:
                    raise QeraError("rounding offsets need the layer's full-precision weight")
                self.register_buffer("anchor", trainable.rounding_anchor(qw.fmt, codes, params,
                                                                         weight.detach().to(torch.float32)))
                self.register_buffer("step", qw.fmt.grid_step(params).expand_as(self.anchor).clone())
                self.offsets = nn.Parameter(torch.zeros_like(self.anchor))
            with torch.no_grad():
                if not torch.equal(self.weight(), qw.dequantize(torch.float32)):
                    raise QeraError(f"format {qw.fmt}: its values from codes and parameters differ from its decode")
        else:
            self.register_buffer("W", qw.dequantize(torch.float32).to(dev))

    def current_codes(self) -> torch.Tensor:
        """The codes ``(rows, groups, width)`` the weight has now (moved by the offsets when trained)."""
        if not self.trains_rounding:
            return self.codes
        with torch.no_grad():
            return self.source.fmt.codes(self.anchor + self.offsets * self.step, {**self.fixed, **self.params})

    @property
    def source(self) -> QERALinear:
        return self._source[0]

    def weight(self) -> torch.Tensor:
        """Float32 ``W̃`` ``(out, in)``."""
        if not (self.trains_scales or self.trains_rounding):
            return self.W
        shape = (self.source.out_features, self.source.in_features)
        W = trainable.weight_of(self.source.fmt, self.current_codes(), {**self.fixed, **self.params}, shape)
        if self.trains_rounding:  # straight through the rounding: dW̃/dV = step
            shift = self.offsets * self.step
            W = W + from_rows(shift - shift.detach(), torch.Size(shape), shape[-1])
        return W

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = F.linear(x, self.weight().to(x.dtype), bias)
        if self.A.shape[0]:
            y = y + F.linear(F.linear(x, self.A.to(x.dtype)), self.B.to(x.dtype))
        return y

    def stored(self) -> QERALinear:
        """The trained layer as the checkpoint stores it (low-rank and parameters in their stored dtypes)."""
        src = self.source
        qw = src.packed_weight
        if self.trains_rounding:
            qw = trainable.with_codes(qw, self.current_codes(), {k: v.detach() for k, v in self.params.items()})
        elif self.trains_scales:
            qw = trainable.with_params(qw, {k: v.detach() for k, v in self.params.items()})
        A = self.A.detach().to(src.A.dtype)
        B = self.B.detach().to(src.B.dtype)
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise QeraError("refined A/B do not fit the low-rank dtype (NaN/Inf after the cast)")
        return QERALinear(qw, A, B, src.bias, src.cache_weight, src.merge_lowrank, act_format=src.act_format)


def _energy_terms(diff: torch.Tensor, ref: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ_t m_t ‖e_t‖², Σ_t m_t ‖y_t‖²)``: each token's error counts by its size."""
    return (diff * m).sum(), (ref * m).sum()


def _token_terms(diff: torch.Tensor, ref: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ_t m_t ‖e_t‖² / ‖y_t‖², Σ_t m_t)``: each token's relative error counts the same."""
    return (m * diff / ref.clamp_min(torch.finfo(ref.dtype).tiny)).sum(), m.sum()


def clipped_channel_weights(energy: torch.Tensor) -> torch.Tensor:
    """Channel weights ``w_j = min(1, ẽ / e_j)`` ``(hidden,)`` from the targets' energy per channel
    ``e_j = Σ_t y_tj²`` ``(hidden,)``, ``ẽ`` its median: a channel holding more energy than the median
    channel (a massive-activation channel above all) counts as if it held the median; the rest count
    as they are. The median, not the mean: one massive channel moves the mean with it. Float64 in,
    float32 out."""
    typical = energy.median()
    if not bool(typical > 0):
        return torch.ones_like(energy, dtype=torch.float32)
    return (typical / energy.clamp_min(torch.finfo(energy.dtype).tiny)).clamp_max(1.0).to(torch.float32)


@dataclass(frozen=True)
class BlockLoss:
    """A block loss: ``terms`` sums per-token squared errors and energies (each summed over channels,
    weighted by ``channel_weights`` of the targets' per-channel energy when given) into
    ``(numerator, denominator)``."""

    terms: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    channel_weights: Callable[[torch.Tensor], torch.Tensor] | None = None


LOSSES: dict[str, BlockLoss] = {
    "energy": BlockLoss(_energy_terms),
    "token": BlockLoss(_token_terms),
    "channel": BlockLoss(_energy_terms, clipped_channel_weights),
}


def _loss_terms(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None,
                loss: str = "energy", weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(numerator, denominator)`` of the block loss ``loss`` (:data:`LOSSES`) over the rows of
    ``mask`` (float32); per token ``‖e_t‖² = Σ_j w_j (out_tj − target_tj)²`` and
    ``‖y_t‖² = Σ_j w_j target_tj²`` with channel weights ``weight`` ``(hidden,)`` (None: all 1)."""
    err = (out.float() - target.float()).pow(2)
    sq = target.float().pow(2)
    if weight is not None:
        weight = weight.to(err.device)  # measured on the CPU; the block may run on a GPU
        err, sq = err * weight, sq * weight
    diff, ref = err.sum(-1), sq.sum(-1)
    m = torch.ones_like(diff) if mask is None else mask.reshape(diff.shape).to(diff.dtype)
    return LOSSES[loss].terms(diff, ref, m)


def channel_energy(data: "BlockData", batches: Sequence[int]) -> torch.Tensor:
    """The targets' energy per channel ``Σ_t m_t y_tj²`` ``(hidden,)`` over ``batches``, float64."""
    if not batches:
        raise QeraError("no batches to measure the channel energy on")
    with torch.no_grad():
        return sum(metrics.channel_energy(data.targets(b), data.masks[b]) for b in batches)


def block_loss(block: nn.Module, data: BlockData, batches: Sequence[int], loss: str = "energy",
               weight: torch.Tensor | None = None) -> float:
    """The block loss ``loss`` of ``block`` over ``batches`` (no gradients), channel weights ``weight``."""
    num = den = 0.0
    with torch.no_grad():
        for b in batches:
            d, r = _loss_terms(data.calls[b](block, data.inputs(b)), data.targets(b), data.masks[b], loss, weight)
            num += float(d)
            den += float(r)
    return num / den if den > 0 else 0.0


def split_batches(n: int) -> tuple[list[int], list[int]]:
    """``(train, held out)`` batch indices: one in eight held out (the last ones) when ``n >= 4``,
    otherwise every batch does both."""
    if n >= 4:
        held = max(1, n // 8)
        return list(range(n - held)), list(range(n - held, n))
    return list(range(n)), list(range(n))


def _swap(block: nn.Module, layers: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Put ``layers`` (names relative to ``block``) in; returns what was there."""
    return {name: replace_module(block, name, new) for name, new in layers.items()}


def _stored(trainables: dict[str, TrainableLinear], index: int) -> dict[str, QERALinear] | None:
    """The trained layers as stored, or None (with a warning) when a value does not fit its stored dtype."""
    try:
        return {name: t.stored() for name, t in trainables.items()}
    except QeraError as exc:
        log.warning("block %d: %s; closed-form layers kept", index, exc)
        return None


def refine_block(block: nn.Module, layers: dict[str, QERALinear], data: BlockData, settings: RefineSettings,
                 index: int = 0, weights: Mapping[str, torch.Tensor] | None = None,
                 ) -> tuple[dict[str, QERALinear], RefineResult]:
    """Refine ``layers`` (names relative to ``block``, already in it) on ``data``; ``weights``: their
    full-precision ``(out, in)`` weights, needed when ``rounding`` is trained.

    Returns the layers to keep (the refined ones, or the given ones when refinement did not lower
    the held-out loss) and the block's :class:`RefineResult`. The block holds the returned layers.
    """
    if not layers:
        raise QeraError(f"block {index}: nothing to refine")
    train_b, held_b = split_batches(len(data))
    spec = LOSSES[settings.loss]
    weight = None if spec.channel_weights is None else spec.channel_weights(channel_energy(data, train_b))
    before = block_loss(block, data, held_b, settings.loss, weight)
    weights = weights or {}
    trainables = {name: TrainableLinear(layer, settings.train, weights.get(name)) for name, layer in layers.items()}
    frozen = [(p, p.requires_grad) for p in block.parameters()]
    offsets = [t.offsets for t in trainables.values() if t.trains_rounding]
    taken = {id(p) for p in offsets}
    params = [p for t in trainables.values() for p in t.parameters() if p.requires_grad and id(p) not in taken]
    gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + index)
    first = last = float("nan")
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        _swap(block, trainables)
        opt = torch.optim.Adam(params, lr=settings.lr) if params else None
        order: list[int] = []
        with torch.enable_grad():
            for step in range(settings.steps):
                if not order:
                    order = [train_b[int(j)] for j in torch.randperm(len(train_b), generator=gen)]
                b = order.pop()
                decay = 0.5 * (1 + math.cos(math.pi * step / settings.steps))
                for group in opt.param_groups if opt is not None else ():
                    group["lr"] = settings.lr * decay
                d, r = _loss_terms(data.calls[b](block, data.inputs(b)), data.targets(b), data.masks[b],
                                   settings.loss, weight)
                loss = d / r.clamp_min(torch.finfo(torch.float32).tiny)
                last = float(loss.detach())
                first = last if step == 0 else first
                if not math.isfinite(last):  # diverged: the held-out check below keeps the closed form
                    log.warning("block %d: refinement loss is %s at step %d (lower refine_lr)", index, last, step)
                    break
                for p in params + offsets:
                    p.grad = None
                loss.backward()
                if opt is not None:
                    opt.step()
                with torch.no_grad():  # AutoRound: signed steps of 1/steps levels, offsets kept within half a level
                    for v in offsets:
                        if v.grad is not None:
                            v.sub_(v.grad.sign(), alpha=decay / settings.steps).clamp_(-0.5, 0.5)
        refined = _stored(trainables, index) if math.isfinite(last) else None
    finally:
        _swap(block, layers)  # the closed-form layers go back whatever happened
        for p, flag in frozen:
            p.requires_grad_(flag)
    after = float("nan")
    if refined is not None:
        _swap(block, refined)
        after = block_loss(block, data, held_b, settings.loss, weight)
    kept = after < before  # False for NaN
    if not kept and refined is not None:
        _swap(block, layers)
        log.warning("block %d: refinement did not lower the held-out block error (%.4g -> %.4g): "
                    "closed-form layers kept", index, before, after)
    heldout = 0 if set(held_b) & set(train_b) else len(held_b)
    result = RefineResult(index, before, after, kept, settings.steps, len(train_b), heldout, first, last)
    log.info("block %d refined: held-out error %.4g -> %.4g%s", index, before, after, "" if kept else " (not kept)")
    return (refined if kept else layers), result
