"""Command-line interface: ``qera quantize | eval | calibrate | compare | export | info``.

Every subcommand is a thin wrapper over the Python API. User errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from .errors import QeraError
from .formats import FORMATS
from .methods import METHODS
from .config import OUTPUT_WEIGHTS
from .rounding import ROUNDINGS

log = logging.getLogger("qera.cli")


# -- argument helpers ----------------------------------------------------------------------------
def _key_values(items: Sequence[str] | None, what: str) -> dict[str, Any]:
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


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="HF id, local directory, .gguf file or alias (smollm2-135m)")
    p.add_argument("--cache-dir", help="cache for converted GGUF models (default ~/.cache/qera or $QERA_CACHE)")


def _add_calibration(p: argparse.ArgumentParser) -> None:
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


def _add_quant(p: argparse.ArgumentParser, multi: bool = False) -> None:
    g = p.add_argument_group("quantization")
    g.add_argument("--format", default="mxint4", help=f"weight format, e.g. mxint4, mxint3:block=16, int4:group=128:asym, nf4 (families: {', '.join(FORMATS.names())})")
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
                        "error. Default none")
    g.add_argument("--rank-normalize", choices=["auto", "fisher", "output", "error", "none"], default="auto",
                   help="what makes layer errors comparable for the allocation: the loss's mean squared gradient at "
                        "the layer output (fisher: one backward pass over the calibration data, one-shot only), the "
                        "output energy trace(W R Wᵀ), the error before the low-rank term, or nothing; "
                        "auto (default): fisher in the one-shot pipeline, else error")
    g.add_argument("--include", action="append", metavar="REGEX", help="target module regex (repeatable)")
    g.add_argument("--exclude", action="append", metavar="REGEX", help="excluded module regex (repeatable)")
    g.add_argument("--stats", help="statistics file from 'qera calibrate' (skips calibration)")


def _add_memory(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("memory")
    g.add_argument("--max-memory", default=None,
                   help="memory budget, e.g. 8GiB (default: $QERA_MAX_MEMORY or 60%% of free RAM); statistics beyond it "
                        "are recorded block by block to disk and read one layer at a time")
    g.add_argument("--offload-dir", default=None, help="folder for statistics and activations beyond the budget")


def _add_eval(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-text", help="plain-text file for perplexity (default: built-in text)")
    g.add_argument("--seq-len", type=int, default=2048, help="window length (capped at the model context)")
    g.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")


# -- shared steps --------------------------------------------------------------------------------
def _load(args, extra: dict[str, int] | None = None):
    """Load ``args.model``; with an explicit budget (``--max-memory`` or ``$QERA_MAX_MEMORY``), first
    refuse, with the estimate, a run whose smallest footprint (the model + ``extra``) cannot fit."""
    from .memory import check_fits, explicit_budget
    from .models import load_model, weights_bytes

    budget = explicit_budget(getattr(args, "max_memory", None))
    if budget is not None:
        size = weights_bytes(args.model, args.cache_dir)
        if size is not None:
            check_fits({"model weights": size, **(extra or {})}, budget, f"qera {args.command} on {args.model}")
    return load_model(args.model, cache=args.cache_dir)


def _logit_bytes(args) -> int:
    """A chunk of float32 logits and its log-softmax: at most LOGIT_ELEMS entries, at most one window's."""
    from .evaluation import LOGIT_ELEMS
    from .models import model_config

    cfg = model_config(args.model, args.cache_dir)
    vocab = int(cfg.get("vocab_size") or LOGIT_ELEMS) if cfg else LOGIT_ELEMS
    return 2 * 4 * min(LOGIT_ELEMS, vocab * getattr(args, "seq_len", 2048))


def _source(explicit: str | None, dataset: str | None) -> str | None:
    return explicit if explicit else dataset


