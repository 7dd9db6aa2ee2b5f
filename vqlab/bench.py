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

__all__ = ["median_time", "layer_timings", "BACKENDS"]

BACKENDS = ("dense fp32", "int8 dynamic", "vq torch", "vq dense", "vq numba", "vq auto")
"""dense fp32: F.linear on the float weight; int8 dynamic: torch's quantize_dynamic Linear; vq torch: the
reference (torch indexing + GEMM); vq dense: parallel dequantize + GEMM; vq numba: the LUT kernel;
vq auto: whichever of vq dense and vq numba was faster when first timed."""


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


@torch.no_grad()
def layer_timings(m: int, n: int, k: int, d: int, batch: int, backends=BACKENDS, repeats: int = 20,
                  warmup: int = 3, threads: int | None = None, seed: int = 0,
                  budget: float | None = None) -> pd.DataFrame:
    """Time one m x n layer (y = x @ W.T, x: (batch, n)) under each backend.

    The VQ layer has a random K x d codebook and uniform random indices (speed does not depend on
    the values).  budget: seconds per backend before slow calls are repeated fewer times (see median_time).
    returns: backend, m, n, K, d, batch, threads, seconds, runs, speedup_vs_dense.
    """
    from .kernels import vq_matmul
    from .kernels.reference import dequantize
    from ._utils import index_dtype

    if n % d:
        raise ValueError(f"d={d} must divide n={n}")
    if threads is not None:
        try:            # numba first: starting its OpenMP layer resets the thread count torch reads
            import numba
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        except ImportError:
            pass
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randn(k, d, generator=g)
    indices = torch.randint(0, k, (m, n // d), generator=g).to(index_dtype(k))
    x = torch.randn(batch, n, generator=g)
    w = dequantize(codebook, indices).contiguous()
    fns = {
        "dense fp32": lambda: F.linear(x, w),
        "vq torch": lambda: vq_matmul(x, codebook, indices, backend="torch"),
        "vq dense": lambda: vq_matmul(x, codebook, indices, backend="dense"),
        "vq numba": lambda: vq_matmul(x, codebook, indices, backend="numba"),
        "vq auto": lambda: vq_matmul(x, codebook, indices, backend="auto"),
    }
    if "int8 dynamic" in backends:
        q = _int8_linear(w)
        fns["int8 dynamic"] = lambda: q(x)
    rows = []
    for name in backends:
        seconds, runs = median_time(fns[name], repeats, warmup, budget)
        rows.append({"backend": name, "m": m, "n": n, "K": k, "d": d, "batch": batch,
                     "threads": torch.get_num_threads(), "seconds": seconds, "runs": runs})
    df = pd.DataFrame(rows)
    dense = df.loc[df["backend"] == "dense fp32", "seconds"]
    df["speedup_vs_dense"] = float(dense.iloc[0]) / df["seconds"] if len(dense) else float("nan")
    return df
