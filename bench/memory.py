"""Peak RSS of every command, per phase, next to a formula: a Qwen2-0.5B-shaped model and SmolLM2.

Each command runs in a fresh process (the CLI's ``main``) with a sampling thread that records the
peak RSS of each phase — load, calibrate, solve, evaluate, train — marked by wrapping the library
functions that do them, plus the process's ``VmHWM``. The 0.5B model has the shape of the issue
(hidden 896, intermediate 4864, 24 blocks, 14 heads / 2 KV heads, vocabulary 151,936, tied
embeddings) with random bf16 weights, written once by ``bench/random_model.py``.

    python bench/memory.py [--models qwen2-0.5b-shape,smollm2-135m] [--commands eval,calibrate,quantize,compare]
        [--max-memory 6GB]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("QERA_DATA", ROOT.parent / "shared" / "data"))

CHILD = r"""
import json, sys, threading, time, functools
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
stack, peaks = ["other"], {}
def sample():
    while True:
        peaks[stack[-1]] = max(peaks.get(stack[-1], 0.0), rss())
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
def phase(module, attr, name):
    fn = getattr(module, attr)
    @functools.wraps(fn)
    def wrapped(*a, **k):
        stack.append(name)
        try:
            return fn(*a, **k)
        finally:
            stack.pop()
    setattr(module, attr, wrapped)
import qera.io.models, qera.quantize.collect, qera.quantize.pipeline, qera.evaluate.perplexity, qera.finetune.qpeft, qera.finetune.trainer, qera.analyze.init_error
phase(qera.io.models, "load_model", "load")
phase(qera.io.models, "load_encoder", "load")
phase(qera.quantize.collect, "collect_statistics_within", "calibrate")
phase(qera.quantize.pipeline, "quantize_model", "solve")
phase(qera.quantize.pipeline, "quantize_and_save", "solve")
phase(qera.finetune.qpeft, "prepare_qpeft_model", "solve")
phase(qera.evaluate.perplexity, "perplexity", "evaluate")
phase(qera.finetune.trainer, "finetune_causal_lm", "train")
phase(qera.analyze.init_error, "output_error_sweep", "sweep")
phase(qera.analyze.init_error, "prepare_qpeft_model", "solve")  # bound at import by analysis: wrap its name there
import qera.calibrate.forward
phase(qera.calibrate.forward, "collect_statistics", "calibrate")  # output-error / finetune: always in memory
from qera.cli import main
t0 = time.perf_counter()
code = main(sys.argv[1:])
print("MEMJSON" + json.dumps({"code": code, "seconds": time.perf_counter() - t0, "peak_gib": hwm(),
                              "phases": {k: round(v, 3) for k, v in peaks.items()}}))
