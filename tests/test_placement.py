"""Placement of the sequential driver under simulated budgets, and the GPU benchmark's CPU smoke run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qera import QeraError
from qera.quantize.placement import BlockNeeds, plan_placement

GB = 10**9
# a Llama-2-7B block in bf16 with 128 x 2048 calibration tokens (sizes as the driver computes them)
NEEDS_7B = BlockNeeds(weights=int(0.40 * GB), statistics=int(1.37 * GB), solve=int(1.15 * GB),
                      activations=128 * 2048 * 4096 * 2)


def test_activations_on_the_gpu_when_they_fit_beside_one_block():
    plan = plan_placement("cuda:0", NEEDS_7B, gpu_budget=24 * GB, host_budget=100 * GB)
    assert plan.activations == "device"
    assert "activations 2.0 GiB on cuda:0" in plan.describe() and "GPU budget 22.4 GiB" in plan.describe()


def test_pinned_host_memory_when_the_gpu_budget_is_tight():
    plan = plan_placement("cuda:0", NEEDS_7B, gpu_budget=4 * GB, host_budget=100 * GB)
    assert plan.activations == "cpu" and "(pinned)" in plan.describe()


def test_disk_when_host_memory_is_tight_too():
    assert plan_placement("cuda:0", NEEDS_7B, gpu_budget=4 * GB, host_budget=1 * GB).activations == "disk"
    assert plan_placement("cpu", NEEDS_7B, host_budget=1 * GB).activations == "disk"
    assert plan_placement("cpu", NEEDS_7B, host_budget=10 * GB).activations == "cpu"


def test_a_budget_below_one_block_is_refused_up_front():
    with pytest.raises(QeraError, match=r"one block needs about 2\.7 GiB on cuda:0.*over the GPU budget of 1\.9 GiB"):
        plan_placement("cuda:0", NEEDS_7B, gpu_budget=2 * GB)


def test_gpu_7b_bench_smoke_on_cpu():
    """The exact smoke command of issue 17: every phase prints one JSON line with the agreed keys."""
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "bench" / "gpu_7b.py"), "--device", "cpu", "--blocks", "2", "--hidden", "256",
           "--inter", "768", "--heads", "4", "--vocab", "1000", "--samples", "8", "--seqlen", "128"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")]
    phases = [l["phase"] for l in lines]
    assert phases == ["build model", "qera int4:group=128 qera-exact r32", "qera mxint4 qera-exact r32"]
    for l in lines:
        assert {"seconds", "peak_gpu_gb", "peak_rss_gb"} <= set(l) and l["peak_gpu_gb"] is None and l["seconds"] > 0
    assert lines[1]["layers"] == 14 and any("plan: one block at a time on cpu" in n for n in lines[1]["notes"])


def test_background_work_reraises_in_the_caller():
    from qera.quantize.placer import Background

    done = []
    Background("ok", lambda: done.append(1)).join()
    assert done == [1]
    job = Background("fails", lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        job.join()
    job.join()  # raised once


def test_block_call_tensors_stay_on_the_gpu_and_count_there():
    """Rotary tables and padded batches' masks go to the GPU with every batch's block call: they
    count in what one block needs there, pushing the activations out or refusing the budget."""
    import dataclasses

    roomy = dataclasses.replace(NEEDS_7B, calls=int(0.2 * GB))
    assert plan_placement("cuda:0", roomy, gpu_budget=24 * GB).activations == "device"
    assert "block call tensors 190.7 MiB" in plan_placement("cuda:0", roomy, gpu_budget=24 * GB).describe()
    crowded = dataclasses.replace(NEEDS_7B, calls=20 * GB)
    assert plan_placement("cuda:0", crowded, gpu_budget=24 * GB, host_budget=100 * GB).activations == "cpu"
    with pytest.raises(QeraError, match="block call tensors 20.5 GiB.*over the GPU budget"):
        plan_placement("cuda:0", dataclasses.replace(NEEDS_7B, calls=22 * GB), gpu_budget=24 * GB)


def test_call_bytes_measures_the_masks_of_padded_batches():
    import torch

    from tiny import byte_tokenizer, right_padded, tiny_llama

    from qera.calibrate.capture import call_bytes, tensor_bytes
    from qera.nn.targets import find_blocks

    model = tiny_llama()
    _, blocks = find_blocks(model, [n for n, _ in model.named_modules() if n.endswith("q_proj")])
    _, padded = right_padded(byte_tokenizer())
    full = {"input_ids": padded["input_ids"], "attention_mask": torch.ones_like(padded["attention_mask"])}
    b, t = padded["input_ids"].shape
    cpu = torch.device("cpu")
    with_mask, without = call_bytes(model.model, blocks, [padded] * 3, cpu, False), call_bytes(model.model, blocks, [full] * 3, cpu, False)
    assert with_mask - without >= 3 * b * t * t  # one (B, 1, T, T) mask per batch, at least a byte an entry
    shared = torch.zeros(10)  # each tensor object once, as to_device copies them
    assert tensor_bytes({"a": shared, "b": (shared, shared[2:]), "c": [shared.expand(3, 10)]}) == 40 + 32 + 120
    # the most tokens (3B rows of T) and the largest mask (one row of 4T > 3B·T² / (4T)²) in different batches
    tall = {k: v.repeat(3, 1) for k, v in padded.items()}
    long = {"input_ids": torch.zeros(1, 4 * t, dtype=torch.long), "attention_mask": torch.ones(1, 4 * t, dtype=torch.long)}
    long["attention_mask"][0, -1] = 0
    assert tall["input_ids"].numel() > long["input_ids"].numel() and 16 * t * t > 3 * b * t * t
    assert call_bytes(model.model, blocks, [tall, long], cpu, False) >= 2 * 16 * t * t  # the (1, 1, 4T, 4T) mask bounds it


def test_gpu_summary_checks_issue_17_targets_from_the_json_lines(tmp_path):
    """bench/gpu_summary.py turns gpu_7b's JSON lines into the README table and the target lines:
    a missed target says MISSED, a CPU run checks none, a failed phase is shown."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from gpu_summary import read_lines, summarize

    qera = {"phase": "qera int4:group=128 qera-exact r32", "seconds": 32.5, "peak_gpu_gb": 5.73,
            "peak_gpu_reserved_gb": 8.0, "peak_rss_gb": 18.9, "cap_gb": 24, "timings": {"record": 20.2}}
    lc = {"phase": "llmcompressor gptq W4A16", "seconds": 157.3, "peak_gpu_gb": 16.05, "peak_rss_gb": 18.9}
    path = tmp_path / "memory.jsonl"
    path.write_text("loguru noise\n" + "\n".join(json.dumps(p) for p in (qera, lc)) + "\n")
    text = summarize(read_lines(path), [{**qera, "seconds": 38.3, "peak_rss_gb": 3.1}])
    assert "| 32.5 | 5.73 / 8.00 | 18.90 | record 20.20 |" in text and "streamed from shards" in text
    assert "whole job ≤ 30 s: MISSED (32.5 s)" in text and "≥ 6× llm-compressor: MISSED (4.84×)" in text
    assert "peak GPU ≤ 12 GB: met (5.73 GB)" in text and "finished under the cap: met" in text
    cpu = summarize([{**qera, "peak_gpu_gb": None, "peak_gpu_reserved_gb": None},
                     {"phase": "llmcompressor", "skipped": "ImportError: no llmcompressor"}])
    assert "not checked" in cpu and "MISSED" not in cpu and "skipped: ImportError" in cpu
