"""Closed form against refined, per setting, from the committed refinement rows (no model is run).

    python experiments/plot_refinement.py   # docs/figures/refinement_smollm2.png

Each pair of bars is one setting of ``experiments/refine_smollm2.py`` (same format, bits and
calibration): the closed-form row and its refined row, test perplexity on a log axis, fp32 as a line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"

# (label, (file, closed-form row), (file, refined row)); a row is matched on its "row" field, or for
# the README's fidelity table (ptq_fidelity_smollm2.json) on the fields given as a dict
BEST_CLOSED = {"method": "qera-iter", "rounding": "gptq", "format": "mxint3", "budget": "b8", "output_weight": "fisher",
               "pipeline": "oneshot"}
PAIRS = [
    ("mxint3, rank 8\n32 windows", ("refine_smollm2.json", "mxint3@8"),
     ("refine_smollm2_rounding.json", "mxint3@8:refine=24,train=lowrank+rounding")),
    ("mxint3, budget 8\now=block\n32 windows", ("refine_smollm2_block_weight.json", "mxint3@8:budget=8,ow=block"),
     ("refine_smollm2_ow_block_refine.json", "mxint3@8:budget=8,ow=block,refine=24,train=lowrank+rounding")),
    ("mxint3, budget 8\n128 windows: best closed\nform vs ow=block, 96 steps", ("ptq_fidelity_smollm2.json", BEST_CLOSED),
     ("refine_smollm2_128_b.json", "mxint3@8:budget=8,ow=block,refine=96,train=lowrank+rounding")),
    ("mxint4, rank 8 vs\nbudget 8, ow=block\n32 windows", ("refine_smollm2_gptq_mxint4.json", "mxint4@8"),
     ("refine_smollm2_gptq_mxint4.json", "mxint4@8:budget=8,ow=block,refine=24,train=lowrank+rounding")),
    ("int2 g64, rank 16", ("refine_smollm2_2bit.json", "int2:group=64:asym@16"),
     ("refine_smollm2_2bit.json", "int2:group=64:asym@16:refine=24,train=lowrank+rounding")),
    ("mxint2, rank 16", ("refine_smollm2_2bit_b.json", "mxint2@16"),
     ("refine_smollm2_2bit_b.json", "mxint2@16:refine=24,train=lowrank+rounding")),
    ("int2 g64, rank 64", ("refine_smollm2_2bit_b.json", "int2:group=64:asym@64"),
     ("refine_smollm2_2bit_b.json", "int2:group=64:asym@64:refine=24,train=lowrank+rounding")),
]


def _ppl(name: str, key) -> float | None:
    """Test perplexity of the row ``key`` of ``experiments/results/name`` (None when absent)."""
    path = RESULTS / name
    if not path.is_file():
        return None
    for r in json.loads(path.read_text())["rows"]:
        if (r.get("row") == key) if isinstance(key, str) else all(r.get(k) == v for k, v in key.items()):
            return r.get("test_ppl", r.get("perplexity"))
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "figures" / "refinement_smollm2.png"))
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, closed, refined = [], [], []
    for label, c_key, r_key in PAIRS:
        c, r = _ppl(*c_key), _ppl(*r_key)
        if c is None or r is None:
            continue
        labels.append(label); closed.append(c); refined.append(r)
    fig, ax = plt.subplots(figsize=(12, 4.6))
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], closed, 0.4, label="closed form", color="#9aa5b1")
    ax.bar([x + 0.2 for x in xs], refined, 0.4, label="refined (lowrank + rounding)", color="#2f6db3")
    for x, c, r in zip(xs, closed, refined):
        ax.text(x - 0.2, c, f"{c:.0f}", ha="center", va="bottom", fontsize=8)
        ax.text(x + 0.2, r, f"{r:.0f}", ha="center", va="bottom", fontsize=8)
    ax.axhline(28.40, color="k", lw=0.8, ls="--", label="fp32 (28.40)")
    ax.set_yscale("log")
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("WikiText-2 test perplexity (40 × 512)")
    ax.set_title("SmolLM2-135M: closed form vs block-wise refinement (lowrank + rounding offsets)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(args.out)


if __name__ == "__main__":
    main()
