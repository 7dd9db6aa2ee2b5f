"""Wall-time measurement shared by benchmarks/kernel.py, notebook 03 and its speed widget.

All timings: median of `repeats` runs after `warmup` runs, in one process, on the current thread
count (`torch.set_num_threads`; numba follows `threads` when given).
"""
from __future__ import annotations

import time
import warnings
from typing import Callable

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["median_time", "layer_timings", "layer_errors", "packed_layer", "BACKENDS", "SIMD_BACKENDS"]

BACKENDS = ("dense fp32", "int8 dynamic", "vq torch", "vq dense", "vq numba", "vq auto", "vq simd", "vq simd packed")
"""dense fp32: F.linear on the float weight; int8 dynamic: torch's quantize_dynamic Linear; vq torch: the
reference (torch indexing + GEMM); vq dense: parallel dequantize + GEMM; vq numba: the LUT kernel;
vq auto: whichever of vq dense and vq numba was faster when first timed; vq simd: the approximate register-table
kernel (`vq_matmul(backend="simd")`, reading the row-major uint8 indices); vq simd packed: the same kernel on a
layer stored in its own 4-bit layout (`vqlab.pack_simd_`, a QuantizedLinear holding a SimdCode).  The two simd
rows exist only for K <= 16 where the native kernel runs (`SIMD_BACKENDS`)."""
SIMD_BACKENDS = ("vq simd", "vq simd packed")


def _simd_runs(k: int) -> bool:
    from .kernels import simd
    return k <= simd.ROW and simd.native_isa() is not None


def median_time(fn: Callable[[], object], repeats: int = 20, warmup: int = 3, budget: float | None = None) -> tuple[float, int]:
    """(median wall time of fn() in seconds, runs measured).

    budget: seconds allowed for the measured runs; a call slower than budget/repeats is run fewer times
    (at least 5), and the returned count says how many.
    """
    for _ in range(warmup):
        fn()
    if budget is not None:
        t0 = time.perf_counter()
        fn()
        repeats = max(5, min(repeats, int(budget / max(time.perf_counter() - t0, 1e-9))))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], repeats


def _int8_linear(w: torch.Tensor) -> nn.Module:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data.copy_(w)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch announces the deprecation of its quantized tensors
        return torch.ao.quantization.quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)


def _layer(m: int, n: int, k: int, d: int, batch: int, seed: int):
    """A random VQ layer and input: codebook (K, d), indices (m, n/d), x (batch, n), dense weight (m, n)."""
    from .kernels.reference import dequantize
    from .dtypes import index_dtype

    if n % d:
        raise ValueError(f"d={d} must divide n={n}")
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randn(k, d, generator=g)
    indices = torch.randint(0, k, (m, n // d), generator=g).to(index_dtype(k))
    x = torch.randn(batch, n, generator=g)
    return codebook, indices, x, dequantize(codebook, indices).contiguous()


def packed_layer(codebook: torch.Tensor, indices: torch.Tensor) -> nn.Module:
    """The layer `vqlab.pack_simd_` makes of a VQLinear with this codebook and these indices (eval, no bias)."""
    from .codebook import Codebook
    from .layers import QuantizedLinear
    from .methods.vq_simd import SimdCode

    k, d = codebook.shape
    code = SimdCode(indices.shape[0], indices.shape[1] * d, k, d, codebook=Codebook.from_tensor(codebook))
    code.set_indices(indices)
    return QuantizedLinear(code.shape[1], code.shape[0], bias=False, code=code).eval()


def _calls(backends, codebook, indices, x, w) -> dict[str, Callable[[], torch.Tensor]]:
    """name -> a call computing the layer's output under that backend (simd rows only where `_simd_runs`)."""
    from .kernels import vq_matmul

    k = codebook.shape[0]
    fns = {}
    for name in backends:
        if name in SIMD_BACKENDS and not _simd_runs(k):
            continue
        if name == "dense fp32":
            fns[name] = lambda: F.linear(x, w)
        elif name == "int8 dynamic":
            q = _int8_linear(w)
            fns[name] = lambda q=q: q(x)
        elif name == "vq simd packed":
            layer = packed_layer(codebook, indices)
            fns[name] = lambda layer=layer: layer(x)
        elif name.startswith("vq ") and name[3:] in ("torch", "dense", "numba", "auto", "simd"):
            fns[name] = lambda b=name[3:]: vq_matmul(x, codebook, indices, backend=b)
        else:
            raise ValueError(f"unknown backend {name!r}; choose from {BACKENDS}")
    return fns


@torch.no_grad()
def layer_timings(m: int, n: int, k: int, d: int, batch: int, backends=BACKENDS, repeats: int = 20,
                  warmup: int = 3, threads: int | None = None, seed: int = 0,
                  budget: float | None = None) -> pd.DataFrame:
    """Time one m x n layer (y = x @ W.T, x: (batch, n)) under each backend.

    The VQ layer has a random K x d codebook and uniform random indices (speed does not depend on
    the values).  budget: seconds per backend before slow calls are repeated fewer times (see median_time).
    The simd rows are left out where K > 16 or no native kernel runs.
    returns: backend, m, n, K, d, batch, threads, seconds, runs, speedup_vs_dense.
    """
    if threads is not None:
        try:            # numba first: starting its OpenMP layer resets the thread count torch reads
            from .kernels import lut_numba  # noqa: F401  selects numba's fork-safe threading layer before it starts
            import numba
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        except ImportError:
            pass
        torch.set_num_threads(threads)
    fns = _calls(backends, *_layer(m, n, k, d, batch, seed))
    rows = []
    for name in fns:
        seconds, runs = median_time(fns[name], repeats, warmup, budget)
        rows.append({"backend": name, "m": m, "n": n, "K": k, "d": d, "batch": batch,
                     "threads": torch.get_num_threads(), "seconds": seconds, "runs": runs})
    df = pd.DataFrame(rows)
    dense = df.loc[df["backend"] == "dense fp32", "seconds"]
    df["speedup_vs_dense"] = float(dense.iloc[0]) / df["seconds"] if len(dense) else float("nan")
    return df


@torch.no_grad()
def layer_errors(m: int, n: int, k: int, d: int, batch: int = 16, backends=BACKENDS, outliers: int = 0,
                 seed: int = 0) -> pd.DataFrame:
    """Error of each backend's output against the float64 product with the same VQ weight, relative to rms(y):
    backend, rms, max (fractions; exact backends give float32 rounding, int8 dynamic and the simd rows their
    quantization).  x: (batch, n) Gaussian, with `outliers` input channels 30x larger.
    returns: backend, K, d, outliers, rms, max."""
    codebook, indices, x, w = _layer(m, n, k, d, batch, seed)
    if outliers:
        x[:, torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))[:outliers]] *= 30
    ref = x.double() @ w.double().T
    scale = ref.pow(2).mean().sqrt().item()
    rows = []
    for name, fn in _calls(backends, codebook, indices, x, w).items():
        e = (fn().double() - ref) / scale
        rows.append({"backend": name, "K": k, "d": d, "outliers": outliers, "rms": e.pow(2).mean().sqrt().item(),
                     "max": e.abs().max().item()})
    return pd.DataFrame(rows)
