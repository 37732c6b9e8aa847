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


def sample_windows(tokens: torch.Tensor, n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``n_samples`` random windows of ``seq_len`` tokens (GPTQ-style calibration), shape ``(n, L)``."""
    if n_samples < 1 or seq_len < 2:
        raise QeraError(f"need n_samples >= 1 and seq_len >= 2, got {n_samples} and {seq_len}")
    if tokens.numel() <= seq_len:
        raise QeraError(
            f"calibration text has {tokens.numel()} tokens; need more than seq_len={seq_len}"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len, (n_samples,), generator=gen)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


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
