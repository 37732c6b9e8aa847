"""Agreement with llama.cpp: read the logits file ``llama-perplexity --kl-divergence-base`` writes and
score a transformers model on the very same windows.

``llama-perplexity -m model.gguf [--lora adapter.gguf] -f text --kl-divergence-base FILE -c 512`` splits
its own tokenization of ``text`` into windows of ``n_ctx`` tokens, puts BOS at each window's first
position when the vocabulary asks for one, and scores the second half of each window (positions
``n_ctx/2 .. n_ctx-2`` predicting the next token). It writes to ``FILE``:

- ``b"_logits_"``, then int32 ``n_ctx``, ``n_vocab``, ``n_chunk``;
- int32 tokens ``(n_chunk, n_ctx)`` (as tokenized, before the BOS substitution);
- per window, ``n_ctx - 1 - n_ctx/2`` rows of ``nv = 2·⌈n_vocab/2⌉ + 4`` uint16: a row's first two
  float32 are ``scale`` and ``min_log_prob``, then each token's log-probability is
  ``min_log_prob + scale·q`` (``q`` uint16; 0 stands for "16 nats or more below the top").

:func:`agreement` runs the model on the file's windows and compares: perplexity of both on the same
scored tokens, top-1 agreement (same arg-max), and the mean KL(llama.cpp ‖ model) over the tokens
llama.cpp stores above its floor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from qera.util.errors import QeraError

MAGIC = b"_logits_"


@dataclass
class LlamaCppLogits:
    """A ``--kl-divergence-base`` file, memory-mapped: ``tokens`` ``(n_chunk, n_ctx)`` and per window the
    scored positions' quantized log-probabilities."""

    path: Path
    n_ctx: int
    n_vocab: int
    tokens: np.ndarray
    _rows: np.ndarray  # (n_chunk, n_ctx - 1 - n_ctx // 2, nv) uint16

    @property
    def n_chunk(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def first(self) -> int:
        """The first scored position of each window (its logits predict the token after it)."""
        return self.n_ctx // 2

    def log_probs(self, chunk: int) -> torch.Tensor:
        """Window ``chunk``'s log-probabilities ``(n_ctx - 1 - first, n_vocab)`` float32, as llama.cpp
        stored them (to ``scale/2`` ≤ 16/131070 nats; tokens 16 nats or more below the top at the floor)."""
        if not 0 <= chunk < self.n_chunk:
            raise QeraError(f"{self.path}: window {chunk} out of range 0..{self.n_chunk - 1}")
        rows = np.ascontiguousarray(self._rows[chunk])
        head = rows[:, :4].copy().view(np.float32)  # (n, 2): scale, min_log_prob
        q = torch.from_numpy(rows[:, 4:4 + self.n_vocab].astype(np.float32))
        scale = torch.from_numpy(head[:, 0:1].copy())
        low = torch.from_numpy(head[:, 1:2].copy())
        return low + scale * q


def read_logits_file(path: str | Path) -> LlamaCppLogits:
    """Open a ``llama-perplexity --kl-divergence-base`` file (see the module docstring); checks its
    header and size and refuses anything else with the reason."""
    path = Path(path)
    if not path.is_file():
        raise QeraError(f"{path}: no such llama-perplexity logits file")
    size = path.stat().st_size
    with path.open("rb") as f:
        magic = f.read(8)
        if magic != MAGIC:
            raise QeraError(f"{path}: not a llama-perplexity logits file (starts with {magic!r}, not {MAGIC!r})")
        n_ctx, n_vocab, n_chunk = (int(v) for v in np.frombuffer(f.read(12), dtype="<i4"))
    if n_ctx < 4 or n_vocab < 1 or n_chunk < 1:
        raise QeraError(f"{path}: bad header n_ctx={n_ctx}, n_vocab={n_vocab}, n_chunk={n_chunk}")
    nv = 2 * ((n_vocab + 1) // 2) + 4
    scored = n_ctx - 1 - n_ctx // 2
    tok_off = 20
    rows_off = tok_off + 4 * n_ctx * n_chunk
    want = rows_off + 2 * nv * scored * n_chunk
    if size < want:
        raise QeraError(f"{path}: {size} bytes, need {want} for {n_chunk} windows of {n_ctx} "
                        f"(a run that stopped early?)")
    tokens = np.memmap(path, dtype="<i4", mode="r", offset=tok_off, shape=(n_chunk, n_ctx))
    rows = np.memmap(path, dtype="<u2", mode="r", offset=rows_off, shape=(n_chunk, scored, nv))
    return LlamaCppLogits(path, n_ctx, n_vocab, tokens, rows)


def gguf_window_bos(path: str | Path) -> int | None:
    """The token llama-perplexity puts at each window's start for the GGUF model ``path``: its BOS id
    when ``tokenizer.ggml.add_bos_token`` is true, else None (the key missing: None, as for BPE vocabularies)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    add = fields.get("tokenizer.ggml.add_bos_token")
    bos = fields.get("tokenizer.ggml.bos_token_id")
    if add is None or not bool(add.contents()):
        return None
    if bos is None:
        raise QeraError(f"{path}: adds a BOS token but has no tokenizer.ggml.bos_token_id")
    return int(bos.contents())


@torch.no_grad()
def agreement(model, logits: LlamaCppLogits, bos: int | None, max_windows: int | None = None,
              progress: bool = True) -> dict:
    """Score ``model`` (a transformers causal LM) on the windows of ``logits``, as llama.cpp did:
    each window's first token replaced by ``bos`` (None: kept), the next-token predictions of
    positions ``first .. n_ctx-2``. Returns both perplexities, their relative difference, the top-1
    agreement and the mean KL(llama.cpp ‖ model) per scored token over the tokens llama.cpp stores
    above its floor (both distributions renormalized there), over ``max_windows`` windows (None: all)."""
    n = logits.n_chunk if max_windows is None else min(max_windows, logits.n_chunk)
    device = next(model.parameters()).device
    first = logits.first
    nll_model = nll_lcpp = kl = 0.0
    same = count = 0
    was_training = model.training
    model.eval()
    try:
        for c in tqdm(range(n), desc="llama.cpp agreement", unit="win", disable=not progress):
            ids = torch.from_numpy(np.asarray(logits.tokens[c], dtype=np.int64)).clone()
            if bos is not None:
                ids[0] = bos
            out = model(input_ids=ids[None].to(device), use_cache=False).logits[0, first:-1].float().cpu()
            if out.shape[-1] < logits.n_vocab:
                raise QeraError(f"model has {out.shape[-1]} logits, llama.cpp's file {logits.n_vocab}")
            mine = torch.log_softmax(out[:, :logits.n_vocab], dim=-1)  # (n, V); padded vocab rows dropped
            theirs = logits.log_probs(c)  # (n, V)
            target = ids[first + 1:]
            nll_model -= float(mine.gather(1, target[:, None]).sum())
            nll_lcpp -= float(theirs.gather(1, target[:, None]).sum())
            same += int((mine.argmax(-1) == theirs.argmax(-1)).sum())
            # KL over the tokens llama.cpp stores (above its floor, 16 nats below the top); the floored
            # tail would otherwise count every one of a large vocabulary's tokens at the floor's probability
            stored = theirs > theirs.min(-1, keepdim=True).values
            logp = torch.where(stored, theirs, torch.full_like(theirs, -math.inf))
            logp = logp - torch.logsumexp(logp, -1, keepdim=True)
            logq = torch.where(stored, mine, torch.full_like(mine, -math.inf))
            logq = logq - torch.logsumexp(logq, -1, keepdim=True)  # both conditioned on the stored tokens
            kl += float(torch.where(stored, logp.exp() * (logp - logq), torch.zeros_like(mine)).sum())
            count += target.numel()
    finally:
        model.train(was_training)
    if count == 0:
        raise QeraError(f"{logits.path}: no window scored")
    ppl_model, ppl_lcpp = math.exp(nll_model / count), math.exp(nll_lcpp / count)
    return {"windows": n, "n_ctx": logits.n_ctx, "scored_tokens": count,
            "llama_cpp_ppl": ppl_lcpp, "qera_ppl": ppl_model, "ppl_rel_diff": ppl_model / ppl_lcpp - 1,
            "top1_agreement": same / count, "kl_llama_cpp_to_qera": kl / count}
