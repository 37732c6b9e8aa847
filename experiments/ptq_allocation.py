"""SmolLM2-135M: ranks allocated across layers under a parameter budget, against the same rank everywhere.

Same protocol as the README's PTQ table (experiments/_protocol.py). One calibration pass (Σxᵀx of
every layer) serves every run (``--stats FILE`` keeps it for the next invocation). Each run is ``METHOD:ROUNDING:FORMAT:BUDGET[:NORMALIZE]``; BUDGET
``uN`` is rank N on every layer, ``bN`` a budget of the A/B parameters of rank N everywhere; a
trailing ``:seqq`` runs the sequential pipeline with quantized-output propagation (GPTQ's setting),
``:ow`` weighs each layer's output channels by the loss's squared gradients (``output_weight="fisher"``;
the allocation's normalization is then ``none`` unless given), ``:kfac`` by their full covariance
(``output_weight="kfac"``), ``:itN`` sets qera-iter's iterations (default 4).

    python experiments/ptq_allocation.py --runs qera-exact:rtn:mxint3:b8:output,qera-exact:rtn:mxint3:b8:none
        [--out runs/ptq_allocation]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from _protocol import Protocol
from qera import CalibrationStats, QuantConfig, collect_statistics, find_targets
from qera.util.atomic import write_json

DEFAULT_RUNS = ",".join([
    "qera-exact:rtn:mxint3:b8:output", "qera-exact:rtn:mxint3:b8:error", "qera-exact:rtn:mxint3:b8:none",
])


def parse_run(spec: str) -> tuple[QuantConfig, dict]:
    parts = spec.split(":")
    method, rounding, fmt, budget = parts[:4]
    flags = parts[4:]
    seqq = "seqq" in flags  # sequential pipeline, each block calibrated on the quantized blocks' outputs
    ow = "kfac" if "kfac" in flags else "fisher" if "ow" in flags else None  # output channels weighted by the loss
    iters = next((int(f[2:]) for f in flags if f.startswith("it") and f[2:].isdigit()), None)  # qera-iter's iters
    normalize = next((f for f in flags if f not in ("seqq", "ow", "kfac") and not (f.startswith("it") and f[2:].isdigit())),
                     "auto" if ow else "output")
    n = int(budget[1:])
    kw = {"rank_budget": n, "rank_normalize": normalize} if budget[0] == "b" else {}
    if seqq:
        kw.update(pipeline="sequential", propagate="quantized")
    if ow:
        kw.update(output_weight=ow)
    if iters is not None:
        kw.update(method_options={"iters": iters})
    cfg = QuantConfig(format=fmt, method=method, rank=n, rounding=rounding, **kw)
    return cfg, {"method": method, "rounding": rounding, "format": fmt, "budget": budget,
                 "normalize": normalize if budget[0] == "b" else None,
                 "pipeline": "sequential, quantized inputs" if seqq else "oneshot",
                 "output_weight": ow or "none", **({"iters": iters} if iters is not None else {})}


def cache_sensitivity(path: Path) -> None:
    """Every run here uses the same fp model and calibration windows, so the loss-gradient pass of
    the fisher normalization is the same each time: compute it once and keep it in ``path``."""
    import qera.quantize.drivers.oneshot as oneshot

    compute = oneshot.output_sensitivity

    def cached(model, batches, targets, progress=False):
        if path.is_file():
            return json.loads(path.read_text())
        sens = compute(model, batches, targets, progress)
        write_json(path, sens)
        return sens

    oneshot.output_sensitivity = cached


def cache_fisher(path: Path) -> None:
    """The same for the per-output-channel squared gradients of ``output_weight="fisher"`` (safetensors)."""
    from safetensors.torch import load_file, save_file

    import qera.calibrate.sensitivity as sensitivity
    from qera.util.atomic import write_file

    compute = sensitivity.output_fisher

    def cached(model, batches, targets, progress=False, full=False):
        where = path.with_name(path.stem + "_full" + path.suffix) if full else path
        if where.is_file():
            return load_file(str(where))
        fisher = compute(model, batches, targets, progress, full=full)
        write_file(where, lambda tmp: save_file({k: v.contiguous() for k, v in fisher.items()}, str(tmp)))
        return fisher

    sensitivity.output_fisher = cached  # both drivers look it up there when they run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--runs", default=DEFAULT_RUNS)
    ap.add_argument("--out", default="runs/ptq_allocation")
    ap.add_argument("--stats", help="statistics file: read if it exists, else written after the calibration pass")
    ap.add_argument("--sensitivity", help="JSON of the fisher normalization's per-layer sensitivities: read if it "
                                          "exists, else written by the first run that computes them")
    ap.add_argument("--fisher", help="safetensors of the per-output-channel squared loss gradients (:ow runs; "
                                     ":kfac runs use NAME_full): read if it exists, else written by the first run "
                                     "that computes them")
    args = ap.parse_args()
    if args.sensitivity:
        cache_sensitivity(Path(args.sensitivity))
    if args.fisher:
        cache_fisher(Path(args.fisher))
    runs = [parse_run(s) for s in args.runs.split(",")]
    pr = Protocol.load(args.model)
    out = Path(args.out)
    t0 = time.perf_counter()
    if args.stats and Path(args.stats).is_file():
        stats = CalibrationStats.load(args.stats)
    else:
        stats = collect_statistics(pr.model, pr.calib, list(find_targets(pr.model)), ("xtx",), progress=False)
        if args.stats:
            stats.save(args.stats)
    calib_s = time.perf_counter() - t0
    rows = []
    for cfg, row in runs:
        if cfg.pipeline == "sequential":  # records each block's statistics itself, on the quantized inputs
            rep, seconds, p = pr.run(cfg, calibration=pr.calib)
        else:  # the shared statistics; batches for the fisher normalization
            rep, seconds, p = pr.run(cfg, stats=stats, calibration=pr.calib)
        q = rep.quality()
        kinds = Counter()
        for l in rep.layers:
            kinds[l.name.rsplit(".", 1)[-1]] += l.rank
        n_blocks = len({l.name.rsplit(".", 2)[0] for l in rep.layers})
        row.update(perplexity=p, bits_total=q["bits_total"], mean_output_error_ratio=q["mean_output_error_ratio"],
                   solve_seconds=seconds, ranks={l.name: l.rank for l in rep.layers},
                   mean_rank_by_type={k: v / n_blocks for k, v in kinds.items()})
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "ranks"}), flush=True)
        write_json(out / "results.json", {"model": args.model, "calibration_seconds": calib_s, "rows": rows})
    print(f"\n| method | rounding | format | budget | normalize | total bits | perplexity | solve s |")
    print("|---|---|---|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['rounding']} | {r['format']} | {r['budget']} | {r['normalize'] or '–'} | "
              f"{r['bits_total']:.3f} | {r['perplexity']:.2f} | {r['solve_seconds']:.0f} |")
    print(f"(one calibration pass, {calib_s:.0f} s)")


if __name__ == "__main__":
    main()
