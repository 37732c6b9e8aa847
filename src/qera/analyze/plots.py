"""PNG figures of the analyses (matplotlib, headless; the style of :mod:`qera.evaluate.plots`)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch

from qera.evaluate.plots import _color, _finish, _plt, _save


def plot_calib_size(rows: Sequence[Mapping], fp: float | None, path: str | Path, title: str = "") -> Path:
    """Perplexity (left) and mean layer output-error ratio (right) vs calibration windows, log x."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        sel = sorted((r for r in rows if r["method"] == method), key=lambda r: r["samples"])
        xs = [r["samples"] for r in sel]
        ax1.plot(xs, [r["perplexity"] for r in sel], marker="o", label=method, color=_color(method))
        oe = [(r["samples"], r["mean_output_error_ratio"]) for r in sel if r["mean_output_error_ratio"] is not None]
        if oe:
            ax2.plot(*zip(*oe), marker="o", label=method, color=_color(method))
    if fp is not None:
        ax1.axhline(fp, color="k", ls="--", lw=1, label=f"fp ({fp:.2f})")
    sizes = sorted({r["samples"] for r in rows})
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.minorticks_off()
    ax1.set(xlabel="calibration windows", ylabel="perplexity", title="perplexity")
    ax2.set(xlabel="calibration windows", ylabel="mean output error after / before",
            title="layer output error (in-sample)")
    _finish(fig, (ax1, ax2), title)
    return _save(fig, plt, path)


def plot_rank_sweep(rows: Sequence[Mapping], fp: float | None, path: str | Path, title: str = "") -> Path:
    """Perplexity vs total bits per weight: one panel per format, one line per method (rank-0 point shared)."""
    plt = _plt()
    formats = list(dict.fromkeys(r["format"] for r in rows))
    fig, axes = plt.subplots(1, max(1, len(formats)), figsize=(5.5 * max(1, len(formats)), 4.2), squeeze=False)
    axes = list(axes[0])
    for ax, fmt in zip(axes, formats):
        sel = [r for r in rows if r["format"] == fmt]
        base = [r for r in sel if r["rank"] == 0]
        for method in dict.fromkeys(r["method"] for r in sel if r["rank"] > 0):
            pts = sorted(base + [r for r in sel if r["method"] == method], key=lambda r: r["rank"])
            ax.plot([r["bits_total"] for r in pts], [r["perplexity"] for r in pts], marker="o", label=method,
                    color=_color(method))
            for r in pts:
                if r["rank"] > 0 and method == list(dict.fromkeys(x["method"] for x in sel if x["rank"] > 0))[-1]:
                    ax.annotate(f"r{r['rank']}", (r["bits_total"], r["perplexity"]), textcoords="offset points",
                                xytext=(3, 4), fontsize=7)
        for r in base:
            ax.plot([r["bits_total"]], [r["perplexity"]], marker="s", color="gray", ls="none", label="w-only (rank 0)")
        if fp is not None:
            ax.axhline(fp, color="k", ls="--", lw=1, label=f"fp ({fp:.2f})")
        ax.set(xlabel="total bits per weight (W̃ + 16-bit A, B)", ylabel="perplexity", title=fmt)
        ppl = [r["perplexity"] for r in sel] + ([fp] if fp else [])
        if ppl and min(ppl) > 0 and max(ppl) / min(ppl) > 3:  # log only when the range needs it
            ax.set_yscale("log")
    _finish(fig, axes, title)
    return _save(fig, plt, path)


def plot_autocorr_heatmaps(maps: Mapping[str, torch.Tensor], path: str | Path, title: str = "") -> Path:
    """``|R'|`` of a few layers (rows: blocks, columns: distinct inputs), colour scale [0, 1]."""
    plt = _plt()
    from qera.analyze.common import layer_depth

    blocks = list(dict.fromkeys(layer_depth(n) for n in maps))
    cols = max((sum(1 for n in maps if layer_depth(n) == b) for b in blocks), default=1)
    fig, axes = plt.subplots(len(blocks) or 1, cols, figsize=(3.1 * cols, 3.0 * max(1, len(blocks))), squeeze=False)
    im = None
    for i, b in enumerate(blocks):
        names = [n for n in maps if layer_depth(n) == b]
        for j in range(cols):
            ax = axes[i][j]
            if j >= len(names):
                ax.axis("off")
                continue
            n = names[j]
            im = ax.imshow(maps[n].numpy(), cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(".".join(n.split(".")[-3:]), fontsize=8)
            ax.set_xticks([]); ax.set_yticks([])
    if im is not None:
        fig.colorbar(im, ax=[a for row in axes for a in row], shrink=0.6, label="|R'| (block mean)")
    fig.suptitle(title)
    return _save(fig, plt, path)


def plot_autocorr_summary(rows: Sequence[Mapping], path: str | Path, title: str = "") -> Path:
    """Off-diagonal share vs depth per layer group (left); relative gap of qera-approx over qera-exact
    vs off-diagonal share (right, log y)."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    groups = list(dict.fromkeys(r["group"] for r in rows))
    for i, g in enumerate(groups):
        sel = [r for r in rows if r["group"] == g]
        by_depth: dict[int, float] = {}
        for r in sel:
            if r["depth"] is not None:
                by_depth.setdefault(r["depth"], r["offdiag_share"])
        if by_depth:
            ax1.plot(sorted(by_depth), [by_depth[d] for d in sorted(by_depth)], marker=".", label=g, color=f"C{i}")
        pts = [(r["offdiag_share"], r["gap_relative"]) for r in sel if r["gap_relative"] and r["gap_relative"] > 0]
        if pts:
            ax2.scatter(*zip(*pts), s=14, label=g, color=f"C{i}")
    ax1.set(xlabel="block", ylabel="off-diagonal share of ‖R'‖²", title="distance of R from diagonal", ylim=(0, 1))
    ax2.set(xlabel="off-diagonal share of ‖R'‖²", ylabel="err(qera-approx) / err(qera-exact) − 1",
            title="what the exact solve gains")
    if any(r["gap_relative"] and r["gap_relative"] > 0 for r in rows):
        ax2.set_yscale("log")
    _finish(fig, (ax1, ax2), title)
    return _save(fig, plt, path)
