"""PNG figures (matplotlib, headless): training curves and output error versus rank."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from qera.core.methods import method_names
from qera.util.atomic import write_figure


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(runs: Mapping[str, Sequence[dict]], metric: str, path: str | Path, title: str = "") -> Path:
    """Train loss (left) and ``metric`` (right) against step, one line per run label."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, history in runs.items():
        tr = [(h["step"], h["loss"]) for h in history if "loss" in h and "eval_" + metric not in h]
        ev = [(h["step"], h["eval_" + metric]) for h in history if "eval_" + metric in h]
        if tr:
            ax1.plot(*zip(*tr), label=label)
        if ev:
            ax2.plot(*zip(*ev), marker="o", label=label)
    ax1.set(xlabel="step", ylabel="train loss", title="training loss")
    ax2.set(xlabel="step", ylabel=metric, title=f"eval {metric}")
    _finish(fig, (ax1, ax2), title)
    return _save(fig, plt, path)


# QPEFT's zero init, every method that adds a low-rank term in the registry's order, 16-bit LoRA
_INIT_ORDER = ("qlora", *method_names(uses_rank=True), "lora")


def _color(label: str) -> str | None:
    """A fixed colour per adapter init, so the same method looks the same in every figure."""
    name = label.removeprefix("16-bit ")
    return f"C{_INIT_ORDER.index(name)}" if name in _INIT_ORDER else None


def _mean_std(series: Sequence[Sequence[tuple[float, float]]]) -> tuple[list[float], list[float], list[float]]:
    """Steps present in every series, with the mean and standard deviation of the values there."""
    import statistics

    common = set.intersection(*(set(x for x, _ in s) for s in series)) if series else set()
    steps = sorted(common)
    vals = [[dict(s)[x] for s in series] for x in steps]
    return steps, [statistics.fmean(v) for v in vals], [statistics.pstdev(v) for v in vals]


def plot_seed_curves(groups: Mapping[str, Sequence[dict]], metric: str, path: str | Path, title: str = "") -> Path:
    """Like :func:`plot_curves`, over several seeds: mean line and ±1 std band per label.

    ``groups`` maps a label to run results (``result.json`` contents: ``history`` and ``initial``);
    the eval curve starts at step 0 (``initial``), where the initializations differ.
    """
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    key = "eval_" + metric
    for label, runs in groups.items():
        tr = [[(h["step"], h["loss"]) for h in r["history"] if "loss" in h and key not in h] for r in runs]
        ev = [[(0, r["initial"][key])] * ("initial" in r) + [(h["step"], h[key]) for h in r["history"] if key in h]
              for r in runs]
        for ax, series in ((ax1, tr), (ax2, ev)):
            steps, mean, std = _mean_std([s for s in series if s])
            if not steps:
                continue
            (line,) = ax.plot(steps, mean, marker="o" if ax is ax2 else None, label=f"{label} (n={len(runs)})",
                              color=_color(label))
            ax.fill_between(steps, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)],
                            color=line.get_color(), alpha=0.15)
    ax1.set(xlabel="step", ylabel="train loss", title="training loss (mean ± std over seeds)")
    ax2.set(xlabel="step", ylabel=metric, title=f"eval {metric} (mean ± std over seeds)")
    if metric == "perplexity":
        ax2.set_yscale("log")
    _finish(fig, (ax1, ax2), title)
    return _save(fig, plt, path)


def _finish(fig, axes, title: str) -> None:
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()


def _save(fig, plt, path, dpi: int = 120) -> Path:
    """Write ``fig`` atomically (the format from the suffix) and close it, whatever happened."""
    try:
        return write_figure(path, fig, dpi=dpi)
    finally:
        plt.close(fig)


def plot_output_error(rows: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Output error vs rank per init (left) and, for inits measured per iteration (LoftQ), error vs
    iterations per rank (right).

    One row of panels per metric: the output MSE, and the KL to the full-precision model when the
    rows have it (causal LMs; logits are only defined up to a per-token shift, which KL ignores).
    """
    plt = _plt()
    metrics = [("logit_mse", "output MSE")] + ([("kl", "KL(fp ‖ init)")] if rows and all("kl" in r for r in rows) else [])
    fig, axes = plt.subplots(len(metrics), 2, figsize=(11, 4 * len(metrics)), squeeze=False)
    # inits measured per iteration (rows with "iters": LoftQ): their rank curve is at the last iteration
    iterated = sorted({r["init"] for r in rows if r.get("iters")})
    last_iter = {i: max(r["iters"] for r in rows if r["init"] == i) for i in iterated}
    ranks = sorted({r["rank"] for r in rows})
    for (key, label), (ax1, ax2) in zip(metrics, axes):
        for init in sorted({r["init"] for r in rows}):
            pts = sorted((r["rank"], r[key]) for r in rows
                         if r["init"] == init and (init not in last_iter or r["iters"] == last_iter[init]))
            ax1.plot(*zip(*pts), marker="o", label=f"{init} ({last_iter[init]} it.)" if init in last_iter else init,
                     color=_color(init))
        for init in iterated:
            for rank in sorted({r["rank"] for r in rows if r["init"] == init}):
                pts = sorted((r["iters"], r[key]) for r in rows if r["init"] == init and r["rank"] == rank)
                ax2.plot(*zip(*pts), marker="o", label=f"rank {rank}" if len(iterated) == 1 else f"{init} rank {rank}")
        ax1.set(xlabel="rank", ylabel=label, yscale="log", title=f"{label} before training")
        ax1.set_xscale("log", base=2)
        ax1.set_xticks(ranks, [str(r) for r in ranks])
        who = ", ".join(iterated) or "iterating inits"
        ax2.set(xlabel="iterations", ylabel=label, yscale="log", title=f"{who}: {label}")
        ax2.xaxis.get_major_locator().set_params(integer=True)
    _finish(fig, axes.ravel(), title)
    return _save(fig, plt, path)
