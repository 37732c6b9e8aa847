"""``quantize_model``: match targets → calibrate → solve → replace, with a per-layer report.

The three steps are separate functions over a set of module names so that a later
layer-by-layer mode (one decoder block at a time with cached block inputs) can call them per block.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .calibration import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, CalibrationStats, collect_statistics, find_targets
from .errors import QeraError
from .formats import parse_format
from .methods import METHODS, Reconstruction, get_method
from .metrics import layer_output_error, weight_error
from .modules import QERALinear

log = logging.getLogger(__name__)

CONFIG_VERSION = 1
LOWRANK_DTYPES = ("float16", "bfloat16", "float32")


@dataclass
class QuantConfig:
    """What to quantize and how. JSON round-trips through :meth:`to_dict` / :meth:`from_dict`.

    format: weight format spec (``mxint4``, ``int4:group=128``, ``nf4`` ...).
    method: reconstruction method name (see ``qera.METHODS``).
    rank: rank of the low-rank term (0 for ``w-only``).
    method_options: keyword options of the method (``iters`` for loftq, ``exact``, ``damp`` ...).
    include / exclude: regexes on module names (defaults: every Linear in the decoder blocks,
        never ``lm_head`` or embeddings).
    rank_overrides: ``{regex: rank}``; the first matching regex sets the layer's rank.
    lowrank_dtype: storage dtype of ``A`` and ``B``.
    seed: seed of the randomized solver.
    """

    format: str = "mxint4"
    method: str = "qera-exact"
    rank: int = 32
    method_options: dict[str, Any] = field(default_factory=dict)
    include: list[str] = field(default_factory=lambda: list(DEFAULT_INCLUDE))
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    rank_overrides: dict[str, int] = field(default_factory=dict)
    lowrank_dtype: str = "float16"
    seed: int = 0
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        self.format = str(parse_format(self.format))
        METHODS.get(self.method)  # raises with the known names
        uses_rank = METHODS.get(self.method).uses_rank
        if not isinstance(self.rank, int) or self.rank < 0:
            raise QeraError(f"rank must be a non-negative integer, got {self.rank!r}")
        if uses_rank and self.rank == 0:
            raise QeraError(f"method {self.method!r} needs rank >= 1")
        if not uses_rank:
            self.rank = 0
        if self.lowrank_dtype not in LOWRANK_DTYPES:
            raise QeraError(f"lowrank_dtype must be one of {LOWRANK_DTYPES}, got {self.lowrank_dtype!r}")
        for pattern in [*self.include, *self.exclude, *self.rank_overrides]:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise QeraError(f"invalid regex {pattern!r}: {exc}") from None
        for pattern, r in self.rank_overrides.items():
            if not isinstance(r, int) or r < 0:
                raise QeraError(f"rank override for {pattern!r} must be a non-negative integer, got {r!r}")
        if self.version != CONFIG_VERSION:
            raise QeraError(f"unsupported config version {self.version} (this qera reads {CONFIG_VERSION})")
        get_method(self.method, **self.solver_options())  # validates the options

    def solver_options(self) -> dict[str, Any]:
        opts = dict(self.method_options)
        if METHODS.get(self.method).uses_rank:
            opts.setdefault("seed", self.seed)
        return opts

    def rank_for(self, name: str) -> int:
        for pattern, r in self.rank_overrides.items():
            if re.search(pattern, name):
                return r
        return self.rank

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QuantConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise QeraError(f"unknown quantization config key(s): {sorted(unknown)}")
        return cls(**d)


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    format: str
    rank: int
    bits_weight: float  # bits per weight of W̃ (codes + scales)
    bits_total: float  # including A and B at their storage dtype
    weight_error_before: float
    weight_error_after: float
    output_error_before: float | None  # trace(E R Eᵀ); None without the autocorrelation
    output_error_after: float | None
    seconds: float


@dataclass
class QuantReport:
    config: QuantConfig
    layers: list[LayerReport] = field(default_factory=list)
    calibration_seconds: float = 0.0
    solve_seconds: float = 0.0
    calibration_tokens: int = 0

    def summary(self) -> dict[str, Any]:
        n = sum(l.shape[0] * l.shape[1] for l in self.layers) or 1
        def wavg(attr: str) -> float:
            return sum(getattr(l, attr) * l.shape[0] * l.shape[1] for l in self.layers) / n
        out_b = [l.output_error_before for l in self.layers if l.output_error_before is not None]
        out_a = [l.output_error_after for l in self.layers if l.output_error_after is not None]
        return {
            "layers": len(self.layers),
            "params": n,
            "bits_weight": wavg("bits_weight"),
            "bits_total": wavg("bits_total"),
            "mean_output_error_ratio": (
                sum(a / b for a, b in zip(out_a, out_b) if b > 0) / len(out_a) if out_a else None
            ),
            "calibration_seconds": self.calibration_seconds,
            "solve_seconds": self.solve_seconds,
            "calibration_tokens": self.calibration_tokens,
        }

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "summary": self.summary(),
                "layers": [dataclasses.asdict(l) for l in self.layers], "qera_version": __version__}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


def stats_kinds_for(config: QuantConfig, report_output_error: bool = False) -> frozenset[str]:
    kinds = set(METHODS.get(config.method).needs)
    if report_output_error:
        kinds.add("xtx")
    return frozenset(kinds)


def solve_layers(
    modules: Mapping[str, nn.Linear],
    config: QuantConfig,
    stats: CalibrationStats | None,
    progress: bool = True,
    output_error: bool = True,
) -> Iterable[tuple[str, Reconstruction, LayerReport]]:
    """Quantize and reconstruct each module; yields ``(name, reconstruction, report)`` lazily.

    ``output_error``: report layer output errors where the statistics hold ``Σxᵀx``.
    """
    fmt = parse_format(config.format)
    method = get_method(config.method, **config.solver_options())
    lowrank_bits = torch.finfo(getattr(torch, config.lowrank_dtype)).bits
    for name, lin in tqdm(modules.items(), desc=f"{config.method} {config.format}", unit="layer", disable=not progress):
        rank = config.rank_for(name) if method.uses_rank else 0
        st = stats[name] if stats is not None and name in stats else None
        W = lin.weight.detach()
        t0 = time.perf_counter()
        q0 = fmt.quantize(W, name)
        if method.uses_rank and rank == 0:  # rank override 0: quantization only
            w_q = q0.dequantize(torch.float32)
            rec = Reconstruction(w_q.new_zeros(0, W.shape[1]), w_q.new_zeros(W.shape[0], 0), w_q, q0)
        else:
            method.check(W, rank, st, name)
            rec = method.solve(W, q0, rank, st, fmt, name)
        dt = time.perf_counter() - t0
        R = st.autocorrelation() if output_error and st is not None and "xtx" in st.kinds else None
        w_q0 = rec.w_q if rec.qweight is q0 else q0.dequantize(torch.float32)  # LoftQ replaces W̃
        out_f, in_f = W.shape
        r = rec.rank
        yield name, rec, LayerReport(
            name=name, shape=(out_f, in_f), format=str(fmt), rank=r,
            bits_weight=fmt.bits_per_weight,
            bits_total=fmt.bits_per_weight + lowrank_bits * r * (in_f + out_f) / (in_f * out_f),
            weight_error_before=weight_error(W, w_q0),
            weight_error_after=weight_error(W, rec.w_q, rec.A, rec.B),
            output_error_before=layer_output_error(W, w_q0, stats=R) if R is not None else None,
            output_error_after=layer_output_error(W, rec.w_q, rec.A, rec.B, R) if R is not None else None,
            seconds=dt,
        )


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_model(
    model: nn.Module,
    config: QuantConfig,
    calibration: Iterable[Mapping[str, torch.Tensor]] | None = None,
    stats: CalibrationStats | None = None,
    report_output_error: bool | None = None,
    progress: bool = True,
) -> QuantReport:
    """Quantize ``model`` in place: every target ``nn.Linear`` becomes a :class:`QERALinear`.

    Args:
        calibration: batches (dicts with ``input_ids``/``attention_mask``) for the statistics the
            method needs; or pass precomputed ``stats`` (from :func:`collect_statistics`).
        report_output_error: ``True`` also collects ``Σxᵀx`` so the report holds layer output
            errors; ``None`` reports them when the statistics have ``Σxᵀx``; ``False`` never.
    Returns:
        A :class:`QuantReport` with per-layer errors, bits and timings.
    """
    targets = find_targets(model, config.include, config.exclude)
    kinds = stats_kinds_for(config, bool(report_output_error))
    report = QuantReport(config)
    own_stats = False
    if kinds:
        if stats is not None:
            missing = kinds - stats.kinds
            if missing:
                raise QeraError(
                    f"the given statistics lack {sorted(missing)} needed by {config.method}; recalibrate with them"
                )
        elif calibration is None:
            raise QeraError(f"method {config.method!r} needs calibration data or precomputed statistics")
        else:
            t0 = time.perf_counter()
            stats = collect_statistics(model, calibration, list(targets), kinds, progress=progress)
            own_stats = True
            report.calibration_seconds = time.perf_counter() - t0
        report.calibration_tokens = stats.tokens
    lowrank_dtype = getattr(torch, config.lowrank_dtype)
    done: set[str] = set()
    t0 = time.perf_counter()
    for name, rec, layer_report in solve_layers(
        targets, config, stats, progress, report_output_error is not False
    ):
        replace_module(model, name, QERALinear.from_linear(targets[name], rec, lowrank_dtype))
        report.layers.append(layer_report)
        done.add(name)
        if own_stats:
            stats.release(name, done)  # statistics we collected ourselves: free them as we go
    report.solve_seconds = time.perf_counter() - t0
    model.qera_config = config  # read by save_quantized
    return report
