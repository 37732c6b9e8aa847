"""The reconstruction-method interface and the shared argument checks."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .._registry import Registry
from ..errors import QeraError, where
from ..formats import QuantizedWeight, WeightFormat
from ..linalg import SolverOptions, left_apply, output_sqrt
from ..statistics import ActivationStats, provided


METHODS: Registry[type] = Registry("method")  # name -> Method subclass; one module per family registers here


@dataclass
class Reconstruction:
    """Result of one layer's solve: ``W ≈ W̃ + B @ A``.

    ``A``: (rank, in), ``B``: (out, rank), float32. ``qweight`` is the final quantized weight
    (LoftQ re-quantizes, so it may differ from the input one); ``w_q`` its dequantized float32 form.
    """

    A: torch.Tensor
    B: torch.Tensor
    w_q: torch.Tensor
    qweight: QuantizedWeight | None = None

    @property
    def rank(self) -> int:
        return self.A.shape[0]


class Method(ABC):
    """A reconstruction method. Subclasses set ``needs`` and implement :meth:`solve_error`.

    Options are keyword arguments validated in ``__init__``; unknown ones raise ``QeraError``.
    """

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()  # statistics kinds (see qera.statistics)
    uses_rank: ClassVar[bool] = True
    option_names: ClassVar[frozenset[str]] = frozenset(f.name for f in dataclasses.fields(SolverOptions))

    def __init__(self, **options: Any) -> None:
        unknown = set(options) - set(self.option_names)
        if unknown:
            raise QeraError(
                f"method {self.name!r} got unknown option(s) {sorted(unknown)}; "
                f"allowed: {', '.join(sorted(self.option_names)) or 'none'}"
            )
        self.options = options
        solver_keys = {f.name for f in dataclasses.fields(SolverOptions)}
        self.solver = SolverOptions(**{k: v for k, v in options.items() if k in solver_keys})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"

    # -- checks ---------------------------------------------------------------------------------
    def check(self, W: torch.Tensor, rank: int, stats: ActivationStats | None, name: str | None) -> None:
        out_f, in_f = W.shape
        if self.uses_rank:
            if not isinstance(rank, int) or not 1 <= rank <= min(out_f, in_f):
                raise QeraError(
                    f"rank must be an integer in 1..{min(out_f, in_f)} for a {out_f}x{in_f} weight, "
                    f"got {rank!r}{where(name)}"
                )
        elif rank not in (0, None):
            raise QeraError(f"method {self.name!r} adds no low-rank term; rank must be 0, got {rank!r}")
        if self.needs:
            if stats is None:
                raise QeraError(
                    f"method {self.name!r} needs calibration statistics ({', '.join(sorted(self.needs))}){where(name)}"
                )
            if stats.dim != in_f:
                raise QeraError(f"statistics width {stats.dim} != in_features {in_f}{where(name)}")
            if stats.count == 0:
                raise QeraError(f"statistics hold no tokens{where(name)}")
            missing = set(self.needs) - provided(stats.kinds)
            if missing:
                raise QeraError(f"method {self.name!r} needs statistics {sorted(missing)}, which were not collected{where(name)}")
            stats.validate()  # NaN/Inf or wrong shapes never reach A and B

    # -- solving --------------------------------------------------------------------------------
    def metric(
        self, stats: ActivationStats | None, name: str | None = None, dtype: torch.dtype = torch.float64
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The input metric the method's error lives in, ``(scale, autocorr)``.

        ``scale`` (in,) means ``R = diag(scale²)``; ``autocorr`` (in, in) is ``R`` itself; both None
        mean ``R = I`` (the weight error). Rank allocation reads each layer's error spectrum in it.
        """
        return None, None

    @abstractmethod
    def solve_error(
        self, D: torch.Tensor, rank: int, stats: ActivationStats | None, name: str | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` approximating the quantization error ``D = W - W̃`` (out × in)."""

    def solve(
        self,
        W: torch.Tensor,
        qweight: QuantizedWeight | torch.Tensor,
        rank: int,
        stats: ActivationStats | None = None,
        fmt: WeightFormat | None = None,
        name: str | None = None,
        out_metric: torch.Tensor | None = None,
    ) -> Reconstruction:
        """Reconstruct ``W`` from its quantized form; see :func:`qera.methods.reconstruct`.

        ``out_metric``: how the output channels count in the objective ``trace(F E R Eᵀ)`` — weights
        (out,) or a PSD matrix (out, out) from the loss's gradients (see :mod:`qera.sensitivity`);
        the solve runs on ``S D`` (``SᵀS = F``) and ``B`` is mapped back by ``S⁻¹``. None: ``F = I``."""
        W = W.detach()
        if isinstance(qweight, QuantizedWeight):
            w_q = qweight.dequantize(torch.float32).to(W.device)
            qw: QuantizedWeight | None = qweight
        else:
            w_q, qw = qweight.detach().to(device=W.device, dtype=torch.float32), None
        if w_q.shape != W.shape:
            raise QeraError(f"W has shape {tuple(W.shape)} but W_q has shape {tuple(w_q.shape)}{where(name)}")
        if not bool(torch.isfinite(W).all() & torch.isfinite(w_q).all()):  # one host sync for both
            bad = int((~torch.isfinite(W)).sum())
            if bad:
                raise QeraError(f"W has {bad} NaN/Inf value(s){where(name)}")
            raise QeraError(f"W_q contains NaN/Inf{where(name)}")
        if not self.uses_rank:
            z = w_q.new_zeros
            return Reconstruction(z(0, W.shape[1]), z(W.shape[0], 0), w_q, qw)
        D = W.to(torch.float32) - w_q  # no float32 copy of W kept
        if out_metric is None:
            A, B = self.solve_error(D, rank, stats, name)
        else:
            S, S_inv = output_sqrt(out_metric, name=name)
            A, B = self.solve_error(left_apply(S, D), rank, stats, name)
            B = left_apply(S_inv, B)
        return Reconstruction(A.to(W.device), B.to(W.device), w_q, qw)
