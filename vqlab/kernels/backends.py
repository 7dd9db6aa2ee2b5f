"""The built-in exact native backends, as adapters from the registry's signature to the numba kernels:

    "dense"   numba's parallel gather rebuilds the float weight from the checked indices, then one GEMM; the weight
              is kept beside the checked copy and reused while the indices' bytes and the codebook's values are
              the same (both compared on every call; weights over DENSE_CACHE_FLOATS are rebuilt every call)
    "numba"   the lookup-table kernel (`lut_numba.lut_matmul`) on a layout derived from the checked indices

numba is imported only when one of them runs.  The approximate "simd" backend registers itself in `simd.py`.
They are available where numba is installed and its parallel kernels may run (`numba_usable`): not in a child
forked from a process whose numba threading layer is GNU OpenMP (numba would terminate that child; see
`lut_numba`), where every call runs the reference instead.
"""
from __future__ import annotations

import functools
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

from .checked import CheckedIndices
from .cost import dense_cost, numba_cost
from .registry import KernelBackend, register_backend

DENSE_CACHE_FLOATS = 1 << 26     # rebuilt weights up to 256 MB are cached with their index copy

__all__ = ["DENSE_CACHE_FLOATS", "rebuilt_weight", "as_float32", "numba_available", "numba_usable", "numba_matmul",
           "dense_matmul", "dense_conv", "dequantize_checked", "conv_weight_from_rows", "group_blocks", "group_book"]


@functools.cache
def numba_available() -> bool:
    try:
        import numba  # noqa: F401
        return True
    except ImportError:
        return False


_FORKED_FROM_OMP = [False]     # this process is a fork() child of one running numba's GNU OpenMP layer


def _omp_layer_started() -> bool:
    """Whether numba's threading layer runs here and is GNU OpenMP (without importing numba)."""
    numba = sys.modules.get("numba")
    if numba is None:
        return False
    try:
        return numba.threading_layer() == "omp"
    except ValueError:                    # no layer started yet
        return False


def _after_fork_in_child() -> None:
    if _omp_layer_started():
        _FORKED_FROM_OMP[0] = True


os.register_at_fork(after_in_child=_after_fork_in_child)


def numba_usable() -> bool:
    """numba is installed and its parallel kernels may run in this process: False in a child forked from a
    process whose numba layer is GNU OpenMP (the child's kernels would be killed), where the callers run the
    reference instead."""
    return numba_available() and not _FORKED_FROM_OMP[0]


def as_float32(x2: torch.Tensor) -> torch.Tensor:
    """x2 as a contiguous float32 tensor without autograd history (no copy when it already is one): what
    native kernels read."""
    if x2.requires_grad:
        x2 = x2.detach()
    return x2 if x2.dtype == torch.float32 and x2.is_contiguous() else x2.to(torch.float32).contiguous()


def group_blocks(rows: int, groups: int) -> list[tuple[int, int, int]]:
    """G equal consecutive blocks (a, b, g) of `rows` output rows, one per codebook group."""
    per = rows // groups
    return [(g * per, (g + 1) * per, g) for g in range(groups)]


def group_book(codebook: torch.Tensor, g: int) -> torch.Tensor:
    """Codebook group g of a (G, K, d) codebook, or the (K, d) codebook itself."""
    return codebook[g] if codebook.dim() == 3 else codebook


def conv_weight_from_rows(rows: torch.Tensor, weight_shape, segment: str) -> torch.Tensor:
    """(out, n) dequantized rows -> conv weight (out, cin/groups, kh, kw) for the two row layouts:
    segment "input" rows are ordered (kh, kw, cin), "kernel" rows (cin, kh, kw)."""
    out, cin, kh, kw = weight_shape
    if segment == "input":
        return rows.reshape(out, kh, kw, cin).permute(0, 3, 1, 2)
    if segment == "kernel":
        return rows.reshape(out, cin, kh, kw)
    raise ValueError(f"segment must be 'input' or 'kernel', got {segment!r}")


def numba_matmul(xf: torch.Tensor, book: torch.Tensor, checked: CheckedIndices) -> torch.Tensor:
    """The LUT kernel: xf (B, n) float32, book (K, d) -> (B, m)."""
    from .lut_numba import lut_layout, lut_matmul

    k = book.shape[0]
    return lut_matmul(xf, book, checked.layout(f"numba/{k}", lambda c: lut_layout(c, k)))


def dequantize_checked(codebook: torch.Tensor, checked: CheckedIndices, temporary: bool) -> torch.Tensor:
    """Dense (m, n) float32 rows from the checked copy by numba's parallel gather (no autograd).
    temporary: write into this thread's reused scratch buffer (overwritten by the next temporary call; only
    for results that never reach the caller) instead of fresh memory."""
    from .lut_numba import dequantize_rows, scratch

    idx = checked.copy
    shape = (idx.shape[0], idx.shape[1] * codebook.shape[-1])
    out = scratch("weight", shape) if temporary else np.empty(shape, dtype=np.float32)
    for a, b, g in group_blocks(shape[0], codebook.shape[0] if codebook.dim() == 3 else 1):
        dequantize_rows(group_book(codebook, g), idx[a:b], out[a:b])
    return torch.from_numpy(out)


def _same_book(book: torch.Tensor, stored: torch.Tensor) -> bool:
    return stored.dtype == book.dtype and stored.shape == book.shape and torch.equal(stored, book.detach())


def rebuilt_weight(name: str, codebook: torch.Tensor, checked: CheckedIndices) -> torch.Tensor:
    """The float32 (m, n) rows of `checked` with `codebook` (K, d) | (G, K, d), rebuilt once and kept in the
    checked copy's store beside a copy of the codebook: reused while the codebook holds the same values (compared
    on every call, K * d numbers, so a write through `.numpy()` is seen too), rebuilt when they differ.  New index
    bytes make a new checked copy (`checked.checked_indices`), so never a stale weight.  Weights over
    DENSE_CACHE_FLOATS are rebuilt into a reused scratch buffer on every call instead."""
    m, s = checked.copy.shape
    if m * s * codebook.shape[-1] > DENSE_CACHE_FLOATS:
        return dequantize_checked(codebook, checked, temporary=True)
    book, weight = checked.refreshed(
        name, lambda hit: _same_book(codebook, hit[0]),
        lambda _: (codebook.detach().clone(), dequantize_checked(codebook, checked, temporary=False)))
    return weight


def dense_matmul(xf: torch.Tensor, book: torch.Tensor, checked: CheckedIndices) -> torch.Tensor:
    """The rebuilt weight (`rebuilt_weight`) + one GEMM: xf (B, n), book (K, d) -> (B, m)."""
    return F.linear(xf, rebuilt_weight("dense", book, checked))


def dense_conv(x, codebook, checked, weight_shape, stride, padding, dilation, groups, segment):
    """The whole convolution from the rebuilt weight (every codebook group at once)."""
    w = conv_weight_from_rows(rebuilt_weight("dense-conv", codebook, checked), weight_shape, segment)
    return F.conv2d(x, w.to(x.dtype), None, stride, padding, dilation, groups)


register_backend(KernelBackend("dense", matmul=dense_matmul, conv=dense_conv, available=numba_usable, cost=dense_cost,
                               description="numba's parallel gather rebuilds the float weight (cached), then one GEMM"))
register_backend(KernelBackend("numba", matmul=numba_matmul, available=numba_usable, cost=numba_cost,
                               description="lookup-table kernel: per input segment the K dot products once, "
                                           "then one table read per output and segment"))
