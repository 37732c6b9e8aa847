"""The quantized modules: QERALinear and its fused kernels, activation quantization, MoE unfusing, and which modules of a model are targets."""
