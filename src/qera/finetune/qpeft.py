"""QPEFT: LoRA adapters on a packed quantized base, initialized by a reconstruction method.

``prepare_qpeft_model`` quantizes the target ``nn.Linear`` layers to a frozen, packed
:class:`~qera.nn.modules.QERALinear` base (dequantized in the forward pass, so memory really
shrinks), wraps the model with PEFT's ``get_peft_model`` and initializes each adapter:

- ``qlora``: PEFT's default (A random, B = 0), so the model starts at ``W̃``;
- ``loftq`` / ``zeroquant-v2`` / ``lqer`` / ``qera-approx`` / ``qera-exact`` / ``qera-iter``: the adapter
  equals the reconstruction, ``scaling · lora_B @ lora_A = B A`` with ``scaling = α / r``, so right
  after initialization the model computes ``x (W̃ + B A)ᵀ``. (LoftQ and qera-iter also replace ``W̃``.)

PEFT is extended through its custom-module registry (``LoraConfig._register_custom_module``),
not by patching it: :class:`QuantLoraLinear` is PEFT's LoRA ``Linear`` over a ``QERALinear`` base.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from qera.util.atomic import atomic_directory, recover_directory
from qera.core.config import QuantConfig
from qera.core.methods import Method, method_names
from qera.util.errors import QeraError
from qera.quantize.layer import LayerResult
from qera.nn.modules import QERALinear
from qera.quantize.pipeline import quantize_model
from qera.calibrate.store import CalibrationStats
from qera.core.selection import DEFAULT_EXCLUDE, DEFAULT_INCLUDE
from qera.nn.targets import find_targets, linear_shape, linear_weight, replace_module

log = logging.getLogger(__name__)

INITS = ("qlora", *method_names(uses_rank=True))  # qlora: PEFT's zero init; the rest are methods
QPEFT_CONFIG = "qpeft_config.json"


def _lora_linear_cls():
    from peft.tuners.lora import Linear as LoraLinear

    class QuantLoraLinear(LoraLinear):
        """PEFT LoRA ``Linear`` whose base layer is a packed :class:`QERALinear`."""

        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            return module.in_features, module.out_features

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            raise QeraError(
                "merging LoRA weights into a packed quantized base is not supported; keep the adapter "
                "separate, or re-quantize W̃ + BA with qera.quantize_model"
            )

    return QuantLoraLinear


@functools.lru_cache(maxsize=1)
def quant_lora_linear() -> type:
    """The :class:`QuantLoraLinear` class (built lazily so that importing qera needs no PEFT)."""
    return _lora_linear_cls()


def register_qera_modules(lora_config) -> Any:
    """Tell a ``LoraConfig`` how to wrap ``QERALinear`` layers; returns the config."""
    lora_config._register_custom_module({QERALinear: quant_lora_linear()})
    return lora_config


@dataclass
class QPEFTConfig:
    """Quantized base + LoRA adapters.

    format: weight format of the frozen base. init: adapter initialization (see ``INITS``).
    rank / alpha / dropout: LoRA ``r``, ``lora_alpha``, ``lora_dropout`` (scaling = alpha / rank).
    init_options: options of the init method (``iters`` for loftq, ``exact``, ``damp`` ...).
    modules_to_save: modules trained in full and saved with the adapter (e.g. ``["classifier"]``).
    task_type: PEFT task type (``CAUSAL_LM``, ``SEQ_CLS`` ...), or None.
    cache_base: keep a dense copy of each dequantized base weight (faster, more memory).
    refine_steps / refine_lr / refine_train: block-wise refinement of the init before the adapters
        take it (:mod:`qera.quantize.refine`; sequential pipeline, quantized propagation, needs
        calibration batches). 0: the closed form.
    """

    format: str = "mxint3"
    init: str = "qera-approx"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    init_options: dict[str, Any] = field(default_factory=dict)
    include: list[str] = field(default_factory=lambda: list(DEFAULT_INCLUDE))
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    cache_base: bool = False
    seed: int = 0
    refine_steps: int = 0
    refine_lr: float = 1e-3
    refine_train: str = "auto"

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise QeraError(f"unknown init {self.init!r}; known: {', '.join(INITS)}")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise QeraError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise QeraError(f"lora alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise QeraError(f"dropout must be in [0, 1), got {self.dropout!r}")
        self.quant_config()  # validates format and init options

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def quant_config(self) -> QuantConfig:
        method = "w-only" if self.init == "qlora" else self.init
        refine = {}
        if self.refine_steps:
            refine = dict(pipeline="sequential", propagate="quantized", refine_steps=self.refine_steps,
                          refine_lr=self.refine_lr, refine_train=self.refine_train)
        return QuantConfig(
            format=self.format, method=method, rank=0 if method == "w-only" else self.rank,
            method_options={} if method == "w-only" else dict(self.init_options),
            include=list(self.include), exclude=list(self.exclude), lowrank_dtype="float32", seed=self.seed,
            **refine,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QPEFTConfig":
        return cls(**d)


def prepare_qpeft_model(
    model: nn.Module,
    config: QPEFTConfig,
    calibration: Iterable[Mapping[str, torch.Tensor]] | None = None,
    stats: CalibrationStats | None = None,
    progress: bool = True,
):
    """Quantize ``model``'s targets in place and return ``(peft_model, report)``.

    ``calibration`` (unlabeled text batches, padding masked) or ``stats`` are needed by the
    activation-aware inits (lqer, qera-approx, qera-exact). The quantization is the same
    per-layer step as PTQ (:func:`qera.quantize_model`), with a sink that keeps ``W̃`` as the
    frozen packed base and hands ``(A, B)`` to the adapters. With ``refine_steps`` the PTQ run
    (refinement included) builds whole ``QERALinear`` layers first; their refined ``W̃`` becomes the
    base and their ``(A, B)`` the adapters' init.
    """
    from peft import LoraConfig, get_peft_model

    qcfg = config.quant_config()
    targets = find_targets(model, qcfg.include, qcfg.exclude)
    for name, lin in targets.items():
        out_f, in_f = linear_shape(lin)
        if config.init != "qlora":
            Method.check_rank(config.rank, (out_f, in_f), name)
    recs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # {layer: (A, B)}

    def base_sink(name: str, module: nn.Module, result: LayerResult) -> nn.Module:
        recs[name] = (result.A, result.B)
        w = linear_weight(module)
        return QERALinear(result.qweight.to(w.device), w.new_zeros(0, w.shape[1]), w.new_zeros(w.shape[0], 0),
                          getattr(module, "bias", None), cache_weight=config.cache_base)

    if qcfg.refines:
        if calibration is None:
            raise QeraError("refine_steps needs calibration batches (the refinement trains on the cached block inputs)")
        report = quantize_model(model, qcfg, calibration=calibration, report_output_error=False, progress=progress)
        for name in targets:  # the refined layers: W̃ becomes the frozen base, (A, B) the adapters' init
            layer = model.get_submodule(name)
            recs[name] = (layer.A.detach(), layer.B.detach())
            base = QERALinear(layer.packed_weight, layer.A.new_zeros(0, layer.in_features),
                              layer.B.new_zeros(layer.out_features, 0), layer.bias, cache_weight=config.cache_base)
            replace_module(model, name, base)
    else:
        report = quantize_model(model, qcfg, calibration=calibration, stats=stats, report_output_error=False,
                                progress=progress, sink=base_sink)
    lora_config = LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
        target_modules=sorted(targets), modules_to_save=config.modules_to_save,
        task_type=config.task_type, init_lora_weights=True,
    )
    register_qera_modules(lora_config)
    with torch.random.fork_rng(devices=[]):  # PEFT draws lora_A from the global generator;
        torch.manual_seed(config.seed)  # seed it for determinism without touching the caller's state
        peft_model = get_peft_model(model, lora_config)
    if config.init != "qlora":
        inner = peft_model.get_base_model()
        with torch.no_grad():
            for name, (A, B) in recs.items():
                layer = inner.get_submodule(name)
                a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
                a.copy_(A.to(a.device, a.dtype))
                b.copy_((B / config.scaling).to(b.device, b.dtype))
    return peft_model, report


def save_qpeft(peft_model, tokenizer, path: str | os.PathLike, overwrite: bool = False, *,
               config: QPEFTConfig | None = None) -> Path:
    """Write ``path/adapter`` (a standard PEFT adapter), ``path/base`` (qera checkpoint) and, when
    given, the ``config`` the model was prepared with (``qpeft_config.json``), atomically.

    An existing ``path`` is replaced only with ``overwrite``, and then atomically: the old or the
    new checkpoint is at ``path`` at every instant.
    """
    from qera.io.checkpoint import save_quantized

    with atomic_directory(path, overwrite) as tmp:
        peft_model.save_pretrained(tmp / "adapter")
        save_quantized(peft_model.get_base_model(), tokenizer, tmp / "base")
        (tmp / QPEFT_CONFIG).write_text(json.dumps(config.to_dict() if config else {}, indent=1))
    return Path(path)


def read_qpeft_config(path: str | os.PathLike) -> QPEFTConfig | None:
    """The :class:`QPEFTConfig` saved beside a QPEFT checkpoint (None when it was saved without one)."""
    file = Path(path) / QPEFT_CONFIG
    if not file.is_file():
        return None
    try:
        d = json.loads(file.read_text())
        return QPEFTConfig.from_dict(d) if d else None
    except (json.JSONDecodeError, TypeError) as exc:
        raise QeraError(f"{file} is not a valid QPEFT config: {exc}") from None


def load_qpeft(path: str | os.PathLike, is_trainable: bool = False, device: str | torch.device = "cpu"):
    """Load ``(peft_model, tokenizer)`` written by :func:`save_qpeft`."""
    from peft import LoraConfig, PeftModel

    from qera.io.checkpoint import load_quantized

    path = Path(path)
    recover_directory(path)
    if not (path / "adapter").is_dir() or not (path / "base").is_dir():
        raise QeraError(f"{path} is not a qera QPEFT checkpoint (needs adapter/ and base/)")
    weights = [n for n in ("adapter_model.safetensors",) if (path / "adapter" / n).is_file()]
    if not weights:
        pickles = [n for n in ("adapter_model.bin",) if (path / "adapter" / n).is_file()]
        hint = f"; {pickles[0]} is a pickle file, which qera never loads" if pickles else ""
        raise QeraError(f"{path / 'adapter'} has no adapter_model.safetensors{hint}")
    if not (path / "adapter" / "adapter_config.json").is_file():
        raise QeraError(f"{path / 'adapter'} has no adapter_config.json")
    cfg = read_qpeft_config(path)
    base, tok = load_quantized(path / "base", device=device, cache_weight=bool(cfg and cfg.cache_base))
    lora_config = register_qera_modules(LoraConfig.from_pretrained(path / "adapter"))
    model = PeftModel.from_pretrained(base, path / "adapter", config=lora_config, is_trainable=is_trainable)
    return model, tok


__all__ = ["INITS", "QPEFTConfig", "prepare_qpeft_model", "save_qpeft", "load_qpeft", "read_qpeft_config",
           "register_qera_modules"]
