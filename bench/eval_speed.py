"""Inference tokens/s and weight memory of a quantized SmolLM2-135M (W̃ + rank-32 term) vs fp32 and bf16.

All forwards are interleaved in one process, ``--repeat`` rounds, so drift in the machine's speed
hits every mode alike. Modes:

- ``fp32``, ``bf16``: the unquantized model;
- ``quantized dense cache (fp32)``: ``W̃ + BA`` merged and cached, one GEMM per layer;
- ``quantized packed (fp32)``: ``cache_weight=False``, each layer dequantized when it runs, low-rank
  branch separate;
- ``quantized fused int4 (fp32 | bf16)``: :func:`qera.prepare_inference`: 4-bit layers run through
  PyTorch's int4 weight-only GEMM (no dense weight at all), low-rank branch separate.

Two workloads: ``prefill`` (``--batch`` × ``--tokens`` in one forward) and ``decode`` (batch 1:
``--decode`` tokens generated one at a time with the KV cache after a ``--prompt``-token prompt).
Weight memory = bytes of parameters, buffers, kernel tensors and dense caches after a forward.

    python bench/eval_speed.py [--device cpu|cuda] [--repeat 5 --tokens 512 --batch 4 --decode 32]
    python bench/eval_speed.py --device cuda --model random:4096,11008,8 --format int4:group=128 --batch 16
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit  # noqa: E402

from qera import QERALinear, QuantConfig, load_model, prepare_inference, quantize_model  # noqa: E402


def random_llama(spec: str, device: torch.device) -> torch.nn.Module:
    """``random:HIDDEN,INTER,BLOCKS[,VOCAB]``: a Llama-shaped fp32 model with random weights (speed only)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, blocks, *rest = (int(v) for v in spec.split(":", 1)[1].split(","))
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=blocks,
                      num_attention_heads=max(1, hidden // 128), num_key_value_heads=max(1, hidden // 128),
                      vocab_size=rest[0] if rest else 32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(cfg).eval()


def build_modes(args, device: torch.device) -> tuple[dict[str, torch.nn.Module], object]:
    if args.model.startswith("random:"):
        fp, tok = random_llama(args.model, device), None
    else:
        fp, tok = load_model(args.model)
    fp = fp.to(device)
    merged = copy.deepcopy(fp)
    quantize_model(merged, QuantConfig(format=args.format, method="zeroquant-v2", rank=args.rank), progress=False)
    packed = copy.deepcopy(merged)
    for m in packed.modules():
        if isinstance(m, QERALinear):
            m.merge_lowrank, m.cache_weight, m._w_cache = False, False, None
    modes = {"fp32": fp, "bf16": copy.deepcopy(fp).to(torch.bfloat16), "quantized dense cache (fp32)": merged,
             "quantized packed (fp32)": packed}
    for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        fused = copy.deepcopy(packed).to(dtype)
        used = prepare_inference(fused, dtype)
        n = sum(v == "int4 kernel" for v in used.values())
        if n == 0:
            print(f"# fused int4 ({label}) skipped: {next(iter(used.values()), 'no quantized layers')}")
            continue
        modes[f"quantized fused int4 ({label}, {n}/{len(used)} layers)"] = fused
    return modes, tok


def prefill(model, ids) -> None:
    model(input_ids=ids, use_cache=False)


def decode(model, prompt, steps: int) -> None:
    out = model(input_ids=prompt, use_cache=True)
    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    for _ in range(steps):
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="a model name, or random:HIDDEN,INTER,BLOCKS[,VOCAB]")
    ap.add_argument("--format", default="mxint4")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32, help="tokens generated one at a time (0: skip decode)")
    ap.add_argument("--ppl-windows", type=int, default=0, help="also the perplexity of every mode on this many windows")
    ap.add_argument("--eval-text", default=None, help="text for --ppl-windows (default: built-in)")
    args = ap.parse_args()
    device = torch.device(args.device)
    modes, tok = build_modes(args, device)
    if args.ppl_windows and tok is not None:  # the fused kernel computes the same model: perplexities side by side
        from qera import perplexity
        from qera.io.data import load_text

        text = load_text(args.eval_text, "evaluation")
        ppl = {k: perplexity(m, tok, text, seq_len=512, max_windows=args.ppl_windows, progress=False).perplexity
               for k, m in modes.items()}
        print(f"# perplexity, {args.ppl_windows} windows of 512 tokens of {args.eval_text or 'the built-in text'}")
        for k, v in ppl.items():
            print(f"#   {k:<42s} {v:.4f}")
    vocab = modes["fp32"].config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.tokens), generator=g).to(device)
    prompt = torch.randint(0, vocab, (1, args.prompt), generator=g).to(device)
    work = {"prefill": (lambda m: prefill(m, ids), ids.numel())}
    if args.decode:
        work["decode"] = (lambda m: decode(m, prompt, args.decode), args.decode)
    times = {(w, k): [] for w in work for k in modes}
    with torch.no_grad():
        for m in modes.values():
            prefill(m, ids[:1, :32])  # warm-up, fills the caches
        for _ in range(args.repeat):
            for w, (fn, _) in work.items():
                for name, m in modes.items():
                    _sync(device)
                    t = time.perf_counter()
                    fn(m)
                    _sync(device)
                    times[(w, name)].append(time.perf_counter() - t)
    mem = {k: weight_bytes(m) for k, m in modes.items()}
    for w, (_, n_tokens) in work.items():
        base = statistics.median(times[(w, "bf16")])
        rows = [{"model": k, "tok_s": n_tokens / statistics.median(times[(w, k)]),
                 "ratio": base / statistics.median(times[(w, k)]), "weight_mb": mem[k] / 1e6,
                 "mem_vs_bf16": mem[k] / mem["bf16"]} for k in modes]
        shape = f"{args.batch} x {args.tokens} tokens" if w == "prefill" else \
            f"batch 1, {args.decode} tokens after a {args.prompt}-token prompt"
        print(f"# {w} on {device}: {shape}; medians of {args.repeat} interleaved rounds")
        emit(f"eval_speed {w}", rows, [("model", "mode", "<42s"), ("tok_s", "tokens/s", ".1f"),
                                       ("ratio", "vs bf16", ".3f"), ("weight_mb", "weights MB", ".1f"),
                                       ("mem_vs_bf16", "vs bf16", ".3f")])


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of distinct parameters and buffers, plus the kernel tensors and dense weight caches of
    quantized layers."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    for m in model.modules():
        if not isinstance(m, QERALinear):
            continue
        c = getattr(m, "_w_cache", None)
        if c is not None:
            total += c.numel() * c.element_size()
        if m._kernel is not None:
            total += m._kernel.nbytes()
    return total


if __name__ == "__main__":
    main()
