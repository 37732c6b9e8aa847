"""Weight formats: a registry of format families and the spec-string parser.

A spec is ``<family><bits>[_<kind>][:key=value|:flag]...``, e.g. ``mxint4``, ``mxint3:block=16``,
``int4:group=128:asym``, ``nf4``, or a GGUF block type such as ``q4_k`` (family ``q``, kind ``k``).
Adding a format is one module with a registered :class:`~qera.core.formats.base.WeightFormat` subclass.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from qera.util.errors import QeraError
from qera.core.formats.base import FORMATS, QuantizedWeight, WeightFormat
from qera.core.formats import mxint, integer, normalfloat, gguf  # noqa: F401  (registration)
from qera.core.formats.packing import pack_bits, unpack_bits

_SPEC = re.compile(r"^([a-z]+)(\d+)(?:_([a-z0-9]+))?$")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_format(spec: "str | WeightFormat") -> WeightFormat:
    """Turn a spec string (or an existing format object) into a :class:`WeightFormat`."""
    if isinstance(spec, WeightFormat):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise QeraError(f"format must be a non-empty string such as 'mxint4', got {spec!r}")
    head, *opts = spec.strip().lower().split(":")
    m = _SPEC.match(head)
    if not m:
        raise QeraError(
            f"cannot parse format {spec!r}: expected <family><bits> such as 'mxint4' (or a GGUF type such as "
            f"'q4_k'); known families: {', '.join(FORMATS.names())}"
        )
    family, bits, kind = m.group(1), int(m.group(2)), m.group(3)
    cls = FORMATS.get(family)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in ("bits", "kind")}
    kwargs: dict[str, object] = {}
    if kind is not None:
        if "kind" not in {f.name for f in dataclasses.fields(cls)}:
            raise QeraError(f"format {spec!r}: family {family} takes no _{kind} suffix (only GGUF types such as q4_k do)")
        kwargs["kind"] = kind
    for opt in opts:
        key, sep, value = opt.partition("=")
        key, value = key.strip(), value.strip()
        target = "asym" if key == "sym" and "asym" in fields else key
        if target not in fields:
            raise QeraError(
                f"format {spec!r}: unknown option {key!r} for {family}; allowed: {', '.join(fields) or 'none'}"
            )
        if target in kwargs:
            raise QeraError(f"format {spec!r}: option {key!r} is given twice")
        if fields[target].type in ("bool", bool):
            if not sep or value in _TRUE:
                flag = True
            elif value in _FALSE:
                flag = False
            else:
                raise QeraError(
                    f"format {spec!r}: option {key} takes no value or one of {', '.join(_TRUE + _FALSE)}, got {value!r}"
                )
            kwargs[target] = (not flag) if key == "sym" else flag
        else:
            if not sep:
                raise QeraError(f"format {spec!r}: option {key} needs a value, e.g. {key}=32")
            try:
                kwargs[target] = int(value)
            except ValueError:
                raise QeraError(f"format {spec!r}: option {key} needs an integer, got {value!r}") from None
    return cls(bits=bits, **kwargs)


def quantize_weight(w: torch.Tensor, fmt: "str | WeightFormat", name: str | None = None) -> QuantizedWeight:
    """Quantize ``w`` (any shape) to ``fmt``; ``.dequantize()`` gives ``W̃`` in ``w.dtype``."""
    return parse_format(fmt).quantize(w, name)


__all__ = [
    "FORMATS",
    "QuantizedWeight",
    "WeightFormat",
    "parse_format",
    "quantize_weight",
    "pack_bits",
    "unpack_bits",
]
