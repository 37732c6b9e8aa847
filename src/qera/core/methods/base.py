"""The reconstruction-method interface and the shared argument checks."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import torch

from qera.util.registry import Registry
from qera.util.errors import QeraError, where
from qera.core.formats import QuantizedWeight, WeightFormat
from qera.core.linalg import SolverOptions, left_apply, output_sqrt
from qera.core.statistics import ActivationStats, provided


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
    needs: ClassVar[frozenset[str]] = frozenset()  # statistics kinds (see qera.core.statistics)
    uses_rank: ClassVar[bool] = True
    order: ClassVar[int] = 100  # where the method is listed (CLI choices, QPEFT inits, plot colours)
    # solve_path yields one reconstruction per iteration (analyses measure each); else one solve
    iterates: ClassVar[bool] = False
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
    @staticmethod
    def check_rank(rank: object, shape: tuple[int, int], name: str | None = None, allow_zero: bool = False) -> None:
        """The one rank bound: an integer in ``1..min(out, in)`` (``0..`` with ``allow_zero``) for an
        ``(out, in)`` weight."""
        out_f, in_f = shape
        lo = 0 if allow_zero else 1
        if not isinstance(rank, int) or isinstance(rank, bool) or not lo <= rank <= min(out_f, in_f):
            raise QeraError(
                f"rank must be an integer in {lo}..{min(out_f, in_f)} for a {out_f}x{in_f} weight, "
                f"got {rank!r}{where(name)}"
            )

    def check(self, W: torch.Tensor, rank: int, stats: ActivationStats | None, name: str | None) -> None:
        if self.uses_rank:
            self.check_rank(rank, tuple(W.shape), name)
        elif rank not in (0, None):
            raise QeraError(f"method {self.name!r} adds no low-rank term; rank must be 0, got {rank!r}")
        in_f = W.shape[1]
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

    def without_data(self) -> "Method":
        """The method for a layer no calibration token reached: one that needs no statistics (the
        weight-error SVD, with this method's seed), or this method when it needs none."""
        if not self.needs:
            return self
        return METHODS.get("zeroquant-v2")(**{k: v for k, v in self.options.items() if k == "seed"})

    def solve_path(self, W: torch.Tensor, qweight: QuantizedWeight | torch.Tensor, rank: int,
                   stats: ActivationStats | None = None, fmt: WeightFormat | None = None, name: str | None = None,
                   out_metric: torch.Tensor | None = None) -> Iterator[Reconstruction]:
        """The reconstruction after each iteration (methods with ``iterates``); else the one solve."""
        yield self.solve(W, qweight, rank, stats, fmt, name, out_metric)

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
        """Reconstruct ``W`` from its quantized form; see :func:`qera.core.methods.reconstruct`.

        ``out_metric``: how the output channels count in the objective ``trace(F E R Eᵀ)`` — weights
        (out,) or a PSD matrix (out, out) from the loss's gradients (see :mod:`qera.calibrate.sensitivity`);
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
