"""Activation-aware methods: one weighted solver, differing only in the input metric ``R``.

- ``lqer``:        ``R = diag(s²)``, ``s = E|x|``         (LQER)
- ``qera-approx``: ``R = diag(E[x²])``                  (QERA, uncorrelated-channel optimum)
- ``qera-exact``:  ``R = E[xᵀx]``                        (QERA, exact optimum of the output error)
"""

from __future__ import annotations

import logging
from typing import ClassVar

import torch

from qera.util.errors import QeraError, where
from qera.core.formats import QuantizedWeight, WeightFormat
from qera.core.linalg import weighted_error, weighted_lowrank
from qera.core.statistics import ActivationStats
from qera.core.methods.base import METHODS, Method, Reconstruction

log = logging.getLogger(__name__)


class DiagonalScaled(Method):
    """Scale the error's input dimension by ``s``, truncated SVD, un-scale."""

    def scale(self, stats: ActivationStats) -> torch.Tensor:
        raise NotImplementedError

    def metric(self, stats, name=None, dtype=torch.float64):
        return self.scale(stats), None

    def solve_error(self, D, rank, stats, name):
        s, _ = self.metric(stats, name)
        return weighted_lowrank(D, rank, scale=s.to(D.device), opts=self.solver)


@METHODS.register("lqer")
class LQER(DiagonalScaled):
    name = "lqer"
    order = 3
    needs: ClassVar[frozenset[str]] = frozenset({"abs"})

    def scale(self, stats):
        return stats.mean_abs()


@METHODS.register("qera-approx")
class QERAApprox(DiagonalScaled):
    name = "qera-approx"
    order = 4
    needs: ClassVar[frozenset[str]] = frozenset({"sq"})

    def scale(self, stats):
        return stats.mean_sq().clamp_min(0).sqrt()


def shrink_toward_diagonal_(R: torch.Tensor, lam: float) -> torch.Tensor:
    """``R ← (1 − λ) R + λ diag(R)`` in place, shape ``(d, d)``: off-diagonal entries scaled by ``1 − λ``.

    A convex combination of two PSD matrices, so ``R_λ`` stays PSD; its diagonal is ``diag(R)``.
    """
    d = torch.diagonal(R).clone()
    R.mul_(1.0 - lam)
    torch.diagonal(R).copy_(d)
    return R


@METHODS.register("qera-exact")
class QERAExact(Method):
    """Whiten by ``R = E[xᵀx]``: the closed-form minimizer of ``E‖x (W̃ + BA - W)ᵀ‖²``.

    Options: ``damp`` (default 0) adds ``damp · mean(diag R) · I`` to ``R`` — a ridge towards the
    weight-error solution, useful when calibration data are scarce. ``shrink`` λ ∈ [0, 1] (default
    0) solves with ``R_λ = (1 − λ) R + λ diag(R)``: λ = 1 is qera-approx's metric, so λ trades the
    exact correlations for robustness to a shift between calibration and inference inputs.
    """

    order = 5

    name = "qera-exact"
    needs: ClassVar[frozenset[str]] = frozenset({"xtx"})
    option_names = Method.option_names | {"damp", "shrink"}

    def __init__(self, damp: float = 0.0, shrink: float = 0.0, **options) -> None:
        super().__init__(**options)
        if not 0.0 <= float(damp) < 1e3:
            raise ValueError(f"damp must be in [0, 1000), got {damp}")
        if not 0.0 <= float(shrink) <= 1.0:
            raise QeraError(f"{self.name}: shrink must be in [0, 1] (0 = exact R, 1 = its diagonal), got {shrink}")
        self.damp, self.shrink = float(damp), float(shrink)
        self.options.update(damp=self.damp, shrink=self.shrink)

    def solve_error(self, D, rank, stats, name):
        exact = self.solver.use_exact(rank, D.shape[0], D.shape[1])
        # float64 R for the dense eigendecomposition; the Krylov path multiplies in compute_dtype anyway
        _, R = self.metric(stats, name, torch.float64 if exact else self.solver.compute_dtype)
        return weighted_lowrank(D, rank, autocorr=R.to(D.device), opts=self.solver)

    def metric(self, stats, name=None, dtype=torch.float64):
        """``(None, R)`` with ``R`` shrunk and damped as the options say (a fresh copy, ``dtype``)."""
        n = stats.dim
        R = stats.autocorrelation(dtype)
        diag = torch.diagonal(R)
        mean = diag.mean()
        dead = int((diag <= 1e-12 * mean.clamp_min(1e-300)).sum())  # one host sync
        if stats.count < n or dead:  # the run's report sums these up in one warning (QuantReport.singular_summary)
            log.info(
                "autocorrelation of %s is singular (%d tokens for %d channels, %d dead channels); "
                "the solution stays finite and optimal on the observed subspace",
                name or "layer", stats.count, n, dead,
            )
        if self.shrink:
            shrink_toward_diagonal_(R, self.shrink)
        if self.damp:
            diag.add_(self.damp * mean)  # R is our own copy
        return None, R


