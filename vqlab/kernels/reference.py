"""Reference (pure torch) VQ kernels: the correctness oracle and the fallback on every device.

Public meaning used across vqlab:  W[i, s*d:(s+1)*d] = codebook[indices[i, s]],  y = x @ W.T
"""
from __future__ import annotations

import torch

__all__ = ["dequantize", "vq_matmul_reference"]


def dequantize(codebook: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rebuild a dense weight from a codebook and indices.

    codebook: (K, d) or (G, K, d) — with G groups, output rows are split into G equal
        consecutive blocks and block g uses codebook[g].
    indices: (m, n/d) integer (uint8 / int16 / int32 / int64).
    returns: (m, n) in the codebook's dtype, differentiable w.r.t. the codebook
        (each codeword's gradient is the sum of the gradients of the segments that use it).
    """
    idx = indices.long()
    m, s = idx.shape
    if codebook.dim() == 2:
        k, d = codebook.shape
        return codebook[idx].reshape(m, s * d)
    g, k, d = codebook.shape
    if m % g:
        raise ValueError(f"{m} output rows cannot be split into {g} codebook groups")
    offset = (torch.arange(m, device=idx.device) // (m // g) * k).unsqueeze(1)  # (m, 1)
    return codebook.reshape(g * k, d)[idx + offset].reshape(m, s * d)


def vq_matmul_reference(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """y = x @ dequantize(codebook, indices).T.   x: (..., n) -> y: (..., m)."""
    w = dequantize(codebook, indices).to(x.dtype)
    return torch.nn.functional.linear(x, w)
