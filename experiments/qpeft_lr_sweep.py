"""Issue 11 §5: a learning-rate sweep of every QPEFT init on STS-B (MiniLM-L6, quantized base).

Each (setting, init, lr, seed) is one ``qera finetune`` run in its own process; ``--workers N`` runs
N at once (on a GPU machine they share the GPU: MiniLM-L6 uses a fraction of it), each with
``--threads`` CPU threads. Finished runs (a ``result.json``) are skipped, so an interrupted sweep
resumes where it stopped. Then ``--summarize`` writes, from whatever has finished:

- ``best_lr.md`` / ``best_lr.json``: per setting and init, the lr with the best mean final
  Pearson/Spearman average over seeds, with its mean ± std and the step-0 value;
- ``lr_sensitivity.png``: final metric against lr (mean ± std over seeds), one panel per setting.

    python experiments/qpeft_lr_sweep.py --out runs/stsb_lr --workers 8          # the issue's sweep
    python experiments/qpeft_lr_sweep.py --out runs/stsb_lr --summarize
    # a reduced grid (one seed), then more seeds at each init's best lr:
    python experiments/qpeft_lr_sweep.py --out runs/stsb_lr_cpu --epochs 1 --seeds 0 --no-lora16
    python experiments/qpeft_lr_sweep.py --out runs/stsb_lr_cpu --epochs 1 --confirm-seeds 1,2 --no-lora16

``--confirm-seeds`` picks each init's ``--confirm-top`` lrs on the seeds every lr has; the reported best
lr is then the highest mean among the lrs run with the most seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

DATA = Path(os.environ.get("QERA_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
STSB = (DATA / "glue" / "STS-B" / "train.tsv", DATA / "glue" / "STS-B" / "dev.tsv")


@dataclass(frozen=True)
class Run:
    fmt: str
    rank: int
    init: str
    lr: float
    seed: int

    @property
    def setting(self) -> str:
        return f"{self.fmt.replace(':', '_')}-r{self.rank}" if self.init != "lora" else f"lora16-r{self.rank}"

    def dir(self, root: Path) -> Path:
        return root / self.setting / self.init / f"lr{self.lr:g}" / f"seed{self.seed}"


def plan(settings: list[tuple[str, int]], inits: list[str], lrs: list[float], seeds: list[int],
         lora16: bool) -> list[Run]:
    """Every run of the sweep, in the order they run: per setting, lr by lr in the given order (so an
    interrupted sweep has compared every init at its first lrs), then seeds; the 16-bit LoRA
    reference once per lr and seed at the first rank."""
    runs = [Run(f, r, i, lr, s) for f, r in settings for s in seeds for lr in lrs for i in inits]
    if lora16:
        runs += [Run("none", settings[0][1], "lora", lr, s) for lr in lrs for s in seeds]
    return runs


def command(run: Run, out: Path, args: argparse.Namespace) -> list[str]:
    cmd = [args.qera, "finetune", "minilm-l6", "--no-progress", "--overwrite", "--task", "stsb",
           "--train", str(STSB[0]), "--eval", str(STSB[1]), "--init", run.init, "--rank", str(run.rank),
           "--alpha", str(2 * run.rank), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
           "--lr", f"{run.lr:g}", "--seed", str(run.seed), "--out", str(out)]
    if run.init != "lora":
        cmd += ["--format", run.fmt, "--loftq-iters", "5", "--calib-text", str(DATA / "wikitext-2" / "wiki.valid.tokens"),
                "--calib-samples", "64", "--calib-seq-len", "128"]
    if args.train:
        cmd += ["--max-train-samples", str(args.train)]
    return cmd


def execute(runs: list[Run], root: Path, args: argparse.Namespace) -> None:
    todo = [r for r in runs if not (r.dir(root) / "result.json").exists()]
    print(f"{len(runs)} runs, {len(runs) - len(todo)} done, {len(todo)} to go, {args.workers} at a time", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    start = time.time()

    def one(run: Run) -> None:
        out = run.dir(root)
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        with open(out / "log.txt", "w") as log:
            rc = subprocess.call(command(run, out, args), stdout=log, stderr=subprocess.STDOUT, env=env)
        state = "ok" if rc == 0 else f"FAILED rc={rc} (see {out / 'log.txt'})"
        print(f"[{time.time() - start:7.0f}s] {run.setting} {run.init} lr={run.lr:g} seed={run.seed}: "
              f"{state} in {time.time() - t0:.0f}s", flush=True)

    with ThreadPoolExecutor(args.workers) as pool:
        list(pool.map(one, todo))


def _final(result: dict) -> tuple[float, float]:
    key = "eval_" + result["metric"]
    return result["final"][key], result.get("initial", {}).get(key, float("nan"))


def summarize(root: Path) -> dict:
    """Best lr per (setting, init) by mean final metric over seeds, plus the lr curves."""
    groups: dict[tuple[str, str], dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for p in sorted(root.glob("*/*/lr*/seed*/result.json")):
        setting, init, lr = p.parts[-5], p.parts[-4], float(p.parts[-3][2:])
        groups[(setting, init)][lr].append(json.loads(p.read_text()))
    sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
    table = []
    for (setting, init), by_lr in sorted(groups.items()):
        curve = []
        for lr, results in sorted(by_lr.items()):
            fin = [_final(r)[0] for r in results]
            ini = [_final(r)[1] for r in results]
            curve.append({"lr": lr, "seeds": len(fin), "mean": statistics.mean(fin), "std": sd(fin),
                          "initial": statistics.mean(ini), "finals": fin,
                          "by_seed": {r["seed"]: _final(r)[0] for r in results}})
        # screen on the seeds every lr has (what --confirm-seeds picks its lrs from); then the best
        # is the highest mean among the lrs run with the most seeds (the confirmed finalists)
        common = set.intersection(*(set(c["by_seed"]) for c in curve))
        pick = lambda c: statistics.mean(c["by_seed"][k] for k in common) if common else c["mean"]  # noqa: E731
        ranked = sorted(curve, key=pick, reverse=True)
        most = max(c["seeds"] for c in curve)
        best = max((c for c in curve if c["seeds"] == most), key=lambda c: c["mean"])
        table.append({"setting": setting, "init": init, "best_lr": best["lr"], "best": best, "curve": curve,
                      "screened_on_seeds": sorted(common), "ranked_lrs": [c["lr"] for c in ranked]})
    return {"metric": "corr (mean of Pearson and Spearman), STS-B dev", "rows": table}


def confirm_plan(summary: dict, candidates: list[Run], seeds: list[int], top: int = 1) -> list[Run]:
    """More seeds at each (setting, init)'s ``top`` best lrs (chosen on the seeds every lr has):
    ``candidates`` give the format and rank of each setting and init asked for on the command line."""
    ranked = {(r["setting"], r["init"]): r["ranked_lrs"][:top] for r in summary["rows"]}
    runs = {}  # every init's best lr first, then its second best ...: an interrupted run has compared the best
    for k in range(top):
        for s in seeds:
            for c in candidates:
                lrs = ranked.get((c.setting, c.init), [])
                if k < len(lrs):
                    runs[(c.setting, c.init, lrs[k], s)] = Run(c.fmt, c.rank, c.init, lrs[k], s)
    return list(runs.values())


def render(summary: dict, root: Path) -> str:
    lines = ["| setting | init | best lr | seeds | final corr (mean ± std) | step 0 | corr at each lr (mean over its seeds) |",
             "|---|---|---:|---:|---:|---:|---|"]
    for row in summary["rows"]:
        b = row["best"]
        each = ", ".join(f"{c['lr']:g}: {c['mean']:.3f}" for c in row["curve"])
        lines.append(f"| {row['setting']} | {row['init']} | {row['best_lr']:g} | {b['seeds']} | "
                     f"{b['mean']:.4f} ± {b['std']:.4f} | {b['initial']:.4f} | {each} |")
    text = "\n".join(lines) + "\n"
    (root / "best_lr.md").write_text(text)
    (root / "best_lr.json").write_text(json.dumps(summary, indent=1))
    plot(summary, root / "lr_sensitivity.png")
    return text


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [s for s in dict.fromkeys(r["setting"] for r in summary["rows"]) if not s.startswith("lora16")]
    reference = [r for r in summary["rows"] if r["setting"].startswith("lora16")]
    fig, axes = plt.subplots(1, max(1, len(settings)), figsize=(5.5 * max(1, len(settings)), 4), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        for row in [r for r in summary["rows"] if r["setting"] == setting] + reference:
            lrs = [c["lr"] for c in row["curve"]]
            mean = [c["mean"] for c in row["curve"]]
            std = [c["std"] for c in row["curve"]]
            ref = row in reference
            ax.errorbar(lrs, mean, yerr=std, marker="o", capsize=3, label="16-bit lora" if ref else row["init"],
                        linestyle="--" if ref else "-")
        ax.set(xscale="log", xlabel="learning rate", ylabel=summary["metric"].split(",")[0], title=f"STS-B {setting}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/stsb_lr")
    ap.add_argument("--settings", default="mxint3:8,mxint2:block=16:64", help="FORMAT:RANK,... (rank after the last colon)")
    ap.add_argument("--inits", default="qlora,loftq,qera-approx,qera-exact")
    ap.add_argument("--lrs", default="1e-3,3e-4,3e-3,1e-4", help="learning rates, in the order they run")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--train", type=int, help="at most this many training examples (default: the whole train set)")
    ap.add_argument("--no-lora16", action="store_true", help="skip the 16-bit LoRA reference")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    ap.add_argument("--qera", default=str(Path(sys.executable).with_name("qera")))
    ap.add_argument("--summarize", action="store_true", help="only summarize what has finished")
    ap.add_argument("--confirm-seeds", help="instead of the grid: run these seeds (e.g. 1,2) at each setting and "
                    "init's best lr so far (chosen on the seeds every lr has)")
    ap.add_argument("--confirm-top", type=int, default=1, help="with --confirm-seeds: at this many best lrs")
    args = ap.parse_args(argv)
    root = Path(args.out)
    if not args.summarize:
        settings = [(s.rsplit(":", 1)[0], int(s.rsplit(":", 1)[1])) for s in args.settings.split(",")]
        runs = plan(settings, args.inits.split(","), [float(x) for x in args.lrs.split(",")],
                    [int(x) for x in args.seeds.split(",")], not args.no_lora16)
        if args.confirm_seeds:
            runs = confirm_plan(summarize(root), runs, [int(x) for x in args.confirm_seeds.split(",")],
                                args.confirm_top)
        execute(runs, root, args)
    print(render(summarize(root), root))


if __name__ == "__main__":
    main()
