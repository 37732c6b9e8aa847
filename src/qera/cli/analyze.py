"""``qera analyze calib-size | autocorrelation | rank``: argparse wiring and the three commands.

:func:`add_parsers` uses the option groups of :mod:`qera.cli.common`, so the analyses take the same
model, calibration and evaluation options as ``compare``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Callable

from qera.cli import common as cli
from qera.cli.common import add_calibration, add_common, add_eval, add_model
from qera.util.errors import QeraError
from qera.core.methods import METHODS

log = logging.getLogger("qera.analyze")

def add_parsers(sub) -> None:
    """Register ``analyze`` and its three sub-subcommands on the subparsers object ``sub``."""
    p = sub.add_parser("analyze", help="analyses: calibration size, input autocorrelation, rank sweep (JSON + PNG)")
    asub = p.add_subparsers(dest="analysis", required=True)
    methods = ", ".join(METHODS.names())

    def outputs(q: argparse.ArgumentParser, stem: str) -> None:
        q.add_argument("--out-json", default=f"analyze_{stem}.json", help=f"result JSON (default analyze_{stem}.json)")
        q.add_argument("--fig-dir", default=".", help="folder for the PNG figures (default: current folder)")
        q.add_argument("--fig-prefix", default="", help="prefix of the PNG file names, e.g. smollm2_")

    q = asub.add_parser("calib-size", help="perplexity and layer output error vs number of calibration windows")
    add_model(q); add_calibration(q); add_eval(q); add_common(q)
    q.add_argument("--sizes", default="8,16,32,64,128", help="calibration windows, increasing (default 8,16,32,64,128); the largest is the number "
                        "drawn (replaces --calib-samples), the smaller sets are its prefixes")
    q.add_argument("--methods", default="qera-approx,qera-exact", help=f"comma list of: {methods}")
    q.add_argument("--format", default="mxint3")
    q.add_argument("--rank", type=int, default=8)
    q.add_argument("--save-stats", help="also save the largest set's statistics here (reuse with --stats)")
    outputs(q, "calib_size")
    q.set_defaults(func=cmd_calib_size)

    q = asub.add_parser("autocorrelation", help="how far R is from diagonal per layer, and what qera-exact gains")
    add_model(q); add_calibration(q); add_common(q)
    q.add_argument("--format", default="mxint3")
    q.add_argument("--rank", type=int, default=8)
    q.add_argument("--stats", help="statistics file (qera calibrate or calib-size --save-stats) instead of calibrating")
    q.add_argument("--heatmap-blocks", default=None, help="blocks to draw (default: first, middle, last)")
    q.add_argument("--heatmap-px", type=int, default=128, help="heat maps are block-averaged to at most this size")
    outputs(q, "autocorrelation")
    q.set_defaults(func=cmd_autocorrelation)

    q = asub.add_parser("rank", help="perplexity vs bits per weight over ranks, one calibration, one solve per layer")
    add_model(q); add_calibration(q); add_eval(q); add_common(q)
    q.add_argument("--ranks", default="0,4,8,16,32,64", help="increasing ranks; 0 = quantization alone")
    q.add_argument("--methods", default="lqer,qera-approx,qera-exact", help=f"comma list of: {methods}")
    q.add_argument("--formats", default="mxint3,mxint4", help="comma list of weight formats")
    q.add_argument("--stats", help="statistics file (qera calibrate or calib-size --save-stats) instead of calibrating")
    outputs(q, "rank")
    q.set_defaults(func=cmd_rank)


# -- shared steps --------------------------------------------------------------------------------
def _check_methods(names: list[str], need_rank: bool = True) -> None:
    for m in names:
        cls = METHODS.get(m)  # unknown names: ValueError listing the known ones
        if need_rank and not cls.uses_rank:
            raise QeraError(f"method {m!r} adds no low-rank term; the sweep covers it at rank 0")


def _evaluator(args, tok) -> tuple[Callable, dict]:
    """``evaluate(model) -> perplexity`` on ``--eval-text`` and a record of the protocol."""
    from qera.io.data import load_text
    from qera.evaluate.perplexity import perplexity

    text = eval_prefix(tok, load_text(cli.text_source(args.eval_text, args.dataset), "evaluation"),
                       args.seq_len, args.max_windows)
    info: dict = {}

    def evaluate(model) -> float:
        r = perplexity(model, tok, text, args.seq_len, args.max_windows, progress=not args.no_progress)
        info.update(windows=r.windows, seq_len=r.seq_len)
        return r.perplexity

    return evaluate, info


def eval_prefix(tok, text: str, seq_len: int, max_windows: int | None) -> str:
    """The shortest prefix of ``text`` (doubling from an estimate) whose tokens start with the first
    ``max_windows · seq_len`` tokens of the whole text: every evaluation then tokenizes only that,
    with the same windows (checked against one tokenization of the whole text)."""
    if max_windows is None:
        return text
    import torch

    from qera.io.data import tokenize

    need = max_windows * seq_len
    full = tokenize(tok, text)
    if full.numel() <= need:
        return text
    chars = 8 * need
    while chars < len(text):
        ids = tokenize(tok, text[:chars])
        if ids.numel() > need + 1 and torch.equal(ids[:need + 1], full[:need + 1]):
            return text[:chars]
        chars *= 2
    return text


def _protocol(args) -> dict:
    out = {"model": args.model, "calib_text": args.calib_text or args.dataset or "builtin",
           "calib_seq_len": args.calib_seq_len, "seed": args.seed}
    if hasattr(args, "eval_text"):
        out["eval_text"] = args.eval_text or args.dataset or "builtin"
    return out


def _fig(args, name: str) -> Path:
    d = Path(args.fig_dir)
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{args.fig_prefix}{name}"


def _load_stats(args, model, tok, kinds: frozenset[str], targets):
    """Statistics from ``--stats`` (checked for ``kinds``) or from a fresh calibration."""
    from qera.calibrate.forward import collect_statistics
    from qera.calibrate.store import CalibrationStats
    from qera.core.statistics import provided

    if getattr(args, "stats", None):
        stats = CalibrationStats.load(args.stats)
        missing = kinds - provided(stats.kinds)
        if missing:
            raise QeraError(f"{args.stats} lacks statistics {sorted(missing)}; collect them with qera calibrate --kinds")
        absent = [n for n in targets if n not in stats]
        if absent:
            raise QeraError(f"{args.stats} has no statistics for {len(absent)} target layer(s), e.g. {absent[0]}")
        return stats
    batches = cli.calibration_batches_for(args, tok)
    return collect_statistics(model, batches, targets, kinds, progress=not args.no_progress,
                              precision=args.stats_precision)


# -- calib-size ----------------------------------------------------------------------------------
def cmd_calib_size(args) -> int:
    from qera.util.atomic import write_json
    from qera.calibrate.forward import find_targets
    from qera.quantize.pipeline import QuantConfig
    from qera.analyze.calib_size import calib_size_sweep, crossing, split_windows
    from qera.analyze.common import parse_int_list, parse_names
    from qera.analyze.plots import plot_calib_size

    t_start = time.perf_counter()
    sizes = parse_int_list(args.sizes, "--sizes", minimum=1)
    methods = parse_names(args.methods, "--methods")
    _check_methods(methods)
    if args.rank < 1:
        raise QeraError(f"--rank must be an integer >= 1, got {args.rank}")
    configs = [QuantConfig(format=args.format, method=m, rank=args.rank, seed=args.seed,
                           stats_precision=args.stats_precision) for m in methods]
    model, tok = cli.load_for(args)
    args.calib_samples = sizes[-1]  # one draw of windows; the smaller sets are its prefixes
    batches = cli.calibration_batches_for(args, tok)
    segments = split_windows(batches, sizes, args.calib_batch_size)
    targets = find_targets(model)
    evaluate, info = _evaluator(args, tok)
    t0 = time.perf_counter()
    fp = evaluate(model)
    fp_seconds = time.perf_counter() - t0
    payload = {"analysis": "calib-size", **_protocol(args), "format": args.format, "rank": args.rank,
               "methods": methods, "sizes": sizes, "fp_perplexity": fp, "rows": [], "complete": False}

    def save_row(row: dict) -> None:  # partial results survive an interrupted run
        payload["rows"].append(row)
        payload.update(info)
        write_json(args.out_json, payload)

    def save_stats(stats) -> None:
        if args.save_stats:
            stats.extra.update({"model": args.model, "samples": str(sizes[-1]), "seq_len": str(args.calib_seq_len),
                                "seed": str(args.seed)})
            stats.save(args.save_stats)

    calib_size_sweep(model, segments, targets, configs, evaluate, precision=args.stats_precision,
                     progress=not args.no_progress, on_row=save_row, on_stats=save_stats)
    rows = payload["rows"]
    cross = {}
    if len(methods) >= 2:
        cross = {"challenger": methods[-1], "baseline": methods[0],
                 "perplexity": crossing(rows, methods[-1], methods[0], "perplexity"),
                 "mean_output_error_ratio": crossing(rows, methods[-1], methods[0], "mean_output_error_ratio")}
    fig = plot_calib_size(rows, fp, _fig(args, "calib_size.png"),
                          title=f"{Path(args.model).name} {args.format} rank {args.rank}: calibration size")
    payload.update(info, crossing=cross, figures=[str(fig)], fp_eval_seconds=fp_seconds,
                   wall_seconds=time.perf_counter() - t_start, complete=True)
    write_json(args.out_json, payload)
    lines = [f"{'method':<13} {'windows':>7} {'tokens':>8} {'out.err':>8} {'perplexity':>11}"]
    for r in rows:
        oe = f"{r['mean_output_error_ratio']:.4f}" if r["mean_output_error_ratio"] is not None else "-"
        lines.append(f"{r['method']:<13} {r['samples']:>7} {r['tokens']:>8} {oe:>8} {r['perplexity']:>11.4f}")
    lines.append(f"fp perplexity {fp:.4f} ({info.get('windows')} windows x {info.get('seq_len')} tokens)")
    if cross:
        at = cross["perplexity"]
        lines.append(f"{cross['challenger']} beats {cross['baseline']} in perplexity from "
                     + (f"{at} windows on" if at is not None else "no size tried"))
    lines.append(f"wrote {args.out_json} and {fig}")
    cli.emit(args, payload, "\n".join(lines))
    return 0


# -- autocorrelation -----------------------------------------------------------------------------
def cmd_autocorrelation(args) -> int:
    from qera.util.atomic import write_json
    from qera.calibrate.forward import find_targets
    from qera.analyze.autocorr import autocorrelation_analysis, group_summary, heatmap_layers, spearman
    from qera.analyze.common import parse_int_list
    from qera.analyze.plots import plot_autocorr_heatmaps, plot_autocorr_summary

    t_start = time.perf_counter()
    if args.rank < 1:
        raise QeraError(f"--rank must be an integer >= 1, got {args.rank}")
    if args.heatmap_px < 8:
        raise QeraError(f"--heatmap-px must be an integer >= 8, got {args.heatmap_px}")
    model, tok = cli.load_for(args)
    targets = find_targets(model)
    t0 = time.perf_counter()
    stats = _load_stats(args, model, tok, frozenset({"sq", "xtx"}), targets)
    t_cal = time.perf_counter() - t0
    blocks = parse_int_list(args.heatmap_blocks, "--heatmap-blocks") if args.heatmap_blocks else None
    chosen = heatmap_layers(list(targets), stats, blocks)
    t0 = time.perf_counter()
    rows, maps = autocorrelation_analysis(targets, stats, args.format, args.rank, seed=args.seed,
                                          heatmaps=chosen, heatmap_px=args.heatmap_px,
                                          progress=not args.no_progress)
    t_solve = time.perf_counter() - t0
    rho_rel = spearman([r["offdiag_share"] for r in rows], [r["gap_relative"] for r in rows])
    rho_ratio = spearman([r["offdiag_share"] for r in rows], [r["gain_ratio_points"] for r in rows])
    rho_rms = spearman([r["offdiag_rms"] for r in rows], [r["gap_relative"] for r in rows])
    name = Path(args.model).name
    figs = [plot_autocorr_heatmaps(maps, _fig(args, "autocorr_heatmaps.png"), title=f"{name}: |R'| (unit diagonal)"),
            plot_autocorr_summary(rows, _fig(args, "autocorr_summary.png"),
                                  title=f"{name} {args.format} rank {args.rank}: off-diagonal share and qera-exact gain")]
    payload = {"analysis": "autocorrelation", **_protocol(args), "format": args.format, "rank": args.rank,
               "stats": args.stats, "calibration_tokens": stats.tokens,
               "spearman_offdiag_vs_gap_relative": rho_rel, "spearman_offdiag_vs_gain_points": rho_ratio,
               "spearman_offdiag_rms_vs_gap_relative": rho_rms,
               "groups": group_summary(rows), "layers": rows, "heatmap_layers": list(maps), "figures": [str(f) for f in figs],
               "calibration_seconds": t_cal, "solve_seconds": t_solve, "wall_seconds": time.perf_counter() - t_start}
    write_json(args.out_json, payload)
    lines = [f"{'group':<8} {'layers':>6} {'offdiag share':>13} {'rms corr':>8} {'gap approx/exact-1':>18} {'gain (pts)':>10}"]
    for g in payload["groups"]:
        lines.append(f"{g['group']:<8} {g['layers']:>6} {g['offdiag_share_mean']:>13.3f} {g['offdiag_rms_mean']:>8.3f} "
                     f"{g['gap_relative_mean'] if g['gap_relative_mean'] is not None else float('nan'):>18.4f} "
                     f"{g['gain_ratio_points_mean']:>10.4f}")
    def num(v):
        return "n/a" if v is None else f"{v:+.3f}"

    lines.append(f"Spearman(off-diagonal share, relative gap) = {num(rho_rel)} over {len(rows)} layers; "
                 f"with the gain in error-ratio points {num(rho_ratio)}; rms correlation vs relative gap {num(rho_rms)}")
    lines.append(f"wrote {args.out_json}, {', '.join(str(f) for f in figs)}")
    cli.emit(args, {k: v for k, v in payload.items() if k != "layers"}, "\n".join(lines))
    return 0


# -- rank ----------------------------------------------------------------------------------------
def cmd_rank(args) -> int:
    from qera.util.atomic import write_json
    from qera.calibrate.forward import find_targets
    from qera.analyze.common import parse_int_list, parse_names
    from qera.analyze.plots import plot_rank_sweep
    from qera.analyze.rank_sweep import rank_sweep

    t_start = time.perf_counter()
    ranks = parse_int_list(args.ranks, "--ranks", minimum=0)
    methods = parse_names(args.methods, "--methods")
    _check_methods(methods)
    formats = parse_names(args.formats, "--formats")
    from qera.core.formats import parse_format

    for f in formats:
        parse_format(f)
    model, tok = cli.load_for(args)
    targets = find_targets(model)
    kinds = frozenset({"xtx"}).union(*(METHODS.get(m).needs for m in methods))
    t0 = time.perf_counter()
    stats = _load_stats(args, model, tok, kinds, targets)
    t_cal = time.perf_counter() - t0
    evaluate, info = _evaluator(args, tok)
    fp = evaluate(model)
    payload = {"analysis": "rank", **_protocol(args), "stats": args.stats, "calibration_tokens": stats.tokens,
               "ranks": ranks, "methods": methods, "formats": formats, "fp_perplexity": fp, "rows": [],
               "complete": False}

    def save_row(row: dict) -> None:
        payload["rows"].append(row)
        payload.update(info)
        write_json(args.out_json, payload)

    rank_sweep(model, targets, stats, formats, methods, ranks, evaluate, seed=args.seed,
               progress=not args.no_progress, on_row=save_row)
    rows = payload["rows"]
    fig = plot_rank_sweep(rows, fp, _fig(args, "rank_sweep.png"), title=f"{Path(args.model).name}: perplexity vs bits per weight")
    payload.update(info, figures=[str(fig)], calibration_seconds=t_cal, wall_seconds=time.perf_counter() - t_start,
                   complete=True)
    write_json(args.out_json, payload)
    lines = [f"{'format':<10} {'method':<13} {'rank':>4} {'bits':>7} {'out.err':>8} {'perplexity':>11}"]
    for r in rows:
        oe = f"{r['mean_output_error_ratio']:.4f}" if r["mean_output_error_ratio"] is not None else "-"
        lines.append(f"{r['format']:<10} {r['method']:<13} {r['rank']:>4} {r['bits_total']:>7.3f} {oe:>8} {r['perplexity']:>11.4f}")
    lines.append(f"fp perplexity {fp:.4f} ({info.get('windows')} windows x {info.get('seq_len')} tokens); wrote {args.out_json}, {fig}")
    cli.emit(args, payload, "\n".join(lines))
    return 0
