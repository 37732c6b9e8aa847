"""Why does fisher rank allocation hurt Gemma-3-270M (issue 28, item 0)? Measurements, one stage each.

Calibration: ``--calib`` windows × 512 tokens of WikiText-2 valid, BOS-first (seed 0), as
``calibration_batches`` draws them. Validation: ``--val`` windows of 512 tokens of WikiText-2 valid that
share no token with the calibration windows (:func:`qera.io.data.heldout_windows`), BOS-first; used to
choose. Test: the first ``--windows`` × 512 tokens of WikiText-2 raw test (GPTQ protocol), only for the
final numbers. Intermediate results (statistics, gradient statistics) are cached under ``--cache``.

Stages (``--stage``):
  ``grad``     one backward pass over the calibration windows with diagnostic hooks: per layer
               ``E‖g‖²`` split into the BOS row and the other rows, the rank-0 error ``E‖δy‖²``
               (``δy = x Dᵀ``, D the RTN error) likewise, and the per-token costs ``E[(g·δy)²]``
               (empirical Fisher of the error) and ``E[‖g‖²‖δy‖²]/out`` (per-token isotropic);
               ``E‖g‖²/out`` is what the fisher normalization uses.
  ``alloc``    the error spectra and the ranks each normalization gives, per layer type and per block.
  ``eval``     perplexity of rank assignments (``--variants``) on the validation windows (and with
               ``--test`` on the test windows); each variant is one quantize + evaluate.

    python experiments/gemma3_allocation.py --stage grad
    python experiments/gemma3_allocation.py --stage alloc
    python experiments/gemma3_allocation.py --stage eval --variants uniform,fisher
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _protocol import DATA  # noqa: E402

from qera import QuantConfig, find_targets, load_model, quantize_model  # noqa: E402
from qera.calibrate.forward import collect_statistics, model_device  # noqa: E402
from qera.calibrate.store import CalibrationStats  # noqa: E402
from qera.core.allocation import NORMALIZERS, allocate_ranks, budget_params  # noqa: E402
from qera.evaluate.perplexity import ChunkedHead, nll_sum, perplexity  # noqa: E402
from qera.io.data import bos_id, calibration_batches, heldout_windows, load_text, prepend_bos, tokenize  # noqa: E402
from qera.nn.targets import linear_shape, linear_weight, replace_module  # noqa: E402
from qera.quantize.layer import LayerQuantizer  # noqa: E402

log = logging.getLogger("gemma3_allocation")
TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def layer_type(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def block_of(name: str) -> int:
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


class Setup:
    """The model, its calibration batches and validation windows, and the cache."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cache = Path(args.cache) / f"{args.model}-c{args.calib}"
        self.cache.mkdir(parents=True, exist_ok=True)
        self.model, self.tok = load_model(args.model)
        self.model.eval()
        valid = load_text(str(DATA / "wikitext-2" / "wiki.valid.tokens"), "calibration")
        self.calib = calibration_batches(self.tok, valid, n_samples=args.calib, seq_len=512, seed=0, batch_size=8)
        val = heldout_windows(tokenize(self.tok, valid), args.val, 512, calib_samples=args.calib, calib_len=512)
        bos = bos_id(self.tok)
        self.val = prepend_bos(val, bos) if bos is not None else val  # as the calibration windows start
        self.targets = find_targets(self.model)

    def stats(self) -> CalibrationStats:
        path = self.cache / "stats.safetensors"
        if path.is_file():
            return CalibrationStats.load(path)
        t0 = time.perf_counter()
        stats = collect_statistics(self.model, self.calib, self.targets, kinds=("abs", "sq", "xtx"), progress=False)
        stats.save(path)
        log.info("statistics: %.0f s", time.perf_counter() - t0)
        return stats

    @torch.no_grad()
    def val_ppl(self) -> float:
        head = ChunkedHead.for_model(self.model, self.val[:1])
        total, count = 0.0, 0
        for w in self.val.split(1):
            total += nll_sum(self.model, head, w)
            count += w[:, 1:].numel()
        return math.exp(total / count)

    def test_ppl(self) -> float:
        text = load_text(str(DATA / "wikitext-2-raw" / "wiki.test.raw"), "evaluation")
        return perplexity(self.model, self.tok, text, seq_len=512, max_windows=self.args.windows,
                          progress=False).perplexity


