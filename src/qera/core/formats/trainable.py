"""A stored weight split into integer codes and group parameters, for training either.

With the codes fixed, ``W̃ = values(codes, params)`` is differentiable in the float parameters (the
fp16 scales of ``int``/``nf``, the fp16 minimums of ``:asym``), so an optimizer can move them and
:func:`with_params` stores the result back in the format's own dtypes: the trained weight stays
exactly representable. Formats whose parameters are not floats (``mxint``'s shared exponents) have
nothing to train here (:func:`float_params` is empty).

The codes themselves move by rounding offsets (AutoRound's idea): ``codes(anchor + V·step)`` with
``V`` in ``[-½, ½]`` and ``anchor`` the closed form's values nudged towards the full-precision weight
by less than half a level (:func:`rounding_anchor`), so ``V = 0`` gives the closed form's codes and
no code moves by more than one level. This needs evenly spaced levels (:meth:`WeightFormat.grid_step`);
:func:`with_codes` stores the result.
"""

from __future__ import annotations

import torch

from qera.core.formats.base import QuantizedWeight, WeightFormat, as_rows, from_rows
from qera.core.formats.packing import unpack_bits
from qera.util.errors import QeraError


def float_params(fmt: WeightFormat) -> list[str]:
    """Names of the float group parameters of ``fmt`` (what scale training can move)."""
    probe = torch.linspace(-1.0, 1.0, fmt.group_width).view(1, 1, -1)
    return sorted(k for k, v in fmt.fit(probe).items() if v.is_floating_point())


def _standard_layout(fmt: WeightFormat) -> bool:
    """The format stores ``codes`` packed by :func:`pack_bits` beside its parameters (the base class's layout)."""
    cls = type(fmt)
    return cls.decode is WeightFormat.decode and cls.encode_with is WeightFormat.encode_with


def split(qw: QuantizedWeight) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(codes, params)`` of a stored weight: int64 codes ``(rows, groups, width)`` and the group
    parameters ``(rows, groups)`` as stored. Raises for a format with its own packed layout."""
    fmt = qw.fmt
    if not _standard_layout(fmt):
        raise QeraError(f"format {fmt} packs its weights in its own layout: its group parameters cannot be trained")
    params = {k: v for k, v in qw.tensors.items() if k != "codes"}
    rows, groups = next(iter(params.values())).shape
    codes = unpack_bits(qw.tensors["codes"], fmt.bits, rows * groups * fmt.group_width)
    return codes.view(rows, groups, fmt.group_width).to(torch.int64), params


def weight_of(fmt: WeightFormat, codes: torch.Tensor, params: dict[str, torch.Tensor],
              shape: tuple[int, ...]) -> torch.Tensor:
    """Float32 ``W̃`` of ``shape`` from ``codes`` ``(rows, groups, width)`` and ``params`` (differentiable in
    the float ones); equals ``QuantizedWeight.dequantize(torch.float32)`` for the stored parameters."""
    values = fmt.values(codes, {k: v for k, v in params.items()})
    return from_rows(values, torch.Size(shape), shape[-1])


def with_params(qw: QuantizedWeight, params: dict[str, torch.Tensor]) -> QuantizedWeight:
    """``qw`` with new group parameters, cast to the dtypes the format stores (codes unchanged).

    Raises when a cast parameter is not finite (e.g. a scale beyond fp16's range)."""
    tensors = dict(qw.tensors)
    for key, value in params.items():
        old = tensors[key]
        new = value.detach().to(old.device, old.dtype)
        if new.shape != old.shape:
            raise QeraError(f"parameter {key} is {tuple(new.shape)}, the stored one {tuple(old.shape)}")
        if new.is_floating_point() and not torch.isfinite(new).all():
            raise QeraError(f"trained parameter {key} does not fit {old.dtype} (NaN/Inf after the cast)")
        tensors[key] = new
    return QuantizedWeight(qw.fmt, qw.shape, qw.dtype, tensors)


def can_train_scales(fmt: WeightFormat) -> bool:
    """Whether ``fmt`` stores plain codes beside float group parameters that training can move."""
    return _standard_layout(fmt) and bool(float_params(fmt))


def can_round(fmt: WeightFormat) -> bool:
    """Whether rounding offsets can move ``fmt``'s codes (standard layout, evenly spaced levels)."""
    if not _standard_layout(fmt):
        return False
    probe = torch.linspace(-1.0, 1.0, fmt.group_width).view(1, 1, -1)
    return fmt.grid_step(fmt.fit(probe)) is not None


ANCHOR_MARGIN = 0.49
"""How far (in levels) the anchor may sit from the closed form's value: below ½, so that it rounds back."""


def rounding_anchor(fmt: WeightFormat, codes: torch.Tensor, params: dict[str, torch.Tensor],
                    weight: torch.Tensor) -> torch.Tensor:
    """``(rows, groups, width)`` float32: the closed form's values moved towards ``weight`` (the layer's
    full-precision ``(out, in)`` weight) by at most :data:`ANCHOR_MARGIN` levels. For round-to-nearest
    codes this is the weight itself wherever it lies inside the grid; for GPTQ's it keeps each code
    while remembering on which side of it the weight lay."""
    step = fmt.grid_step(params)
    if step is None:
        raise QeraError(f"format {fmt} has unevenly spaced levels: its codes cannot move by rounding offsets")
    values = fmt.values(codes, params)
    blocks, _ = as_rows(weight.to(values.device), fmt.group_width)
    half = ANCHOR_MARGIN * step.abs()
    return values + torch.maximum(torch.minimum(blocks - values, half), -half)


def with_codes(qw: QuantizedWeight, codes: torch.Tensor, params: dict[str, torch.Tensor]) -> QuantizedWeight:
    """``qw`` with new codes ``(rows, groups, width)`` and parameters (stored as :func:`with_params` does)."""
    from qera.core.formats.packing import pack_bits

    out = with_params(qw, params)
    tensors = dict(out.tensors)
    tensors["codes"] = pack_bits(codes.to(torch.int64), qw.fmt.bits).to(qw.tensors["codes"].device)
    return QuantizedWeight(qw.fmt, qw.shape, qw.dtype, tensors)
