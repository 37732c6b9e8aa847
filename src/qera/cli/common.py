"""What every command shares: option groups, loading the model within a memory budget, calibration
batches and statistics, the quantization config from the options, perplexity, printing results."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Sequence

from qera.core.config import OUTPUT_WEIGHTS
from qera.core.formats import FORMATS
from qera.core.methods import METHODS
from qera.core.rounding import ROUNDINGS
from qera.util.errors import QeraError

log = logging.getLogger("qera.cli")


# -- option groups -------------------------------------------------------------------------------
def add_common(p: argparse.ArgumentParser) -> None:
    """Options every command has: ``--json``, ``--no-progress``, ``-v``."""
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="log INFO messages")


def key_values(items: Sequence[str] | None, what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise QeraError(f"{what} must look like KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="HF id, local directory, .gguf file or alias (smollm2-135m)")
    p.add_argument("--cache-dir", help="cache for converted GGUF models (default ~/.cache/qera or $QERA_CACHE)")


def add_calibration(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration")
    g.add_argument("--calib-text", help="plain-text file for calibration (default: built-in text)")
    g.add_argument("--dataset", choices=["builtin", "wikitext2"], default=None,
                   help="named data set (wikitext2 needs the hub); --calib-text/--eval-text win")
    g.add_argument("--calib-samples", type=int, default=128, help="number of windows (default 128)")
    g.add_argument("--calib-seq-len", type=int, default=512, help="tokens per window (default 512)")
    g.add_argument("--calib-batch-size", type=int, default=8)
    g.add_argument("--calib-bos", choices=["auto", "on", "off"], default="auto",
                   help="start each window with BOS: auto (default) = when the tokenizer adds BOS, as the "
                        "evaluation windows and prompts do")
    g.add_argument("--seed", type=int, default=0, help="seed for window sampling and the solver")
    g.add_argument("--stats-precision", choices=["mixed", "float64"], default="mixed",
                   help="Σxᵀx chunk sums in float32 (tensor cores for bf16 on a GPU) or float64")


def add_quant(p: argparse.ArgumentParser, multi: bool = False) -> None:
    g = p.add_argument_group("quantization")
    g.add_argument("--format", default="mxint4", help=f"weight format, e.g. mxint4, mxint3:block=16, int4:group=128:asym, nf4 (families: {', '.join(FORMATS.names())})")
    g.add_argument("--format-fallback", default=None, metavar="FORMAT",
                   help="format of the layers --format cannot store (GGUF k-quants need widths that are multiples of 256); "
                        "'auto': llama.cpp's choice (q3_k -> q4_0, q4_k -> q5_0, ...)")
    if multi:
        g.add_argument("--methods", default="w-only,qera-exact", help=f"comma list of: {', '.join(METHODS.names())}")
        g.add_argument("--settings", help="comma list of FORMAT@RANK (overrides --format/--rank), e.g. mxint4@32,mxint3@64")
    else:
        g.add_argument("--method", default="qera-exact", choices=METHODS.names())
    g.add_argument("--rank", type=int, default=32)
    g.add_argument("--rounding", choices=ROUNDINGS.names(), default="rtn",
                   help="how W̃ is rounded before the reconstruction: rtn (nearest) or gptq (error feedback through R)")
    g.add_argument("--gptq-damp", type=float, default=0.01, help="GPTQ damping, fraction of mean diag(R) (default 0.01)")
    g.add_argument("--act-format", default=None,
                   help="also quantize the quantized GEMM's input, e.g. mxint8 (LQER's W4A8); low-rank branch stays high precision")
    g.add_argument("--method-opt", action="append", metavar="KEY=VALUE", help="method option, e.g. iters=5 (repeatable)")
    g.add_argument("--rank-override", action="append", metavar="REGEX=RANK", help="per-layer rank (repeatable)")
    budget = g.add_mutually_exclusive_group()
    budget.add_argument("--rank-budget", type=float, metavar="R",
                        help="allocate ranks across layers within the A/B parameters of rank R everywhere (replaces --rank)")
    budget.add_argument("--extra-bits", type=float, metavar="BITS",
                        help="allocate ranks across layers within BITS bits per weight for A and B (replaces --rank)")
    g.add_argument("--output-weight", choices=OUTPUT_WEIGHTS, default="none",
                   help="weigh a layer's output channels by the loss's gradients there: fisher (mean squared gradient "
                        "per channel) or kfac (their full covariance); one backward pass over the calibration data, "
                        "the whole model in memory; the low-rank term then minimizes the layer's loss cost, not its plain output "
                        "error; block: the block-level stand-in (each block output's sensitivity to the layer's channels, "
                        "sequential pipeline, works on streamed models). Default none")
    g.add_argument("--rank-normalize", choices=["auto", "fisher", "output", "error", "none"], default="auto",
                   help="what makes layer errors comparable for the allocation: the loss's mean squared gradient at "
                        "the layer output (fisher: one backward pass over the calibration data, one-shot only), the "
                        "output energy trace(W R Wᵀ), the error before the low-rank term, or nothing; "
                        "auto (default): fisher in the one-shot pipeline, else error")
    g.add_argument("--include", action="append", metavar="REGEX", help="target module regex (repeatable)")
    g.add_argument("--exclude", action="append", metavar="REGEX", help="excluded module regex (repeatable)")
    g.add_argument("--stats", help="statistics file from 'qera calibrate' (skips calibration)")


def add_memory(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("memory")
    g.add_argument("--max-memory", default=None,
                   help="memory budget, e.g. 8GiB (default: $QERA_MAX_MEMORY or 60%% of free RAM); statistics beyond it "
                        "are recorded block by block to disk and read one layer at a time")
    g.add_argument("--offload-dir", default=None, help="folder for statistics and activations beyond the budget")


def add_eval(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-text", help="plain-text file for perplexity (default: built-in text)")
    g.add_argument("--seq-len", type=int, default=2048, help="window length (capped at the model context)")
    g.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")


# -- shared steps --------------------------------------------------------------------------------
def load_for(args, extra: dict[str, int] | None = None):
    """Load ``args.model``; with an explicit budget (``--max-memory`` or ``$QERA_MAX_MEMORY``), first
    refuse, with the estimate, a run whose smallest footprint (the model + ``extra``) cannot fit."""
    from qera.util.memory import check_fits, explicit_budget
    from qera.io.models import load_model, weights_bytes

    budget = explicit_budget(getattr(args, "max_memory", None))
    if budget is not None:
        size = weights_bytes(args.model, args.cache_dir)
        if size is not None:
            check_fits({"model weights": size, **(extra or {})}, budget, f"qera {args.command} on {args.model}")
    return load_model(args.model, cache=args.cache_dir)


def logit_bytes(args) -> int:
    """A chunk of float32 logits and its log-softmax: at most LOGIT_ELEMS entries, at most one window's."""
    from qera.evaluate.perplexity import LOGIT_ELEMS
    from qera.io.models import model_config

    cfg = model_config(args.model, args.cache_dir)
    vocab = int(cfg.get("vocab_size") or LOGIT_ELEMS) if cfg else LOGIT_ELEMS
    return 2 * 4 * min(LOGIT_ELEMS, vocab * getattr(args, "seq_len", 2048))


