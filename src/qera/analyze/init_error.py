"""Model output error of adapter initializations before any training (QERA paper, Figure 1)."""

from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qera.core.formats import parse_format
from qera.core.methods import METHODS, get_method
from qera.nn.modules import QERALinear
from qera.finetune.qpeft import QPEFTConfig, prepare_qpeft_model
from qera.calibrate.store import CalibrationStats
from qera.nn.targets import find_targets, linear_weight, replace_module

log = logging.getLogger(__name__)


def _outputs(model, batches) -> list[torch.Tensor]:
    outs = []
    with torch.no_grad():
        for b in batches:
            o = model(**{k: v for k, v in b.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
            t = o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state
            mask = b.get("attention_mask")
            outs.append(t[mask.bool()] if mask is not None else t.reshape(-1, t.shape[-1]))
    return [o.float() for o in outs]


def compare_outputs(outs: Sequence[torch.Tensor], ref: Sequence[torch.Tensor], logits: bool) -> dict[str, float]:
    """Mean squared error per element and (for logits) mean KL(ref ‖ model) per token."""
    n = sum(o.shape[0] for o in outs)
    mse = sum(float(((o - r) ** 2).mean(-1).sum()) for o, r in zip(outs, ref)) / n
    out = {"logit_mse": mse}
    if logits:
        out["kl"] = sum(float(F.kl_div(o.log_softmax(-1), r.log_softmax(-1), log_target=True, reduction="sum"))
                        for o, r in zip(outs, ref)) / n
    return out


def _path_outputs(
    load_model: Callable[[], torch.nn.Module], fmt: str, init: str, rank: int, iters: int,
    eval_batches: Sequence[dict], seed: int,
) -> list[tuple[list[torch.Tensor], float]]:
    """Outputs of the model initialized by an iterating method (``Method.iterates``: LoftQ) after each
    of its ``1..iters`` iterations, from one run of the method.

    At step 0 the PEFT model computes ``x (W̃_t + B_t A_t)ᵀ`` (tested in ``tests/test_peft.py``), so each
    iteration's model is built directly from ``(W̃_t, A_t, B_t)``. Every layer goes through the same
    per-layer path as every run (check, then the method's ``solve_path``). Returns
    ``[(outputs, solve seconds so far)]``.
    """
    cfg = QPEFTConfig(format=fmt, init=init, rank=rank, init_options={"iters": iters}, seed=seed)
    qcfg = cfg.quant_config()
    method, wfmt = get_method(init, **qcfg.solver_options()), parse_format(fmt)
    model = load_model()
    targets = find_targets(model, qcfg.include, qcfg.exclude)
    paths: dict[str, list[tuple]] = {}
    elapsed = [0.0] * iters
    for name, lin in targets.items():
        W = linear_weight(lin).detach()
        method.check(W, rank, None, name)
        t0 = time.perf_counter()
        paths[name] = []
        for t, rec in enumerate(method.solve_path(W, wfmt.quantize(W, name), rank, None, wfmt, name)):
            paths[name].append((rec.qweight, rec.A, rec.B))
            elapsed[t] += time.perf_counter() - t0
    del model
    results = []
    for t in range(iters):
        model = load_model()
        for name, lin in find_targets(model, qcfg.include, qcfg.exclude).items():
            qw, A, B = paths[name][t]
            replace_module(model, name, QERALinear(qw, A, B, getattr(lin, "bias", None), cache_weight=True))
        results.append((_outputs(model, eval_batches), elapsed[t]))  # elapsed[t]: cumulative to iteration t + 1
        del model
    return results


def output_error_sweep(
    load_model: Callable[[], torch.nn.Module],
    fmt: str,
    stats: CalibrationStats,
    eval_batches: Sequence[dict],
    inits: Sequence[str] = ("qlora", "loftq", "qera-approx", "qera-exact"),
    ranks: Sequence[int] = (4, 8, 16, 32),
    loftq_iters: int = 5,
    progress: bool = True,
    on_row: Callable[[dict], None] | None = None,
    seed: int = 0,
) -> list[dict]:
    """Output error vs the full-precision model for each (init, rank[, LoftQ iterations 1..loftq_iters]).

    ``load_model`` returns a fresh full-precision model each call (it is quantized in place).
    ``on_row`` is called with each row as soon as it is measured (e.g. to save partial results).
    An iterating method (LoftQ) runs once per rank with ``loftq_iters`` iterations; every iteration's
    model is measured.
    """
    ref_model = load_model()
    ref = _outputs(ref_model, eval_batches)
    is_logits = getattr(ref_model(**{k: v[:1, :2] for k, v in eval_batches[0].items()}), "logits", None) is not None
    del ref_model
    jobs = [(init, rank) for init in inits for rank in ([ranks[0]] if init == "qlora" else ranks)]
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        log.info("%s", row)
        if on_row is not None:
            on_row(row)

    for init, rank in tqdm(jobs, desc=f"output error {fmt}", disable=not progress):
        base = {"format": fmt, "init": init, "rank": rank}
        if init != "qlora" and METHODS.get(init).iterates:  # every iteration measured, from one run
            for t, (outs, seconds) in enumerate(
                _path_outputs(load_model, fmt, init, rank, loftq_iters, eval_batches, seed), start=1
            ):
                emit({**base, "iters": t, **compare_outputs(outs, ref, is_logits), "solve_seconds": seconds})
            continue
        t0 = time.perf_counter()
        cfg = QPEFTConfig(format=fmt, init=init, rank=rank, seed=seed)
        model, _ = prepare_qpeft_model(load_model(), cfg, stats=stats, progress=False)
        solve_s = time.perf_counter() - t0
        row = {**base, "iters": None, **compare_outputs(_outputs(model, eval_batches), ref, is_logits), "solve_seconds": solve_s}
        del model
        emit(row)
        if init == "qlora":  # rank does not change QLoRA's step-0 output (B = 0)
            for r in ranks[1:]:
                emit({**row, "rank": r})
    return rows
