"""The 7B job on one GPU: qera's sequential driver vs llm-compressor's GPTQ, same model, same tokens.

Builds a Llama-shaped model with random bf16 weights (in host memory, or with ``--source disk``
written once as bf16 safetensors shards and streamed from them), draws ``--samples`` × ``--seqlen``
random calibration tokens, and runs qera (sequential pipeline, qera-exact rank 32, on
``int4:group=128`` and then ``mxint4``); with ``--compare llmcompressor`` it also runs
llm-compressor's GPTQ W4A16 on the same model and tokens, in the same process, when it can be
imported. One JSON line per phase (``phase``, ``seconds``, ``peak_gpu_gb`` (null on the CPU),
``peak_rss_gb``), then the ratio ``llmcompressor_seconds / qera_seconds``.

    python bench/gpu_7b.py [--device cuda|cpu] [--blocks 32] [--hidden 4096] [--inter 11008] [--heads 32]
        [--vocab 32000] [--samples 128] [--seqlen 2048] [--source memory|disk] [--gpu-memory GB]
        [--compare llmcompressor] [--profile FILE]

``--profile FILE`` runs the first format under ``torch.profiler`` and writes the operators with the
most device (and host) time, and the count of host synchronizations, to FILE: use it with few
``--blocks`` (every block does the same work).

Smoke test (seconds, CPU): ``--device cpu --blocks 2 --hidden 256 --inter 768 --heads 4 --vocab 1000
--samples 8 --seqlen 128``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import shutil
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def peaks(device: torch.device) -> dict:
    gpu = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    return {"peak_gpu_gb": gpu, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}


def emit(phase: str, seconds: float, device: torch.device, **extra) -> None:
    print(json.dumps({"phase": phase, "seconds": round(seconds, 3), **peaks(device), **extra}), flush=True)


def llama_config(a):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=a.hidden, intermediate_size=a.inter, num_hidden_layers=a.blocks,
                       num_attention_heads=a.heads, num_key_value_heads=a.heads, vocab_size=a.vocab,
                       max_position_embeddings=max(4096, a.seqlen), dtype="bfloat16")


def random_model_in_memory(a, device: torch.device):
    """The random bf16 model in host memory, built without a float32 copy (meta → filled tensor by tensor;
    on a GPU machine the numbers are drawn on the GPU)."""
    from qera.io.lazy import empty_model

    model = empty_model(llama_config(a), torch.bfloat16)
    gen = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in list(model.named_parameters()):
            t = torch.ones(p.shape, dtype=torch.bfloat16) if p.dim() == 1 else \
                (torch.randn(p.shape, generator=gen, device=device) * 0.02).to(torch.bfloat16).cpu()
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner)._parameters[attr] = torch.nn.Parameter(t, requires_grad=False)
    return model.eval()


def run_llmcompressor(model, batches, a, device, workdir: Path) -> float | None:
    """GPTQ W4A16 with llm-compressor's sequential pipeline; None (and a line saying why) when unavailable."""
    try:
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import GPTQModifier
    except Exception as exc:  # not installed, or incompatible with the installed transformers
        print(json.dumps({"phase": "llmcompressor", "skipped": f"{type(exc).__name__}: {exc}"[:300]}), flush=True)
        return None
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny import byte_tokenizer  # any PreTrainedTokenizerFast will do: the data are token ids

    cfg_dir = workdir / "config"
    model.config.save_pretrained(cfg_dir)  # llm-compressor re-reads the config from name_or_path
    model.config._name_or_path = str(cfg_dir)
    ids = torch.cat([b["input_ids"] for b in batches])
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, processor=byte_tokenizer(),
            recipe=GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]),
            num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1])
    seconds = time.perf_counter() - t0
    emit("llmcompressor gptq W4A16", seconds, device)
    return seconds


def set_cap(device: torch.device, gb: float | None) -> None:
    """Cap this process's CUDA allocations at ``gb`` (None lifts the cap)."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gb * 1e9 / total) if gb else 1.0, device)


def phase_failed(phase: str, exc: BaseException) -> None:
    print(json.dumps({"phase": phase, "error": f"{type(exc).__name__}: {exc}"[:2000],
                      "where": traceback.format_exc()[-3000:]}), flush=True)


SYNC_OPS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def profile_table(prof, device: torch.device, rows: int = 30) -> str:
    """The profiler's top operators by device time (CUDA) or host time, then the host-sync calls."""
    events = prof.key_averages()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    text = [events.table(sort_by=key, row_limit=rows)]
    if device.type == "cuda":
        text.append(events.table(sort_by="self_cpu_time_total", row_limit=rows))
    syncs = {e.key: e.count for e in events if e.key.startswith(SYNC_OPS)}
    text.append("host synchronizations and copies: " + json.dumps(syncs, sort_keys=True))
    return "\n".join(text)


