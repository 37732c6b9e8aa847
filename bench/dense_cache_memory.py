"""Host memory left behind by building the dense ``W̃ + B A`` caches of many layers (CPU).

Each mode runs in a fresh process: quantize the linear layers of a random Llama-shaped stack
(bf16, mxint3, rank 8), then build every layer's dense bf16 cache the way evaluation does, and
report the resident memory above the caches themselves (what the heap keeps of the temporaries).

- ``whole``: the former path, ``(dequantize(float32) + B.float() @ A.float()).to(bf16)``, one
  full-size float32 temporary (and a second for ``B A``) per layer;
- ``blocks``: ``QuantizedWeight.dequantize(bf16, lowrank=(B, A))``, a block of rows at a time.

    python bench/dense_cache_memory.py [--layers 24 --hidden 896 --inter 4864]   # Qwen2-0.5B widths
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, psutil, torch
from qera.core.formats import parse_format
mode, layers, hidden, inter = sys.argv[1], *map(int, sys.argv[2:5])
torch.manual_seed(0)
fmt = parse_format("mxint3")
shapes = [(hidden, hidden), (hidden // 7, hidden), (hidden // 7, hidden), (hidden, hidden),
          (inter, hidden), (inter, hidden), (hidden, inter)] * layers
packed = []
for out_f, in_f in shapes:
    W = (torch.randn(out_f, in_f) * 0.02).to(torch.bfloat16)
    packed.append((fmt.quantize(W), torch.randn(out_f, 8).half(), torch.randn(8, in_f).half()))
    del W
from qera.util.memory import trim_heap
trim_heap()
proc = psutil.Process()
before = proc.memory_info().rss
caches = []
for q, B, A in packed:
    if mode == "whole":
        caches.append((q.dequantize(torch.float32) + B.float() @ A.float()).to(torch.bfloat16))
    else:
        caches.append(q.dequantize(torch.bfloat16, lowrank=(B, A)))
after = proc.memory_info().rss
cache_bytes = sum(c.numel() * c.element_size() for c in caches)
print(json.dumps({"mode": mode, "cache_mib": cache_bytes / 2**20, "rss_growth_mib": (after - before) / 2**20,
                  "retained_mib": (after - before - cache_bytes) / 2**20}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--inter", type=int, default=4864)
    args = ap.parse_args()
    rows = {}
    for mode in ("whole", "blocks"):
        out = subprocess.run([sys.executable, "-c", CHILD, mode, str(args.layers), str(args.hidden), str(args.inter)],
                             capture_output=True, text=True, check=True)
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(rows[mode]))
    w, b = rows["whole"], rows["blocks"]
    print(f"dense caches {b['cache_mib']:.0f} MiB; RSS growth while building them: whole-layer float32 "
          f"{w['rss_growth_mib']:.0f} MiB, row blocks {b['rss_growth_mib']:.0f} MiB "
          f"({b['rss_growth_mib'] / w['rss_growth_mib']:.2f}x); retained beyond the caches: "
          f"{w['retained_mib']:.0f} vs {b['retained_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
