"""Drivers run the per-layer step over a model: ``oneshot`` (whole model) and ``sequential`` (block by block).

Each driver is a function registered under its pipeline name with the signature of
:func:`qera.quantize.drivers.base.Driver`; :func:`qera.quantize.pipeline.quantize_model` picks one from
``QuantConfig.pipeline``.
"""

from __future__ import annotations

from qera.util.registry import Registry

DRIVERS: Registry = Registry("pipeline")

from qera.quantize.drivers.base import DriverContext  # noqa: E402
from qera.quantize.drivers import oneshot, sequential  # noqa: E402,F401  (registration)

__all__ = ["DRIVERS", "DriverContext"]
