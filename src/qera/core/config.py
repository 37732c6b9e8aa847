"""``QuantConfig``: what to quantize and how; it identifies a checkpoint (saved in its JSON)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from qera.util.errors import QeraError
from qera.core.formats import parse_format
from qera.core.methods import METHODS, get_method
from qera.core.rounding import ROUNDINGS
from qera.core.statistics import STATS_PRECISIONS
from qera.core.selection import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, compile_patterns

CONFIG_VERSION = 2
LOWRANK_DTYPES = ("float16", "bfloat16", "float32")
PIPELINES = ("oneshot", "sequential", "auto")
PROPAGATE = ("fp", "quantized")
OUTPUT_WEIGHTS = ("none", "fisher", "kfac", "block")
REFINE_PARTS = ("lowrank", "scales", "rounding")
REFINE_LOSSES = ("energy", "token", "channel")  # qera.quantize.refine.LOSSES


def _format_field(name: str, spec: Any) -> str:
    """The canonical spec of a format field; its errors start with the field's name (``act_format: ...``),
    since a nested format's own message names only the format family."""
    try:
        return str(parse_format(spec))
    except QeraError as exc:
        raise QeraError(f"{name}: {exc}") from None


def _fallback_field(fmt: str, spec: Any) -> str:
    """The canonical ``format_fallback``: ``auto`` becomes the format's own fallback (llama.cpp's for
    the GGUF k-quants), a spec its canonical string."""
    if spec == "auto":
        own = parse_format(fmt).fallback
        if own is None:
            raise QeraError(f"format_fallback: {fmt} stores every shape, so it has no automatic fallback; "
                            "name a format or leave format_fallback unset")
        return own
    return _format_field("format_fallback", spec)


