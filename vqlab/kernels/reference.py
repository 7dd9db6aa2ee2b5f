"""Reference (pure torch) VQ kernels: the correctness oracle and the fallback on every device.

Public meaning used across vqlab:  W[i, s*d:(s+1)*d] = codebook[indices[i, s]],  y = x @ W.T

Indices are checked before anything reads through them (`check_indices`): integer dtype only, every
value in [0, K).  Negative values are refused on every backend (torch indexing would wrap them
Python-style, a native kernel would read outside the table), so uint8 indices for K > 128 viewed as
int8, or int16 for K > 32768, raise instead of meaning different things on different backends.
"""
from __future__ import annotations

import torch

__all__ = ["dequantize", "vq_matmul_reference", "check_indices", "check_codebook_groups", "INDEX_DTYPES"]

INDEX_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


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
    lo, hi = (int(v) for v in torch.aminmax(indices if indices.dtype != torch.uint8 else indices.to(torch.int16)))
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
    idx = indices.long()
    m, s = idx.shape
    if codebook.dim() == 2:
        k, d = codebook.shape
        return codebook[idx].reshape(m, s * d)
    g, k, d = codebook.shape
    check_codebook_groups(codebook, m)
    offset = (torch.arange(m, device=idx.device) // (m // g) * k).unsqueeze(1)  # (m, 1)
    return codebook.reshape(g * k, d)[idx + offset].reshape(m, s * d)


def vq_matmul_reference(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """y = x @ dequantize(codebook, indices).T.   x: (..., n) -> y: (..., m)."""
    w = dequantize(codebook, indices).to(x.dtype)
    return torch.nn.functional.linear(x, w)
