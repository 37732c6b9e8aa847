"""``qera eval | compare``: perplexity (and lm-eval tasks) of a model or checkpoint; methods side by side."""

from __future__ import annotations

import logging

from qera.core.methods import METHODS
from qera.util.errors import QeraError
from qera.cli.common import (
    add_calibration,
    add_common,
    add_eval,
    add_memory,
    add_model,
    add_quant,
    emit,
    eval_perplexity,
    load_for,
    logit_bytes,
    parse_settings,
    quant_config,
    statistics_for,
    text_source,
)

log = logging.getLogger("qera.cli")

def add_parsers(sub) -> None:
    """Register ``eval`` and ``compare``."""
    p = sub.add_parser("eval", help="perplexity of a model or a quantized checkpoint")
    add_model(p); add_eval(p); add_common(p)
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
    g = p.add_argument_group("agreement with llama.cpp")
    g.add_argument("--llama-cpp-logits", metavar="FILE",
                   help="a 'llama-perplexity --kl-divergence-base FILE' output: score the model on llama.cpp's windows "
                        "and report both perplexities, top-1 agreement and KL instead of the usual perplexity")
    g.add_argument("--llama-cpp-gguf", metavar="GGUF",
                   help="the GGUF llama.cpp ran: its add_bos_token flag says whether each window starts with BOS "
                        "(default: whether the tokenizer has a BOS token)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="calibrate once; perplexity of full precision and each method")
    add_model(p); add_quant(p, multi=True); add_calibration(p); add_eval(p); add_common(p)
    p.add_argument("--out-json", help="also write the table as JSON here")
    add_memory(p)
    p.set_defaults(func=cmd_compare)


def cmd_eval(args) -> int:
    llama_cpp = _open_llama_cpp_logits(args) if args.llama_cpp_logits else None  # refused before the model loads
    model, tok = load_for(args, {"logits of one chunk": logit_bytes(args)})
    if args.device:
        model.to(args.device)
    if args.fused_int4:
        _use_fused_int4(model)
    if llama_cpp is not None:
        return _llama_cpp_agreement(args, model, tok, llama_cpp)
    harness = _harness(args, model, tok) if args.tasks else None
    r = eval_perplexity(args, model, tok)
    line = f"perplexity {r.perplexity:.4f} over {r.windows} windows x {r.seq_len} tokens ({r.tokens_per_second:.0f} tok/s)"
    payload = {"model": args.model, **r.to_dict()}
    if harness is not None:
        payload["lm_eval"] = harness
        line = harness["table"] + "\n" + harness["check_line"] + f"qera {line}"
    emit(args, payload, line)
    return 0


def _open_llama_cpp_logits(args):
    """``--llama-cpp-logits``: the checks and the file's header, before any slow work."""
    from qera.evaluate.llama_cpp import read_logits_file

    if args.tasks:
        raise QeraError("--llama-cpp-logits replaces the perplexity run; pass --tasks separately")
    return read_logits_file(args.llama_cpp_logits)


def _llama_cpp_agreement(args, model, tok, logits) -> int:
    """``--llama-cpp-logits``: the model (in float32, as llama.cpp computes activations) on llama.cpp's windows."""
    from qera.evaluate.llama_cpp import agreement, gguf_window_bos
    from qera.io.data import bos_id

    bos = gguf_window_bos(args.llama_cpp_gguf) if args.llama_cpp_gguf else bos_id(tok)
    res = agreement(model.float(), logits, bos, max_windows=args.max_windows,
                    progress=not args.no_progress)
    line = (f"llama.cpp {res['llama_cpp_ppl']:.4f}, qera {res['qera_ppl']:.4f} ({100 * res['ppl_rel_diff']:+.2f}%) "
            f"over {res['windows']} windows ({res['scored_tokens']} tokens); top-1 agreement "
            f"{100 * res['top1_agreement']:.2f}%, KL {res['kl_llama_cpp_to_qera']:.5f}")
    emit(args, {"model": args.model, "llama_cpp_logits": args.llama_cpp_logits, **res}, line)
    return 0


def _use_fused_int4(model) -> None:
    """bf16 model, 4-bit layers through the fused int4 kernel (``qera.prepare_inference``); says how many."""
    import torch

    from qera.nn.inference import prepare_inference

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

    from qera.io.data import load_text
    from qera.evaluate.perplexity import context_length, rolling_loglikelihood
    from qera.evaluate.harness import TEXT_TASK, run_harness, split_documents

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    limit = args.limit
    if limit is not None and limit <= 0:
        raise QeraError(f"--limit must be > 0 (a count, or a share below 1), got {limit}")
    if limit is not None and limit >= 1:
        limit = int(limit)  # a count; below 1 a share, as lm-eval reads it
    docs = None
    if TEXT_TASK in tasks:
        docs = split_documents(load_text(text_source(args.eval_text, args.dataset), "evaluation"), args.doc_chars)
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


def cmd_compare(args) -> int:
    """Calibrate once, then quantize each (setting, method) into the same model and restore it after."""
    from qera.calibrate.forward import find_targets
    from qera.quantize.pipeline import stats_kinds_for

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise QeraError("--methods is empty")
    for m in methods:
        METHODS.get(m)
    settings = parse_settings(args.settings, args.format, args.rank)
    configs = [(fmt, m, quant_config(args, fmt, m, r if METHODS.get(m).uses_rank else 0)) for fmt, r in settings for m in methods]
    model, tok = load_for(args, {"logits of one chunk": logit_bytes(args)})
    kinds = frozenset().union(*(stats_kinds_for(c, True) for _, _, c in configs))
    targets = find_targets(model, configs[0][2].include, configs[0][2].exclude)
    from qera.nn.targets import linear_weight

    # room for one quantized copy of the layers (their dense W̃ + BA cache) and the evaluation's logits
    copy_bytes = sum(linear_weight(m).numel() * linear_weight(m).element_size() for m in targets.values())
    stats, temp = statistics_for(args, model, tok, kinds, targets, reserve=copy_bytes + logit_bytes(args))
    try:
        return _compare(args, model, tok, configs, targets, stats)
    finally:
        if temp is not None:
            temp.remove()


def _compare(args, model, tok, configs, targets, stats) -> int:
    rows = []
    base = eval_perplexity(args, model, tok)
    rows.append({"method": "fp", "format": "-", "rank": 0, "perplexity": base.perplexity,
                 "bits_weight": 16.0, "bits_total": 16.0, "mean_output_error_ratio": None, "solve_seconds": 0.0})
    from qera.quantize.pipeline import quantize_model
    from qera.nn.targets import restoring

    for fmt, method, config in configs:
        with restoring(model, dict(targets)):  # the fp layers go back: one model, at most one quantized copy
            report = quantize_model(model, config, stats=stats,
                                    report_output_error="xtx" in stats.kinds if stats else False,
                                    progress=not args.no_progress)
            r = eval_perplexity(args, model, tok)
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
        from qera.util.atomic import write_json

        write_json(args.out_json, {"rows": rows, "windows": base.windows, "seq_len": base.seq_len})
    emit(args, {"rows": rows, "windows": base.windows, "seq_len": base.seq_len}, "\n".join(lines))
    return 0
