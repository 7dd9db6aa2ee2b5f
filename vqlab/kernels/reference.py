"""Reference (pure torch) VQ kernels: the correctness oracle and the fallback on every device.

Public meaning used across vqlab:  W[i, s*d:(s+1)*d] = codebook[indices[i, s]],  y = x @ W.T

`dequantize` is the training path too (VQ layers rebuild W from it in every step), so it is built for
speed: the forward is one `index_select` of whole codewords viewed as one wide element (d=4 float32 -> one
complex128), written into fresh memory that is advised to use huge pages on Linux (page faults on a new
64 MB weight cost ~10x the gather itself); the codebook gradient is a scatter-add (numba's thread-private
sums on CPU when numba is installed, else `index_add_`).  Values are copied bit for bit.

Indices are checked before anything reads through them (`check_indices`): integer dtype only, every
value in [0, K).  Negative values are refused on every backend (torch indexing would wrap them
Python-style, a native kernel would read outside the table), so uint8 indices for K > 128 viewed as
int8, or int16 for K > 32768, raise instead of meaning different things on different backends.
"""
from __future__ import annotations

import mmap
import sys

import torch
from torch.autograd.function import once_differentiable

from ..dtypes import INDEX_DTYPES

__all__ = ["dequantize", "vq_matmul_reference", "check_indices", "check_codebook_groups"]


def check_indices(indices: torch.Tensor, k: int, what: str = "indices") -> None:
    """Raise unless `indices` is an integer tensor with every value in [0, k).

    ValueError for a non-integer dtype (float, bool, complex) and for values outside [0, k), naming the
    values' range and K.  Reads every element once (one aminmax); callers on hot paths cache the verdict.
    """
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype not in INDEX_DTYPES:
        raise ValueError(f"{what} must have an integer dtype {[str(t) for t in INDEX_DTYPES]}, got {indices.dtype}")
    if indices.numel() == 0:
        return
    if indices.dtype == torch.uint8:                     # never negative: only the maximum matters
        if k >= 256:
            return
        lo, hi = 0, int(indices.max())
    else:
        lo, hi = (int(v) for v in torch.aminmax(indices))
    if lo < 0 or hi >= k:
        raise ValueError(f"{what} hold values in [{lo}, {hi}] but the codebook has K={k} codewords: every index "
                         f"must lie in [0, {k - 1}]")


def check_codebook_groups(codebook: torch.Tensor, rows: int) -> None:
    """Raise unless a (G, K, d) codebook's G groups split `rows` output rows into equal blocks."""
    if codebook.dim() == 3 and (codebook.shape[0] < 1 or rows % codebook.shape[0]):
        raise ValueError(f"{rows} output rows cannot be split into {codebook.shape[0]} codebook groups: G must "
                         f"divide the number of rows m")


def dequantize(codebook: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rebuild a dense weight from a codebook and indices.

    codebook: (K, d) or (G, K, d) — with G groups, output rows are split into G equal
        consecutive blocks and block g uses codebook[g].
    indices: (m, n/d) integer (uint8 / int8 / int16 / int32 / int64), every value in [0, K).
    returns: (m, n) in the codebook's dtype, differentiable w.r.t. the codebook
        (each codeword's gradient is the sum of the gradients of the segments that use it).
    raises: ValueError for non-integer indices, values outside [0, K) or G not dividing m.
    """
    check_indices(indices, codebook.shape[-2])
    m, s = indices.shape
    k, d = codebook.shape[-2], codebook.shape[-1]
    groups = codebook.shape[0] if codebook.dim() == 3 else 1
    check_codebook_groups(codebook, m)
    flat = indices if indices.dtype in (torch.int32, torch.int64) else indices.to(torch.int32)
    if groups > 1:
        rows = torch.arange(m, device=indices.device, dtype=flat.dtype) // (m // groups) * k
        flat = flat + rows.unsqueeze(1)
    book = codebook.reshape(groups * k, d)
    return _Dequantize.apply(book if book.is_contiguous() else book.contiguous(), flat.reshape(-1)).view(m, s * d)


_HUGE_MIN = 4 << 20      # bytes from which CPU results are allocated on huge-page-advised memory


def _empty(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A fresh 1-D tensor; large CPU ones on anonymous memory advised to use huge pages (Linux), which
    faults in 2 MB at a time instead of 4 KB (measured: a 64 MB gather 27 ms instead of 101 ms)."""
    nbytes = numel * dtype.itemsize
    if device.type != "cpu" or nbytes < _HUGE_MIN or not sys.platform.startswith("linux") \
            or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(numel, dtype=dtype, device=device)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        pass
    return torch.frombuffer(buf, dtype=dtype, count=numel)          # the tensor keeps the mapping alive


def _gather(book: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """book (R, d) contiguous, flat (N,) int32/int64 in [0, R) -> (N, d) copies of the rows: one index_select
    of rows viewed as the widest element that divides a row's bytes (complex128, int64, int32, int16)."""
    rows, d = book.shape
    nbytes = d * book.element_size()
    wide = [(torch.int64, 8), (torch.int32, 4), (torch.int16, 2)]
    if book.device.type in ("cpu", "cuda"):
        wide.insert(0, (torch.complex128, 16))
    for dtype, size in wide:
        if nbytes % size == 0 and size >= book.element_size():
            try:
                src = book.view(dtype)                                   # (R, nbytes / size)
            except RuntimeError:                                         # misaligned storage: plain rows
                break
            cols = nbytes // size
            out = _empty(flat.shape[0] * cols, dtype, book.device)
            if cols == 1:
                torch.index_select(src.view(-1), 0, flat, out=out)
            else:
                torch.index_select(src, 0, flat, out=out.view(-1, cols))
            return out.view(book.dtype).view(-1, d)
    out = _empty(flat.shape[0] * d, book.dtype, book.device).view(-1, d)
    return torch.index_select(book, 0, flat, out=out)


class _Dequantize(torch.autograd.Function):
    """rows = book[flat] (no copy of the index tensor to int64); grad_book = scatter-add of grad_rows."""

    @staticmethod
    def forward(ctx, book: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(flat)
        ctx.rows = book.shape[0]
        return _gather(book, flat).view(-1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (flat,) = ctx.saved_tensors
        g = grad.reshape(flat.shape[0], -1)
        if g.device.type == "cpu" and g.dtype == torch.float32:
            from .backends import numba_usable
            if numba_usable():
                from .lut_numba import codeword_grad
                return codeword_grad(flat, g, ctx.rows), None
        acc = torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else g.dtype   # sums of many halves
        out = torch.zeros((ctx.rows, g.shape[1]), dtype=acc, device=g.device)
        out.index_add_(0, flat.long() if g.device.type == "cpu" else flat, g.to(acc))
        return out.to(g.dtype), None


def vq_matmul_reference(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """y = x @ dequantize(codebook, indices).T.   x: (..., n) -> y: (..., m)."""
    w = dequantize(codebook, indices).to(x.dtype)
    return torch.nn.functional.linear(x, w)
