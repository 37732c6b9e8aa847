"""Mean ± std of the final (and step-0) eval metric per task/setting/init, and one curves PNG per
task/setting (mean ± std over seeds, the 16-bit reference included), from the result.json files
written by experiments/qpeft_glue.sh or experiments/qpeft_clm.sh.

    python experiments/summarize_glue.py runs/qpeft_glue
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from qera.evaluate.plots import plot_seed_curves


def main(root: str) -> None:
    groups: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for p in sorted(Path(root).glob("*/*/*/seed*/result.json")):
        task, setting, init = p.parts[-5], p.parts[-4], p.parts[-3]
        groups[(task, setting, init)].append(json.loads(p.read_text()))
    print(f"{'task':<5} {'setting':<16} {'init':<12} {'seeds':>5} {'step 0':>16} {'final':>16}")
    for (task, setting, init), runs in sorted(groups.items()):
        metric = "eval_" + runs[0]["metric"]
        fin = [r["final"][metric] for r in runs]
        ini = [r["initial"][metric] for r in runs if "initial" in r]
        sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
        print(f"{task:<5} {setting:<16} {init:<12} {len(runs):>5} "
              f"{statistics.mean(ini):>8.4f} ± {sd(ini):.4f} {statistics.mean(fin):>8.4f} ± {sd(fin):.4f}")
    by_plot: dict[tuple[str, str], dict[str, list[dict]]] = defaultdict(dict)
    for (task, setting, init), runs in sorted(groups.items()):
        by_plot[(task, setting)][init] = runs
    reference = {task: runs for (task, setting), runs in by_plot.items() if setting.startswith("lora16")}
    for (task, setting), runs in by_plot.items():
        if setting.startswith("lora16"):
            continue
        runs = {**runs, **{f"16-bit {k}": v for k, v in reference.get(task, {}).items()}}
        metric = next(iter(runs.values()))[0]["metric"]
        model = next(iter(runs.values()))[0].get("model", "")
        plot_seed_curves(runs, metric, Path(root) / f"curves_{task}_{setting}.png", title=f"{model} {task} {setting}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/qpeft_glue")