def grad_stage(s: Setup) -> dict:
    """Per-layer gradient and error statistics over the calibration windows (see the module docstring)."""
    path = s.cache / f"grad-{s.args.format}.json"
    if path.is_file():
        res = json.loads(path.read_text())
        for n, a in res["layers"].items():
            a["out"] = linear_shape(s.targets[n])[0]
        return res
    stats = s.stats()
    q = LayerQuantizer(QuantConfig(format=s.args.format, method="qera-exact", rank=8))
    D = {}
    for name, mod in s.targets.items():
        W = linear_weight(mod).detach()
        D[name] = (W.float() - q.round(name, W, stats[name]).dequantize(torch.float32)).contiguous()
    keys = ("g2", "g2_bos", "e2", "e2_bos", "gd2", "gd2_bos", "gd", "g2e2", "g2e2_bos", "diag", "tokens")
    acc = {n: dict.fromkeys(keys, 0.0) for n in s.targets}
    chan = {n: torch.zeros(linear_shape(m)[0], dtype=torch.float64) for n, m in s.targets.items()}
    chan_nobos = {n: torch.zeros_like(v) for n, v in chan.items()}
    handles = []

    def hook(name: str):
        def fwd(mod, args, out):
            x = args[0].detach()
            dy = (x.float() @ D[name].T)[0]  # (L, out)

            def bwd(g):
                g = g.detach().float()[0]
                a = acc[name]
                g2, e2 = g.pow(2).sum(-1).double(), dy.pow(2).sum(-1).double()
                gd = (g * dy).sum(-1).double()
                out_f = g.shape[-1]
                a["g2"] += float(g2.sum()); a["g2_bos"] += float(g2[0])
                a["e2"] += float(e2.sum()); a["e2_bos"] += float(e2[0])
                a["gd2"] += float(gd.pow(2).sum()); a["gd2_bos"] += float(gd[0] ** 2)
                a["gd"] += float(gd.sum())
                a["g2e2"] += float((g2 * e2).sum()) / out_f; a["g2e2_bos"] += float(g2[0] * e2[0]) / out_f
                a["diag"] += float((g.pow(2) * dy.pow(2)).sum())
                a["tokens"] += g.shape[0]
                chan[name].add_(g.pow(2).sum(0).double())
                chan_nobos[name].add_(g[1:].pow(2).sum(0).double())
            out.register_hook(bwd)
        return fwd

    embed = s.model.get_input_embeddings()
    handles.append(embed.register_forward_hook(lambda m, a, o: o.requires_grad_()))
    handles += [m.register_forward_hook(hook(n)) for n, m in s.targets.items()]
    flags = {p: p.requires_grad for p in s.model.parameters()}
    losses = []
    t0 = time.perf_counter()
    try:
        for p in flags:
            p.requires_grad_(False)
        dev = model_device(s.model)
        for b in s.calib:
            for ids in b["input_ids"].split(1):
                ids = ids.to(dev)
                with torch.enable_grad():
                    out = s.model(input_ids=ids, labels=ids, use_cache=False)
                    n = ids.shape[1] - 1
                    (out.loss * n).backward()
                losses.append(float(out.loss))
    finally:
        for h in handles:
            h.remove()
        for p, f in flags.items():
            p.requires_grad_(f)
    log.info("gradient pass: %.0f s, mean loss %.4f", time.perf_counter() - t0, sum(losses) / len(losses))
    res = {"loss": sum(losses) / len(losses), "layers": acc,
           "chan_cv": {n: float(c.std() / c.mean()) for n, c in chan.items()},
           "chan_cv_nobos": {n: float(c.std() / c.mean()) for n, c in chan_nobos.items()}}
    torch.save({"chan": chan, "chan_nobos": chan_nobos}, s.cache / "chan.pt")
    path.write_text(json.dumps(res))
    for n, a in res["layers"].items():
        a["out"] = linear_shape(s.targets[n])[0]
    return res


