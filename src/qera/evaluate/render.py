"""A quantization report people can look at: Markdown + PNGs from a :class:`~qera.core.report.QuantReport`.

``write_report(report, "report.md")`` writes ``report.md``, the same data as ``report.json`` beside
it, and ``report_files/*.png`` (with matplotlib; without it the Markdown says the figures were
skipped). The figures: each layer's output error after / before reconstruction against depth, by
layer type; ranks by depth (when they differ); the eigenvalue decay of the error (with
``report_spectrum``); and the time each layer's solve took. A section on calibration coverage
lists tokens per layer and the input channels no calibration token reached.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from qera.evaluate.plots import _plt, _save
from qera.util.atomic import write_text
from qera.core.report import LayerReport, QuantReport

log = logging.getLogger(__name__)

_DEPTH = re.compile(r"\.(\d+)\.")


def layer_type(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` → ``q_proj`` (the last name component)."""
    return name.rsplit(".", 1)[-1]


def depth(layer: LayerReport) -> int | None:
    """Decoder block index of a layer (from the report, else the first number in its name)."""
    if layer.block is not None:
        return layer.block
    m = _DEPTH.search(f".{layer.name}.")
    return int(m.group(1)) if m else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def by_type(layers: Sequence[LayerReport]) -> list[dict]:
    """Per layer type: count, mean output- and weight-error ratios (after / before), total solve seconds."""
    groups: dict[str, list[LayerReport]] = defaultdict(list)
    for lay in layers:
        groups[layer_type(lay.name)].append(lay)
    rows = []
    for t, ls in groups.items():
        out = [r for r in (_ratio(l.output_error_after, l.output_error_before) for l in ls) if r is not None]
        w = [r for r in (_ratio(l.weight_error_after, l.weight_error_before) for l in ls) if r is not None]
        rows.append({"type": t, "layers": len(ls), "rank": sorted({l.rank for l in ls}),
                     "bits_total": sum(l.bits_total for l in ls) / len(ls),
                     "output_error_ratio": sum(out) / len(out) if out else None,
                     "weight_error_ratio": sum(w) / len(w) if w else None,
                     "seconds": sum(l.seconds for l in ls)})
    return rows


def _fmt(v, spec: str = ".4f") -> str:
    return "–" if v is None else format(v, spec)


def _depth_plot(plt, series: dict[str, list[tuple]], column: int, path: Path, size: tuple[float, float],
                ylabel: str, title: str, **style) -> Path:
    """One line per layer type: ``point[column]`` against the decoder block ``point[0]``; saved as ``path``."""
    fig, ax = plt.subplots(figsize=size)
    for t, pts in sorted(series.items()):
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[column] for p in pts], label=t, **style)
    ax.set(xlabel="decoder block", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return _save(fig, plt, path, dpi=110)


def _figures(report: QuantReport, folder: Path) -> list[tuple[str, Path]]:
    try:
        plt = _plt()
    except ImportError:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    series: dict[str, list[tuple[int, float, float, int]]] = defaultdict(list)
    for lay in report.layers:
        d = depth(lay)
        if d is not None:
            series[layer_type(lay.name)].append((d, _ratio(lay.output_error_after, lay.output_error_before) or float("nan"),
                                                 lay.seconds, lay.rank))
    if any(any(p[1] == p[1] for p in pts) for pts in series.values()):
        out.append(("Output error by depth", _depth_plot(
            plt, series, 1, folder / "output_error.png", (8, 4), "output error after / before",
            "Layer output error left by the reconstruction (lower is better)", marker="o", ms=3)))
    if len({p[3] for pts in series.values() for p in pts}) > 1:  # ranks differ across layers (allocated or overridden)
        out.append(("Rank by depth", _depth_plot(plt, series, 3, folder / "ranks.png", (8, 3.5), "rank",
                                                 "Rank of each layer's low-rank term", marker="o", ms=3)))
    spectra = _spectra_by_type(report.layers)
    if spectra:
        out.append(("Eigenvalue decay", _spectrum_plot(plt, spectra, report, folder / "spectrum.png")))
    if series:
        out.append(("Solve time", _depth_plot(plt, series, 2, folder / "solve_seconds.png", (8, 3.5), "seconds",
                                              "Solve time per layer", marker=".")))
    return out


def _spectra_by_type(layers: Sequence[LayerReport]) -> dict[str, list[float]]:
    """Per layer type, the median over its layers of the output error left at rank k, k = 0..K
    (``1 − Σ_{i<k} spectrum_i``: what the optimal rank-k term leaves of the error before it)."""
    import statistics

    groups: dict[str, list[list[float]]] = defaultdict(list)
    for lay in layers:
        if lay.spectrum:
            left, acc = [1.0], 0.0
            for v in lay.spectrum:
                acc += v
                left.append(max(1.0 - acc, 0.0))
            groups[layer_type(lay.name)].append(left)
    out = {}
    for t, curves in groups.items():
        n = min(len(c) for c in curves)
        out[t] = [statistics.median(c[k] for c in curves) for k in range(n)]
    return out


def _spectrum_plot(plt, spectra: dict[str, list[float]], report: QuantReport, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4))
    for t, left in sorted(spectra.items()):
        ax.plot(range(len(left)), left, label=t, marker=".", ms=3)
    ranks = sorted({l.rank for l in report.layers} - {0})
    for r in {ranks[0], ranks[-1]} if ranks else ():
        ax.axvline(r, color="gray", ls="--", lw=1)
    ax.set_yscale("log")
    ax.set(xlabel="rank k", ylabel="output error left / before",
           title="Eigenvalue decay of D R Dᵀ: error the optimal rank-k term leaves (median per type; dashed: ranks used)")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return _save(fig, plt, path, dpi=110)


