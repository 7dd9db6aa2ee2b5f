"""VQ kernels: `vq_matmul`, `vq_conv2d` over the backends in `registry` ("torch" reference, "dense", "numba",
"simd" (approximate, opt-in), "auto"), the `dequantize` reference, and `set_backend` to pin what "auto" runs."""
from .ops import auto_choices, clear_caches, conv_flops, conv_weight_from_rows, matmul_flops, vq_conv2d, vq_matmul
from .reference import check_indices, dequantize, vq_matmul_reference
from .registry import KernelBackend, available_backends, backend_names, register_backend, set_backend
from . import simd as _simd  # noqa: F401,E402  registers the approximate, opt-in backend "simd"

__all__ = ["vq_matmul", "vq_conv2d", "dequantize", "vq_matmul_reference", "check_indices", "available_backends",
           "backend_names", "auto_choices", "clear_caches", "conv_weight_from_rows", "matmul_flops", "conv_flops",
           "KernelBackend", "register_backend", "set_backend"]
