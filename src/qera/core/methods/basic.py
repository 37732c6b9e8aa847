"""Methods that need no calibration: ``w-only`` and ``zeroquant-v2`` (plain truncated SVD)."""

from __future__ import annotations

import torch

from qera.core.linalg import weighted_lowrank
from qera.core.statistics import ActivationStats
from qera.core.methods.base import METHODS, Method


@METHODS.register("w-only")
class WeightOnly(Method):
    """Quantization alone: no low-rank term (rank 0)."""

    name = "w-only"
    order = 0
    uses_rank = False

    def solve_error(self, D, rank, stats, name):  # pragma: no cover - never called (uses_rank False)
        raise AssertionError


@METHODS.register("zeroquant-v2")
class ZeroQuantV2(Method):
    """Truncated SVD of ``W - W̃``: minimizes the weight error ``‖W - W̃ - BA‖_F``."""

    order = 2

    name = "zeroquant-v2"

    def solve_error(self, D: torch.Tensor, rank: int, stats: ActivationStats | None, name):
        return weighted_lowrank(D, rank, opts=self.solver)
