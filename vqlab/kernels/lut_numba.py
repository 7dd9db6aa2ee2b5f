"""The fast CPU kernels in numba: lookup-table (LUT) VQ matmul, and dequantize for the dense path.

y[b, i] = sum_s T[b, s, I[i, s]]  with the table T[b, s, k] = x[b, s*d:(s+1)*d] . codebook[k].

Two index layouts, both segment-major (the inner loop runs over outputs i, reading contiguous memory and
gathering from table rows that stay in L1):
* K <= 256 ("packed"): the byte indices of 8 consecutive segments are packed into one uint64 word,
  words (ceil(S/8), m); the table rows have a compile-time stride (64 for K <= 64, else 256: one compiled
  kernel per stride) so the 8 lookups use constant offsets.  One word load serves 8 lookups and one
  accumulator update; measured here 1.5x faster than one byte stream per segment, and 2.2x faster than
  the same loop with a run-time stride K.  Small-K tables are packed densely (K=64: 256 bytes per segment
  instead of 1 KB padded to 256 columns).
* K <= 16 ("pairs"): two segments share one byte index i + 16 j and one 256-entry table of pair sums
  T2[p, i + 16 j] = T[2p, i] + T[2p+1, j], so K=16, d=2 runs half the lookups (as fast as K=256, d=4;
  with tables padded to 256 columns it had been 1.8x slower).
* K > 256: (S, m) int16/int32, one segment per pass (tables of K floats no longer sit in L1; `auto`
  picks dequantize + GEMM for these in every case measured).
The table is built inside numba too: a torch GEMM right before a numba parallel loop leaves torch's
OpenMP threads spinning on the same cores (measured +0.25 ms per call on 2 cores).
Every parallel iteration owns a disjoint block of outputs: no two threads write the same element.
Compiled code is cached on disk (numba cache=True).

Threading layer: numba's GNU OpenMP layer ("omp", its default on Linux without TBB) cannot run in a child made
by fork() once it ran in the parent (numba terminates the child), and fork is how multiprocessing and a
DataLoader with workers start on Linux.  So before anything is compiled this module selects numba's fork-safe
layer (`numba.config.THREADING_LAYER = "forksafe"`: TBB when installed, else "workqueue") and starts it, unless
$NUMBA_THREADING_LAYER is set or numba's layer was already started by other code.  "workqueue" must not be
entered by two threads at once (numba aborts the process), so every call into a parallel kernel holds one
process-wide lock under that layer (`_parallel_call`).  Where the layer is "omp" anyway, a forked child does not
launch these kernels (`vqlab.kernels.backends.numba_usable`): it runs the reference instead.
"""
from __future__ import annotations

import functools
import os
import threading

import numba
import numpy as np
import torch

from numba import njit, prange

__all__ = ["lut_matmul", "lut_layout", "dequantize_rows", "same_bytes"]

BLOCK = 512             # outputs per parallel work item (a block's accumulators stay in L1)
PACK = 8                # byte indices per uint64 word
TABLE_BUDGET = 1 << 22  # floats of table built at once (16 MB); larger batches are processed in chunks


def _select_threading_layer() -> str:
    """Select numba's fork-safe threading layer and start it, before any kernel here is compiled or loaded
    (module docstring); keep the user's $NUMBA_THREADING_LAYER or a layer other code already started.
    Returns the layer that runs."""
    from numba.np.ufunc import parallel

    if not os.environ.get("NUMBA_THREADING_LAYER") and not parallel._is_initialized:
        numba.config.THREADING_LAYER = "forksafe"
    numba.get_num_threads()                   # starts the layer now, so no later config change can switch it
    return numba.threading_layer()


LAYER = _select_threading_layer()
_LOCK = [threading.RLock() if LAYER == "workqueue" else None]   # workqueue is not thread-safe: one caller at a time


def _new_lock_in_child() -> None:
    """A forked child gets a fresh lock (another thread of the parent may have held it at the fork)."""
    if _LOCK[0] is not None:
        _LOCK[0] = threading.RLock()


os.register_at_fork(after_in_child=_new_lock_in_child)


