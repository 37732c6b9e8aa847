"""qera: low-precision weights plus a low-rank term that reconstructs the quantization error."""

from __future__ import annotations

import logging

from qera._version import __version__  # noqa: E402
from qera.util.errors import QeraError  # noqa: E402
from qera.core.formats import FORMATS, QuantizedWeight, WeightFormat, parse_format, quantize_weight  # noqa: E402
from qera.core.linalg import SolverOptions, weighted_lowrank  # noqa: E402
from qera.core.methods import METHODS, Reconstruction, get_method, quantize_and_reconstruct, reconstruct  # noqa: E402
from qera.core.metrics import layer_output_error, weight_error  # noqa: E402
from qera.core.rounding import ROUNDINGS, round_gptq  # noqa: E402
from qera.core.statistics import ActivationStats
from qera.calibrate.store import load_stats, save_stats  # noqa: E402
from qera.calibrate.store import CalibrationStats  # noqa: E402
from qera.nn.targets import find_targets  # noqa: E402
from qera.calibrate.forward import collect_statistics  # noqa: E402
from qera.calibrate.recording import record_statistics  # noqa: E402
from qera.nn.modules import QERALinear  # noqa: E402
from qera.nn.inference import prepare_inference  # noqa: E402
from qera.core.config import QuantConfig  # noqa: E402
from qera.core.report import LayerReport, QuantReport  # noqa: E402
from qera.quantize.layer import LayerQuantizer, LayerResult  # noqa: E402
from qera.quantize.pipeline import quantize_and_save, quantize_model  # noqa: E402
from qera.io.checkpoint import load_quantized, save_quantized  # noqa: E402
from qera.io.export import export  # noqa: E402
from qera.evaluate.perplexity import perplexity  # noqa: E402
from qera.io.models import load_model  # noqa: E402

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
