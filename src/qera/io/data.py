"""Text sources and token windows for calibration and evaluation.

Sources: a plain-text file, ``wikitext2`` through the ``datasets`` library (needs the hub), or
the built-in default: the documentation topics shipped with Python in ``pydoc_data`` (no
download), split by topic into disjoint calibration and evaluation parts.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from qera.util.errors import QeraError

log = logging.getLogger(__name__)

BUILTIN = "builtin"
SPLITS = ("calibration", "evaluation")


def builtin_text(split: str) -> str:
    """Python's documentation topics; every 4th topic (sorted by name) is the evaluation part."""
    if split not in SPLITS:
        raise QeraError(f"split must be one of {SPLITS}, got {split!r}")
    from pydoc_data.topics import topics

    names = sorted(topics)
    chosen = [n for i, n in enumerate(names) if (i % 4 == 3) == (split == "evaluation")]
    return "\n\n".join(topics[n] for n in chosen)


def read_text_file(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise QeraError(f"text file not found: {p}")
    try:
        return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise QeraError(f"cannot read text file {p}: {exc}") from None


def gptq_join(raw: str) -> str:
    """The GPTQ evaluation text: the split's rows (lines, newline kept) joined with ``"\\n\\n"``."""
    return "\n\n".join(raw.splitlines(keepends=True))


def load_text(source: str | None, split: str) -> str:
    """Text of ``split`` from ``source``: ``None``/``"builtin"``, ``"wikitext2"`` or a file path.

    Files and WikiText-2 rows are joined GPTQ-style (see :func:`gptq_join`).
    """
    if source in (None, BUILTIN):
        return builtin_text(split)
    if source.lower() in ("wikitext2", "wikitext-2"):
        try:
            import datasets
        except ImportError:
            raise QeraError("--dataset wikitext2 needs the 'datasets' package (pip install datasets)") from None
        hf_split = "test" if split == "evaluation" else "train"
        try:
            rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=hf_split)["text"]
        except Exception as exc:  # network or hub errors
            raise QeraError(f"cannot load wikitext2 from the hub ({type(exc).__name__}); pass a text file instead") from None
        return "\n\n".join(rows)
    return gptq_join(read_text_file(source))


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D ``LongTensor`` (no special tokens added)."""
    if not text.strip():
        raise QeraError("the text is empty")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def window_starts(n_tokens: int, n_samples: int, seq_len: int, seed: int = 0) -> list[int]:
    """Start offsets of :func:`sample_windows`' windows in a text of ``n_tokens`` tokens."""
    if n_samples < 1 or seq_len < 2:
        raise QeraError(f"need n_samples >= 1 and seq_len >= 2, got {n_samples} and {seq_len}")
    if n_tokens <= seq_len:
        raise QeraError(f"calibration text has {n_tokens} tokens; need more than seq_len={seq_len}")
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_tokens - seq_len, (n_samples,), generator=gen).tolist()


def sample_windows(tokens: torch.Tensor, n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``n_samples`` random windows of ``seq_len`` tokens (GPTQ-style calibration), shape ``(n, L)``."""
    starts = window_starts(tokens.numel(), n_samples, seq_len, seed)
    return torch.stack([tokens[s : s + seq_len] for s in starts])


def heldout_windows(tokens: torch.Tensor, n_windows: int, seq_len: int, *, calib_samples: int, calib_len: int,
                    seed: int = 0) -> torch.Tensor:
    """``n_windows`` non-overlapping windows ``(n, seq_len)`` of ``tokens`` that share no token with the
    calibration windows ``sample_windows(tokens, calib_samples, calib_len, seed)`` draws: validation
    data from the calibration text that the calibration never read (for choosing settings, never
    the test split). Taken in text order; raises when the text has fewer such windows."""
    used = torch.zeros(tokens.numel() + 1, dtype=torch.int32)
    for s in window_starts(tokens.numel(), calib_samples, calib_len, seed):
        used[s] += 1
        used[s + calib_len] -= 1
    free = used.cumsum(0)[: tokens.numel()] == 0
    out, pos = [], 0
    while len(out) < n_windows and pos + seq_len <= tokens.numel():
        if bool(free[pos:pos + seq_len].all()):
            out.append(tokens[pos:pos + seq_len])
            pos += seq_len
        else:
            pos += 1 + int(torch.nonzero(~free[pos:pos + seq_len])[-1])
    if len(out) < n_windows:
        raise QeraError(f"the text has {len(out)} windows of {seq_len} tokens outside the calibration windows, "
                        f"asked for {n_windows}")
    return torch.stack(out)


def bos_id(tokenizer) -> int | None:
    """The BOS token id the tokenizer puts before every text, or None (e.g. SmolLM2, GPT-2)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


def prepend_bos(windows: torch.Tensor, bos: int) -> torch.Tensor:
    """``(n, L)`` windows → ``(n, L)`` windows ``[BOS, w_0 … w_{L-2}]`` (same length, last token dropped)."""
    return torch.cat([torch.full_like(windows[:, :1], bos), windows[:, :-1]], dim=1)


def calibration_batches(
    tokenizer, text: str, n_samples: int = 128, seq_len: int = 512, seed: int = 0, batch_size: int = 8,
    bos: bool | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Tokenize once, draw windows with ``seed`` and group them into model-input batches.

    ``bos``: start every window with the BOS token, as every evaluation window and every prompt
    does (the window keeps ``seq_len`` tokens). ``None`` (default) does so exactly when the
    tokenizer adds BOS to a text; ``True`` always, ``False`` never. Without it,
    models with a BOS attention sink (Gemma, Llama-2) are calibrated on activations they never see
    at inference, and qera-exact — which fits the calibration autocorrelation exactly — suffers most
    (issue 15: Gemma-3-270M mxint3 r8, WikiText-2 perplexity 111.1 → 90.8).
    """
    windows = sample_windows(tokenize(tokenizer, text), n_samples, seq_len, seed)
    if bos is None:
        bos_token = bos_id(tokenizer)
    elif bos:
        bos_token = getattr(tokenizer, "bos_token_id", None)
        if bos_token is None:
            raise QeraError("bos=True, but the tokenizer has no BOS token (bos_token_id is None)")
    else:
        bos_token = None
    if bos_token is not None:
        windows = prepend_bos(windows, bos_token)
    return [
        {"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows.split(batch_size)
    ]
