"""Quantized checkpoints: a streaming, sharded, atomic writer and a validating meta-device loader.

Layout (Hugging Face conventions)::

    model.safetensors                      (or model-0000k-of-0000N.safetensors + model.safetensors.index.json)
    qera_config.json   format version, QuantConfig, per-layer format/shape/rank/dtypes, tied names, bits
    config.json, generation_config.json, tokenizer files

Writing: :class:`CheckpointWriter` adds one decoder block at a time to a work folder
``.<name>.partial`` beside the output (each block's file flushed to disk, then recorded in
``state.json``), so an interrupted run resumes after its last finished block. ``finalize`` writes
the rest, assembles the shards in a temporary folder and publishes it atomically
(:mod:`qera.util.atomic`). Loading: the configuration is validated against the tensors' headers
(names, shapes, dtypes, format, rank) before anything is built; the model is built on the meta
device and filled from the files, each tensor in its stored dtype. Pickle files are never loaded.
"""

from __future__ import annotations

from qera.io.checkpoint.layout import (
    FORMAT_VERSION,
    LAYER_KEYS,
    PICKLE_NAMES,
    QERA_CONFIG,
    WEIGHTS,
    WEIGHTS_INDEX,
    bits_summary,
    expected_layer_tensors,
    layer_meta,
    plain_key,
    quantized_layers,
    read_qera_config,
)
from qera.io.checkpoint.files import DEFAULT_MAX_SHARD, TensorFiles, merge_safetensors
from qera.io.checkpoint.writer import (
    CheckpointWriter,
    buffer_dtypes,
    fingerprint_of,
    rest_tensors,
    save_quantized,
)
from qera.io.checkpoint.loader import load_quantized, validate_checkpoint

__all__ = [
    "FORMAT_VERSION", "LAYER_KEYS", "PICKLE_NAMES", "QERA_CONFIG", "WEIGHTS", "WEIGHTS_INDEX", "DEFAULT_MAX_SHARD",
    "CheckpointWriter", "TensorFiles", "bits_summary", "buffer_dtypes", "expected_layer_tensors", "fingerprint_of",
    "layer_meta", "load_quantized", "merge_safetensors", "plain_key", "quantized_layers", "read_qera_config",
    "rest_tensors", "save_quantized", "validate_checkpoint",
]