def proxy_stage(s: Setup) -> dict:
    """Per layer, what a token-weighted sensitivity can use without knowing the error ``D``:
    ``Σ_t ‖g_t‖² ‖x_t‖²`` and ``Σ_t ‖x_t‖²`` (input-energy weighting), and per input channel
    ``a_i = Σ_t ‖g_t‖² x_ti²`` and ``b_i = Σ_t x_ti²`` (with ``D``'s column energies ``d_i`` the
    weight ``Σ a_i d_i / Σ b_i d_i``)."""
    path = s.cache / "proxy.pt"
    if path.is_file():
        return torch.load(path)
    acc = {n: {"gx": 0.0, "x": 0.0, "a": 0.0, "b": 0.0, "tokens": 0} for n in s.targets}
    handles = []

    def hook(name: str):
        def fwd(mod, args, out):
            x2 = args[0].detach().float()[0].pow(2)  # (L, in)

            def bwd(g):
                g2 = g.detach().float()[0].pow(2).sum(-1).double()  # (L,)
                a = acc[name]
                xn = x2.sum(-1).double()
                a["gx"] += float((g2 * xn).sum()); a["x"] += float(xn.sum())
                a["a"] = a["a"] + (g2[:, None] * x2.double()).sum(0); a["b"] = a["b"] + x2.double().sum(0)
                a["tokens"] += g2.numel()
            out.register_hook(bwd)
        return fwd

    handles.append(s.model.get_input_embeddings().register_forward_hook(lambda m, a, o: o.requires_grad_()))
    handles += [m.register_forward_hook(hook(n)) for n, m in s.targets.items()]
    flags = {p: p.requires_grad for p in s.model.parameters()}
    t0 = time.perf_counter()
    try:
        for p in flags:
            p.requires_grad_(False)
        for b in s.calib:
            for ids in b["input_ids"].split(1):
                with torch.enable_grad():
                    out = s.model(input_ids=ids, labels=ids, use_cache=False)
                    (out.loss * (ids.shape[1] - 1)).backward()
    finally:
        for h in handles:
            h.remove()
        for p, f in flags.items():
            p.requires_grad_(f)
    log.info("proxy pass: %.0f s", time.perf_counter() - t0)
    torch.save(acc, path)
    return acc


def curves_of(s: Setup, method: str = "qera-exact") -> list:
    """Every layer's error curve (RTN, ``method``'s metric), cached."""
    path = s.cache / f"curves-{s.args.format}-{method}.pt"
    if path.is_file():
        return torch.load(path, weights_only=False)
    stats = s.stats()
    q = LayerQuantizer(QuantConfig(format=s.args.format, method=method, rank=8))
    curves = [q.error_curve(n, m, stats[n])[1] for n, m in s.targets.items()]
    torch.save(curves, path)
    return curves


def weights_of(grad: dict, kind: str) -> dict[str, float]:
    """Per-layer loss weight of a unit of output error energy ``E‖δy‖²`` under several models of the loss.

    ``fisher``: ``E‖g‖²/out`` (what the library uses); ``fisher-nobos``: the same without the BOS rows;
    ``efisher``: ``E[(g·δy)²] / E‖δy‖²`` at the rank-0 error δy (the empirical Fisher in the error's own
    direction, per unit of its energy); ``tokfisher``: ``E[‖g‖²‖δy‖²]/out / E‖δy‖²`` (the fisher weight
    taken token by token, each token's gradient energy weighed by its own error energy)."""
    out = {}
    for n, a in grad["layers"].items():
        t = a["tokens"]
        if kind == "fisher":
            out[n] = a["g2"] / t / a["out"]
        elif kind == "fisher-nobos":
            out[n] = (a["g2"] - a["g2_bos"]) / t / a["out"]
        elif kind == "efisher":
            out[n] = a["gd2"] / a["e2"]
        elif kind == "tokfisher":
            out[n] = a["g2e2"] / a["e2"]
        else:
            raise ValueError(kind)
    return out


def allocation(s: Setup, kind: str, curves: list, grad: dict) -> dict[str, int]:
    """Ranks under ``--budget`` by one normalization (a library name, or a weight of :func:`weights_of`)."""
    shapes = {c.name: linear_shape(s.targets[c.name]) for c in curves}
    budget = budget_params(shapes, rank_budget=s.args.budget)
    kind, _, floor = kind.partition("+f")  # KIND+fN: every layer keeps at least rank N
    floor = int(floor or 0)
    if kind == "uniform":
        return {c.name: int(s.args.budget) for c in curves}
    if kind in NORMALIZERS.names() and kind != "fisher":
        return allocate_ranks(curves, budget, kind, floor=floor)
    w = weights_of(grad, kind)
    for c in curves:
        c.sensitivity = w[c.name]
    return allocate_ranks(curves, budget, "fisher", floor=floor)


