"""Drivers run the per-layer step over a model: ``oneshot`` (whole model) and ``sequential`` (block by block).

Each driver is a function registered under its pipeline name with the signature of
:func:`qera.drivers.base.Driver`; :func:`qera.pipeline.quantize_model` picks one from
``QuantConfig.pipeline``.
"""

from __future__ import annotations

from .._registry import Registry

DRIVERS: Registry = Registry("pipeline")

from .base import DriverContext  # noqa: E402
from . import oneshot, sequential  # noqa: E402,F401  (registration)

__all__ = ["DRIVERS", "DriverContext"]