def run_qera(a, model, src, batches, fmt: str, device: torch.device, work: Path, profile: str | None = None) -> float:
    """One qera job (sequential pipeline, qera-exact r32 on ``fmt``); emits its line, returns its seconds."""
    from qera import QuantConfig, find_targets, quantize_and_save, quantize_model
    from qera.nn.targets import replace_module

    cfg = QuantConfig(format=fmt, method="qera-exact", rank=32, pipeline="sequential")
    gpu_budget = int(a.gpu_memory * 1e9) if a.gpu_memory else None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    prof = None
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        prof = torch_profile(activities=acts)
        prof.__enter__()
    t1 = time.perf_counter()
    if model is None:
        rep = quantize_and_save(src, cfg, work / f"out-{fmt.replace(':', '_')}", calibration=batches, overwrite=True,
                                progress=False, device=device, gpu_memory=gpu_budget, report_output_error=False)
    else:
        originals = dict(find_targets(model))
        try:
            rep = quantize_model(model, cfg, calibration=batches, progress=False, device=device,
                                 gpu_memory=gpu_budget, report_output_error=False)
        finally:
            for name, mod in originals.items():  # the next job starts from the same weights
                replace_module(model, name, mod)
    seconds = time.perf_counter() - t1
    if prof is not None:
        prof.__exit__(None, None, None)
        Path(profile).write_text(profile_table(prof, device))
    reserved = torch.cuda.max_memory_reserved(device) / 1e9 if device.type == "cuda" else None
    emit(f"qera {fmt} qera-exact r32", seconds, device, source=a.source, cap_gb=a.gpu_memory,
         peak_gpu_reserved_gb=reserved, calibration_s=round(rep.calibration_seconds, 3),
         solve_s=round(rep.solve_seconds, 3), timings=rep.timings, layers=len(rep.layers), notes=rep.notes)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--blocks", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--source", default="memory", choices=["memory", "disk"])
    ap.add_argument("--gpu-memory", type=float, default=None,
                    help="cap (GB) on what qera may place on the GPU (llm-compressor runs uncapped)")
    ap.add_argument("--compare", default=None, choices=["llmcompressor"])
    ap.add_argument("--formats", default="int4:group=128,mxint4", help="comma-separated weight formats for qera")
    ap.add_argument("--batch", type=int, default=8, help="calibration rows per forward")
    ap.add_argument("--work", default=None, help="folder for the shards (--source disk) and outputs")
    ap.add_argument("--profile", default=None, help="profile the first format's run; the table goes to this file")
    a = ap.parse_args()

    device = torch.device(a.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("gpu_7b: --device cuda but no CUDA GPU is available")
        device = torch.device("cuda", torch.cuda.current_device())
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="qera-gpu7b-"))
    try:
        _run(a, device, work)
    finally:
        if not a.work:  # a folder of our own: shards and outputs go with it
            shutil.rmtree(work, ignore_errors=True)


def _run(a, device: torch.device, work: Path) -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, a.vocab, (a.samples, a.seqlen), generator=g)
    batches = [{"input_ids": ids[i:i + a.batch], "attention_mask": torch.ones_like(ids[i:i + a.batch])}
               for i in range(0, a.samples, a.batch)]
    t0 = time.perf_counter()
    src = None
    if a.source == "disk":
        from random_model import write_random_llama

        src = work / f"llama-{a.hidden}-{a.inter}-{a.blocks}"
        if not (src / "config.json").is_file():
            write_random_llama(src, a.hidden, a.inter, a.blocks, a.heads, a.heads, a.vocab,
                               max_positions=max(4096, a.seqlen), device=a.device)
        model = None
    else:
        model = random_model_in_memory(a, device)
    emit("build model" if a.source == "memory" else "write shards", time.perf_counter() - t0, device, source=a.source)
    qera_seconds = None
    set_cap(device, a.gpu_memory)
    for k, fmt in enumerate(a.formats.split(",")):
        try:
            seconds = run_qera(a, model, src, batches, fmt, device, work, a.profile if k == 0 else None)
            qera_seconds = qera_seconds or seconds
        except Exception as exc:
            phase_failed(f"qera {fmt}", exc)
    set_cap(device, None)
    if a.compare == "llmcompressor":
        try:
            if model is None:
                from transformers import AutoModelForCausalLM

                model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            lc = run_llmcompressor(model.to(device) if device.type == "cuda" else model, batches, a, device, work)
        except Exception as exc:
            phase_failed("llmcompressor", exc)
            lc = None
        if lc is not None and qera_seconds:
            print(json.dumps({"llmcompressor_seconds / qera_seconds": round(lc / qera_seconds, 3)}), flush=True)


if __name__ == "__main__":
    main()