def describe(ranks: dict[str, int], curves: list) -> dict:
    """Mean rank per layer type, parameters per block, layers at rank 0."""
    cost = {c.name: c.cost for c in curves}
    per_type = {t: sum(r for n, r in ranks.items() if layer_type(n) == t) / max(1, sum(1 for n in ranks if layer_type(n) == t))
                for t in TYPES}
    blocks = sorted({block_of(n) for n in ranks})
    total = sum(r * cost[n] for n, r in ranks.items())
    per_block = [round(sum(r * cost[n] for n, r in ranks.items() if block_of(n) == b) / total, 4) for b in blocks]
    zero = sorted(n for n, r in ranks.items() if r == 0)
    return {"per_type": {t: round(v, 2) for t, v in per_type.items()}, "block_share": per_block,
            "min_rank": min(ranks.values()), "max_rank": max(ranks.values()),
            "zero": len(zero), "zero_types": {t: sum(1 for n in zero if layer_type(n) == t) for t in TYPES}}


def evaluate(s: Setup, name: str, ranks: dict[str, int], method: str = "qera-exact", **cfg_kw) -> dict:
    """Quantize with exactly ``ranks`` (one override per layer), score, put the fp layers back."""
    stats = s.stats()
    overrides = {f"^{re.escape(n)}$": r for n, r in ranks.items()}
    cfg = QuantConfig(format=s.args.format, method=method, rank=int(s.args.budget), rank_overrides=overrides, **cfg_kw)
    originals = dict(s.targets)
    t0 = time.perf_counter()
    try:
        rep = quantize_model(s.model, cfg, stats=stats, progress=False)
        row = {"variant": name, "method": method, "format": s.args.format, "budget": s.args.budget,
               "calib": s.args.calib, "quantize_s": round(time.perf_counter() - t0, 1),
               "val_ppl": round(s.val_ppl(), 3), "val_windows": s.args.val}
        if s.args.test:
            row.update(test_ppl=round(s.test_ppl(), 3), test_windows=s.args.windows)
        row["bits_total"] = round(rep.quality()["bits_total"], 4)
    finally:
        for n, m in originals.items():
            replace_module(s.model, n, m)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def use_cached_fisher(s: Setup, token_weight: str) -> None:
    """The library's loss-gradient pass is the same for every recipe of a run (same fp model, same
    windows): compute ``output_fisher(token_weight=...)`` once, keep it under the cache, and let the
    library read it (both the fisher normalization and the output weighting go through it)."""
    import qera.calibrate.sensitivity as sensitivity

    compute = sensitivity.output_fisher
    path = s.cache / f"fisher-{token_weight}.pt"
    chan = s.cache / "chan.pt"
    if not path.is_file() and token_weight == "none" and chan.is_file():  # the grad stage's sums: the same pass
        tokens = sum(int(b["attention_mask"].sum()) for b in s.calib)
        torch.save({n: c / tokens for n, c in torch.load(chan)["chan"].items()}, path)
    if not path.is_file():
        t0 = time.perf_counter()
        fisher = compute(s.model, s.calib, s.targets, token_weight=token_weight)
        torch.save(fisher, path)
        log.info("loss-gradient pass (token_weight=%s): %.0f s", token_weight, time.perf_counter() - t0)
    fisher = torch.load(path)

    def cached(model, batches, targets, progress=False, full=False, token_weight=token_weight):
        if full:
            raise ValueError("kfac is not cached here")
        return {n: fisher[n] for n in targets}

    sensitivity.output_fisher = cached


def parse_recipe(spec: str) -> dict:
    """``ROUNDING:METHOD:BUDGET[:ow][:NORMALIZE]``: BUDGET ``uN`` (rank N everywhere) or ``bN`` (budget
    of rank N, allocated); ``ow``: ``output_weight="fisher"``; NORMALIZE a ``rank_normalize`` name."""
    rounding, method, budget, *flags = spec.split(":")
    kw: dict = {"rounding": rounding, "method": method, "rank": int(budget[1:])}
    if budget[0] == "b":
        kw["rank_budget"] = float(budget[1:])
    for f in flags:
        if f == "ow":
            kw["output_weight"] = "fisher"
        else:
            kw["rank_normalize"] = f
    return kw


