"""Activation-aware methods: one weighted solver, differing only in the input metric ``R``.

- ``lqer``:        ``R = diag(s²)``, ``s = E|x|``         (LQER)
- ``qera-approx``: ``R = diag(E[x²])``                  (QERA, uncorrelated-channel optimum)
- ``qera-exact``:  ``R = E[xᵀx]``                        (QERA, exact optimum of the output error)
"""

from __future__ import annotations

import logging
from typing import ClassVar

import torch

from ..linalg import weighted_lowrank
from ..statistics import ActivationStats
from .base import METHODS, Method

log = logging.getLogger(__name__)


class DiagonalScaled(Method):
    """Scale the error's input dimension by ``s``, truncated SVD, un-scale."""

    def scale(self, stats: ActivationStats) -> torch.Tensor:
        raise NotImplementedError

    def solve_error(self, D, rank, stats, name):
        s = self.scale(stats).to(D.device)
        return weighted_lowrank(D, rank, scale=s, opts=self.solver)


@METHODS.register("lqer")
class LQER(DiagonalScaled):
    name = "lqer"
    needs: ClassVar[frozenset[str]] = frozenset({"abs"})

    def scale(self, stats):
        return stats.mean_abs()


@METHODS.register("qera-approx")
class QERAApprox(DiagonalScaled):
    name = "qera-approx"
    needs: ClassVar[frozenset[str]] = frozenset({"sq"})

    def scale(self, stats):
        return stats.mean_sq().clamp_min(0).sqrt()


@METHODS.register("qera-exact")
class QERAExact(Method):
    """Whiten by ``R = E[xᵀx]``: the closed-form minimizer of ``E‖x (W̃ + BA - W)ᵀ‖²``.

    Option ``damp`` (default 0) adds ``damp · mean(diag R) · I`` to ``R`` — a ridge towards the
    weight-error solution, useful when calibration data are scarce.
    """

    name = "qera-exact"
    needs: ClassVar[frozenset[str]] = frozenset({"xtx"})
    option_names = Method.option_names | {"damp"}

    def __init__(self, damp: float = 0.0, **options) -> None:
        super().__init__(**options)
        if not 0.0 <= float(damp) < 1e3:
            raise ValueError(f"damp must be in [0, 1000), got {damp}")
        self.damp = float(damp)
        self.options["damp"] = self.damp

    def solve_error(self, D, rank, stats, name):
        n = stats.dim
        exact = self.solver.use_exact(rank, D.shape[0], D.shape[1])
        # float64 R for the dense eigendecomposition; the Krylov path multiplies in compute_dtype anyway
        R = stats.autocorrelation(torch.float64 if exact else self.solver.compute_dtype).to(D.device)
        diag = torch.diagonal(R)
        mean_diag = float(diag.mean())
        dead = int((diag <= 1e-12 * max(mean_diag, 1e-300)).sum())
        if stats.count < n or dead:
            log.warning(
                "autocorrelation of %s is singular (%d tokens for %d channels, %d dead channels); "
                "the solution stays finite and optimal on the observed subspace",
                name or "layer", stats.count, n, dead,
            )
        if self.damp:
            diag.add_(self.damp * mean_diag)  # R is our own copy
        return weighted_lowrank(D, rank, autocorr=R, opts=self.solver)
