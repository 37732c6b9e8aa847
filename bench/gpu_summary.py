"""The 7B job's table and issue 17's targets, from the JSON lines `bench/gpu_7b.py` printed.

    python bench/gpu_summary.py OUTDIR     (reads OUTDIR/memory.jsonl and, if present, OUTDIR/disk.jsonl)
    python bench/gpu_summary.py FILE.jsonl [FILE2.jsonl]

Prints a Markdown table (one row per qera phase and for llm-compressor) and one line per target of
issue 17: whole job ≤ 30 s, ≥ 6× llm-compressor in the same run, peak GPU memory ≤ 12 GB, and
finished under the cap. Nothing is measured here: it only reads what the benchmark wrote.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TARGET_SECONDS, TARGET_RATIO, TARGET_GPU_GB = 30.0, 6.0, 12.0


def read_lines(path: Path) -> list[dict]:
    """The JSON objects of ``path``, one per line (other lines are skipped)."""
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _gb(v) -> str:
    return "–" if v is None else f"{v:.2f}"


def row(p: dict, label: str) -> str:
    gpu = _gb(p.get("peak_gpu_gb"))
    if p.get("peak_gpu_reserved_gb") is not None:
        gpu += f" / {p['peak_gpu_reserved_gb']:.2f}"
    phases = ", ".join(f"{k} {v:.2f}" for k, v in (p.get("timings") or {}).items())
    return f"| {label} | {p['seconds']:.1f} | {gpu} | {_gb(p.get('peak_rss_gb'))} | {phases or '–'} |"


def summarize(memory: list[dict], disk: list[dict] | None = None) -> str:
    """The table and the target lines for one memory run (and optionally one disk run)."""
    lines = ["| job | wall s | peak GPU GB (allocated / reserved) | peak host RSS GB | phases (s) |",
             "|---|---:|---:|---:|---|"]
    qera = [p for p in memory if str(p.get("phase", "")).startswith("qera ") and "seconds" in p]
    lc = next((p for p in memory if str(p.get("phase", "")).startswith("llmcompressor") and "seconds" in p), None)
    for p in qera:
        cap = f", under a {p['cap_gb']:g} GB cap" if p.get("cap_gb") else ""
        lines.append(row(p, f"{p['phase']}, weights in memory{cap}"))
    for p in disk or []:
        if str(p.get("phase", "")).startswith("qera ") and "seconds" in p:
            cap = f", under a {p['cap_gb']:g} GB cap" if p.get("cap_gb") else ""
            lines.append(row(p, f"{p['phase']}, streamed from shards{cap}"))
    if lc is not None:
        lines.append(row(lc, "llm-compressor GPTQ W4A16 (uncapped)"))
    problems = [p for p in memory + (disk or []) if "error" in p or "skipped" in p]
    for p in problems:
        lines.append(f"\n{p.get('phase')}: {p.get('error') or 'skipped: ' + str(p.get('skipped'))}")
    if not qera:
        lines.append("\nno qera phase of a --source memory run finished here: the targets are checked on that run")
        return "\n".join(lines)
    first = qera[0]
    if first.get("peak_gpu_gb") is None:
        lines.append("\nthis run was on the CPU: issue 17's targets are for the GPU job, not checked")
        return "\n".join(lines)
    ratio = lc["seconds"] / first["seconds"] if lc is not None else None
    checks = [
        (f"whole job ≤ {TARGET_SECONDS:g} s", first["seconds"] <= TARGET_SECONDS, f"{first['seconds']:.1f} s"),
        (f"≥ {TARGET_RATIO:g}× llm-compressor", None if ratio is None else ratio >= TARGET_RATIO,
         "llm-compressor did not run" if ratio is None else f"{ratio:.2f}×"),
        (f"peak GPU ≤ {TARGET_GPU_GB:g} GB", None if first.get("peak_gpu_gb") is None
         else first["peak_gpu_gb"] <= TARGET_GPU_GB, f"{_gb(first.get('peak_gpu_gb'))} GB"),
        ("finished under the cap", bool(first.get("cap_gb")) or None,
         f"cap {first.get('cap_gb')} GB" if first.get("cap_gb") else "no cap was set"),
    ]
    lines.append("")
    lines.append(f"Targets of issue 17 (for the Llama-2-7B shape, 128 × 2048 tokens, one H100/H200), "
                 f"for `{first['phase']}`:")
    for name, ok, value in checks:
        mark = "n/a" if ok is None else ("met" if ok else "MISSED")
        lines.append(f"- {name}: {mark} ({value})")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit(__doc__)
    first = Path(argv[0])
    if first.is_dir():
        memory, disk = first / "memory.jsonl", first / "disk.jsonl"
    else:
        memory, disk = first, Path(argv[1]) if len(argv) > 1 else None
    have = [f for f in (memory, disk) if f is not None and f.is_file()]
    if not have:
        sys.exit(f"gpu_summary: no {memory} (run bench/gpu_check.sh or bench/gpu_7b.py first)")
    print(summarize(read_lines(memory) if memory.is_file() else [],
                    read_lines(disk) if disk is not None and disk.is_file() else None))


if __name__ == "__main__":
    main(sys.argv[1:])