def _parallel_call(fn):
    """Wrap an entry point into numba's parallel kernels:
    * under the "workqueue" layer, hold the process-wide lock (two threads inside workqueue abort the process);
    * numba's OpenMP layer sets the OpenMP thread count it shares with torch at its first parallel launch, so
      torch.get_num_threads() would read NUMBA_NUM_THREADS afterwards (a 1-thread benchmark silently became 2):
      restore torch's setting after every call."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        threads = torch.get_num_threads()
        lock = _LOCK[0]
        try:
            if lock is None:
                return fn(*args, **kwargs)
            with lock:
                return fn(*args, **kwargs)
        finally:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
    return call


_SCRATCH = threading.local()  # per-thread float32 buffers, reused: fresh memory costs page faults on every call


def scratch(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A float32 array of `shape` from this thread's buffer `name` (grown when too small, never shrunk).

    The table costs ~0.1 ms of page faults per call when allocated fresh; a freshly allocated 180 MB
    dequantized weight was measured at 18-240 ms per call against 18 ms when reused.  The contents are
    overwritten by the next call with the same name: use for temporaries only."""
    size = int(np.prod(shape))
    buf = getattr(_SCRATCH, name, None)
    if buf is None or buf.size < size:
        buf = np.empty(size, dtype=np.float32)
        setattr(_SCRATCH, name, buf)
    return buf[:size].reshape(shape)


@njit(parallel=True, cache=True, nogil=True)
def _build_table(x, cb_t, table):  # x (B, n) f32, cb_t (d, K) f32, table (B, S_pad, K_pad) f32, padding set to 0
    nb = x.shape[0]
    d, k = cb_t.shape
    s_real = x.shape[1] // d
    s_pad = table.shape[1]
    for bs in prange(nb * s_pad):
        b, s = bs // s_pad, bs % s_pad
        row = table[b, s]
        row[:] = 0.0
        if s < s_real:
            for j in range(d):                 # the inner loop over codewords vectorizes
                xv = x[b, s * d + j]
                cj = cb_t[j]
                for c in range(k):
                    row[c] += xv * cj[c]


STRIDES = (64, 256)        # table row strides of the packed kernels
PAIR_K = 16                # codebooks up to this size run on pair tables
_PACKED: dict = {}


def table_stride(k: int) -> int:
    """Columns per table row of the packed kernel for a K-entry codebook (K <= 256; pair tables for K <= 16)."""
    return 256 if k <= PAIR_K else next(t for t in STRIDES if k <= t)


@njit(parallel=True, cache=True, nogil=True)
def _pair_table(single, table):  # single (B, 2P, K<=16) f32 -> table (B, P, 256): [b, p, i + 16 j] = T[2p, i] + T[2p+1, j]
    nb, s2, k = single.shape
    p_count = table.shape[1]
    for bp in prange(nb * p_count):
        b, p = bp // p_count, bp % p_count
        row = table[b, p]
        row[:] = 0.0
        if 2 * p < s2:
            t0, t1 = single[b, 2 * p], single[b, 2 * p + 1]
            for j in range(k):
                for i in range(k):
                    row[i + 16 * j] = t0[i] + t1[j]


@njit(inline="always", cache=True)
def _sum8(t, w, base, ks):  # the 8 entries one uint64 word of byte indices picks from 8 table rows of ks at t[base:]
    return (((t[base + (w & 255)] + t[base + ks + ((w >> 8) & 255)])
             + (t[base + 2 * ks + ((w >> 16) & 255)] + t[base + 3 * ks + ((w >> 24) & 255)]))
            + ((t[base + 4 * ks + ((w >> 32) & 255)] + t[base + 5 * ks + ((w >> 40) & 255)])
               + (t[base + 6 * ks + ((w >> 48) & 255)] + t[base + 7 * ks + (w >> 56)])))


def _packed_kernel(ks: int):
    """The packed LUT kernel for table rows of `ks` columns (a compile-time constant: the closure's only free
    variable, inlined into `_sum8`; compiled and cached on disk once per stride).  Reads t[row * ks + index] for
    byte indices < K <= ks (the checked layout).  `_sum8` is a module-level function, not a second closure
    variable: numba keys a closure's disk cache on its pickled free variables, and a dispatcher pickles
    differently in every process (the kernel was recompiled, 3-8 s, in every new process)."""
    if ks in _PACKED:
        return _PACKED[ks]

    @njit(parallel=True, cache=True, nogil=True)
    def lut_packed(table, words, out):  # table (B, 8Q, ks) f32, words (Q, m) uint64, out (B, m) f32
        nb = table.shape[0]
        q_count, m = words.shape
        nblocks = (m + BLOCK - 1) // BLOCK
        for blk in prange(nblocks):
            lo = blk * BLOCK
            hi = min(m, lo + BLOCK)
            acc = np.zeros((nb, hi - lo), dtype=np.float32)
            for q in range(0, q_count - 1, 2):     # two words (16 segments) per accumulator update: 12 % faster
                w0, w1 = words[q], words[q + 1]
                for b in range(nb):
                    t = table[b, 8 * q:8 * q + 16].ravel()         # 16 table rows of ks, one after another
                    a = acc[b]
                    for i in range(lo, hi):
                        a[i - lo] += _sum8(t, w0[i], 0, ks) + _sum8(t, w1[i], 8 * ks, ks)
            if q_count % 2:
                q = q_count - 1
                w0 = words[q]
                for b in range(nb):
                    t = table[b, 8 * q:8 * q + 8].ravel()
                    a = acc[b]
                    for i in range(lo, hi):
                        a[i - lo] += _sum8(t, w0[i], 0, ks)
            out[:, lo:hi] = acc

    _PACKED[ks] = lut_packed
    return lut_packed


