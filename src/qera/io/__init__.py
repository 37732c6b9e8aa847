"""Reading and writing models: checkpoints, exports (compressed-tensors + PEFT), model loading (HF ids, GGUF, lazily from shards), text data."""
