"""Evaluation: perplexity under the GPTQ protocol, and output-error metrics against a reference."""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qera.io.data import bos_id, tokenize
from qera.util.errors import QeraError

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
        with torch.no_grad():  # a probe: no graph, whatever the caller's grad mode
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

    def nll_sum(self, ids: torch.Tensor, targets: torch.Tensor | None = None) -> float:
        """Summed next-token NLL, chunk by chunk: of ``ids`` itself (positions 1..T-1), or of
        ``targets`` ``(B, n)`` predicted by the last ``n`` positions of ``ids`` ``(B, T)``."""
        hidden = self.decoder(input_ids=ids, use_cache=False).last_hidden_state
        if targets is None:
            hidden, labels = hidden[:, :-1], ids[:, 1:]
        else:
            hidden, labels = hidden[:, ids.shape[1] - targets.shape[1]:], targets
        total = 0.0
        for s in range(0, hidden.shape[1], self.rows):
            x = self.head(hidden[:, s:s + self.rows]).float()
            for fn, v in self.post:
                x = fn(x, v)
            total += float(F.cross_entropy(x.reshape(-1, x.shape[-1]), labels[:, s:s + self.rows].reshape(-1),
                                           reduction="sum"))
        return total


def nll_sum(model, head: ChunkedHead | None, ids: torch.Tensor, targets: torch.Tensor | None = None) -> float:
    """Summed next-token NLL of ``ids`` ``(B, T)`` (positions 1..T-1), or of ``targets`` ``(B, n)``
    predicted by the last ``n`` positions; through ``head`` when there is one, else full logits."""
    if head is not None:
        return head.nll_sum(ids, targets)
    logits = model(input_ids=ids, use_cache=False).logits
    if targets is None:
        logits, targets = logits[:, :-1], ids[:, 1:]
    else:
        logits = logits[:, ids.shape[1] - targets.shape[1]:]
    logits = logits.float()
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"))


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
            total += nll_sum(model, head, batch)
            count += batch[:, 1:].numel()
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


def rolling_windows(n_tokens: int, length: int) -> list[tuple[int, int, int]]:
    """Windows that score each of ``n_tokens`` document tokens exactly once, with full context.

    In the sequence ``[prefix] + doc``, window ``(start, stop, first)`` reads positions
    ``start..stop-1`` (at most ``length``) and scores the next-token predictions of its last
    ``stop - first`` positions, i.e. doc tokens ``first..stop-1``. Consecutive windows overlap by one
    token, and the last window reaches back a full ``length`` (lm-eval-harness' rolling scheme).
    """
    if length < 1:
        raise QeraError(f"window length must be >= 1, got {length}")
    out, first = [], 0
    while first < n_tokens:
        stop = min(first + length, n_tokens)
        out.append((max(0, stop - length), stop, first))
        first = stop
    return out


@dataclass
class RollingResult:
    """Summed log-likelihood of documents under rolling windows, and the units it is averaged over."""

    loglikelihood: float  # nats, summed over every token of every document
    tokens: int
    words: int  # whitespace-separated fields, counted as lm-eval-harness counts them
    bytes: int  # UTF-8

    @property
    def word_perplexity(self) -> float:
        return math.exp(-self.loglikelihood / self.words)

    @property
    def byte_perplexity(self) -> float:
        return math.exp(-self.loglikelihood / self.bytes)

    @property
    def bits_per_byte(self) -> float:
        return -self.loglikelihood / self.bytes / math.log(2)

    @property
    def token_perplexity(self) -> float:
        return math.exp(-self.loglikelihood / self.tokens)

    def to_dict(self) -> dict:
        return {**asdict(self), "word_perplexity": self.word_perplexity, "byte_perplexity": self.byte_perplexity,
                "bits_per_byte": self.bits_per_byte, "token_perplexity": self.token_perplexity}


def count_words(doc: str) -> int:
    return len(re.split(r"\s+", doc))


@torch.no_grad()
def rolling_loglikelihood(model, tokenizer, docs: list[str], length: int, add_bos: bool, prefix: int,
                          progress: bool = True) -> RollingResult:
    """Log-likelihood of whole documents, each token predicted once (see :func:`rolling_windows`).

    Each document is encoded with special tokens iff ``add_bos`` and preceded by the ``prefix``
    token, so the first token is predicted too. The same quantity lm-eval-harness computes for its
    ``loglikelihood_rolling`` tasks (word perplexity of WikiText), computed here independently.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, n_tok, n_words, n_bytes = 0.0, 0, 0, 0
    seqs = [torch.tensor([prefix] + list(tokenizer(d, add_special_tokens=add_bos)["input_ids"]), dtype=torch.long,
                         device=device) for d in docs]
    try:
        head = ChunkedHead.for_model(model, seqs[0][None, :16]) if seqs else None
        for doc, seq in tqdm(list(zip(docs, seqs)), desc="rolling log-likelihood", unit="doc", disable=not progress):
            n = seq.numel() - 1
            for start, stop, first in rolling_windows(n, length):
                total -= nll_sum(model, head, seq[None, start:stop], seq[None, first + 1:stop + 1])
            n_tok, n_words, n_bytes = n_tok + n, n_words + count_words(doc), n_bytes + len(doc.encode())
    finally:
        model.train(was_training)
    return RollingResult(total, n_tok, n_words, n_bytes)
