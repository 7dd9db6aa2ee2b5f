"""The fast CPU kernel: lookup-table (LUT) VQ matmul in numba, parallel over blocks of outputs.

y[b, i] = sum_s T[b, s, I[i, s]]  with the table T[b, s, k] = x[b, s*d:(s+1)*d] . codebook[k]
computed once per input row by BLAS.  Indices are read segment-major, It = I.T (S, m), so the inner
loop over outputs i reads contiguous bytes and gathers from one table row that stays in L1 — measured
~2.7x faster than a row-major loop here; four segments per pass cut the accumulator traffic (~3.2x).
Every parallel iteration owns a disjoint block of outputs: no two threads write the same element.
Compiled code is cached on disk (numba cache=True).
"""
from __future__ import annotations

import numpy as np
import torch

from numba import njit, prange

__all__ = ["lut_matmul", "segment_major"]

BLOCK = 512            # outputs per parallel work item (a block's accumulators stay in L1)
TABLE_BUDGET = 1 << 22  # floats of table built at once (16 MB); larger batches are processed in chunks


@njit(parallel=True, cache=True, nogil=True)
def _lut_kernel(table, idx_t, out):  # table (B, S, K) f32, idx_t (S, m) ints, out (B, m) f32
    nb, S, _ = table.shape
    m = idx_t.shape[1]
    nblocks = (m + BLOCK - 1) // BLOCK
    for blk in prange(nblocks):
        lo = blk * BLOCK
        hi = min(m, lo + BLOCK)
        acc = np.zeros((nb, hi - lo), dtype=np.float32)
        s = 0
        while s + 4 <= S:               # four segments per pass; their index bytes stay in L1 for every row b
            i0, i1, i2, i3 = idx_t[s], idx_t[s + 1], idx_t[s + 2], idx_t[s + 3]
            for b in range(nb):
                t0, t1, t2, t3 = table[b, s], table[b, s + 1], table[b, s + 2], table[b, s + 3]
                a = acc[b]
                for i in range(lo, hi):
                    a[i - lo] += (t0[i0[i]] + t1[i1[i]]) + (t2[i2[i]] + t3[i3[i]])
            s += 4
        while s < S:
            i0 = idx_t[s]
            for b in range(nb):
                t0, a = table[b, s], acc[b]
                for i in range(lo, hi):
                    a[i - lo] += t0[i0[i]]
            s += 1
        out[:, lo:hi] = acc


def segment_major(indices: torch.Tensor) -> np.ndarray:
    """(m, S) indices -> contiguous (S, m) numpy array in the same integer dtype (uint8/int16/int32)."""
    idx = indices.detach().cpu()
    if idx.dtype == torch.int64:
        idx = idx.to(torch.int32)
    return np.ascontiguousarray(idx.numpy().T)


def lut_matmul(x: torch.Tensor, codebook: torch.Tensor, idx_t: np.ndarray) -> torch.Tensor:
    """y = x @ W.T via the lookup table.  x: (B, n) float32 CPU, codebook: (K, d), idx_t: (S, m) -> (B, m) float32."""
    b, n = x.shape
    k, d = codebook.shape
    s, m = idx_t.shape
    cb_t = codebook.detach().to(torch.float32).T.contiguous()         # (d, K)
    out = np.empty((b, m), dtype=np.float32)
    chunk = max(1, TABLE_BUDGET // max(1, s * k))
    for lo in range(0, b, chunk):
        xb = x[lo:lo + chunk]
        table = torch.matmul(xb.reshape(len(xb), s, d), cb_t).numpy()   # (b, S, K): n*K MACs per row
        _lut_kernel(table, idx_t, out[lo:lo + chunk])
    return torch.from_numpy(out)