"""


def commands(model: str, work: Path, max_memory: str | None) -> dict[str, list[str]]:
    calib = ["--calib-text", str(DATA / "wikitext-2" / "wiki.valid.tokens"), "--calib-samples", "32",
             "--calib-seq-len", "512"]
    ev = ["--eval-text", str(DATA / "wikitext-2-raw" / "wiki.test.raw"), "--seq-len", "512", "--max-windows", "16"]
    mem = ["--max-memory", max_memory] if max_memory else []
    out = lambda name: ["--out", str(work / f"{Path(model).name}-{name}"), "--overwrite"]  # noqa: E731
    return {
        "eval": ["eval", model, *ev],
        "calibrate": ["calibrate", model, *calib, *mem, *out("stats.safetensors")],
        "quantize": ["quantize", model, "--format", "mxint3", "--method", "qera-exact", "--rank", "8", *calib, *mem,
                     *out("q")],
        "compare": ["compare", model, "--methods", "w-only,lqer,qera-approx,qera-exact", "--settings", "mxint3@8,mxint4@8",
                    *calib, *ev, *mem],
        "output-error": ["output-error", model, "--formats", "mxint3", "--inits", "qlora,qera-exact", "--ranks", "8",
                         "--calib-text", str(DATA / "wikitext-2" / "wiki.valid.tokens"), "--calib-samples", "16",
                         "--eval-samples", "4", *out("oe")],
        "finetune": ["finetune", model, "--task", "clm", "--train", str(DATA / "wikitext-2" / "wiki.valid.tokens"),
                     "--eval", str(DATA / "wikitext-2-raw" / "wiki.test.raw"), "--init", "qera-exact", "--rank", "8",
                     "--seq-len", "256", "--max-train-samples", "8", "--max-eval-samples", "4", "--batch-size", "4",
                     "--epochs", "1", "--calib-samples", "16", *out("ft")],
    }


def formula(command: str, g: dict[str, float], streamed: bool, base: float = 0.4) -> float:
    """The README's formula for a command's peak (GiB); ``g`` holds the terms from :func:`sizes`.

    base: Python + torch + transformers; model: the weights in their dtype; stats: every layer's
    float64 statistics (in memory) or one block's (recorded block by block over the budget);
    fwd: one calibration forward's working set (batch tokens × (3·intermediate + 4·hidden) × 4 bytes);
    solve: one layer's solve (4·in² + 28·out·in bytes) plus the packed quantized layers so far;
    dense: one dense copy of the linear layers (evaluation caches W̃ + BA per layer);
    logits: one chunk of float32 logits and its log-softmax (2 × 2^24 × 4 bytes).
    The phases do not overlap, so the largest of them counts.

    output-error (``qera.analyze.init_error.output_error_sweep``): the fp model that collected the statistics
    stays referenced by ``cmd_output_error`` for the whole sweep, and so do all the statistics
    (abs+sq+xtx, always in memory: ``collect_statistics`` takes no budget). On top, the largest of:
    fwd_oe: the calibration forward (8 × --calib-seq-len 128 tokens); reference: a second fp model
    + 2·oe_logits (``_outputs``: the logits in the model dtype, their masked copy and the float32
    copy = 8 bytes per logit in bf16 and in fp32, where ``.float()`` is a no-op); solve: a fresh
    fp model + the reference logits (oe_logits) + one layer's solve + the packed layers; compare:
    the quantized model + 7·oe_logits (``compare_outputs``: reference and outputs, both
    log-softmaxes, and ``kl_div``'s exp(ref), ref − out and their product, all float32).
    oe_logits = eval tokens (4 × 128) × vocabulary × 4 bytes. The quantized model counts as
    model + packed, not model − dense + packed: ``load_model`` leaves the weights as views of the
    mmap-ed safetensors file, and the mapping lives while any of its tensors does (the embedding,
    the norms), so the fp linear weights' pages, read once by the solve, stay in the RSS (RssFile).

    finetune (clm, ``qera.finetune.trainer.finetune_causal_lm``): ``cmd_finetune`` keeps the statistics
    (xtx only, for qera-exact) referenced through training. Largest of: fwd_oe (calibration
    forward); solve + packed (quantizing in place); training: the packed base plus its dense
    W̃ + BA cache (``cache_base=True``: + packed + dense, on top of the fp weights, which stay
    resident through the file mapping as in output-error), the
    LoRA state (lora: weights, gradients, Adam's two moments, 4 × 4 bytes per LoRA parameter),
    the activations autograd saves for the backward (act, see :func:`sizes`) and 3·ft_logits: at
    the backward of the loss the log-softmax output (saved), ``nll_loss``'s gradient and the
    log-softmax's input gradient are all float32 logit-sized (the forward peak, bf16 logits +
    float32 upcast + log-softmax = 2.5·ft_logits, is lower). ft_logits = batch tokens (4 × 256)
    × vocabulary × 4 bytes.
    """
    logits = 2 * (1 << 24) * 4 / 2**30
    stats = g["block_stats"] if streamed else g["stats"]
    solve = g["solve"] + g["packed"]
    f = {
        "eval": base + g["model"] + logits + g["fwd_eval"],
        "calibrate": base + g["model"] + stats + g["fwd"],
        "quantize": base + g["model"] + stats + max(g["fwd"], solve),
        "compare": base + g["model"] + stats + max(g["fwd"], solve, g["dense"] + logits),
    }
    if "oe_logits" in g:  # rows written before these terms existed lack them
        # since the rows measured before 2026-11-30 11:00 (``held`` = True for them): cmd_output_error
        # drops its calibration model after the statistics and cmd_finetune drops the statistics after
        # the solve, so those terms count only in the phases that use them
        held = g.get("held_before_fix", False)
        f["output-error"] = base + g["stats"] + max(
            g["model"] + g["fwd_oe"], (g["model"] if held else 0.0) + max(
                g["model"] + 2 * g["oe_logits"], g["model"] + g["oe_logits"] + solve,
                g["model"] + g["packed"] + 7 * g["oe_logits"]))
        f["finetune"] = base + g["model"] + max(
            g["stats_xtx"] + max(g["fwd_oe"], solve),
            (g["stats_xtx"] if held else 0.0) + g["packed"] + g["dense"] + g["lora"] + g["act"] + 3 * g["ft_logits"])
    return f.get(command, float("nan"))


def sizes(model: str) -> dict[str, float]:
    """GiB of: the model in its dtype, its linear layers, its one-shot statistics (abs+sq+xtx of every
    distinct layer input) and one block's statistics, from the config.

    For output-error and finetune also: stats_xtx (xtx alone, what qera-exact collects); fwd_oe (a
    calibration forward of 8 × 128 tokens); oe_logits and ft_logits (one float32 copy of the
    logits of the evaluation batch, 4 × 128 tokens, or of a training batch, 4 × 256 tokens);
    lora (16 bytes per LoRA parameter, r·(in + out) per adapted layer); act, the tensors autograd
    saves in a training step, per token and block (h hidden, i intermediate, kv = KV heads × head
    dim, e the model's bytes per element, LoRA in float32):
    e·(3i + 2h + 2kv) for gate, up, silu(gate), the rotated q, k, v and the attention output (what
    SDPA saves); 8h for the float32 inputs of the two RMSNorms; 4·(6h + i) for the float32 copies
    PEFT makes of each LoRA A's input (q, k, v, o, gate, up, down, one cast each) when e = 2, or
    4·(3h + i) − 4h when e = 4 (no cast: q/k/v and gate/up share their input, o's input is the
    attention output already counted); 4·7r for the A outputs; 4·heads + 8 (SDPA's logsumexp, the
    RMSNorm rsqrt). The frozen QERALinear bases save nothing but their cached weight.
    """
    import torch
    from qera.io.models import convert_gguf, resolve_source
    from qera.io.lazy import empty_model
    from qera.nn.targets import find_targets, linear_shape
    from transformers import AutoConfig

    where = resolve_source(model)
    if isinstance(where, Path) and where.suffix == ".gguf":
        where = convert_gguf(where)
    cfg = AutoConfig.from_pretrained(where)
    m = empty_model(cfg, getattr(cfg, "dtype", None) or torch.float32)
    if getattr(cfg, "tie_word_embeddings", False):
        m.tie_weights()
    el = torch.empty(0, dtype=next(m.parameters()).dtype).element_size()
    params = sum(p.numel() for p in m.parameters())
    shapes = [linear_shape(t) for t in find_targets(m).values()]
    lin = sum(o * i for o, i in shapes)
    h, i = cfg.hidden_size, cfg.intermediate_size
    heads = cfg.num_attention_heads
    kv = (getattr(cfg, "num_key_value_heads", None) or heads) * (getattr(cfg, "head_dim", None) or h // heads)
    block = 8 * (3 * h * h + i * i + 2 * (3 * h + i))  # inputs of q/k/v, o, gate/up, down
    lora_in = 4 * (6 * h + i) if el != 4 else 4 * (3 * h + i) - 4 * h
    act = el * (3 * i + 2 * h + 2 * kv) + 8 * h + lora_in + 4 * 7 * FT_RANK + 4 * heads + 8
    L, V = cfg.num_hidden_layers, cfg.vocab_size
    gib = 2**30
    return {"model": params * el / gib, "dense": lin * el / gib, "stats": L * block / gib,
            "block_stats": block / gib,
            "fwd": CALIB_TOKENS * (3 * i + 4 * h) * 4 / gib, "fwd_eval": EVAL_TOKENS * (3 * i + 4 * h) * 4 / gib,
            "solve": max(4 * i_ * i_ + 28 * o_ * i_ for o_, i_ in shapes) / gib,
            "packed": lin * PACKED_BITS / 8 / gib,
            "stats_xtx": L * 8 * (3 * h * h + i * i) / gib, "fwd_oe": OE_CALIB_TOKENS * (3 * i + 4 * h) * 4 / gib,
            "oe_logits": OE_EVAL_TOKENS * V * 4 / gib, "ft_logits": FT_TOKENS * V * 4 / gib,
            "lora": 16 * FT_RANK * sum(o_ + i_ for o_, i_ in shapes) / gib, "act": FT_TOKENS * L * act / gib}


CALIB_TOKENS = 8 * 512  # --calib-batch-size 8 × --calib-seq-len 512
EVAL_TOKENS = 512
PACKED_BITS = 4.5  # mxint3/mxint4 codes + scales + a rank-8 A/B, per weight (upper end)
OE_CALIB_TOKENS = 8 * 128  # output-error / finetune: batches of 8 × the default --calib-seq-len 128
OE_EVAL_TOKENS = 4 * 128  # output-error: --eval-samples 4 × the default --eval-seq-len 128
FT_TOKENS = 4 * 256  # finetune: --batch-size 4 × --seq-len 256
FT_RANK = 8


def render(rows: list[dict]) -> None:
    print(f"# {machine()}")
    print("| model | command | budget | statistics | peak GiB | formula GiB | load | calibrate | solve | evaluate | sweep "
          "| train | wall s |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ph = r["phases"]
        cells = [f"{ph[k]:.2f}" if k in ph else "–" for k in ("load", "calibrate", "solve", "evaluate", "sweep", "train")]
        where = "by block, on disk" if r["stats_streamed"] else "in memory"
        cmd = r["command"] + (" (before the fix)" if r.get("held_before_fix") else "")
        print(f"| {r['model']} | {cmd} | {r['max_memory'] or 'default'} | {where} | {r['peak_gib']:.2f} | "
              f"{r['formula_gib']:.2f} | " + " | ".join(cells) + f" | {r['seconds']:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="qwen2-0.5b-shape,smollm2-135m")
    ap.add_argument("--commands", default="eval,calibrate,quantize,compare,output-error,finetune")
    ap.add_argument("--max-memory", default=None, help="passed to the commands that take it")
    ap.add_argument("--work", default="bench_work/memory")
    ap.add_argument("--render", nargs="+", metavar="JSONL", help="only print the table of earlier runs' JSON lines "
                    "(formula recomputed)")
    args = ap.parse_args()
    if args.render:
        rows = []
        for path in args.render:
            for line in Path(path).read_text().splitlines():
                if line.startswith("{"):
                    r = json.loads(line)
                    model = str(Path(args.work).parent / r["model"]) if r["model"] == "qwen2-0.5b-shape" else r["model"]
                    g = {**sizes(model), "held_before_fix": r.get("held_before_fix", False)}
                    r["formula_gib"] = formula(r["command"], g, r["stats_streamed"])
                    rows.append(r)
        render(rows)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models.split(","):
        model = name
        if name == "qwen2-0.5b-shape":
            from random_model import write_random_model
            from transformers import Qwen2Config

            model = str(work.parent / "qwen2-0.5b-shape")
            if not (Path(model) / "config.json").is_file():
                write_random_model(model, Qwen2Config(
                    hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                    num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768))
        size = sizes(model)
        for cmd in args.commands.split(","):
            argv = commands(model, work, args.max_memory)[cmd]
            out = subprocess.run([sys.executable, "-c", CHILD, *argv, "--no-progress"], capture_output=True, text=True,
                                 env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
            line = [l for l in out.stdout.splitlines() if l.startswith("MEMJSON")]
            if not line:
                raise SystemExit(f"{name} {cmd} failed:\n{out.stderr[-3000:]}")
            r = json.loads(line[-1][len("MEMJSON"):])
            streamed = "recorded block by block" in out.stderr
            r.update(model=name, command=cmd, formula_gib=formula(cmd, size, streamed), sizes_gib=size,
                     stats_streamed=streamed, max_memory=args.max_memory)
            rows.append(r)
            print(json.dumps(r), flush=True)
    render(rows)


if __name__ == "__main__":
    main()