def text_source(explicit: str | None, dataset: str | None) -> str | None:
    return explicit if explicit else dataset


def check_positive(value: int | None, flag: str, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise QeraError(f"{flag} must be an integer >= {minimum}, got {value}")


def check_numbers(args) -> None:
    """Range checks shared by every subcommand that has these flags (before any slow work)."""
    for attr, flag, lo in (("calib_samples", "--calib-samples", 1), ("calib_seq_len", "--calib-seq-len", 2),
                           ("calib_batch_size", "--calib-batch-size", 1), ("max_windows", "--max-windows", 1),
                           ("seq_len", "--seq-len", 2), ("rank", "--rank", 0), ("eval_samples", "--eval-samples", 1),
                           ("eval_seq_len", "--eval-seq-len", 2), ("loftq_iters", "--loftq-iters", 1),
                           ("batch_size", "--batch-size", 1), ("max_train_samples", "--max-train-samples", 1),
                           ("max_eval_samples", "--max-eval-samples", 1), ("eval_steps", "--eval-steps", 1),
                           ("logging_steps", "--logging-steps", 1), ("max_length", "--max-length", 2)):
        check_positive(getattr(args, attr, None), flag, lo)
    for attr, flag in (("include", "--include"), ("exclude", "--exclude")):
        from qera.core.selection import compile_patterns

        compile_patterns(getattr(args, attr, None) or [], flag)
    for attr, flag in (("max_memory", "--max-memory"), ("gpu_memory", "--gpu-memory")):
        from qera.util.memory import parse_size

        parse_size(getattr(args, attr, None), flag)
    check_folder(getattr(args, "offload_dir", None), "--offload-dir")


def check_folder(path: str | None, flag: str) -> None:
    """A folder option (made on first use): refuse a path that is, or lies under, an existing non-folder
    up front, not when (if ever) something is first written there."""
    if not path:
        return
    p = Path(path).expanduser()
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                raise QeraError(f"{flag}: {q} is a file, not a folder")
            return


def calibration_batches_for(args, tokenizer):
    from qera.io.data import calibration_batches, load_text

    text = load_text(text_source(args.calib_text, args.dataset), "calibration")
    bos = {"auto": None, "on": True, "off": False}[getattr(args, "calib_bos", "auto")]
    return calibration_batches(tokenizer, text, args.calib_samples, args.calib_seq_len, args.seed,
                               args.calib_batch_size, bos=bos)


def parse_settings(spec: str | None, fmt: str, rank: int) -> list[tuple[str, int]]:
    """``--settings mxint4@32,mxint3@64`` → ``[("mxint4", 32), ("mxint3", 64)]``."""
    if not spec:
        return [(fmt, rank)]
    out = []
    for item in spec.split(","):
        item = item.strip()
        f, sep, r = item.rpartition("@")
        if not sep or not f or not r.strip().isdigit():
            raise QeraError(f"--settings entries look like FORMAT@RANK (e.g. mxint4@32), got {item!r}")
        out.append((f, int(r)))
    return out


def quant_config(args, fmt: str, method: str, rank: int):
    from qera.quantize.pipeline import QuantConfig

    kw: dict[str, Any] = dict(format=fmt, format_fallback=getattr(args, "format_fallback", None), method=method, rank=rank, seed=args.seed,
                              pipeline=default_pipeline(args), propagate=getattr(args, "propagate", "fp"),
                              stats_precision=getattr(args, "stats_precision", "mixed"),
                              rounding=getattr(args, "rounding", "rtn"), gptq_damp=getattr(args, "gptq_damp", 0.01),
                              act_format=getattr(args, "act_format", None),
                              report_spectrum=report_spectrum(args),
                              refine_steps=getattr(args, "refine", 0), refine_lr=getattr(args, "refine_lr", 1e-3),
                              refine_train=getattr(args, "refine_train", "auto"),
                              refine_loss=getattr(args, "refine_loss", "channel"),
                              method_options=key_values(args.method_opt, "--method-opt"),
                              rank_overrides={k: int(v) for k, v in key_values(args.rank_override, "--rank-override").items()})
    if args.include:
        kw["include"] = args.include
    if args.exclude:
        kw["exclude"] = args.exclude
    if METHODS.get(method).uses_rank:
        kw.update(rank_budget=getattr(args, "rank_budget", None), extra_bits=getattr(args, "extra_bits", None),
                  rank_normalize=getattr(args, "rank_normalize", "auto"),
                  output_weight=getattr(args, "output_weight", "none"))
    if not METHODS.get(method).uses_rank:
        kw["method_options"] = {}
    else:  # compare passes one --method-opt list to every method: each drops the other methods' options
        known = METHODS.get(method).option_names
        others = set().union(*(METHODS.get(m).option_names for m in METHODS.names()))
        kw["method_options"] = {k: v for k, v in kw["method_options"].items() if k in known or k not in others}
    try:
        return QuantConfig(**kw)
    except QeraError as exc:  # a format field's error starts with the field's name: say the option instead
        flags = {"format": "--settings" if getattr(args, "settings", None) else "--format", "act_format": "--act-format",
                 "format_fallback": "--format-fallback"}
        field, sep, rest = str(exc).partition(": ")
        if sep and field in flags:
            raise QeraError(f"{flags[field]}: {rest}") from None
        raise


def default_pipeline(args) -> str:
    """``--pipeline``, or by default the one-shot pipeline, or the sequential one under torchrun
    (several processes split the calibration data block by block)."""
    from qera.quantize.distributed import env_world_size

    chosen = getattr(args, "pipeline", None)
    return chosen or ("sequential" if env_world_size() > 1 else "oneshot")


def report_spectrum(args) -> int:
    """``--report-spectrum``; by default 32 eigenvalues per layer when a report is written, else none."""
    k = getattr(args, "report_spectrum", None)
    if k is None:
        return 32 if getattr(args, "report", None) else 0
    if k < 0:
        raise QeraError(f"--report-spectrum must be >= 0, got {k}")
    return k


def memory_budget(args) -> int:
    """``--max-memory``, else ``$QERA_MAX_MEMORY``, else 60% of the RAM available now."""
    from qera.util.memory import default_budget, parse_size

    return parse_size(getattr(args, "max_memory", None), "--max-memory") or default_budget()


def stats_budget(args, model, reserve: int = 0) -> int:
    """What the statistics may take: the memory budget less the model in memory and ``reserve``."""
    from qera.quantize.drivers.oneshot import resident_bytes

    return max(0, memory_budget(args) - resident_bytes(model) - reserve)


def statistics_for(args, model, tokenizer, kinds, targets, path=None, extra=None, reserve: int = 0):
    """``(statistics, scratch or None)``: from ``--stats`` (read lazily when over the budget), or
    collected — in memory within the budget, else block by block into ``path`` or a scratch folder."""
    from qera.calibrate.store import CalibrationStats
    from qera.quantize.collect import collect_statistics_within

    if args.stats:
        lazy = Path(args.stats).is_file() and Path(args.stats).stat().st_size > stats_budget(args, model, reserve)
        return CalibrationStats.load(args.stats, lazy=lazy), None
    if not kinds:
        return None, None
    return collect_statistics_within(
        model, calibration_batches_for(args, tokenizer), targets, kinds, stats_budget(args, model, reserve), path=path,
        workdir=getattr(args, "offload_dir", None), precision=getattr(args, "stats_precision", "mixed"),
        progress=not args.no_progress, extra=extra,
    )


def eval_perplexity(args, model, tokenizer):
    from qera.io.data import load_text
    from qera.evaluate.perplexity import perplexity

    text = load_text(text_source(args.eval_text, args.dataset), "evaluation")
    return perplexity(model, tokenizer, text, args.seq_len, args.max_windows, progress=not args.no_progress)


def output_dir(args) -> Path:
    """``--out`` as a path; refuse an existing one unless ``--overwrite`` (before any slow work)."""
    from qera.util.atomic import refuse_existing

    return refuse_existing(args.out, args.overwrite or getattr(args, "resume", False))


def emit(args, payload: dict, table: str) -> None:
    print(json.dumps(payload, indent=1) if args.json else table)


ENCODER_TYPES = ("bert", "roberta", "distilbert", "electra", "deberta", "deberta-v2", "mpnet", "xlm-roberta")


def is_encoder(source: str) -> bool:
    from qera.io.models import resolve_source

    where = resolve_source(source)
    cfg = Path(where) / "config.json" if isinstance(where, Path) and where.is_dir() else None
    return bool(cfg and cfg.is_file() and json.loads(cfg.read_text()).get("model_type") in ENCODER_TYPES)


def text_batches(args, tokenizer, source, split, n, L, seed):
    from qera.io.data import calibration_batches, load_text

    return calibration_batches(tokenizer, load_text(source, split), n, L, seed, batch_size=8)
