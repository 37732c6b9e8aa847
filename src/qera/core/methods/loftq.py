"""LoftQ: alternate quantization of ``W - BA`` and truncated SVD of the new error."""

from __future__ import annotations

from typing import Iterator

import torch

from qera.util.errors import QeraError, where
from qera.core.formats import QuantizedWeight, WeightFormat
from qera.core.linalg import weighted_lowrank
from qera.core.methods.base import METHODS, Method, Reconstruction


@METHODS.register("loftq")
class LoftQ(Method):
    """``T`` iterations (option ``iters``, default 5) of ``W̃ = dq(q(W - BA))``; ``BA = svd_k(W - W̃)``.

    Needs the weight format (to re-quantize); returns the final ``W̃`` in the reconstruction.
    """

    order = 1
    iterates = True

    name = "loftq"
    option_names = Method.option_names | {"iters"}

    def __init__(self, iters: int = 5, **options) -> None:
        super().__init__(**options)
        if not isinstance(iters, int) or iters < 1:
            raise QeraError(f"loftq: iters must be a positive integer, got {iters!r}")
        self.iters = iters
        self.options["iters"] = iters

    def solve_error(self, D, rank, stats, name):
        return weighted_lowrank(D, rank, opts=self.solver)

    def solve_path(
        self, W, qweight, rank, stats=None, fmt: WeightFormat | None = None, name=None, out_metric=None,
    ) -> Iterator[Reconstruction]:
        """Yield the reconstruction after each of the ``iters`` iterations (the last one is :meth:`solve`'s)."""
        if fmt is None:
            if not isinstance(qweight, QuantizedWeight):
                raise QeraError(f"loftq re-quantizes the weight: pass a QuantizedWeight or fmt={where(name)}")
            fmt = qweight.fmt
        W32 = W.detach().to(torch.float32)
        if not isinstance(qweight, QuantizedWeight):  # iteration 1 is W̃ = q(W) whatever was passed
            qweight = fmt.quantize(W32, name)
        rec = super().solve(W, qweight, rank, stats, fmt, name, out_metric)
        yield rec
        for _ in range(self.iters - 1):
            qw = fmt.quantize(W32 - rec.B @ rec.A, name)
            rec = super().solve(W, qw, rank, stats, fmt, name, out_metric)
            yield rec

    def solve(self, W, qweight, rank, stats=None, fmt: WeightFormat | None = None, name=None,
              out_metric=None) -> Reconstruction:
        for rec in self.solve_path(W, qweight, rank, stats, fmt, name, out_metric):
            pass
        return rec