@njit(parallel=True, cache=True, nogil=True)
def _lut_wide(table, idx_t, out):  # table (B, S, K) f32, idx_t (S, m) int16/int32, out (B, m) f32
    nb, S, _ = table.shape
    m = idx_t.shape[1]
    nblocks = (m + BLOCK - 1) // BLOCK
    for blk in prange(nblocks):
        lo = blk * BLOCK
        hi = min(m, lo + BLOCK)
        acc = np.zeros((nb, hi - lo), dtype=np.float32)
        for s in range(S):
            ix = idx_t[s]
            for b in range(nb):
                t, a = table[b, s], acc[b]
                for i in range(lo, hi):
                    a[i - lo] += t[ix[i]]
        out[:, lo:hi] = acc


@njit(parallel=True, cache=True, nogil=True)
def _dequantize(cb, idx, out):  # cb (K, d), idx (m, S), out (m, S*d)
    m, S = idx.shape
    d = cb.shape[1]
    for i in prange(m):
        for s in range(S):
            c = idx[i, s]
            for j in range(d):
                out[i, s * d + j] = cb[c, j]


@njit(cache=True, nogil=True)
def _differ(a, b):  # a, b (n,) uint64 -> True when any word differs; one OR-accumulate loop that vectorizes
    acc = np.uint64(0)
    for i in range(a.size):
        acc |= a[i] ^ b[i]
    return acc != 0


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two C-contiguous arrays hold identical bytes: one single-threaded pass at about memory speed
    (a parallel loop was 10x slower on a busy 2-core machine: its threads wait for each other)."""
    if a.nbytes != b.nbytes:
        return False
    x, y = a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)
    words = x.size // 8
    if words and _differ(x[:words * 8].view(np.uint64), y[:words * 8].view(np.uint64)):
        return False
    return bool(np.array_equal(x[words * 8:], y[words * 8:]))


@_parallel_call
def lut_layout(indices: torch.Tensor, k: int) -> np.ndarray:
    """(m, S) indices -> the kernel's layout: uint64 words (ceil(S'/8), m) of byte indices when k <= 256 (for
    k <= 16 the S' = ceil(S/2) pair indices i + 16 j of segments 2p, 2p+1), else (S, m) int16/int32."""
    idx = indices.detach().cpu()
    if k <= 256:
        m, s = idx.shape
        b = idx.to(torch.uint8).numpy()
        if k <= PAIR_K:
            pairs = np.zeros((m, s + s % 2), dtype=np.uint8)
            pairs[:, :s] = b
            b, s = pairs[:, 0::2] | (pairs[:, 1::2] << 4), (s + 1) // 2
        q = -(-s // PACK)
        padded = np.zeros((m, q * PACK), dtype=np.uint8)
        padded[:, :s] = b
        return np.ascontiguousarray(padded.reshape(m, q, PACK).transpose(1, 0, 2)).view(np.uint64).reshape(q, m)
    return np.ascontiguousarray(idx.to(torch.int32 if k > 2**15 else torch.int16).numpy().T)


@_parallel_call
def lut_matmul(x: torch.Tensor, codebook: torch.Tensor, layout: np.ndarray) -> torch.Tensor:
    """y = x @ W.T via the lookup table.  x: (B, n) float32 CPU, codebook: (K, d), layout from `lut_layout`
    -> (B, m) float32."""
    b, n = x.shape
    k, d = codebook.shape
    packed = layout.dtype == np.uint64
    pairs = packed and k <= PAIR_K
    m = layout.shape[1]
    s_pad, k_pad = (layout.shape[0] * PACK, table_stride(k)) if packed else (layout.shape[0], k)
    xn = x.numpy()
    cb_t = codebook.detach().to(torch.float32).T.contiguous().numpy()
    out = np.empty((b, m), dtype=np.float32)
    chunk = max(1, TABLE_BUDGET // (s_pad * k_pad))
    for lo in range(0, b, chunk):
        xb = xn[lo:lo + chunk]
        table = scratch("table", (len(xb), s_pad, k_pad))
        if pairs:
            single = scratch("single", (len(xb), 2 * s_pad, k))
            _build_table(xb, cb_t, single)               # n*K MACs per row; segments past n/d get zero rows
            _pair_table(single, table)                                   # 256 adds per pair of segments
        else:
            _build_table(xb, cb_t, table)                                # n*K MACs per row
        (_packed_kernel(k_pad) if packed else _lut_wide)(table, layout, out[lo:lo + chunk])
    return torch.from_numpy(out)


@_parallel_call
def dequantize_rows(codebook: torch.Tensor, indices: torch.Tensor, out: np.ndarray | None = None) -> torch.Tensor:
    """Dense (m, S*d) float32 weight from codebook (K, d) and indices (m, S), in parallel; no autograd.
    out: a C-contiguous (m, S*d) float32 array to write into (e.g. a `scratch` buffer), else a new one."""
    cb = codebook.detach().to(torch.float32).contiguous().numpy()
    idx = indices.detach()
    if idx.dtype == torch.int64:
        idx = idx.to(torch.int32)
    idx = idx.contiguous().numpy()
    if out is None:
        out = np.empty((idx.shape[0], idx.shape[1] * cb.shape[1]), dtype=np.float32)
    _dequantize(cb, idx, out)
    return torch.from_numpy(out)


@njit(parallel=True, cache=True, nogil=True)
def _codeword_grad(flat, grad, out):  # flat (N,) int rows of the codebook, grad (N, d) f32, out (C, R, d) zeroed
    c_count = out.shape[0]
    n, d = grad.shape
    for c in prange(c_count):                  # chunk c owns out[c]: no two threads write the same element
        lo = c * n // c_count
        hi = (c + 1) * n // c_count
        acc = out[c]
        for i in range(lo, hi):
            r = flat[i]
            for j in range(d):
                acc[r, j] += grad[i, j]


@_parallel_call
def codeword_grad(flat: torch.Tensor, grad: torch.Tensor, rows: int) -> torch.Tensor:
    """Scatter-add for the codebook gradient: out[r] = sum of grad[i] over i with flat[i] == r.
    flat: (N,) integer CPU tensor with values in [0, rows) (checked by the caller); grad: (N, d) float32
    -> (rows, d) float32.  Thread-private partial sums, added at the end (2.5x faster than index_add_ here)."""
    import numba

    chunks = min(2 * numba.get_num_threads(), max(1, flat.shape[0] // 65536))
    out = np.zeros((chunks, rows, grad.shape[1]), dtype=np.float32)
    _codeword_grad(flat.numpy(), grad.detach().contiguous().numpy(), out)
    return torch.from_numpy(out.sum(axis=0) if chunks > 1 else out[0])


def warm() -> list[str]:
    """Load every kernel here from numba's disk cache (compiling it the first time on this machine) by running it
    once on tiny arrays of the dtypes and layouts the entry points pass, so no user call waits for it.  Calls
    the kernels themselves, not the entry points: `_parallel_call` restores torch's thread count after a call,
    which from a background thread could undo the user's own `torch.set_num_threads`.  Under numba's OpenMP layer
    (which sets the thread count it shares with torch at its first launch) nothing is run.  Returns the names of
    the kernels loaded."""
    if LAYER == "omp":
        return []
    f32 = np.float32
    done = []

    def run(name: str, fn, *args) -> None:
        lock = _LOCK[0]
        if lock is None:
            fn(*args)
        else:
            with lock:
                fn(*args)
        done.append(name)

    x, cb_t = np.ones((1, 16), f32), np.ones((4, 16), f32)
    single = np.empty((1, 8, 16), f32)
    run("build_table", _build_table, x, cb_t, single)
    table = np.zeros((1, 16, 256), f32)
    run("pair_table", _pair_table, single, table[:, :4])
    out = np.empty((1, 8), f32)
    for ks in STRIDES:
        run(f"packed/{ks}", _packed_kernel(ks), np.zeros((1, 16, ks), f32), np.zeros((2, 8), np.uint64), out)
    run("wide", _lut_wide, np.zeros((1, 2, 300), f32), np.zeros((2, 8), np.int16), out)
    for dtype in (np.uint8, np.int16, np.int32):
        run(f"dequantize/{np.dtype(dtype).name}", _dequantize, np.ones((4, 2), f32), np.zeros((3, 2), dtype),
            np.empty((3, 4), f32))
    run("differ", _differ, np.zeros(4, np.uint64), np.zeros(4, np.uint64))
    for dtype in (np.uint8, np.int16, np.int32, np.int64):
        run(f"codeword_grad/{np.dtype(dtype).name}", _codeword_grad, np.zeros(4, dtype), np.ones((4, 2), f32),
            np.zeros((1, 3, 2), f32))
    return done
