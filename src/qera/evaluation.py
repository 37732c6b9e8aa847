"""Evaluation: perplexity under the GPTQ protocol, and output-error metrics against a reference."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import tokenize
from .errors import QeraError


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean token negative log-likelihood (nats)
    tokens: int  # predicted tokens
    windows: int
    seq_len: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.windows * self.seq_len / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second}


def _adds_bos(tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def context_length(model) -> int | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    text: str,
    seq_len: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> PerplexityResult:
    """GPTQ-protocol perplexity: tokenize ``text`` once, split into non-overlapping windows.

    ``seq_len`` is capped at the model's context. Where the tokenizer adds a BOS token, each
    window is BOS + ``seq_len - 1`` text tokens. The result is ``exp`` of the mean token NLL over
    all windows.
    """
    limit = context_length(model)
    if limit:
        seq_len = min(seq_len, limit)
    if seq_len < 2:
        raise QeraError(f"seq_len must be >= 2, got {seq_len}")
    ids = tokenize(tokenizer, text)
    bos = tokenizer.bos_token_id if _adds_bos(tokenizer) else None
    step = seq_len - 1 if bos is not None else seq_len
    n = ids.numel() // step
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise QeraError(f"evaluation text has {ids.numel()} tokens; need at least {step} for one window")
    windows = ids[: n * step].view(n, step)
    if bos is not None:
        windows = torch.cat([torch.full((n, 1), bos, dtype=torch.long), windows], dim=1)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    t0 = time.perf_counter()
    try:
        for batch in tqdm(windows.split(batch_size), desc="perplexity", unit="win", disable=not progress):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            labels = batch[:, 1:]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
            total += float(nll)
            count += labels.numel()
    finally:
        model.train(was_training)
    nll = total / count
    return PerplexityResult(math.exp(nll), nll, count, n, seq_len, time.perf_counter() - t0)


@torch.no_grad()
def output_error(model, reference, batches, progress: bool = False) -> dict[str, float]:
    """Mean squared logit error and mean KL(reference ‖ model) per token over ``batches``."""
    mse, kl, count = 0.0, 0.0, 0
    for batch in tqdm(batches, desc="output error", disable=not progress):
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        a = model(input_ids=ids, attention_mask=mask).logits.float()
        b = reference(input_ids=ids, attention_mask=mask).logits.float()
        keep = torch.ones(ids.shape, dtype=torch.bool) if mask is None else mask.bool()
        a, b = a[keep], b[keep]
        mse += float(((a - b) ** 2).mean(-1).sum())
        kl += float(F.kl_div(a.log_softmax(-1), b.log_softmax(-1), log_target=True, reduction="sum"))
        count += a.shape[0]
    return {"logit_mse": mse / count, "kl": kl / count, "tokens": count}