@dataclass
class QuantConfig:
    """What to quantize and how. JSON round-trips through :meth:`to_dict` / :meth:`from_dict`.

    format: weight format spec (``mxint4``, ``int4:group=128``, ``nf4`` ...).
    format_fallback: the format of the layers whose shape ``format`` cannot store (the GGUF
        k-quants need input widths that are multiples of 256); ``auto`` takes the format's own
        (llama.cpp's: q2_k and q3_k → q4_0, q4_k → q5_0, q5_k → q5_1, q6_k → q8_0). Unset: such a
        layer is refused before any calibration.
    method: reconstruction method name (see ``qera.METHODS``).
    rank: rank of the low-rank term (0 for ``w-only``).
    method_options: keyword options of the method (``iters`` for loftq, ``exact``, ``damp`` ...).
    include / exclude: regexes on module names (defaults: every linear layer in the decoder
        blocks, never ``lm_head`` or embeddings).
    rank_overrides: ``{regex: rank}``; the first matching regex sets the layer's rank.
    lowrank_dtype: storage dtype of ``A`` and ``B``.
    seed: seed of the randomized solver.
    pipeline: ``oneshot`` (whole model, all statistics at once), ``sequential`` (one decoder block
        at a time over cached block inputs) or ``auto`` (sequential when the one-shot statistics
        would not fit the memory budget).
    propagate: with ``sequential``, the next block's inputs are the outputs of the original block
        (``fp``, same result as one-shot) or of the quantized block (``quantized``, as GPTQ does).
    stats_precision: ``mixed`` (float32 chunk sums, tensor cores for bf16 on a GPU) or ``float64``.
    rounding: how ``W̃`` is placed on the grid before the reconstruction: ``rtn`` (round to
        nearest) or ``gptq`` (column by column with error feedback through ``R``; needs ``Σxᵀx``).
    gptq_damp: GPTQ's damping, as a fraction of the mean diagonal of ``R`` (0 < damp ≤ 1).
    rank_budget: allocate ranks across layers instead of ``rank`` everywhere, within the A/B
        parameters of this average rank (``8`` = as many as rank 8 on every layer); ranks go where a
        rank unit removes the most normalized error (see :mod:`qera.core.allocation`).
    extra_bits: the same budget given as bits per weight spent on A and B (e.g. ``0.4``).
    rank_normalize: how layer errors are made comparable for the allocation: ``fisher`` (weighted
        by the loss's mean squared gradient at the layer output; one-shot only), ``output`` (by
        ``trace(W R Wᵀ)``), ``error`` (by the error before the low-rank term), ``none``, or ``auto``
        (default: ``fisher`` where the one-shot pipeline has calibration batches, else ``error``).
    output_weight: how the output channels of a layer count in its objective: ``none`` (all the
        same: the output error ``trace(E R Eᵀ)``), ``fisher`` (each by the loss's mean squared
        gradient at that channel: ``trace(F E R Eᵀ)``, ``F = diag E[g²]``) or ``kfac`` (``F = E[gᵀg]``,
        the channels' gradient correlations too; an (out × out) float64 matrix per layer, 1.4 GB on
        SmolLM2-135M, tens of GB on a 7B, refused over the memory budget). Both need one
        loss-gradient pass through the whole full-precision model (in memory, one process; the
        sequential pipeline runs it before the first block) and put the layers' errors in the
        loss's units, so rank allocation's ``auto`` normalization is then ``none``. ``block``:
        the block-level stand-in for a streamed model (sequential pipeline): each channel by the
        diagonal of its block output's Gauss-Newton matrix, ``E‖∂z/∂y_j‖²``, estimated per block
        from its cached inputs (:func:`qera.calibrate.sensitivity.block_output_fisher`).
    act_format: quantize the input of each quantized GEMM too (e.g. ``mxint8`` for LQER's W4A8);
        the low-rank branch keeps the high-precision input. None: weights only.
    report_spectrum: keep this many leading eigenvalues of each layer's output-error matrix
        ``D R Dᵀ`` in its report (the decay that explains the rank; one eigen-solve per layer on top
        of the solve); 0: none.
    refine_steps: after each decoder block's closed-form solve (sequential pipeline), this many
        optimizer steps that lower the block's output error against the full-precision block
        (:mod:`qera.quantize.refine`); 0: none.
    refine_lr: the refinement's Adam learning rate (cosine-decayed to 0 over the steps).
    refine_train: what the refinement trains, a comma list of ``lowrank`` (``A``, ``B``),
        ``scales`` (the float group parameters of ``W̃``) and ``rounding`` (AutoRound-style offsets
        that move each integer code of ``W̃`` by at most one level); ``auto`` (default):
        ``lowrank,rounding`` where the format allows, else ``lowrank``.
    refine_loss: how the block's output error is summed (the refinement's objective, and with
        ``output_weight="block"`` the weighting of the block-level Gauss-Newton probe):
        ``channel`` (default: the energy loss with each hidden channel weighted by
        ``min(1, median channel energy / its energy)``, so a massive-activation channel counts as a
        typical one), ``energy`` (``Σ_t ‖e_t‖² / Σ_t ‖y_t‖²``: each token and channel by its size)
        or ``token`` (``mean_t ‖e_t‖² / ‖y_t‖²``: each token's relative error counts the same).
    """

    format: str = "mxint4"
    format_fallback: str | None = None
    method: str = "qera-exact"
    rank: int = 32
    method_options: dict[str, Any] = field(default_factory=dict)
    include: list[str] = field(default_factory=lambda: list(DEFAULT_INCLUDE))
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    rank_overrides: dict[str, int] = field(default_factory=dict)
    lowrank_dtype: str = "float16"
    seed: int = 0
    pipeline: str = "oneshot"
    propagate: str = "fp"
    stats_precision: str = "mixed"
    rounding: str = "rtn"
    gptq_damp: float = 0.01
    act_format: str | None = None
    rank_budget: float | None = None
    extra_bits: float | None = None
    rank_normalize: str = "auto"
    output_weight: str = "none"
    report_spectrum: int = 0
    refine_steps: int = 0
    refine_lr: float = 1e-3
    refine_train: str = "auto"
    refine_loss: str = "channel"
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        self.format = _format_field("format", self.format)
        if self.format_fallback is not None:
            self.format_fallback = _fallback_field(self.format, self.format_fallback)
        if self.act_format is not None:
            self.act_format = _format_field("act_format", self.act_format)
        method_cls = METHODS.get(self.method)  # raises with the known names
        uses_rank = method_cls.uses_rank
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 0:
            raise QeraError(f"rank must be a non-negative integer, got {self.rank!r}")
        if uses_rank and self.rank == 0:
            raise QeraError(f"method {self.method!r} needs rank >= 1")
        if not uses_rank:
            self.rank = 0
        if self.lowrank_dtype not in LOWRANK_DTYPES:
            raise QeraError(f"lowrank_dtype must be one of {LOWRANK_DTYPES}, got {self.lowrank_dtype!r}")
        if not isinstance(self.method_options, dict):
            raise QeraError(f"method_options must be a dict, got {type(self.method_options).__name__}")
        for what, patterns in (("include", self.include), ("exclude", self.exclude)):
            if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
                raise QeraError(f"{what} must be a list of regex strings, got {patterns!r}")
            compile_patterns(patterns, what)
        compile_patterns(list(self.rank_overrides), "rank override")
        for pattern, r in self.rank_overrides.items():
            if not isinstance(r, int) or isinstance(r, bool) or r < 0:
                raise QeraError(f"rank override for {pattern!r} must be a non-negative integer, got {r!r}")
        if not isinstance(self.seed, int):
            raise QeraError(f"seed must be an integer, got {self.seed!r}")
        if isinstance(self.report_spectrum, bool) or not isinstance(self.report_spectrum, int) or self.report_spectrum < 0:
            raise QeraError(f"report_spectrum must be a non-negative integer, got {self.report_spectrum!r}")
        if self.pipeline not in PIPELINES:
            raise QeraError(f"pipeline must be one of {', '.join(PIPELINES)}, got {self.pipeline!r}")
        if self.propagate not in PROPAGATE:
            raise QeraError(f"propagate must be one of {', '.join(PROPAGATE)}, got {self.propagate!r}")
        if self.stats_precision not in STATS_PRECISIONS:
            raise QeraError(f"stats_precision must be one of {', '.join(STATS_PRECISIONS)}, got {self.stats_precision!r}")
        if self.rounding not in ROUNDINGS.names():
            raise QeraError(f"rounding must be one of {', '.join(ROUNDINGS.names())}, got {self.rounding!r}")
        if isinstance(self.gptq_damp, bool) or not isinstance(self.gptq_damp, (int, float)) \
                or not 0 < self.gptq_damp <= 1:
            raise QeraError(f"gptq_damp must be a number in (0, 1], got {self.gptq_damp!r}")
        self.gptq_damp = float(self.gptq_damp)
        self._check_allocation(uses_rank)
        self._check_refine(uses_rank)
        if self.propagate == "quantized" and self.pipeline == "oneshot":
            raise QeraError("propagate='quantized' needs pipeline='sequential' (or 'auto')")
        if self.version != CONFIG_VERSION:
            raise QeraError(f"unsupported config version {self.version} (this qera reads {CONFIG_VERSION})")
        get_method(self.method, **self.solver_options())  # validates the options

    def _check_allocation(self, uses_rank: bool) -> None:
        from qera.core.allocation import NORMALIZERS

        for key in ("rank_budget", "extra_bits"):
            v = getattr(self, key)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1e6:
                raise QeraError(f"{key} must be a positive number, got {v!r}")
            setattr(self, key, float(v))
        if self.rank_budget is not None and self.extra_bits is not None:
            raise QeraError("give rank_budget or extra_bits, not both (they are two ways to state one budget)")
        if self.rank_normalize == "fisher" and self.pipeline == "sequential":
            raise QeraError("rank_normalize='fisher' needs the whole model's loss gradients: use pipeline='oneshot' "
                            "(or 'auto'), or rank_normalize='error' block by block")
        if self.output_weight not in OUTPUT_WEIGHTS:
            raise QeraError(f"output_weight must be one of {', '.join(OUTPUT_WEIGHTS)}, got {self.output_weight!r}")
        if self.output_weight != "none":
            ow = self.output_weight
            if not uses_rank:
                raise QeraError(f"method {self.method!r} has no low-rank term: output_weight does not apply")
            if self.rank_normalize == "fisher":
                raise QeraError(f"output_weight={ow!r} already puts every layer's error in the loss's units: "
                                "rank_normalize='fisher' would count the loss gradients twice (use auto or none)")
            if ow == "block" and self.pipeline == "oneshot":
                raise QeraError("output_weight='block' is computed block by block from the cached block inputs: "
                                "use pipeline='sequential' or 'auto'")
        if self.allocates and not uses_rank:
            raise QeraError(f"method {self.method!r} has no low-rank term: a rank budget does not apply")
        if self.rank_normalize != "auto" and self.rank_normalize not in NORMALIZERS:
            raise QeraError(f"rank_normalize must be auto or one of {', '.join(NORMALIZERS.names())}, "
                            f"got {self.rank_normalize!r}")

    def _check_refine(self, uses_rank: bool) -> None:
        steps, lr = self.refine_steps, self.refine_lr
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise QeraError(f"refine_steps must be a non-negative integer, got {steps!r}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < 1:
            raise QeraError(f"refine_lr must be a number in (0, 1), got {lr!r}")
        self.refine_lr = float(lr)
        if self.refine_train == "auto":
            self.refine_train = self._auto_refine_train(uses_rank)
        if self.refine_loss not in REFINE_LOSSES:
            raise QeraError(f"refine_loss must be one of {', '.join(REFINE_LOSSES)}, got {self.refine_loss!r}")
        parts = [p.strip() for p in str(self.refine_train).split(",") if p.strip()]
        bad = [p for p in parts if p not in REFINE_PARTS]
        if not parts or bad:
            raise QeraError(f"refine_train must be a comma list of {', '.join(REFINE_PARTS)}, got {self.refine_train!r}")
        self.refine_train = ",".join(p for p in REFINE_PARTS if p in parts)
        if not steps:
            return
        if self.pipeline == "oneshot":
            raise QeraError("refine_steps needs the sequential pipeline (each block is refined over its cached "
                            "inputs): use pipeline='sequential' or 'auto'")
        if "lowrank" in parts and not uses_rank:
            raise QeraError(f"method {self.method!r} has no low-rank term to refine: use refine_train='scales' or 'rounding'")
        if self.act_format is not None:
            raise QeraError("refine_steps with act_format is not supported: the quantized activations have no gradient")
        from qera.core.formats.trainable import can_round, can_train_scales

        for spec in filter(None, (self.format, self.format_fallback)):
            fmt = parse_format(spec)
            if "scales" in parts and not can_train_scales(fmt):
                raise QeraError(f"format {fmt} has no float group parameters to train (refine_train='scales'): "
                                "use refine_train='lowrank' or 'rounding', or an int/nf format")
            if "rounding" in parts and not can_round(fmt):
                raise QeraError(f"format {fmt} has no evenly spaced levels stored as plain codes, so rounding "
                                "offsets cannot move them (refine_train='rounding'): use an int or mxint format")

    def _auto_refine_train(self, uses_rank: bool) -> str:
        """``refine_train="auto"``: ``A, B`` and the rounding offsets where every format of the run has
        evenly spaced levels (measured best on SmolLM2 at mxint3, docs/results/refinement.md), else
        ``A, B`` alone; without a low-rank term, the rounding, else the scales."""
        from qera.core.formats.trainable import can_round, can_train_scales

        formats = [parse_format(f) for f in (self.format, self.format_fallback) if f]
        parts = ["lowrank"] if uses_rank else []
        if all(can_round(f) for f in formats):
            parts.append("rounding")
        elif not uses_rank and all(can_train_scales(f) for f in formats):
            parts.append("scales")
        return ",".join(parts) or "lowrank"

    @property
    def refines(self) -> bool:
        """Each block is refined after its solve (``refine_steps > 0``)."""
        return self.refine_steps > 0

    @property
    def allocates(self) -> bool:
        """Ranks are chosen per layer under a budget (``rank_budget`` or ``extra_bits``)."""
        return self.rank_budget is not None or self.extra_bits is not None

    def fixed_rank(self, name: str) -> int | None:
        """The rank a ``rank_overrides`` pattern sets for ``name``, or None."""
        for pattern, r in self.rank_overrides.items():
            if re.search(pattern, name):
                return r
        return None

    def solver_options(self) -> dict[str, Any]:
        opts = dict(self.method_options)
        method = METHODS.get(self.method)
        if method.uses_rank:
            opts.setdefault("seed", self.seed)
        if "rounding" in method.option_names:  # a method that re-rounds (qera-iter) rounds like the run
            opts.setdefault("rounding", self.rounding)
            opts.setdefault("gptq_damp", self.gptq_damp)
        return opts

    def rank_for(self, name: str) -> int:
        fixed = self.fixed_rank(name)
        return self.rank if fixed is None else fixed

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QuantConfig":
        """Read a config written by this or an earlier qera (version 1 had no pipeline fields)."""
        if not isinstance(d, Mapping):
            raise QeraError(f"a quantization config must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        if d.get("version", 1) == 1:
            d["version"] = CONFIG_VERSION
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise QeraError(f"unknown quantization config key(s): {sorted(unknown)}")
        try:
            return cls(**d)
        except TypeError as exc:
            raise QeraError(f"bad quantization config: {exc}") from None
