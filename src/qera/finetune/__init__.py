"""Quantized fine-tuning (QPEFT): LoRA adapters on a quantized base, initialized by a reconstruction method, and the Trainer glue."""
