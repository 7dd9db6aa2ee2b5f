"""VQ kernels: `vq_matmul`, `vq_conv2d` (backends "torch", "dense", "numba", "auto") and the `dequantize` reference."""
from .ops import auto_choices, available_backends, conv_weight_from_rows, vq_conv2d, vq_matmul
from .reference import dequantize, vq_matmul_reference

__all__ = ["vq_matmul", "vq_conv2d", "dequantize", "vq_matmul_reference", "available_backends", "auto_choices",
           "conv_weight_from_rows"]