def _positive(value: int | None, flag: str, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise QeraError(f"{flag} must be an integer >= {minimum}, got {value}")


def _check_numbers(args) -> None:
    """Range checks shared by every subcommand that has these flags (before any slow work)."""
    for attr, flag, lo in (("calib_samples", "--calib-samples", 1), ("calib_seq_len", "--calib-seq-len", 2),
                           ("calib_batch_size", "--calib-batch-size", 1), ("max_windows", "--max-windows", 1),
                           ("seq_len", "--seq-len", 2), ("rank", "--rank", 0), ("eval_samples", "--eval-samples", 1),
                           ("eval_seq_len", "--eval-seq-len", 2), ("loftq_iters", "--loftq-iters", 1),
                           ("batch_size", "--batch-size", 1), ("max_train_samples", "--max-train-samples", 1),
                           ("max_eval_samples", "--max-eval-samples", 1), ("eval_steps", "--eval-steps", 1),
                           ("logging_steps", "--logging-steps", 1), ("max_length", "--max-length", 2)):
        _positive(getattr(args, attr, None), flag, lo)
    for attr, flag in (("include", "--include"), ("exclude", "--exclude")):
        from .targets import compile_patterns

        compile_patterns(getattr(args, attr, None) or [], flag)
    for attr, flag in (("max_memory", "--max-memory"), ("gpu_memory", "--gpu-memory")):
        from .memory import parse_size

        parse_size(getattr(args, attr, None), flag)


def _calibration_batches(args, tokenizer):
    from .data import calibration_batches, load_text

    text = load_text(_source(args.calib_text, args.dataset), "calibration")
    bos = {"auto": None, "on": True, "off": False}[getattr(args, "calib_bos", "auto")]
    return calibration_batches(tokenizer, text, args.calib_samples, args.calib_seq_len, args.seed,
                               args.calib_batch_size, bos=bos)


def _settings(spec: str | None, fmt: str, rank: int) -> list[tuple[str, int]]:
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


def _config(args, fmt: str, method: str, rank: int):
    from .pipeline import QuantConfig

    kw: dict[str, Any] = dict(format=fmt, method=method, rank=rank, seed=args.seed,
                              pipeline=getattr(args, "pipeline", "oneshot"), propagate=getattr(args, "propagate", "fp"),
                              stats_precision=getattr(args, "stats_precision", "mixed"),
                              rounding=getattr(args, "rounding", "rtn"), gptq_damp=getattr(args, "gptq_damp", 0.01),
                              act_format=getattr(args, "act_format", None),
                              report_spectrum=_report_spectrum(args),
                              method_options=_key_values(args.method_opt, "--method-opt"),
                              rank_overrides={k: int(v) for k, v in _key_values(args.rank_override, "--rank-override").items()})
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
    return QuantConfig(**kw)


def _report_spectrum(args) -> int:
    """``--report-spectrum``; by default 32 eigenvalues per layer when a report is written, else none."""
    k = getattr(args, "report_spectrum", None)
    if k is None:
        return 32 if getattr(args, "report", None) else 0
    if k < 0:
        raise QeraError(f"--report-spectrum must be >= 0, got {k}")
    return k


def _budget(args) -> int:
    """``--max-memory``, else ``$QERA_MAX_MEMORY``, else 60% of the RAM available now."""
    from .memory import default_budget, parse_size

    return parse_size(getattr(args, "max_memory", None), "--max-memory") or default_budget()


def _stats_budget(args, model, reserve: int = 0) -> int:
    """What the statistics may take: the memory budget less the model in memory and ``reserve``."""
    from .drivers.oneshot import resident_bytes

    return max(0, _budget(args) - resident_bytes(model) - reserve)


def _stats(args, model, tokenizer, kinds, targets, path=None, extra=None, reserve: int = 0):
    """``(statistics, scratch or None)``: from ``--stats`` (read lazily when over the budget), or
    collected — in memory within the budget, else block by block into ``path`` or a scratch folder."""
    from .statistics import CalibrationStats
    from .stats_store import collect_statistics_within

    if args.stats:
        lazy = Path(args.stats).is_file() and Path(args.stats).stat().st_size > _stats_budget(args, model, reserve)
        return CalibrationStats.load(args.stats, lazy=lazy), None
    if not kinds:
        return None, None
    return collect_statistics_within(
        model, _calibration_batches(args, tokenizer), targets, kinds, _stats_budget(args, model, reserve), path=path,
        workdir=getattr(args, "offload_dir", None), precision=getattr(args, "stats_precision", "mixed"),
        progress=not args.no_progress, extra=extra,
    )


def _eval(args, model, tokenizer):
    from .data import load_text
    from .evaluation import perplexity

    text = load_text(_source(args.eval_text, args.dataset), "evaluation")
    return perplexity(model, tokenizer, text, args.seq_len, args.max_windows, progress=not args.no_progress)


def _output_dir(args) -> Path:
    """``--out`` as a path; refuse an existing one unless ``--overwrite`` (before any slow work)."""
    from .atomic import refuse_existing

    return refuse_existing(args.out, args.overwrite or getattr(args, "resume", False))


def _emit(args, payload: dict, table: str) -> None:
    print(json.dumps(payload, indent=1) if args.json else table)


# -- subcommands ---------------------------------------------------------------------------------
def cmd_quantize(args) -> int:
    from .models import resolve_source
    from .pipeline import quantize_and_save
    from .streaming import is_lazy_source

    out = _output_dir(args)
    config = _config(args, args.format, args.method, args.rank)
    where = resolve_source(args.model)
    if isinstance(where, Path) and where.is_file() and where.suffix == ".gguf":
        from .models import convert_gguf

        where = convert_gguf(where, args.cache_dir)
    stream = config.pipeline != "oneshot" and isinstance(where, Path) and is_lazy_source(where)
    if stream:
        from transformers import AutoTokenizer

        model, tok = where, AutoTokenizer.from_pretrained(str(where))
    else:
        model, tok = _load(args)
    stats = None
    if args.stats:
        from .statistics import CalibrationStats

        stats = CalibrationStats.load(args.stats, lazy=True)  # read one layer at a time
    calibration = None
    from .pipeline import stats_kinds_for

    needs_data = bool(stats_kinds_for(config, args.report_output_error)) or config.pipeline != "oneshot"
    # the loss gradients need batches
    fisher = (config.allocates and config.rank_normalize in ("fisher", "auto")) or config.output_weight != "none"
    if needs_data and (stats is None or config.pipeline != "oneshot" or fisher):
        calibration = _calibration_batches(args, tok)
    report = quantize_and_save(
        model, config, out, tokenizer=tok, calibration=calibration, stats=stats, overwrite=args.overwrite,
        resume=args.resume, progress=not args.no_progress, dtype=args.dtype,
        report_output_error=True if args.report_output_error else (False if args.no_output_error else None),
        device=args.device, max_memory=args.max_memory, gpu_memory=args.gpu_memory, offload_dir=args.offload_dir,
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun rank 0 writes and reports
    if args.report:
        from .report_render import write_report

        write_report(report, args.report)
    s = report.summary()
    _emit(args, {"out": str(out), **s},
          f"saved {out}: {s['layers']} layers ({s['pipeline']}), {s['bits_weight']:.3f} bits/weight "
          f"({s['bits_total']:.3f} with the low-rank term), solve {s['solve_seconds']:.1f}s")
    return 0


def cmd_eval(args) -> int:
    model, tok = _load(args, {"logits of one chunk": _logit_bytes(args)})
    if args.device:
        model.to(args.device)
    if args.fused_int4:
        _use_fused_int4(model)
    harness = _harness(args, model, tok) if args.tasks else None
    r = _eval(args, model, tok)
    line = f"perplexity {r.perplexity:.4f} over {r.windows} windows x {r.seq_len} tokens ({r.tokens_per_second:.0f} tok/s)"
    payload = {"model": args.model, **r.to_dict()}
    if harness is not None:
        payload["lm_eval"] = harness
        line = harness["table"] + "\n" + harness["check_line"] + f"qera {line}"
    _emit(args, payload, line)
    return 0


def _use_fused_int4(model) -> None:
    """bf16 model, 4-bit layers through the fused int4 kernel (``qera.prepare_inference``); says how many."""
    import torch

    from .kernels import prepare_inference

    used = prepare_inference(model.to(torch.bfloat16), torch.bfloat16)
    fused = [n for n, v in used.items() if v == "int4 kernel"]
    if not used:
        raise QeraError("--fused-int4: the model has no quantized layers (pass a qera checkpoint)")
    if not fused:
        raise QeraError(f"--fused-int4: no layer can use the kernel: {next(iter(used.values()))}")
    log.warning("fused int4 kernel on %d of %d quantized layers (bf16)%s", len(fused), len(used),
                "" if len(fused) == len(used) else f"; e.g. {next(n for n in used if n not in fused)}: "
                f"{next(v for v in used.values() if v != 'int4 kernel')}")


def _harness(args, model, tok) -> dict:
    """lm-eval ``--tasks`` on the loaded model; for ``qera_text``, the same documents scored by qera's
    own rolling log-likelihood beside it (the two must agree)."""
    import math

    from .data import load_text
    from .evaluation import context_length, rolling_loglikelihood
    from .harness import TEXT_TASK, run_harness, split_documents

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    limit = args.limit
    if limit is not None and limit <= 0:
        raise QeraError(f"--limit must be > 0 (a count, or a share below 1), got {limit}")
    if limit is not None and limit >= 1:
        limit = int(limit)  # a count; below 1 a share, as lm-eval reads it
    docs = None
    if TEXT_TASK in tasks:
        docs = split_documents(load_text(_source(args.eval_text, args.dataset), "evaluation"), args.doc_chars)
        if limit is not None:
            docs = docs[: limit if isinstance(limit, int) else math.ceil(len(docs) * limit)]
    max_length = min(args.seq_len, context_length(model) or args.seq_len)
    res = run_harness(model, tok, tasks, text_docs=docs, include_path=args.include_path, limit=limit,
                      batch_size=args.batch_size, max_length=max_length, num_fewshot=args.num_fewshot, seed=args.seed)
    out = {"tasks": tasks, "results": res.results, "settings": res.settings, "table": res.table, "check_line": ""}
    if docs is not None:
        s = res.settings
        own = rolling_loglikelihood(model, tok, docs, s["max_length"], s["add_bos"], s["prefix"],
                                    progress=not args.no_progress)
        theirs = res.metric(TEXT_TASK, "word_perplexity")
        rel = abs(own.word_perplexity - theirs) / theirs
        out["qera_text"] = {"documents": len(docs), **own.to_dict(), "lm_eval_word_perplexity": theirs,
                            "relative_difference": rel}
        out["check_line"] = (f"{TEXT_TASK}: {len(docs)} documents, {own.tokens} tokens; word perplexity lm-eval "
                             f"{theirs:.6g}, qera {own.word_perplexity:.6g} (rel. diff {rel:.1e}); "
                             f"token perplexity {own.token_perplexity:.4f}\n")
    return out


def cmd_calibrate(args) -> int:
    from .calibration import find_targets

    out = _output_dir(args)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    model, tok = _load(args)
    targets = find_targets(model, args.include, args.exclude)
    args.stats = None
    meta = {"model": args.model, "samples": str(args.calib_samples), "seq_len": str(args.calib_seq_len),
            "seed": str(args.seed), "bos": args.calib_bos}
    stats, _ = _stats(args, model, tok, frozenset(kinds), targets, path=out, extra=meta)
    if not stats.lazy:  # within the budget: in memory, saved now (a lazy result was written block by block)
        stats.extra.update(meta)
        stats.save(out)
    n_inputs = len(stats.stats)
    _emit(args, {"out": str(out), "inputs": n_inputs, "layers": len(stats.groups), "tokens": stats.tokens},
          f"saved {out}: {n_inputs} distinct inputs for {len(stats.groups)} layers, {stats.tokens} tokens")
    return 0


def cmd_info(args) -> int:
    from .checkpoint import read_qera_config

    meta = read_qera_config(args.path)
    size = sum(p.stat().st_size for p in Path(args.path).iterdir() if p.is_file())
    qc = meta.get("quant_config") or {}
    b = meta["bits"]
    ranks = sorted({m["rank"] for m in meta["layers"].values()})
    allocated = qc.get("rank_budget") is not None or qc.get("extra_bits") is not None
    payload = {"path": str(args.path), "qera_version": meta.get("qera_version"), "layers": len(meta["layers"]),
               "format": qc.get("format"), "method": qc.get("method"),
               "rank": None if allocated else qc.get("rank"),  # allocated: the budget below says it
               "ranks": ranks, "rounding": qc.get("rounding", "rtn"),
               "output_weight": qc.get("output_weight", "none"),
               "pipeline": qc.get("pipeline"), "propagate": qc.get("propagate"),
               "bits_weight": b["bits_weight"], "bits_total": b["bits_total"], "bytes_on_disk": size}
    if allocated:
        payload["rank_budget"], payload["extra_bits"] = qc.get("rank_budget"), qc.get("extra_bits")
    text = "\n".join(f"{k:>13}: {v}" for k, v in payload.items() if v is not None)
    if allocated:
        payload["layer_ranks"] = {n: m["rank"] for n, m in meta["layers"].items()}
        text += "\n" + _rank_table(payload["layer_ranks"])
    _emit(args, payload, text)
    return 0


def _rank_table(layer_ranks: dict[str, int]) -> str:
    """Allocated ranks as a block × layer-type table (rows: blocks; columns: the layers' last name part)."""
    import re

    rows: dict[str, dict[str, int]] = {}
    kinds: list[str] = []
    for name, r in layer_ranks.items():
        m = re.search(r"\.(\d+)\.(.+)$", name)
        block, kind = (m.group(1), m.group(2).split(".")[-1]) if m else ("-", name)
        rows.setdefault(block, {})[kind] = r
        if kind not in kinds:
            kinds.append(kind)
    lines = ["allocated ranks (block x layer):", "block " + " ".join(f"{k[:9]:>9}" for k in kinds)]
    lines += [f"{b:>5} " + " ".join(f"{row.get(k, ''):>9}" for k in kinds) for b, row in rows.items()]
    return "\n".join(lines)


def cmd_export(args) -> int:
    """Write a checkpoint in another ecosystem's format (compressed-tensors + a PEFT LoRA adapter)."""
    from .export import export

    out = export(args.path, args.out, to=args.to, overwrite=args.overwrite, scale_dtype=args.scale_dtype)
    size = {name: sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())
            for name, d in (("source_bytes", args.path), ("export_bytes", out))}
    _emit(args, {"out": str(out), "to": args.to, **size},
          f"exported {args.path} ({size['source_bytes'] / 2**20:.1f} MiB) to {out} as {args.to} "
          f"({size['export_bytes'] / 2**20:.1f} MiB{', adapter in ' + str(out / 'adapter') if (out / 'adapter').is_dir() else ''})")
    return 0


def cmd_compare(args) -> int:
    """Calibrate once, then quantize each (setting, method) into the same model and restore it after."""
    from .calibration import find_targets
    from .pipeline import stats_kinds_for

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise QeraError("--methods is empty")
    for m in methods:
        METHODS.get(m)
    settings = _settings(args.settings, args.format, args.rank)
    configs = [(fmt, m, _config(args, fmt, m, r if METHODS.get(m).uses_rank else 0)) for fmt, r in settings for m in methods]
    model, tok = _load(args, {"logits of one chunk": _logit_bytes(args)})
    kinds = frozenset().union(*(stats_kinds_for(c, True) for _, _, c in configs))
    targets = find_targets(model, configs[0][2].include, configs[0][2].exclude)
    from .targets import linear_weight

    # room for one quantized copy of the layers (their dense W̃ + BA cache) and the evaluation's logits
    copy_bytes = sum(linear_weight(m).numel() * linear_weight(m).element_size() for m in targets.values())
    stats, temp = _stats(args, model, tok, kinds, targets, reserve=copy_bytes + _logit_bytes(args))
    try:
        return _compare(args, model, tok, configs, targets, stats)
    finally:
        if temp is not None:
            temp.remove()


def _compare(args, model, tok, configs, targets, stats) -> int:
    rows = []
    base = _eval(args, model, tok)
    rows.append({"method": "fp", "format": "-", "rank": 0, "perplexity": base.perplexity,
                 "bits_weight": 16.0, "bits_total": 16.0, "mean_output_error_ratio": None, "solve_seconds": 0.0})
    from .memory import trim_heap
    from .pipeline import quantize_model
    from .targets import replace_module

    for fmt, method, config in configs:
        originals = dict(targets)
        try:
            report = quantize_model(model, config, stats=stats,
                                    report_output_error="xtx" in stats.kinds if stats else False,
                                    progress=not args.no_progress)
            r = _eval(args, model, tok)
        finally:  # the fp layers go back: one model, at most one quantized copy of each layer
            for name, mod in originals.items():
                replace_module(model, name, mod)
            trim_heap()
        s = report.summary()
        rows.append({"method": method, "format": config.format, "rank": config.rank, "perplexity": r.perplexity,
                     "bits_weight": s["bits_weight"], "bits_total": s["bits_total"],
                     "mean_output_error_ratio": s["mean_output_error_ratio"], "solve_seconds": s["solve_seconds"]})
    lines = [f"{'method':<13} {'format':<16} {'rank':>4} {'bits W':>7} {'bits +AB':>8} {'out.err':>8} {'solve s':>7} {'perplexity':>11}"]
    for r in rows:
        oe = f"{r['mean_output_error_ratio']:.4f}" if r["mean_output_error_ratio"] is not None else "-"
        lines.append(f"{r['method']:<13} {r['format']:<16} {r['rank']:>4} {r['bits_weight']:>7.3f} {r['bits_total']:>8.3f} "
                     f"{oe:>8} {r['solve_seconds']:>7.1f} {r['perplexity']:>11.4f}")
    lines.append(f"(perplexity on {base.windows} windows x {base.seq_len} tokens; out.err = mean over layers of "
                 f"output error after / before reconstruction; fp bits shown as 16)")
    if args.out_json:
        from .atomic import write_json

        write_json(args.out_json, {"rows": rows, "windows": base.windows, "seq_len": base.seq_len})
    _emit(args, {"rows": rows, "windows": base.windows, "seq_len": base.seq_len}, "\n".join(lines))
    return 0


ENCODER_TYPES = ("bert", "roberta", "distilbert", "electra", "deberta", "deberta-v2", "mpnet", "xlm-roberta")


def _is_encoder(source: str) -> bool:
    from .models import resolve_source

    where = resolve_source(source)
    cfg = Path(where) / "config.json" if isinstance(where, Path) and where.is_dir() else None
    return bool(cfg and cfg.is_file() and json.loads(cfg.read_text()).get("model_type") in ENCODER_TYPES)


def _text_batches(args, tokenizer, source, split, n, L, seed):
    from .data import calibration_batches, load_text

    return calibration_batches(tokenizer, load_text(source, split), n, L, seed, batch_size=8)


def cmd_finetune(args) -> int:
    """Quantize + initialize adapters (or plain 16-bit LoRA), fine-tune, log curves."""
    from .calibration import collect_statistics, find_targets
    from .data import load_text, tokenize
    from .finetune import TrainConfig, finetune_causal_lm, finetune_classifier, write_result
    from .memory import trim_heap
    from .glue import TASKS, read_task
    from .models import load_encoder
    from .peft import QPEFTConfig, prepare_qpeft_model, save_qpeft
    from .pipeline import stats_kinds_for
    from .plots import plot_curves

    out = _output_dir(args)
    train_cfg = TrainConfig(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, max_length=args.max_length,
                            eval_steps=args.eval_steps, logging_steps=args.logging_steps, seed=args.seed)
    clm = args.task == "clm"
    if clm:
        model, tok = _load(args)
        task_type, save_modules = "CAUSAL_LM", None
        train_text, eval_text = load_text(args.train, "calibration"), load_text(args.eval, "evaluation")
    else:
        spec = TASKS.get(args.task)
        train = read_task(args.task, args.train, args.max_train_samples, args.seed)
        evaluation = read_task(args.task, args.eval, args.max_eval_samples, args.seed)
        model, tok = load_encoder(args.model, num_labels=spec.num_labels, seed=args.seed)
        task_type, save_modules = "SEQ_CLS", ["classifier", "pooler"]
    if args.init == "lora":  # 16-bit LoRA reference: no quantization
        from peft import LoraConfig, get_peft_model
        import torch

        lc = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=sorted(find_targets(model)),
                        modules_to_save=save_modules, task_type=task_type)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            pm = get_peft_model(model, lc)
    else:
        qcfg = QPEFTConfig(format=args.format, init=args.init, rank=args.rank, alpha=args.alpha,
                           init_options={"iters": args.loftq_iters} if args.init == "loftq" else {},
                           modules_to_save=save_modules, task_type=task_type, seed=args.seed, cache_base=True)
        stats = None
        kinds = stats_kinds_for(qcfg.quant_config())
        if kinds:
            calib = _text_batches(args, tok, _source(args.calib_text, None), "calibration",
                                  args.calib_samples, args.calib_seq_len, args.seed)
            stats = collect_statistics(model, calib, list(find_targets(model)), kinds, progress=not args.no_progress)
        pm, _ = prepare_qpeft_model(model, qcfg, stats=stats, progress=not args.no_progress)
        del stats  # 4.7 GiB of Σxᵀx on a 0.5B model: not needed for training
        trim_heap()
    if clm:
        tr = tokenize(tok, train_text)
        n_tr = min(args.max_train_samples or 10**9, tr.numel() // args.seq_len)
        ev = tokenize(tok, eval_text)
        n_ev = min(args.max_eval_samples or 10**9, ev.numel() // args.seq_len)
        if n_tr < 1 or n_ev < 1:
            raise QeraError(f"train/eval text too short for --seq-len {args.seq_len}")
        train_ids = tr[: n_tr * args.seq_len].view(n_tr, args.seq_len)
        eval_ids = ev[: n_ev * args.seq_len].view(n_ev, args.seq_len)
        result = finetune_causal_lm(pm, tok, train_ids, eval_ids, train_cfg, out, progress=not args.no_progress)
    else:
        result = finetune_classifier(pm, tok, args.task, train, evaluation, train_cfg, out, progress=not args.no_progress)
    result.update({"model": args.model, "init": args.init, "format": None if args.init == "lora" else args.format,
                   "rank": args.rank, "alpha": args.alpha, "seed": args.seed})
    out.mkdir(parents=True, exist_ok=True)
    write_result(result, out / "result.json")
    metric = result["metric"]
    plot_curves({f"{args.init}": result["history"]}, metric, out / "curves.png",
                title=f"{args.model} {args.task} {args.init} {args.format if args.init != 'lora' else '16-bit'} r{args.rank}")
    if args.save_model and args.init != "lora":
        save_qpeft(pm, tok, out / "model", overwrite=True)
    final = result["final"].get("eval_" + metric)
    _emit(args, {"out": str(out), "metric": metric, "final": final},
          f"{args.task} {args.init}: final eval {metric} = {final:.4f}  (log: {out / 'result.json'}, curves: {out / 'curves.png'})")
    return 0


def cmd_output_error(args) -> int:
    """Figure 1 of the QERA paper: output error of each init before training, over ranks and LoftQ iterations."""
    from .analysis import output_error_sweep
    from .calibration import collect_statistics, find_targets
    from .finetune import write_result
    from .memory import trim_heap
    from .models import load_encoder, load_model
    from .plots import plot_output_error

    out = _output_dir(args)
    encoder = _is_encoder(args.model)
    loader = (lambda: load_encoder(args.model)[0]) if encoder else (lambda: load_model(args.model, cache=args.cache_dir)[0])
    model, tok = load_encoder(args.model) if encoder else load_model(args.model, cache=args.cache_dir)
    calib = _text_batches(args, tok, _source(args.calib_text, None), "calibration", args.calib_samples, args.calib_seq_len, args.seed)
    stats = collect_statistics(model, calib, list(find_targets(model)), ("abs", "sq", "xtx"), progress=not args.no_progress)
    del model  # the sweep loads a fresh model for each init (loader)
    trim_heap()
    evaluation = _text_batches(args, tok, _source(args.eval_text, None), "evaluation", args.eval_samples, args.eval_seq_len, args.seed + 1)
    ranks = [int(r) for r in args.ranks.split(",")]
    inits = [i.strip() for i in args.inits.split(",")]
    rows: list[dict] = []

    def save_row(row: dict) -> None:  # partial results survive an interrupted sweep
        rows.append(row)
        write_result({"model": args.model, "complete": False, "rows": rows}, out / "output_error.json")

    for fmt in args.formats.split(","):
        output_error_sweep(loader, fmt, stats, evaluation, inits, ranks, args.loftq_iters,
                           progress=not args.no_progress, on_row=save_row, seed=args.seed)
    write_result({"model": args.model, "complete": True, "rows": rows}, out / "output_error.json")
    for fmt in args.formats.split(","):
        plot_output_error([r for r in rows if r["format"] == fmt], out / f"output_error_{fmt.replace(':', '_')}.png",
                          title=f"{Path(args.model).name} {fmt}: output error before training")
    lines = [f"{'format':<16} {'init':<12} {'rank':>4} {'iters':>5} {'output MSE':>12} {'KL':>10}"]
    for r in rows:
        kl = f"{r['kl']:.4g}" if "kl" in r else "-"  # encoders have no logits: MSE of hidden states only
        lines.append(f"{r['format']:<16} {r['init']:<12} {r['rank']:>4} {r['iters'] or '-':>5} {r['logit_mse']:>12.5g} {kl:>10}")
    _emit(args, {"rows": rows}, "\n".join(lines))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qera", description="Low-bit weights + low-rank error reconstruction for LLMs.")
    ap.add_argument("--version", action="version", version=f"qera {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        p.add_argument("--no-progress", action="store_true", help="hide progress bars")
        p.add_argument("-v", "--verbose", action="store_true", help="log INFO messages")

    p = sub.add_parser("quantize", help="quantize a model and save a checkpoint")
    _add_model(p); _add_quant(p); _add_calibration(p); common(p)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                   help="storage dtype of the non-quantized weights: embeddings, norms, LM head (default bfloat16)")
    p.add_argument("--report", help="write the per-layer report here: JSON, or .md for Markdown + PNGs (+ the JSON beside it)")
    p.add_argument("--report-output-error", action="store_true", help="also collect Σxᵀx to report layer output errors")
    p.add_argument("--report-spectrum", type=int, default=None,
                   help="leading eigenvalues of each layer's output-error matrix kept in the report (the decay "
                        "behind the rank choice; one eigen-solve per layer); default 32 with --report, else 0")
    p.add_argument("--no-output-error", action="store_true",
                   help="skip the per-layer output-error report (one extra in×in product per layer; large models on a CPU)")
    g = p.add_argument_group("scale")
    g.add_argument("--pipeline", choices=["oneshot", "sequential", "auto"], default="oneshot",
                   help="oneshot: whole model at once; sequential: one decoder block at a time (models larger "
                        "than memory; a local safetensors model is streamed from its shards); auto: sequential "
                        "when the one-shot statistics exceed --max-memory")
    g.add_argument("--propagate", choices=["fp", "quantized"], default="fp",
                   help="sequential: next block's inputs from the original (fp) or the quantized block")
    g.add_argument("--device", default=None, help="where blocks are computed: auto, cuda, cpu (default: the model's)")
    g.add_argument("--max-memory", default=None, help="host memory budget, e.g. 16GiB (default: $QERA_MAX_MEMORY or 60%% of free RAM)")
    g.add_argument("--gpu-memory", default=None, help="GPU memory budget for cached activations, e.g. 24GiB")
    g.add_argument("--offload-dir", default=None, help="folder for cached activations that exceed --max-memory")
    g.add_argument("--resume", action="store_true", help="continue an interrupted sequential run into the same --out")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("eval", help="perplexity of a model or a quantized checkpoint")
    _add_model(p); _add_eval(p); common(p)
    p.add_argument("--max-memory", default=None, help="memory budget, e.g. 8GiB: refuse up front what cannot fit")
    p.add_argument("--dataset", choices=["builtin", "wikitext2"], default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="evaluate on this device (default: where the model loads, the CPU)")
    p.add_argument("--fused-int4", action="store_true",
                   help="serve the 4-bit layers (int4:group=G, mxint4) through the fused int4 kernel, in bf16")
    g = p.add_argument_group("lm-eval-harness (pip install 'qera[eval]')")
    g.add_argument("--tasks", help="comma-separated lm-eval tasks, e.g. qera_text,arc_easy,piqa; qera_text is the "
                                   "evaluation text as documents (rolling log-likelihood, no hub needed)")
    g.add_argument("--limit", type=float, default=None, help="documents per task: a count, or a share below 1")
    g.add_argument("--include-path", help="folder of local lm-eval task YAMLs")
    g.add_argument("--batch-size", type=int, default=1)
    g.add_argument("--num-fewshot", type=int, default=None)
    g.add_argument("--doc-chars", type=int, default=4000,
                   help="qera_text: cut the text at paragraph breaks into documents of at least this many characters")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("calibrate", help="collect calibration statistics once, for reuse with --stats")
    _add_model(p); _add_calibration(p); common(p)
    p.add_argument("--kinds", default="abs,sq,xtx", help="statistics to keep: abs (lqer), sq (qera-approx), xtx (qera-exact)")
    _add_memory(p)
    p.add_argument("--include", action="append"); p.add_argument("--exclude", action="append")
    p.add_argument("--out", required=True); p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("compare", help="calibrate once; perplexity of full precision and each method")
    _add_model(p); _add_quant(p, multi=True); _add_calibration(p); _add_eval(p); common(p)
    p.add_argument("--out-json", help="also write the table as JSON here")
    _add_memory(p)
    p.set_defaults(func=cmd_compare)

    from .peft import INITS

    p = sub.add_parser("finetune", help="QPEFT fine-tuning (GLUE TSV tasks or causal LM) with curves")
    _add_model(p); common(p)
    p.add_argument("--task", required=True, choices=["sst2", "mrpc", "stsb", "clm"])
    p.add_argument("--train", required=True, help="training file (GLUE TSV, or text for clm)")
    p.add_argument("--eval", required=True, help="evaluation file (GLUE TSV, or text for clm)")
    p.add_argument("--init", default="qera-approx", choices=[*INITS, "lora"], help="adapter init; 'lora' = 16-bit LoRA, no quantization")
    p.add_argument("--format", default="mxint3")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--loftq-iters", type=int, default=5)
    p.add_argument("--calib-text", help="unlabeled text for the init statistics (default: built-in)")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256, help="clm window length")
    p.add_argument("--max-train-samples", type=int)
    p.add_argument("--max-eval-samples", type=int)
    p.add_argument("--eval-steps", type=int, help="evaluate every N steps (default: every epoch)")
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-model", action="store_true", help="also save adapter + quantized base")
    p.add_argument("--out", required=True); p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("output-error", help="model output error of each adapter init before training (table + PNG)")
    _add_model(p); common(p)
    p.add_argument("--formats", default="mxint3,mxint2:block=16")
    p.add_argument("--inits", default="qlora,loftq,qera-approx,qera-exact")
    p.add_argument("--ranks", default="4,8,16,32")
    p.add_argument("--loftq-iters", type=int, default=5, help="LoftQ is evaluated at 1..N iterations")
    p.add_argument("--calib-text"); p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-seq-len", type=int, default=128)
    p.add_argument("--eval-text"); p.add_argument("--eval-samples", type=int, default=8)
    p.add_argument("--eval-seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True); p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_output_error)

    from .export import EXPORTERS, SCALE_DTYPES

    p = sub.add_parser("export", help="export a checkpoint: compressed-tensors weights + a PEFT LoRA adapter")
    p.add_argument("path", help="qera checkpoint directory"); common(p)
    p.add_argument("--to", default="compressed-tensors", choices=EXPORTERS.names(), help="export target")
    p.add_argument("--out", required=True, help="output directory (the adapter goes to OUT/adapter)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--scale-dtype", choices=list(SCALE_DTYPES), default=None,
                   help="dtype of the group scales (default: float32 for int, bfloat16 for mxint: exact on every loader)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("info", help="describe a quantized checkpoint")
    p.add_argument("path"); common(p)
    p.set_defaults(func=cmd_info)
    from .analyze.cli import add_analyze_parser

    add_analyze_parser(sub, common, _add_model, _add_calibration, _add_eval)
    return ap


class _PlanOrWarning(logging.Filter):
    """Always show the run's plan (``qera.plan``: pipeline, activation cache); otherwise the chosen level."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == "qera.plan" or record.levelno >= self.level


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The CLI owns the "qera" logger for the length of the command (and puts it back after).
    logger = logging.getLogger("qera")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_PlanOrWarning(logging.INFO if args.verbose else logging.WARNING))
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    made_group = False
    try:
        _check_numbers(args)
        if args.command == "quantize":
            from .distributed import init_from_env

            made_group = init_from_env()  # under torchrun: one process group for the run
            if made_group and int(os.environ.get("RANK", "0")) != 0:  # one voice: rank 0 prints
                handler.filters.clear()
                handler.setLevel(logging.WARNING)
                args.no_progress = True
        return args.func(args)
    except QeraError as exc:
        print(f"qera {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # registry lookups and config validation
        print(f"qera {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the environment said no: disk full, permissions, a file that vanished
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"qera {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qera {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if made_group:
            import torch.distributed as dist

            dist.destroy_process_group()
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
