"""PNG figures (matplotlib, headless): training curves and output error versus rank."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence


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
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_output_error(rows: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Output error vs rank per init (left) and LoftQ error vs iterations per rank (right)."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    inits = sorted({r["init"] for r in rows if r["init"] != "loftq" or r.get("iters") == max(x.get("iters", 0) for x in rows)})
    for init in inits:
        pts = sorted((r["rank"], r["logit_mse"]) for r in rows if r["init"] == init and (init != "loftq" or r["iters"] == max(x.get("iters", 0) for x in rows if x["init"] == "loftq")))
        ax1.plot(*zip(*pts), marker="o", label=init)
    for rank in sorted({r["rank"] for r in rows if r["init"] == "loftq"}):
        pts = sorted((r["iters"], r["logit_mse"]) for r in rows if r["init"] == "loftq" and r["rank"] == rank)
        ax2.plot(*zip(*pts), marker="o", label=f"rank {rank}")
    ax1.set(xlabel="rank", ylabel="output MSE", xscale="log", yscale="log", title="output error before training")
    ax2.set(xlabel="LoftQ iterations", ylabel="output MSE", yscale="log", title="LoftQ")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