@METHODS.register("qera-iter")
class QERAIter(QERAExact):
    """LoftQ's alternation under the *output* error: ``W̃ = round(W − BA)``, ``BA = qera-exact(W − W̃)``.

    Options: ``iters`` (default 4; iteration 1 is qera-exact on the given ``W̃``), ``rounding``
    (``rtn`` or ``gptq``; the run's rounding by default), ``gptq_damp``. Each iterate is scored by
    ``trace(E R Eᵀ)`` with ``E = W − W̃ − BA`` and the best is returned, so the result is never worse
    than one-shot qera-exact on the same first ``W̃``. With an output metric ``F`` (see
    :meth:`Method.solve`) the score and every solve are ``trace(F E R Eᵀ)``; the rounding is row by
    row, exact for a diagonal ``F`` and blind to the off-diagonal part of a full one.
    """

    order = 6

    name = "qera-iter"
    option_names = QERAExact.option_names | {"iters", "rounding", "gptq_damp"}

    def __init__(self, iters: int = 4, rounding: str = "rtn", gptq_damp: float = 0.01, **options) -> None:
        super().__init__(**options)
        from qera.core.rounding import ROUNDINGS

        if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
            raise QeraError(f"qera-iter: iters must be a positive integer, got {iters!r}")
        if rounding not in ROUNDINGS.names():
            raise QeraError(f"qera-iter: rounding must be one of {', '.join(ROUNDINGS.names())}, got {rounding!r}")
        self.iters, self.rounding, self.gptq_damp = iters, rounding, float(gptq_damp)
        self.options.update(iters=iters, rounding=rounding, gptq_damp=self.gptq_damp)

    def solve_path(self, W, qweight, rank, stats=None, fmt: WeightFormat | None = None, name=None, out_metric=None):
        """Yield ``(reconstruction, objective)`` for each iterate."""
        from qera.core.rounding import ROUNDINGS

        if fmt is None:
            if not isinstance(qweight, QuantizedWeight):
                raise QeraError(f"qera-iter re-rounds the weight: pass a QuantizedWeight or fmt={where(name)}")
            fmt = qweight.fmt
        W32 = W.detach().to(torch.float32)
        R = stats.autocorrelation(torch.float64).to(W.device)
        if self.shrink:  # the same metric for re-rounding and scoring as for the solves
            shrink_toward_diagonal_(R, self.shrink)
        rec = super().solve(W, qweight, rank, stats, fmt, name, out_metric)
        yield rec, weighted_error(W32 - rec.w_q, rec.A, rec.B, R, out_metric=out_metric)
        for _ in range(self.iters - 1):
            qw = ROUNDINGS.get(self.rounding)(W32 - rec.B @ rec.A, fmt, R, name=name, damp=self.gptq_damp)
            rec = super().solve(W, qw, rank, stats, fmt, name, out_metric)
            yield rec, weighted_error(W32 - rec.w_q, rec.A, rec.B, R, out_metric=out_metric)

    def solve(self, W, qweight, rank, stats=None, fmt: WeightFormat | None = None, name=None,
              out_metric=None) -> Reconstruction:
        best, best_obj = None, float("inf")
        for rec, obj in self.solve_path(W, qweight, rank, stats, fmt, name, out_metric):
            if obj < best_obj:
                best, best_obj = rec, obj
        return best