def coverage_lines(layers: Sequence[LayerReport]) -> list[str]:
    """Markdown lines on what the calibration reached: tokens per layer and dead input channels."""
    tokens = [l.tokens for l in layers if l.tokens is not None]
    lines = ["", "## Calibration coverage", ""]
    lines.append(f"- tokens per layer: {min(tokens):,}–{max(tokens):,}" if tokens else "- tokens per layer: not recorded")
    dead = [(l.name, l.dead_channels, l.shape[1]) for l in layers if l.dead_channels]
    if not any(l.dead_channels is not None for l in layers):
        lines.append("- dead input channels: not measured (needs Σxᵀx)")
    elif not dead:
        lines.append("- dead input channels (never reached by a calibration token): none")
    else:
        lines.append(f"- dead input channels (never reached by a calibration token): {sum(d[1] for d in dead):,} in "
                     f"{len(dead)} layers; the reconstruction cannot see errors there")
        lines += ["", "| layer | dead / inputs |", "|---|---:|"]
        lines += [f"| {n} | {d} / {w} |" for n, d, w in dead[:50]]
        if len(dead) > 50:
            lines.append(f"| … {len(dead) - 50} more | |")
    return lines


def _rank_text(c) -> str:
    ow = getattr(c, "output_weight", "none")
    weighted = f", output channels weighted by the loss's gradients ({ow})" if ow != "none" else ""
    if c.rank_budget is not None:
        return (f"ranks allocated within the parameters of rank {c.rank_budget:g} everywhere "
                f"({c.rank_normalize} normalization){weighted}")
    if c.extra_bits is not None:
        return f"ranks allocated within {c.extra_bits:g} extra bits per weight ({c.rank_normalize} normalization){weighted}"
    return f"rank {c.rank}{weighted}"


def render_markdown(report: QuantReport, figures: Sequence[tuple[str, Path]] = (), base: Path | None = None) -> str:
    """The report as Markdown; ``figures`` (title, path) are linked relative to ``base``."""
    s, c = report.summary(), report.config
    lines = [
        "# qera quantization report", "",
        f"- method **{c.method}**, format **{c.format}**, "
        f"{_rank_text(c)}, rounding {c.rounding}, pipeline {s['pipeline']}",
        f"- {s['layers']} layers, {s['params']:,} weights: {s['bits_weight']:.3f} bits/weight, "
        f"{s['bits_total']:.3f} with the low-rank term",
        f"- mean output error after / before: {_fmt(s['mean_output_error_ratio'])}",
        f"- calibration: {s['calibration_tokens']:,} tokens, {s['calibration_seconds']:.1f} s; "
        f"solve {s['solve_seconds']:.1f} s",
    ]
    lines += [f"- note: {n}" for n in report.notes]
    if not figures:
        lines.append("- figures: skipped (install matplotlib: `pip install qera[plot]`)")
    lines += ["", "## By layer type", "", "| type | layers | rank | bits (+AB) | output err. ratio | weight err. ratio | solve s |",
              "|---|---:|---|---:|---:|---:|---:|"]
    for r in by_type(report.layers):
        lines.append(f"| {r['type']} | {r['layers']} | {','.join(map(str, r['rank']))} | {r['bits_total']:.3f} | "
                     f"{_fmt(r['output_error_ratio'])} | {_fmt(r['weight_error_ratio'])} | {r['seconds']:.2f} |")
    lines += coverage_lines(report.layers)
    for title, path in figures:
        rel = path.relative_to(base) if base is not None else path
        lines += ["", f"## {title}", "", f"![{title}]({rel.as_posix()})"]
    lines += ["", "## Layers", "", "| layer | shape | rank | bits (+AB) | output err. before | after | ratio | tokens | s | note |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for lay in report.layers:
        lines.append(
            f"| {lay.name} | {lay.shape[0]}×{lay.shape[1]} | {lay.rank} | {lay.bits_total:.3f} | "
            f"{_fmt(lay.output_error_before, '.4g')} | {_fmt(lay.output_error_after, '.4g')} | "
            f"{_fmt(_ratio(lay.output_error_after, lay.output_error_before))} | {lay.tokens if lay.tokens is not None else '–'} | "
            f"{lay.seconds:.2f} | {lay.note or ''} |")
    return "\n".join(lines) + "\n"


def write_report(report: QuantReport, path: str | Path) -> Path:
    """Write ``path`` as JSON (``.json``) or Markdown (``.md``: plus the JSON beside it and PNGs in ``<stem>_files/``)."""
    path = Path(path)
    if path.suffix.lower() != ".md":
        write_text(path, report.to_json())
        return path
    write_text(path.with_suffix(".json"), report.to_json())
    figures = _figures(report, path.parent / f"{path.stem}_files")
    write_text(path, render_markdown(report, figures, base=path.parent))
    log.info("report written to %s", path)
    return path
