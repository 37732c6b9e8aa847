"""qera: low-precision weights plus a low-rank term that reconstructs the quantization error."""

from __future__ import annotations

import logging

from ._version import __version__  # noqa: E402
from .errors import QeraError  # noqa: E402
from .formats import FORMATS, QuantizedWeight, WeightFormat, parse_format, quantize_weight  # noqa: E402
from .linalg import SolverOptions, weighted_lowrank  # noqa: E402
from .methods import METHODS, Reconstruction, get_method, quantize_and_reconstruct, reconstruct  # noqa: E402
from .metrics import layer_output_error, weight_error  # noqa: E402
from .rounding import ROUNDINGS, round_gptq  # noqa: E402
from .statistics import ActivationStats, load_stats, save_stats  # noqa: E402
from .statistics import CalibrationStats  # noqa: E402
from .targets import find_targets  # noqa: E402
from .calibration import collect_statistics  # noqa: E402
from .recording import record_statistics  # noqa: E402
from .modules import QERALinear  # noqa: E402
from .kernels import prepare_inference  # noqa: E402
from .config import QuantConfig  # noqa: E402
from .report import LayerReport, QuantReport  # noqa: E402
from .layer import LayerQuantizer, LayerResult  # noqa: E402
from .pipeline import quantize_and_save, quantize_model  # noqa: E402
from .checkpoint import load_quantized, save_quantized  # noqa: E402
from .export import export  # noqa: E402
from .evaluation import perplexity  # noqa: E402
from .models import load_model  # noqa: E402

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "__version__",
    "QeraError",
    "FORMATS",
    "METHODS",
    "ROUNDINGS",
    "round_gptq",
    "QuantizedWeight",
    "WeightFormat",
    "parse_format",
    "quantize_weight",
    "ActivationStats",
    "save_stats",
    "load_stats",
    "SolverOptions",
    "weighted_lowrank",
    "Reconstruction",
    "get_method",
    "reconstruct",
    "quantize_and_reconstruct",
    "layer_output_error",
    "weight_error",
    "CalibrationStats",
    "collect_statistics",
    "record_statistics",
    "find_targets",
    "QERALinear",
    "prepare_inference",
    "QuantConfig",
    "QuantReport",
    "LayerReport",
    "LayerQuantizer",
    "LayerResult",
    "quantize_model",
    "quantize_and_save",
    "save_quantized",
    "load_quantized",
    "export",
    "perplexity",
    "load_model",
]
