"""Wall time of the sequential pipeline in 1 process vs N processes (torchrun, gloo on the CPU).

Uses a random Llama-shaped model written by ``bench/random_model.py`` (width 1024, 8 blocks by
default), the same random calibration tokens, and compares the two checkpoints.

    python bench/distributed.py [--nproc 2] [--blocks 8] [--samples 16 --seq-len 512]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

CHILD = r"""
import json, os, sys, time, torch
from qera import QuantConfig, quantize_and_save
from qera.quantize.distributed import init_from_env
a = json.loads(sys.argv[1])
made = init_from_env()
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, a["vocab"], (a["samples"], a["seq_len"]), generator=g)
batches = [{"input_ids": ids[i:i + a["batch"]], "attention_mask": torch.ones_like(ids[i:i + a["batch"]])}
           for i in range(0, a["samples"], a["batch"])]
t0 = time.perf_counter()
rep = quantize_and_save(a["src"], QuantConfig(format="int4:group=128", method="qera-exact", rank=32, pipeline="sequential"),
                        a["out"], calibration=batches, overwrite=True, progress=False, report_output_error=True)
wall = time.perf_counter() - t0
if int(os.environ.get("RANK", "0")) == 0:
    print(json.dumps({"wall_s": wall, "calibration_s": rep.calibration_seconds, "solve_s": rep.solve_seconds,
                      "objective": sum(l.output_error_after for l in rep.layers)}))
if made:
    torch.distributed.destroy_process_group()
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=2816)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--work", default="bench_work/distributed")
    args = ap.parse_args()
    from random_model import write_random_llama

    work = Path(args.work)
    src = work / f"llama-h{args.hidden}-b{args.blocks}"
    if not (src / "config.json").is_file():
        write_random_llama(src, args.hidden, args.inter, args.blocks, args.heads, vocab=args.vocab)
    payload = {"src": str(src), "vocab": args.vocab, "samples": args.samples, "seq_len": args.seq_len,
               "batch": args.batch}
    rows = []
    for n in (1, args.nproc):
        p = {**payload, "out": str(work / f"out-{n}")}
        if n == 1:
            cmd = [sys.executable, "-c", CHILD, json.dumps(p)]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                   "--no-python", sys.executable, "-c", CHILD, json.dumps(p)]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // n))}
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise SystemExit(out.stderr[-3000:])
        r = json.loads([l for l in out.stdout.splitlines() if l.startswith("{")][-1])
        r.update(processes=n, launch_s=time.perf_counter() - t0, threads_per_process=env["OMP_NUM_THREADS"])
        rows.append(r)
        print(json.dumps(r), flush=True)
    import torch
    from safetensors.torch import load_file

    a, b = load_file(str(work / "out-1" / "model.safetensors")), load_file(str(work / f"out-{args.nproc}" / "model.safetensors"))
    same_codes = all(torch.equal(a[k], b[k]) for k in a if not a[k].is_floating_point())
    worst = 0.0  # the low-rank term B A of each layer (A, B themselves are stored in fp16)
    for k in a:
        if k.endswith(".A"):
            p = k[:-2]
            ba1 = a[p + ".B"].double() @ a[p + ".A"].double()
            ba2 = b[p + ".B"].double() @ b[p + ".A"].double()
            worst = max(worst, float((ba1 - ba2).norm() / ba1.norm()))
    print(f"# {machine()}")
    print(f"# {args.blocks} blocks, width {args.hidden}/{args.inter}; {args.samples} x {args.seq_len} tokens")
    for r in rows:
        print(f"# {r['processes']} process(es) x {r['threads_per_process']} threads: quantize {r['wall_s']:.1f} s "
              f"(calibration {r['calibration_s']:.1f}, solve {r['solve_s']:.1f}), launch to exit {r['launch_s']:.1f} s")
    print(f"# speed-up {rows[0]['wall_s'] / rows[1]['wall_s']:.2f}x; checkpoints: packed codes identical: {same_codes}, "
          f"largest relative difference of a layer's B A (Frobenius) {worst:.2e}; summed layer output error "
          f"trace(E R Eᵀ) differs by {abs(rows[1]['objective'] / rows[0]['objective'] - 1):.1e} relative")


if __name__ == "__main__":
    main()
