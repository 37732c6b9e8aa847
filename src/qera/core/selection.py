"""Which layer names are quantization targets by default, and compiling include/exclude regexes."""

from __future__ import annotations

import re
from typing import Sequence

from qera.util.errors import QeraError

# Every linear layer inside numbered decoder blocks (model.layers.N, model.decoder.layers.N,
# transformer.h.N, blocks.N, encoder.layer.N); never the LM head or embeddings.
DEFAULT_INCLUDE = (r"(^|\.)(layers|layer|h|blocks)\.\d+\.",)
DEFAULT_EXCLUDE = (
    r"(^|\.)lm_head$", r"embed", r"(^|\.)(classifier|score|pooler)(\.|$)",
    r"(^|\.)(gate|router|shared_expert_gate)$",  # mixture-of-experts routers: tiny, and routing is fragile
)


def compile_patterns(patterns: Sequence[str], what: str) -> list[re.Pattern]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as exc:
            raise QeraError(f"invalid {what} regex {p!r}: {exc}") from None
    return out
