"""The fidelity table of SmolLM2-135M (README): every rounding × method × rank choice measured under
the README's PTQ protocol, gathered from the experiments' result files, best per setting marked.

    python experiments/fidelity_table.py [--results experiments/results] [--plot docs/fidelity_smollm2.png]

Reads ``ptq_gptq_smollm2*.json``, ``ptq_allocation_smollm2.json``, ``ptq_fidelity_smollm2.json``
(rows of ``ptq_allocation.py``) and ``ptq_sequential_smollm2.json``. A cell shows perplexity and
solve seconds; rows not measured show "–".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SETTINGS = [("mxint3", 8), ("mxint4", 8), ("mxint3", 64)]
BITS_W = {"mxint3": 3.25, "mxint4": 4.25}
ROWS = [  # (label, method, rounding, ranks, pipeline)
    ("RTN → w-only", "w-only", "rtn", "uniform", "oneshot"),
    ("GPTQ → w-only", "w-only", "gptq", "uniform", "oneshot"),
    ("RTN → qera-exact", "qera-exact", "rtn", "uniform", "oneshot"),
    ("GPTQ → qera-exact", "qera-exact", "gptq", "uniform", "oneshot"),
    ("RTN → qera-iter", "qera-iter", "rtn", "uniform", "oneshot"),
    ("GPTQ → qera-iter", "qera-iter", "gptq", "uniform", "oneshot"),
    ("RTN → qera-exact, fisher-allocated", "qera-exact", "rtn", "fisher", "oneshot"),
    ("GPTQ → qera-exact, fisher-allocated", "qera-exact", "gptq", "fisher", "oneshot"),
    ("GPTQ → qera-iter, fisher-allocated", "qera-iter", "gptq", "fisher", "oneshot"),
    ("RTN → qera-exact, fisher-weighted outputs", "qera-exact", "rtn", "uniform+fisher", "oneshot"),
    ("RTN → qera-exact, fisher-weighted outputs, allocated", "qera-exact", "rtn", "auto+fisher", "oneshot"),
    ("GPTQ → qera-exact, fisher-weighted outputs, allocated", "qera-exact", "gptq", "auto+fisher", "oneshot"),
    ("GPTQ → qera-iter, fisher-weighted outputs, allocated", "qera-iter", "gptq", "auto+fisher", "oneshot"),
    ("GPTQ → qera-iter (8 it.), fisher-weighted outputs, allocated", "qera-iter", "gptq", "auto+fisher+it8", "oneshot"),
    ("GPTQ → qera-iter, K-FAC-weighted outputs, allocated", "qera-iter", "gptq", "auto+kfac", "oneshot"),
    ("RTN → qera-exact, sequential, quantized inputs", "qera-exact", "rtn", "uniform", "sequential"),
    ("GPTQ → w-only, sequential, quantized inputs", "w-only", "gptq", "uniform", "sequential"),
    ("GPTQ → qera-exact, sequential, quantized inputs", "qera-exact", "gptq", "uniform", "sequential"),
    ("GPTQ → qera-iter, fisher-weighted outputs, allocated per block, sequential, quantized inputs", "qera-iter",
     "gptq", "auto+fisher", "sequential"),
]


def _load(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    d = json.loads(path.read_text())
    return d["rows"] if isinstance(d, dict) else d


def collect(folder: Path) -> dict[tuple, dict]:
    """``{(method, rounding, ranks, pipeline, format, rank): {perplexity, seconds, bits_total}}``."""
    cells: dict[tuple, dict] = {}

    def put(key, ppl, seconds, bits):
        cells[key] = {"perplexity": ppl, "seconds": seconds, "bits_total": bits}

    for name in ("ptq_gptq_smollm2.json", "ptq_gptq_smollm2_wonly.json"):
        for r in _load(folder / name):
            if r.get("method") == "fp32":
                continue
            for fmt, rank in SETTINGS:  # w-only has no rank: the same row serves every setting of its format
                if r["format"] == fmt and (r["rank"] == rank or r["method"] == "w-only"):
                    put((r["method"], r["rounding"], "uniform", "oneshot", fmt, rank), r["perplexity"],
                        r["solve_seconds"], r["bits_total"] if r["method"] != "w-only" else BITS_W[fmt])
    for name in ("ptq_allocation_smollm2.json", "ptq_fidelity_smollm2.json"):
        for r in _load(folder / name):
            n = int(r["budget"][1:])
            ranks = "uniform" if r["budget"][0] == "u" else r["normalize"]
            if r.get("output_weight", "none") != "none":  # the layers' objectives weighted by the loss's gradients
                ranks = f"{ranks}+{r['output_weight']}"
            if r.get("iters") is not None:  # qera-iter with other than its default 4 iterations
                ranks = f"{ranks}+it{r['iters']}"
            pipeline = "sequential" if r.get("pipeline", "oneshot").startswith("sequential") else "oneshot"
            for fmt, rank in SETTINGS:
                if r["format"] == fmt and (n == rank or r["method"] == "w-only"):
                    put((r["method"], r["rounding"], ranks, pipeline, fmt, rank), r["perplexity"], r["solve_seconds"],
                        r["bits_total"])
    for r in _load(folder / "ptq_sequential_smollm2.json"):
        if "@" not in r["setting"]:
            continue
        fmt, rank = r["setting"].split("@")
        pipeline = "sequential" if r["pipeline"] == "sequential" and r["propagate"] == "quantized" else "oneshot"
        key = ("qera-exact", "rtn", "uniform", pipeline, fmt, int(rank))
        if (r["pipeline"], r["propagate"]) != ("sequential", "fp") and key not in cells:  # seconds: with calibration
            put(key, r["perplexity"], r["quantize_seconds"], r["bits_total"])
    return cells


def render(cells: dict[tuple, dict], fp: float | None) -> str:
    bits = []
    for fmt, rank in SETTINGS:
        b = [c["bits_total"] for k, c in cells.items() if k[4:] == (fmt, rank) and k[0] != "w-only"]
        bits.append(f"{max(b):.2f}" if b else "?")
    head = " | ".join(f"{f} r{r}: W̃ {BITS_W[f]:.2f}, total {b} bits" for (f, r), b in zip(SETTINGS, bits))
    lines = [f"| W̃ rounding → method | {head} |", "|---|" + "---:|" * len(SETTINGS)]
    best = {}
    for fmt, rank in SETTINGS:
        vals = [(c["perplexity"], k) for k, c in cells.items() if k[4:] == (fmt, rank) and k[0] != "w-only"]
        if vals:
            best[(fmt, rank)] = min(vals)[1]
    for label, method, rounding, ranks, pipeline in ROWS:
        row = []
        for fmt, rank in SETTINGS:
            key = (method, rounding, ranks, pipeline, fmt, rank)
            c = cells.get(key)
            if c is None:
                row.append("–")
                continue
            text = f"{c['perplexity']:.2f} ({c['seconds']:.0f} s)"
            row.append(f"**{text}**" if best.get((fmt, rank)) == key else text)
        if any(c != "–" for c in row):  # rows never measured are left out
            lines.append(f"| {label} | " + " | ".join(row) + " |")
    if fp is not None:
        lines.append(f"\n(fp32: {fp:.2f}; cells: perplexity (solve seconds); w-only rows have W̃'s bits only)")
    return "\n".join(lines)


def plot(cells: dict[tuple, dict], fp: float | None, path: Path) -> Path:
    """One panel per setting: a bar per measured row (perplexity, log scale), the best one dark, fp32 dashed."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SETTINGS), figsize=(5.2 * len(SETTINGS), 6), sharey=True)
    labels = [r[0] for r in ROWS]
    for ax, (fmt, rank) in zip(axes, SETTINGS):
        vals = [cells.get((m, rd, rk, pl, fmt, rank), {}).get("perplexity") for _, m, rd, rk, pl in ROWS]
        measured = [v for v in vals if v is not None]
        best = min(v for (_, m, *_), v in zip(ROWS, vals) if v is not None and m != "w-only") if measured else None
        ys = list(range(len(ROWS)))
        ax.barh(ys, [v or 0 for v in vals], color=["#1f4e79" if v == best else "#8fb3d9" for v in vals])
        for y, v in zip(ys, vals):
            ax.text(v * 1.03 if v else 1.05 * (fp or 1), y, f"{v:.1f}" if v else "not run", va="center", fontsize=8,
                    color="black" if v else "grey")
        if fp is not None:
            ax.axvline(fp, ls="--", color="grey", lw=1)
        ax.set_xscale("log")
        hi = max(measured) if measured else 100
        ax.set_xticks([t for t in (30, 40, 60, 100, 200, 400) if t <= hi * 1.3])
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"{fmt} (W̃ {BITS_W[fmt]:.2f} bits), rank {rank} or its budget")
        ax.set_xlabel("WikiText-2 perplexity (log; dashed: fp32)")
    axes[0].set_yticks(range(len(ROWS)), labels, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle("SmolLM2-135M: every fidelity choice (dark: best per setting)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--plot", help="also draw the table as a PNG here")
    args = ap.parse_args()
    folder = Path(args.results)
    fp = next((r["perplexity"] for r in _load(folder / "ptq_gptq_smollm2.json") if r.get("method") == "fp32"), None)
    cells = collect(folder)
    print(render(cells, fp))
    if args.plot:
        print(f"figure: {plot(cells, fp, Path(args.plot))}")


if __name__ == "__main__":
    main()
