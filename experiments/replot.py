"""Redraw the docs figures whose raw rows are committed, from those rows alone (no model is run).

    python experiments/replot.py            # every figure below, into docs/figures/
    python experiments/replot.py --out DIR  # somewhere else (e.g. to compare)

The rows come from ``experiments/results/`` (written by the commands named in the docs pages:
``qera output-error``, ``qera analyze calib-size | rank | autocorrelation``), so a change to the
plotting code is shown on the published figures without re-running hours of CPU work. The
autocorrelation heat maps need the matrices themselves and are drawn only by
``qera analyze autocorrelation``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qera.analyze.plots import plot_autocorr_summary, plot_calib_size, plot_rank_sweep
from qera.evaluate.plots import plot_output_error

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def replot(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for source, stem, model in (("output_error_smollm2-135m.json", "smollm2", "smollm2-135m"),
                                ("output_error_minilm-l6.json", "minilm", "minilm-l6")):
        rows = _load(source)["rows"]
        for fmt in dict.fromkeys(r["format"] for r in rows):
            short = fmt.split(":")[0]
            if stem == "minilm" and short != "mxint2":
                continue  # the docs show MiniLM at 2 bits only
            written.append(plot_output_error([r for r in rows if r["format"] == fmt],
                                             out / f"output_error_{stem}_{short}.png",
                                             title=f"{model} {fmt}: output error before training"))
    d = _load("analyze_calib_size.json")
    name = Path(d["model"]).name
    written.append(plot_calib_size(d["rows"], d["fp_perplexity"], out / f"{name.split('-')[0]}_calib_size.png",
                                   title=f"{name} {d['format']} rank {d['rank']}: calibration size"))
    d = _load("analyze_rank.json")
    written.append(plot_rank_sweep(d["rows"], d["fp_perplexity"], out / f"{name.split('-')[0]}_rank_sweep.png",
                                   title=f"{Path(d['model']).name}: perplexity vs bits per weight"))
    d = _load("analyze_autocorrelation.json")
    written.append(plot_autocorr_summary(
        d["layers"], out / f"{name.split('-')[0]}_autocorr_summary.png",
        title=f"{Path(d['model']).name} {d['format']} rank {d['rank']}: off-diagonal share and qera-exact gain"))
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
    for path in replot(ap.parse_args().out):
        print(path)


if __name__ == "__main__":
    main()
