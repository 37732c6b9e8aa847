"""qera's GGUF exports against llama.cpp's own quants (with and without an importance matrix), all
scored by llama.cpp on the same windows; qera's own score of the same checkpoints; tokens per second.

    python experiments/llama_cpp_compare.py --llama-cpp /path/to/llama.cpp/build/bin --model smollm2-135m \\
        --calib-samples 128 --work runs/lcpp --out experiments/results/llama_cpp_smollm2_128.json \\
        --rows "lcpp:F32;lcpp:Q3_K_S;lcpp:Q3_K_S:imat;qera:q3_k:qera-exact:8"

Rows (``;``-separated):

- ``lcpp:TYPE[:imat]``: ``llama-quantize`` of the F32 model to ``TYPE`` (``F32`` itself; ``Q3_K_S``,
  ``Q4_K_S``, ``Q4_0`` …), with the importance matrix that ``llama-imatrix`` computes on the first
  ``--calib-samples`` windows of 512 tokens of WikiText-2 valid when ``imat`` is given.
- ``qera:FORMAT:RECIPE:RANK``: ``qera quantize`` (``--format-fallback auto``, ``--calib-samples``
  random windows of WikiText-2 valid, seed 0) then ``qera export --to gguf --base-type q8_0`` (the
  token embedding in Q8_0, as llama.cpp's quantizer stores it for these types); scored without and
  with the adapter. ``RECIPE``: ``qera-exact`` (RTN → qera-exact at rank ``RANK``) or ``best``
  (GPTQ → qera-iter, fisher output weighting, ranks allocated within the parameters of rank ``RANK``).
- ``agree:FORMAT:RECIPE:RANK``: the same checkpoint exported with ``--base-type auto`` (every tensor
  as qera computes it), run by llama.cpp with ``--kl-divergence-base``; qera scores the same windows
  (:func:`qera.evaluate.llama_cpp.agreement`): both perplexities, top-1 agreement, KL.

Perplexity: ``llama-perplexity -c 512 -b 512`` on the first ``--eval-bytes`` bytes of WikiText-2 raw
test, ``--chunks`` windows (llama.cpp scores the second half of each window), read from the running
perplexity it prints after the last window. With ``--speed``, llama.cpp's own timings of
``llama-completion`` (a prompt of about 540 tokens, then 128 generated; the median of ``--speed-runs``
runs) give prompt and generation tokens per second, with and without the adapter.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _protocol import DATA  # noqa: E402

from qera.io.models import resolve_source  # noqa: E402
from qera.util.atomic import write_json  # noqa: E402

QERA = [sys.executable, "-m", "qera"]
RECIPES = {
    "qera-exact": lambda r: ["--method", "qera-exact", "--rank", str(r)],
    "best": lambda r: ["--method", "qera-iter", "--rounding", "gptq", "--output-weight", "fisher",
                       "--rank-budget", str(r), "--rank", str(r)],
}


def run(cmd: list[str], log: Path, env: dict | None = None) -> tuple[str, float]:
    """Run ``cmd``; stdout+stderr to ``log``; returns (output, wall seconds); raises on failure."""
    t0 = time.perf_counter()
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    out = res.stdout + res.stderr
    log.write_text(" ".join(map(str, cmd)) + "\n" + out)
    if res.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({res.returncode}), see {log}:\n{out[-2000:]}")
    return out, time.perf_counter() - t0


class LlamaCpp:
    def __init__(self, bindir: Path, threads: int, chunks: int, text: Path, work: Path, repeats: int = 5) -> None:
        self.bin, self.t, self.chunks, self.text, self.work = bindir, threads, chunks, text, work
        self.repeats = repeats

    def tool(self, name: str) -> str:
        path = shutil.which(name, path=str(self.bin))
        if path is None:
            raise SystemExit(f"{name} not found in {self.bin}")
        return path

    def perplexity(self, model: Path, lora: Path | None, tag: str, logits: Path | None = None) -> dict:
        """llama.cpp's perplexity after ``chunks`` windows and its prompt tokens per second."""
        cmd = [self.tool("llama-perplexity"), "-m", model, "-f", self.text, "-c", "512", "-b", "512",
               "--chunks", str(self.chunks + 1), "-t", str(self.t)]  # one more: the log may drop the last lines
        if lora is not None:
            cmd += ["--lora", lora]
        if logits is not None:
            cmd += ["--kl-divergence-base", logits]
        out, wall = run(cmd, self.work / f"ppl-{tag}.log")
        running = dict(re.findall(r"\[(\d+)\]([0-9.]+)", out))
        if str(self.chunks) not in running:
            raise RuntimeError(f"no running perplexity after window {self.chunks} in {self.work / f'ppl-{tag}.log'}")
        return {"llama_cpp_ppl": float(running[str(self.chunks)]), "ppl_wall_s": wall}

    def speed(self, model: Path, lora: Path | None, tag: str) -> dict:
        """llama.cpp's own timings: prompt processing of ``prompt`` (about 540 tokens) and generation of
        128 tokens after it (greedy), tokens per second, the median of ``repeats`` runs."""
        prompt = self.work / "prompt.txt"
        if not prompt.exists():
            prompt.write_bytes(self.text.read_bytes()[:2000])
        cmd = [self.tool("llama-completion"), "-m", model, "-f", prompt, "-n", "128", "-c", "1024",
               "-t", str(self.t), "--temp", "0", "-no-cnv", "--ignore-eos"]
        if lora is not None:
            cmd += ["--lora", lora]
        pp, tg = [], []
        for _ in range(self.repeats):
            out, _ = run(cmd, self.work / f"speed-{tag}.log")
            pp += [float(v) for v in re.findall(r"prompt eval time =.*?([0-9.]+) tokens per second", out)[-1:]]
            tg += [float(v) for v in re.findall(r"\beval time =.*?([0-9.]+) tokens per second", out)[-1:]]
        return {"prompt_tokens_per_s": statistics.median(pp) if pp else None,
                "gen_tokens_per_s": statistics.median(tg) if tg else None, "speed_runs": self.repeats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-cpp", required=True, help="folder with llama-perplexity, llama-quantize, llama-imatrix")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", required=True)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--chunks", type=int, default=20, help="windows of 512 scored by llama.cpp")
    ap.add_argument("--eval-bytes", type=int, default=300_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--speed", action="store_true", help="also time prompt processing and generation (llama-completion)")
    ap.add_argument("--respeed", action="store_true", help="rows already in --out: time them again (nothing else)")
    ap.add_argument("--speed-runs", type=int, default=5, help="runs per timing; the median is reported")
    ap.add_argument("--work", default="runs/lcpp")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    text = work / "wiki.test.prefix.raw"
    text.write_bytes((DATA / "wikitext-2-raw" / "wiki.test.raw").read_bytes()[: args.eval_bytes])
    valid = DATA / "wikitext-2" / "wiki.valid.tokens"
    lc = LlamaCpp(Path(args.llama_cpp), args.threads, args.chunks, text, work, args.speed_runs)
    source = Path(resolve_source(args.model))
    f32 = work / "f32.gguf"
    if not f32.exists():
        run([lc.tool("llama-quantize"), "--allow-requantize", source, f32, "F32", str(args.threads)], work / "f32.log")
    out_path = Path(args.out)
    result = json.loads(out_path.read_text()) if out_path.exists() else {"rows": []}
    result.update({"model": args.model, "source": source.name, "calib_samples": args.calib_samples,
                   "eval": f"llama-perplexity -c 512 -b 512, first {args.eval_bytes} bytes of WikiText-2 raw test, "
                           f"running perplexity after window {args.chunks} (second half of each window scored)",
                   "threads": args.threads})
    done = {r["row"] for r in result["rows"]}

    def emit(row: dict) -> None:
        result["rows"] = [r for r in result["rows"] if r["row"] != row["row"]] + [row]
        write_json(out_path, result)
        print(json.dumps(row), flush=True)

    for spec in filter(None, args.rows.split(";")):
        parts = spec.split(":")
        tag = spec.replace(":", "-")
        if spec in done:
            if args.respeed and parts[0] != "agree":  # the timings again, alone on the cores
                row = next(r for r in result["rows"] if r["row"] == spec)
                if parts[0] == "lcpp":
                    row.update(lc.speed(f32 if parts[1] == "F32" else work / f"{tag}.gguf", None, tag))
                else:
                    gg = work / f"gguf-{parts[1]}-{parts[2]}-{parts[3]}-q8_0"
                    row.update({f"base_{k}": v for k, v in lc.speed(gg / "model.gguf", None, tag + "-base").items()})
                    row.update(lc.speed(gg / "model.gguf", gg / "adapter.gguf", tag + "-lora"))
                emit(row)
            continue
        if parts[0] == "lcpp":
            qtype, imat = parts[1], "imat" in parts[2:]
            row = {"row": spec, "type": qtype, "imatrix": imat}
            model = f32
            if qtype != "F32":
                model = work / f"{tag}.gguf"
                cmd = [lc.tool("llama-quantize")]
                if imat:
                    dat = work / f"imatrix-{args.calib_samples}.dat"
                    if not dat.exists():
                        _, row["imatrix_s"] = run([lc.tool("llama-imatrix"), "-m", f32, "-f", valid, "-o", dat, "-c", "512",
                                                   "-b", "512", "--chunks", str(args.calib_samples), "-t", str(args.threads)],
                                                  work / "imatrix.log")
                    cmd += ["--imatrix", dat]
                _, row["quantize_s"] = run(cmd + [f32, model, qtype, str(args.threads)], work / f"quant-{tag}.log")
            row["file_bytes"] = model.stat().st_size
            row.update(lc.perplexity(model, None, tag))
            if args.speed:
                row.update(lc.speed(model, None, tag))
            emit(row)
            continue
        kind, fmt, recipe, rank = parts[0], parts[1], parts[2], int(parts[3])
        ck = work / f"ck-{fmt}-{recipe}-{rank}"
        qrow: dict = {"row": spec, "format": fmt, "recipe": recipe, "rank": rank}
        if not (ck / "qera_config.json").exists() and not any(ck.glob("*.safetensors")):
            _, qrow["qera_quantize_s"] = run(QERA + ["quantize", args.model, "--format", fmt, "--format-fallback", "auto",
                                                     *RECIPES[recipe](rank), "--calib-text", valid, "--calib-samples",
                                                     str(args.calib_samples), "--no-progress", "--overwrite", "--out", ck],
                                             work / f"qera-{fmt}-{recipe}-{rank}.log")
        base_type = "q8_0" if kind == "qera" else "auto"
        gg = work / f"gguf-{fmt}-{recipe}-{rank}-{base_type}"
        if not (gg / "model.gguf").exists():
            run(QERA + ["export", ck, "--to", "gguf", "--gguf-source", args.model, "--base-type", base_type,
                        "--overwrite", "--out", gg], work / f"export-{tag}.log")
        lora = gg / "adapter.gguf"
        qrow["file_bytes"] = (gg / "model.gguf").stat().st_size
        qrow["adapter_bytes"] = lora.stat().st_size if lora.exists() else 0
        if kind == "qera":
            base = lc.perplexity(gg / "model.gguf", None, tag + "-base")
            qrow.update({f"base_{k}": v for k, v in base.items()})
            qrow.update(lc.perplexity(gg / "model.gguf", lora, tag + "-lora"))
            if args.speed:
                qrow.update({f"base_{k}": v for k, v in lc.speed(gg / "model.gguf", None, tag + "-base").items()})
                qrow.update(lc.speed(gg / "model.gguf", lora, tag + "-lora"))
        else:  # agreement: llama.cpp's logits on its windows against qera's model on the same windows
            import torch

            from qera import load_quantized
            from qera.evaluate.llama_cpp import agreement, gguf_window_bos, read_logits_file

            logits = work / f"logits-{tag}.bin"
            qrow.update(lc.perplexity(gg / "model.gguf", lora, tag, logits=logits))
            model, _ = load_quantized(ck)
            model.float()  # llama.cpp computes activations in float32; fp16/bf16 stored values are exact in it
            torch.set_num_threads(args.threads)
            bos = gguf_window_bos(gg / "model.gguf")
            qrow.update(agreement(model, read_logits_file(logits), bos, progress=False))
            del model
            os.remove(logits)
        emit(qrow)


if __name__ == "__main__":
    main()
