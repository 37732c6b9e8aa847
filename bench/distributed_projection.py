"""On paper: memory per rank, all-reduce traffic per block and time of qera's sequential pipeline
for 7B, 70B and 405B Llama shapes on 1, 8 and 64 GPUs, from measured per-block figures.

Measured inputs (and where they come from):
- bf16 forward of Llama-2-7B's 32 blocks over 128 x 2048 tokens: 7.6 s on one H200 (issue 17);
- Σxᵀx of every distinct block input on tensor cores, same tokens: 3.9 s on one H200 (issue 17);
- qera-exact solve of a 4096 x 4096 layer at rank 32: 0.015 s on one H100 (bench/README.md);
- per-layer step memory: R in float32 + 7 float32 copies of the layer (bench/README.md, CPU);
Assumptions (stated, not measured here): compute scales with FLOPs (forward ∝ block params x tokens,
statistics ∝ tokens x Σ d², solve ∝ out·in + in²); ranks split the tokens evenly and a block's 7
layers are solved by min(N, 7) ranks; ring all-reduce moves 2(N-1)/N x the statistics per rank at
300 GB/s within a node (NVLink, 8 GPUs) and 40 GB/s per GPU across nodes (64 GPUs = 8 nodes); every
rank streams every block's bf16 weights from local NVMe or page cache at 5 GB/s.

    python bench/distributed_projection.py [--tokens 262144] [--propagate fp|quantized]
"""

from __future__ import annotations

import argparse

SHAPES = {  # hidden, intermediate, blocks, kv width
    "7B": (4096, 11008, 32, 4096),
    "70B": (8192, 28672, 80, 1024),
    "405B": (16384, 53248, 126, 1024),
}
H200_FWD_S, H200_STATS_S, H100_SOLVE_4096_S = 7.6, 3.9, 0.015
REF_TOKENS = 128 * 2048
GB = 1e9


def block_params(h: int, i: int, kv: int) -> int:
    return 2 * h * h + 2 * h * kv + 3 * h * i


def stats_elems(h: int, i: int) -> int:
    return 3 * h * h + i * i  # attention input, o_proj input, MLP input (width h), down_proj input (width i)


def project(h: int, i: int, L: int, kv: int, tokens: int, n: int, passes: int) -> dict:
    h7, i7, L7, kv7 = SHAPES["7B"]
    fwd_rate = 2 * L7 * block_params(h7, i7, kv7) * REF_TOKENS / H200_FWD_S  # FLOP/s, measured
    stats_rate = 2 * L7 * stats_elems(h7, i7) * REF_TOKENS / H200_STATS_S
    solve_rate = (4096 * 4096 + 4096 * 4096) / H100_SOLVE_4096_S  # (out·in + in²) per second
    layers = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]
    fwd = passes * 2 * block_params(h, i, kv) * tokens / fwd_rate / n
    stats = 2 * stats_elems(h, i) * tokens / stats_rate / n
    solve_each = sorted(((o * k + k * k) / solve_rate for o, k in layers), reverse=True)
    workers = min(n, len(layers))
    solve = max(sum(solve_each[r::workers]) for r in range(workers))
    traffic = 8 * stats_elems(h, i)
    bw = 300 * GB if n <= 8 else 40 * GB
    comm = 0.0 if n == 1 else 2 * (n - 1) / n * traffic / bw
    step = max(4 * k * k + 28 * o * k for o, k in layers)
    mem = block_params(h, i, kv) * 2 + traffic + step + tokens / n * h * 2
    io = block_params(h, i, kv) * 2 / (5 * GB)
    per_block = fwd + stats + solve + comm + io
    return {"per_block_s": per_block, "total_min": L * per_block / 60, "traffic_gb": traffic / GB,
            "comm_s": comm, "mem_gb": mem / GB}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=REF_TOKENS)
    ap.add_argument("--propagate", choices=["fp", "quantized"], default="fp")
    args = ap.parse_args()
    passes = 1 if args.propagate == "fp" else 2
    print(f"{args.tokens} calibration tokens, propagate={args.propagate}\n")
    print("| model | GPUs | memory per rank GB | all-reduce per block GB (sent per rank) | comm s/block | time s/block | total min |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (h, i, L, kv) in SHAPES.items():
        for n in (1, 8, 64):
            p = project(h, i, L, kv, args.tokens, n, passes)
            sent = 0 if n == 1 else 2 * (n - 1) / n * p["traffic_gb"]
            print(f"| {name} | {n} | {p['mem_gb']:.1f} | {p['traffic_gb']:.2f} ({sent:.2f}) | {p['comm_s']:.2f} | "
                  f"{p['per_block_s']:.2f} | {p['total_min']:.1f} |")


if __name__ == "__main__":
    main()
