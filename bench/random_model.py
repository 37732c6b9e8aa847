"""Write a Llama-shaped model with random weights as bf16 safetensors shards, one tensor at a time.

Never holds more than one shard in memory, so a 26 GB (13B) model is written on a 24 GB machine.
Weights are N(0, 0.02²) like Hugging Face's initializer; norms are 1. A byte-level tokenizer is
saved beside it so the directory loads like any Hugging Face model.

    python bench/random_model.py OUT --shape llama-2-13b
    python bench/random_model.py OUT --hidden 1024 --inter 2816 --layers 8 --heads 16 --vocab 32000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab (the published configurations)
    "llama-2-7b": (4096, 11008, 32, 32, 32, 32000),
    "llama-2-13b": (5120, 13824, 40, 40, 40, 32000),
    "llama-2-70b": (8192, 28672, 80, 64, 8, 32000),
}


def tensors_of(hidden: int, inter: int, layers: int, heads: int, kv_heads: int, vocab: int, tie: bool):
    """(name, shape) of every parameter of a LlamaForCausalLM, in module order."""
    head_dim = hidden // heads
    yield "model.embed_tokens.weight", (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (hidden,)
        yield p + "self_attn.q_proj.weight", (heads * head_dim, hidden)
        yield p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)
        yield p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)
        yield p + "self_attn.o_proj.weight", (hidden, heads * head_dim)
        yield p + "post_attention_layernorm.weight", (hidden,)
        yield p + "mlp.gate_proj.weight", (inter, hidden)
        yield p + "mlp.up_proj.weight", (inter, hidden)
        yield p + "mlp.down_proj.weight", (hidden, inter)
    yield "model.norm.weight", (hidden,)
    if not tie:
        yield "lm_head.weight", (vocab, hidden)


def write_random_llama(out: str | Path, hidden: int, inter: int, layers: int, heads: int, kv_heads: int | None = None,
                       vocab: int = 32000, seed: int = 0, shard_bytes: int = 2 * 10**9, tie: bool = False,
                       max_positions: int = 4096, device: str = "cpu") -> Path:
    """``device="cuda"`` draws the random numbers on the GPU (seconds for a 7B model, not minutes)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny import byte_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kv_heads = kv_heads or heads
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, vocab_size=vocab, tie_word_embeddings=tie,
                      max_position_embeddings=max_positions, dtype="bfloat16")
    gen = torch.Generator(device).manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    size, k, files, weight_map, total = 0, 0, [], {}, 0

    def flush() -> None:
        nonlocal shard, size, k
        if shard:
            name = f"part-{k:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            files.append((name, list(shard)))
            shard, size, k = {}, 0, k + 1

    for name, shape in tensors_of(hidden, inter, layers, heads, kv_heads, vocab, tie):
        t = torch.ones(shape, dtype=torch.bfloat16) if len(shape) == 1 else \
            (torch.randn(shape, generator=gen, device=device) * 0.02).to(torch.bfloat16).cpu()
        nbytes = t.numel() * 2
        if size + nbytes > shard_bytes:
            flush()
        shard[name] = t
        size += nbytes
        total += nbytes
    flush()
    n = len(files)
    for i, (name, keys) in enumerate(files, start=1):
        final = f"model-{i:05d}-of-{n:05d}.safetensors"
        (out / name).rename(out / final)
        weight_map.update({key: final for key in keys})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1))
    cfg.save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    return out


def write_random_model(out: str | Path, config, seed: int = 0, shard_bytes: int = 2 * 10**9) -> Path:
    """Any Hugging Face architecture from ``config`` with random bf16 weights (N(0, 0.02²); 1-D tensors:
    norms 1, biases 0), written tensor by tensor as safetensors shards + index, config and tokenizer."""
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from qera.io.lazy import empty_model
    from tiny import byte_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config.dtype = "bfloat16"
    model = empty_model(config, torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    size, files, total = 0, [], 0
    for name, p in model.named_parameters():
        if p.dim() == 1:
            t = (torch.ones if "norm" in name else torch.zeros)(p.shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(p.shape, generator=gen) * 0.02).to(torch.bfloat16)
        if size + t.numel() * 2 > shard_bytes and shard:
            files.append(shard)
            shard, size = {}, 0
        shard[name] = t
        size += t.numel() * 2
        total += t.numel() * 2
    files.append(shard)
    weight_map = {}
    for i, part in enumerate(files, start=1):
        name = f"model-{i:05d}-of-{len(files):05d}.safetensors"
        save_file(part, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1))
    config.save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--shape", choices=sorted(SHAPES))
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    dims = SHAPES[args.shape] if args.shape else (args.hidden, args.inter, args.layers, args.heads, args.kv_heads, args.vocab)
    t0 = time.perf_counter()
    path = write_random_llama(args.out, *dims, seed=args.seed)
    size = sum(p.stat().st_size for p in path.iterdir())
    print(json.dumps({"out": str(path), "bytes": size, "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
