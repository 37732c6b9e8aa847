"""Model output error of adapter initializations before any training (QERA paper, Figure 1)."""

from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .calibration import CalibrationStats
from .peft import QPEFTConfig, prepare_qpeft_model

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


def output_error_sweep(
    load_model: Callable[[], torch.nn.Module],
    fmt: str,
    stats: CalibrationStats,
    eval_batches: Sequence[dict],
    inits: Sequence[str] = ("qlora", "loftq", "qera-approx", "qera-exact"),
    ranks: Sequence[int] = (4, 8, 16, 32),
    loftq_iters: Sequence[int] = (1, 2, 3, 4, 5),
    progress: bool = True,
) -> list[dict]:
    """Output error vs the full-precision model for each (init, rank[, LoftQ iterations]).

    ``load_model`` returns a fresh full-precision model each call (it is quantized in place).
    """
    ref_model = load_model()
    ref = _outputs(ref_model, eval_batches)
    is_logits = getattr(ref_model(**{k: v[:1, :2] for k, v in eval_batches[0].items()}), "logits", None) is not None
    del ref_model
    jobs = []
    for init in inits:
        for rank in ([ranks[0]] if init == "qlora" else ranks):
            for iters in (loftq_iters if init == "loftq" else [None]):
                jobs.append((init, rank, iters))
    rows = []
    for init, rank, iters in tqdm(jobs, desc=f"output error {fmt}", disable=not progress):
        t0 = time.perf_counter()
        cfg = QPEFTConfig(format=fmt, init=init, rank=rank, init_options={"iters": iters} if iters else {})
        model, _ = prepare_qpeft_model(load_model(), cfg, stats=stats, progress=False)
        row = {"format": fmt, "init": init, "rank": rank, "iters": iters,
               **compare_outputs(_outputs(model, eval_batches), ref, is_logits), "seconds": time.perf_counter() - t0}
        rows.append(row)
        log.info("%s", row)
        if init == "qlora":  # rank does not change QLoRA's step-0 output (B = 0)
            rows.extend({**row, "rank": r} for r in ranks[1:])
    return rows
