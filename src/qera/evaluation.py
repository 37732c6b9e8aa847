"""Evaluation: perplexity under the GPTQ protocol, and output-error metrics against a reference."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import bos_id, tokenize
from .errors import QeraError

log = logging.getLogger(__name__)


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


def context_length(model) -> int | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


LOGIT_ELEMS = 1 << 24  # logits formed at a time (64 MB in float32): 110 positions of a 152k vocabulary

# Output processing some causal LMs apply to the LM head's output (config attribute → function).
LOGIT_POSTPROCESS = {
    "final_logit_softcapping": lambda x, v: torch.tanh(x / v) * v,  # Gemma-2/3
    "logit_scale": lambda x, v: x * v,  # Cohere
    "logits_scaling": lambda x, v: x / v,  # Granite
}


class ChunkedHead:
    """Token NLL from the decoder's hidden states with the LM head applied a few positions at a time.

    A window then never holds its full ``(seq, vocab)`` float32 logits and their log-softmax (1.2 GB
    each for 2048 positions of a 152k vocabulary). :meth:`for_model` checks the chunked logits
    against the model's own forward on a few positions and returns None (use the full logits) when
    they differ, so a model with unknown output processing is never evaluated wrongly.
    """

    def __init__(self, model, decoder, head, post) -> None:
        self.model, self.decoder, self.head, self.post = model, decoder, head, post
        self.rows = max(1, LOGIT_ELEMS // head.weight.shape[0])

    @classmethod
    def for_model(cls, model, probe: torch.Tensor) -> "ChunkedHead | None":
        get_dec, get_head = getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", None)
        decoder = get_dec() if callable(get_dec) else None
        head = get_head() if callable(get_head) else None
        if decoder is None or decoder is model or head is None or getattr(head, "weight", None) is None:
            return None
        cfg = getattr(model, "config", None)
        post = [(fn, getattr(cfg, key)) for key, fn in LOGIT_POSTPROCESS.items() if getattr(cfg, key, None)]
        ch = cls(model, decoder, head, post)
        ids = probe[:, : min(probe.shape[1], 16)]
        want = model(input_ids=ids, use_cache=False).logits.float()
        got = torch.cat(list(ch.logits(ids)), dim=1)
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max())):
            log.info("chunked LM head does not reproduce %s's logits; evaluating with full logits", type(model).__name__)
            return None
        return ch

    def logits(self, ids: torch.Tensor):
        """Float32 logits of ``ids`` for every position, in chunks of :attr:`rows` positions."""
        hidden = self.decoder(input_ids=ids, use_cache=False).last_hidden_state
        for s in range(0, hidden.shape[1], self.rows):
            x = self.head(hidden[:, s:s + self.rows]).float()
            for fn, v in self.post:
                x = fn(x, v)
            yield x

    def nll_sum(self, ids: torch.Tensor) -> float:
        """Summed next-token NLL of ``ids`` (positions 1..T-1), chunk by chunk."""
        hidden = self.decoder(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
        labels = ids[:, 1:]
        total = 0.0
        for s in range(0, hidden.shape[1], self.rows):
            x = self.head(hidden[:, s:s + self.rows]).float()
            for fn, v in self.post:
                x = fn(x, v)
            total += float(F.cross_entropy(x.reshape(-1, x.shape[-1]), labels[:, s:s + self.rows].reshape(-1),
                                           reduction="sum"))
        return total


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
    bos = bos_id(tokenizer)
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
        head = ChunkedHead.for_model(model, windows[:1].to(device))
        for batch in tqdm(windows.split(batch_size), desc="perplexity", unit="win", disable=not progress):
            batch = batch.to(device)
            labels = batch[:, 1:]
            if head is not None:
                total += head.nll_sum(batch)
            else:
                logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
                total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum"))
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