def recipe_stage(s: Setup, spec: str) -> dict:
    """One recipe through the library's own path (``quantize_model`` with the config, the cached
    statistics and the calibration batches), scored on the validation (and test) windows."""
    kw = parse_recipe(spec)
    cfg = QuantConfig(format=s.args.format, **kw)
    originals = dict(s.targets)
    t0 = time.perf_counter()
    try:
        rep = quantize_model(s.model, cfg, stats=s.stats(), calibration=s.calib, progress=False)
        ranks = {l.name: l.rank for l in rep.layers}
        import qera.core.allocation as allocation_module

        row = {"recipe": spec, "token_weight": s.args.token_weight, "floor_share": allocation_module.FLOOR_SHARE, "model": s.args.model, "format": s.args.format,
               "calib": s.args.calib, "quantize_s": round(time.perf_counter() - t0, 1),
               "bits_total": round(rep.quality()["bits_total"], 4),
               "notes": [n for n in rep.notes if "ranks allocated" in n],
               "val_ppl": round(s.val_ppl(), 3), "val_windows": s.args.val}
        if s.args.test:
            row.update(test_ppl=round(s.test_ppl(), 3), test_windows=s.args.windows)
    finally:
        for n, m in originals.items():
            replace_module(s.model, n, m)
    curves = [type("C", (), {"name": n, "cost": sum(linear_shape(m))})() for n, m in s.targets.items()]
    row["allocation"] = describe(ranks, curves)
    row["ranks"] = ranks
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--format", default="mxint3")
    ap.add_argument("--budget", type=float, default=8)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--val", type=int, default=16)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--stage", default="grad")
    ap.add_argument("--variants", default="uniform")
    ap.add_argument("--test", action="store_true")
    ap.add_argument("--floor-share", type=float, help="the library's FLOOR_SHARE for the recipe stage (default: "
                    "the library's own)")
    ap.add_argument("--token-weight", default="input", help="the loss-gradient pass's token weighting (recipe stage)")
    ap.add_argument("--cache", default="/tmp/qera-gemma3-alloc")
    ap.add_argument("--out", default="experiments/results/gemma3_allocation.jsonl")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(2)
    s = Setup(args)
    if args.stage == "grad":
        res = grad_stage(s)
        by_type = defaultdict(lambda: defaultdict(float))
        for n, a in res["layers"].items():
            for k, v in a.items():
                by_type[layer_type(n)][k] += v
        for t in TYPES:
            a = by_type[t]
            log.info("%-9s g2/tok %.3e (bos share %.3f)  e2/tok %.3e (bos share %.3f)  gd2 bos share %.3f  "
                     "gd2/(g2e2) %.3f  gd2/prod %.3f", t, a["g2"] / a["tokens"], a["g2_bos"] / a["g2"],
                     a["e2"] / a["tokens"], a["e2_bos"] / a["e2"], a["gd2_bos"] / a["gd2"], a["gd2"] / a["g2e2"],
                     a["gd2"] * a["tokens"] / (a["g2"] * a["e2"]))
    elif args.stage == "recipe":
        if args.floor_share is not None:  # the library's default floor, as the run asks
            import qera.core.allocation as allocation_module

            allocation_module.FLOOR_SHARE = args.floor_share
        use_cached_fisher(s, args.token_weight)
        for spec in args.variants.split(","):
            row = recipe_stage(s, spec)
            log.info("%s", json.dumps({k: v for k, v in row.items() if k != "ranks"}))
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    elif args.stage == "proxy":
        proxy_stage(s)
    elif args.stage == "alloc":
        grad, curves = grad_stage(s), curves_of(s)
        rows = {}
        for kind in args.variants.split(","):
            d = describe(allocation(s, kind, curves, grad), curves)
            rows[kind] = d
            log.info("%-13s zero %3d %s  per type %s", kind, d["zero"], d["zero_types"], d["per_type"])
            log.info("%-13s block shares %s", kind, d["block_share"])
        Path(args.out).with_suffix(".alloc.json").write_text(json.dumps(rows, indent=1))
    elif args.stage == "eval":
        grad, curves = grad_stage(s), curves_of(s)
        for kind in args.variants.split(","):
            row = evaluate(s, kind, allocation(s, kind, curves, grad))
            print(json.dumps(row), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
