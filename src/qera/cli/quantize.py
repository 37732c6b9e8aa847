"""``qera quantize | calibrate | export | info``: make a checkpoint, statistics for reuse, an export; describe a checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

from qera.cli.common import (
    add_calibration,
    add_common,
    add_memory,
    add_model,
    add_quant,
    calibration_batches_for,
    emit,
    load_for,
    output_dir,
    quant_config,
    statistics_for,
)
from qera.core.config import REFINE_LOSSES

def add_parsers(sub) -> None:
    """Register ``quantize``, ``calibrate``, ``export`` and ``info``."""
    p = sub.add_parser("quantize", help="quantize a model and save a checkpoint")
    add_model(p); add_quant(p); add_calibration(p); add_common(p)
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
    g.add_argument("--pipeline", choices=["oneshot", "sequential", "auto"], default=None,
                   help="oneshot: whole model at once; sequential: one decoder block at a time (models larger "
                        "than memory; a local safetensors model is streamed from its shards); auto: sequential "
                        "when the one-shot statistics exceed --max-memory. Default: oneshot, or sequential "
                        "under torchrun")
    g.add_argument("--propagate", choices=["fp", "quantized"], default="fp",
                   help="sequential: next block's inputs from the original (fp) or the quantized block")
    g.add_argument("--device", default=None, help="where blocks are computed: auto, cuda, cpu (default: the model's)")
    g.add_argument("--max-memory", default=None, help="host memory budget, e.g. 16GiB (default: $QERA_MAX_MEMORY or 60%% of free RAM)")
    g.add_argument("--gpu-memory", default=None, help="GPU memory budget for cached activations, e.g. 24GiB")
    g.add_argument("--offload-dir", default=None, help="folder for cached activations that exceed --max-memory")
    g.add_argument("--resume", action="store_true", help="continue an interrupted sequential run into the same --out")
    g.add_argument("--guard", action="store_true",
                   help="keep the recipe (rank allocation, output weighting, GPTQ, qera-iter, refinement) only if it "
                        "beats RTN -> qera-exact at the same bits on held-out calibration batches (one in eight): "
                        "two runs in memory, the better one is written; the report says which")
    g = p.add_argument_group("refinement (sequential pipeline)")
    g.add_argument("--refine", type=int, default=0, metavar="STEPS",
                   help="after each block's closed-form solve, STEPS Adam steps that lower the block's output error "
                        "against the full-precision block (one calibration batch per step; kept only if it lowers "
                        "the error on held-out calibration batches). Needs --pipeline sequential or auto. Default 0")
    g.add_argument("--refine-lr", type=float, default=1e-3, help="refinement learning rate (Adam, cosine decay; default 1e-3)")
    g.add_argument("--refine-train", default="auto",
                   help="what is trained, a comma list of: lowrank (A, B), scales (the float group scales of W̃, "
                        "codes fixed; int/nf formats), rounding (AutoRound-style offsets: each code of W̃ may move "
                        "one level; int/mxint formats). Default auto: lowrank,rounding where the format allows, else lowrank")
    g.add_argument("--refine-loss", choices=REFINE_LOSSES, default="channel",
                   help="how the block's output error is summed, in refinement and in --output-weight block: "
                        "channel (default: each hidden channel's weight capped at the median channel's, so a "
                        "massive-activation channel does not own the loss), energy (each token and channel by "
                        "its size) or token (each token's error relative to its own norm)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("calibrate", help="collect calibration statistics once, for reuse with --stats")
    add_model(p); add_calibration(p); add_common(p)
    p.add_argument("--kinds", default="abs,sq,xtx", help="statistics to keep: abs (lqer), sq (qera-approx), xtx (qera-exact)")
    add_memory(p)
    p.add_argument("--include", action="append"); p.add_argument("--exclude", action="append")
    p.add_argument("--out", required=True); p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_calibrate)

    from qera.io.export import EXPORTERS, SCALE_DTYPES

    p = sub.add_parser("export", help="export a checkpoint: compressed-tensors weights + a PEFT LoRA adapter, "
                                      "or GGUF + a GGUF LoRA adapter for llama.cpp")
    p.add_argument("path", help="qera checkpoint directory"); add_common(p)
    p.add_argument("--to", default="compressed-tensors", choices=EXPORTERS.names(), help="export target")
    p.add_argument("--out", required=True, help="output directory (compressed-tensors: the adapter goes to OUT/adapter; "
                                                "gguf: OUT/model.gguf and OUT/adapter.gguf)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--scale-dtype", choices=list(SCALE_DTYPES), default=None,
                   help="dtype of the group scales (default: float32 for int, bfloat16 for mxint: exact on every loader)")
    p.add_argument("--gguf-source", default=None, metavar="GGUF",
                   help="--to gguf: the GGUF file (or model alias) the checkpoint was quantized from; its metadata "
                        "and tokenizer are copied")
    p.add_argument("--base-type", default="auto",
                   help="--to gguf: type of the 2-D tensors that are not quantized layers (embeddings, head): auto "
                        "(their own float dtype, lossless), f32, f16, bf16 or a GGUF type such as q8_0. Norms stay f32")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("info", help="describe a quantized checkpoint")
    p.add_argument("path"); add_common(p)
    p.set_defaults(func=cmd_info)


def cmd_quantize(args) -> int:
    from qera.io.models import resolve_source
    from qera.quantize.pipeline import quantize_and_save
    from qera.quantize.drivers.base import check_given_stats
    from qera.io.lazy import is_lazy_source

    out = output_dir(args)
    config = quant_config(args, args.format, args.method, args.rank)
    if args.guard and args.stats:
        from qera.util.errors import QeraError

        raise QeraError("--guard records its own statistics (it holds calibration batches out): drop --stats")
    where = resolve_source(args.model)
    if isinstance(where, Path) and where.is_file() and where.suffix == ".gguf":
        from qera.io.models import convert_gguf

        where = convert_gguf(where, args.cache_dir)
    # the guard compares two runs in memory, so it never streams
    stream = config.pipeline != "oneshot" and isinstance(where, Path) and is_lazy_source(where) and not args.guard
    if stream:
        from transformers import AutoTokenizer

        model, tok = where, AutoTokenizer.from_pretrained(str(where))
    else:
        model, tok = load_for(args)
    stats = None
    if args.stats:
        from qera.calibrate.store import CalibrationStats

        stats = CalibrationStats.load(args.stats, lazy=True)  # read one layer at a time
        check_given_stats(config, stats)  # before any text is read
    calibration = None
    from qera.quantize.pipeline import stats_kinds_for

    needs_data = bool(stats_kinds_for(config, args.report_output_error)) or config.pipeline != "oneshot"
    # the loss gradients need batches
    fisher = (config.allocates and config.rank_normalize in ("fisher", "auto")) or config.output_weight != "none"
    # given statistics serve both pipelines, except the quantized model's inputs (sequential, "quantized")
    recorded = stats is None or (config.pipeline != "oneshot" and config.propagate == "quantized")
    recorded = recorded or config.refines  # refinement trains on the cached block inputs
    if needs_data and (recorded or fisher) or args.guard:
        calibration = calibration_batches_for(args, tok)
    from qera.quantize.guard import quantize_guarded_and_save

    save = quantize_guarded_and_save if args.guard else quantize_and_save
    report = save(
        model, config, out, tokenizer=tok, calibration=calibration, stats=stats, overwrite=args.overwrite,
        resume=args.resume, progress=not args.no_progress, dtype=args.dtype,
        report_output_error=True if args.report_output_error else (False if args.no_output_error else None),
        device=args.device, max_memory=args.max_memory, gpu_memory=args.gpu_memory, offload_dir=args.offload_dir,
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun rank 0 writes and reports
    if args.report:
        from qera.evaluate.render import write_report

        write_report(report, args.report)
    s = report.summary()
    emit(args, {"out": str(out), **s},
          f"saved {out}: {s['layers']} layers ({s['pipeline']}), {s['bits_weight']:.3f} bits/weight "
          f"({s['bits_total']:.3f} with the low-rank term), solve {s['solve_seconds']:.1f}s")
    return 0


def cmd_calibrate(args) -> int:
    from qera.calibrate.forward import find_targets

    out = output_dir(args)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    model, tok = load_for(args)
    targets = find_targets(model, args.include, args.exclude)
    args.stats = None
    meta = {"model": args.model, "samples": str(args.calib_samples), "seq_len": str(args.calib_seq_len),
            "seed": str(args.seed), "bos": args.calib_bos}
    stats, _ = statistics_for(args, model, tok, frozenset(kinds), targets, path=out, extra=meta)
    if not stats.lazy:  # within the budget: in memory, saved now (a lazy result was written block by block)
        stats.extra.update(meta)
        stats.save(out)
    n_inputs = len(stats.stats)
    emit(args, {"out": str(out), "inputs": n_inputs, "layers": len(stats.groups), "tokens": stats.tokens},
          f"saved {out}: {n_inputs} distinct inputs for {len(stats.groups)} layers, {stats.tokens} tokens")
    return 0


def cmd_info(args) -> int:
    from qera.io.checkpoint import read_qera_config

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
    emit(args, payload, text)
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
    """Write a checkpoint in another ecosystem's format (compressed-tensors + a PEFT LoRA adapter, or GGUF)."""
    from qera.io.export import export
    from qera.util.errors import QeraError

    if args.to == "gguf":
        if args.scale_dtype is not None:
            raise QeraError("--scale-dtype applies to compressed-tensors; GGUF stores each type's own scales")
        options = {"gguf_source": args.gguf_source, "base_type": args.base_type}
        adapter = Path(args.out) / "adapter.gguf"
    else:
        if args.gguf_source is not None or args.base_type != "auto":
            raise QeraError("--gguf-source and --base-type apply to --to gguf")
        options = {"scale_dtype": args.scale_dtype}
        adapter = Path(args.out) / "adapter"
    out = export(args.path, args.out, to=args.to, overwrite=args.overwrite, **options)
    size = {name: sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())
            for name, d in (("source_bytes", args.path), ("export_bytes", out))}
    emit(args, {"out": str(out), "to": args.to, **size},
          f"exported {args.path} ({size['source_bytes'] / 2**20:.1f} MiB) to {out} as {args.to} "
          f"({size['export_bytes'] / 2**20:.1f} MiB{', adapter in ' + str(adapter) if adapter.exists() else ''})")
    return 0
