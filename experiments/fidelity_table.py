"""The fidelity table of SmolLM2-135M (README): every rounding × method × rank choice measured under
the README's PTQ protocol, gathered from the experiments' result files, best per setting marked.

    python experiments/fidelity_table.py [--results experiments/results]

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
    ("RTN → qera-exact, sequential, quantized inputs", "qera-exact", "rtn", "uniform", "sequential"),
    ("GPTQ → w-only, sequential, quantized inputs", "w-only", "gptq", "uniform", "sequential"),
    ("GPTQ → qera-exact, sequential, quantized inputs", "qera-exact", "gptq", "uniform", "sequential"),
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    folder = Path(args.results)
    fp = next((r["perplexity"] for r in _load(folder / "ptq_gptq_smollm2.json") if r.get("method") == "fp32"), None)
    print(render(collect(folder), fp))


if __name__ == "__main__":
    main()
