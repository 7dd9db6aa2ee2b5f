"""VQ kernels: `vq_matmul`, `vq_conv2d` over the backends in `registry` ("torch" reference, "dense", "numba",
"simd" (approximate, opt-in), "auto"), the `dequantize` reference, and `set_backend` to pin what "auto" runs.

    reference   dequantize, vq_matmul_reference, check_indices: the oracle and the fallback on every device
    checked     checked private copies of index tensors (what native kernels read)
    flops       the FLOP formulas of every quantized product
    registry    KernelBackend, register_backend, set_backend / $VQLAB_BACKEND
    backends    the "dense" and "numba" adapters;  simd: the "simd" backend and its packed layout
    route       which path a call takes (reference / direct / checked copy) and auto's choice
    cost        auto's cost model: predicted seconds per backend from counted work and measured machine constants
    tuning      `tune`: timing the backends on a model's real inputs, when asked (auto never times)
    warm        numba's kernels loaded ahead in a background thread ($VQLAB_WARM=0: off)
    ops         the public vq_matmul / vq_conv2d (torch custom ops, seen by FlopCounterMode and torch.compile)
    plan        call plans: a layer's eval call decided once per input signature, re-checked by a byte compare
"""
from . import backends as _backends  # noqa: F401  registers "dense" and "numba"
from . import simd as _simd  # noqa: F401,E402  registers the approximate, opt-in backend "simd"
from .backends import conv_weight_from_rows
from .flops import conv_flops, lut_flops, matmul_flops, table_count
from .ops import vq_conv2d, vq_matmul
from .reference import check_indices, dequantize, vq_matmul_reference
from .registry import (KernelBackend, available_backends, backend_names, register_backend, set_backend,
                       unregister_backend)
from .route import auto_choices, clear_caches
from .tuning import tune

__all__ = ["vq_matmul", "vq_conv2d", "dequantize", "vq_matmul_reference", "check_indices", "available_backends",
           "backend_names", "auto_choices", "clear_caches", "conv_weight_from_rows", "matmul_flops", "conv_flops",
           "lut_flops", "table_count", "KernelBackend", "register_backend", "unregister_backend", "set_backend",
           "tune"]

from . import warm  # noqa: E402

warm.start()
