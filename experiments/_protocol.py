"""The README's PTQ protocol, shared by the experiments that quantize SmolLM2 in place.

Calibration: 128 windows × 512 tokens of WikiText-2 valid (seed 0, batches of 8). Evaluation:
perplexity on the first 40 windows of 512 tokens of WikiText-2 raw test. Each run quantizes the
model in place, is evaluated and has its fp layers put back.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qera import QuantConfig, QuantReport, find_targets, load_model, perplexity, quantize_model
from qera.evaluate.perplexity import ChunkedHead, nll_sum
from qera.io.data import calibration_batches, load_text
from qera.nn.targets import replace_module

DATA = Path(os.environ.get("QERA_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def window_perplexity(model, windows: torch.Tensor, rows: int = 4) -> float:
    """Perplexity of ``windows`` ``(n, L)``, each window scored on its own (like the test protocol),
    ``rows`` windows per forward."""
    head = ChunkedHead.for_model(model, windows[:1])
    total = count = 0
    with torch.no_grad():
        for w in windows.split(rows):
            total += nll_sum(model, head, w)
            count += w[:, 1:].numel()
    return math.exp(total / count)


@dataclass
class Protocol:
    model: object
    tok: object
    calib: list
    text: str

    @classmethod
    def load(cls, model_name: str) -> "Protocol":
        model, tok = load_model(model_name)
        calib = calibration_batches(tok, load_text(str(DATA / "wikitext-2" / "wiki.valid.tokens"), "calibration"),
                                    n_samples=128, seq_len=512, seed=0, batch_size=8)
        return cls(model, tok, calib, load_text(str(DATA / "wikitext-2-raw" / "wiki.test.raw"), "evaluation"))

    def ppl(self) -> float:
        return perplexity(self.model, self.tok, self.text, seq_len=512, max_windows=40, progress=False).perplexity

    def run(self, cfg: QuantConfig, **kwargs) -> tuple[QuantReport, float, float]:
        """``(report, quantize seconds, perplexity)`` of ``cfg``; the model is restored afterwards."""
        originals = dict(find_targets(self.model, cfg.include, cfg.exclude))
        t0 = time.perf_counter()
        try:
            rep = quantize_model(self.model, cfg, progress=False, **kwargs)
            seconds = time.perf_counter() - t0
            return rep, seconds, self.ppl()
        finally:
            for name, mod in originals.items():
                replace_module(self.model, name, mod)
