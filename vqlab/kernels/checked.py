"""Checked private copies of index tensors: what native kernels read instead of the caller's tensor.

The first time a CPU index tensor reaches a native backend it is checked (`check_indices`: an integer dtype,
every value in [0, K)) and copied.  Kernels read only that copy and the layouts derived from it.  On every
later call the caller's bytes are compared with the copy (one linear pass at about memory speed), so a change
made behind torch's back (`indices.numpy()[:] = ...`, which does not bump `_version`) can never hit a stale
entry: it is checked and copied again.

The one exception is a backend with a `direct` entry (`registry.KernelBackend.direct`, today "simd") given
contiguous uint8 CPU indices: it reads the caller's tensor itself, with no copy and no compare, because its
kernel range-checks every index byte on every call and cannot address memory with an index value (see
`vqlab.kernels.simd`).  Its other index tensors (int64, strided views) still come through here.
"""
from __future__ import annotations

import ctypes
import os

import numpy as np
import torch

from .reference import check_indices

__all__ = ["CheckedIndices", "Snapshot", "checked_indices", "clear_checked"]

_CACHE: dict = {}        # (data_ptr, shape, stride, dtype, K) -> CheckedIndices
_CACHE_MAX = 128


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    try:
        from .lut_numba import same_bytes
    except ImportError:                                  # no numba: numpy's comparison (allocates a mask)
        return a.shape == b.shape and bool(np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)))
    return same_bytes(a, b)


class CheckedIndices:
    """A checked (m, S) contiguous CPU copy of one index tensor, or a block of its rows, plus derived layouts.

    copy: the checked values (same dtype as the caller's tensor); `rows(a, b)` is the block of rows [a, b)
    sharing the same layout store; `layout(name, build)` returns build(copy) computed once per block and name
    (a backend's private arrangement, e.g. the numba kernel's packed words); `refreshed(name, current, build)`
    one that is rebuilt when `current` says it no longer is (the dense backend's weight, per codebook values).
    """

    def __init__(self, copy: torch.Tensor, store: dict | None = None, span: tuple[int, int] | None = None):
        self.copy = copy
        self._store = {} if store is None else store
        self.span = (0, copy.shape[0]) if span is None else span

    def rows(self, a: int, b: int) -> "CheckedIndices":
        lo = self.span[0]
        return CheckedIndices(self.copy[a:b], self._store, (lo + a, lo + b))

    def layout(self, name: str, build):
        key = (name, self.span)
        hit = self._store.get(key)
        if hit is None:
            hit = self._store[key] = build(self.copy)
        return hit

    def refreshed(self, name: str, current, build):
        """Like `layout`, for things that also depend on other inputs: the stored build(copy) while
        current(stored) is true, else built again (and stored in place of the old one)."""
        key = (name, self.span)
        hit = self._store.get(key)
        if hit is None or not current(hit):
            hit = self._store[key] = build(self.copy)
        return hit


def checked_indices(indices: torch.Tensor, k: int) -> CheckedIndices:
    """The checked copy of a CPU index tensor for a K-entry codebook; checked and copied again whenever the
    tensor's bytes changed.  raises ValueError (from `check_indices`) for a non-integer dtype or a value
    outside [0, K)."""
    key = (indices.data_ptr(), tuple(indices.shape), tuple(indices.stride()), indices.dtype, k)
    hit = _CACHE.get(key)
    if hit is not None and _same_bytes(hit.copy.numpy(), indices.detach().contiguous().numpy()):
        return hit
    _CACHE.pop(key, None)
    if len(_CACHE) >= _CACHE_MAX:
        _CACHE.pop(next(iter(_CACHE)))                  # drop the oldest entry
    check_indices(indices, k)
    hit = CheckedIndices(indices.detach().contiguous().clone())
    hit.source = indices      # keeps the caller's memory alive: its address cannot be reused while cached
    _CACHE[key] = hit
    return hit


def clear_checked() -> None:
    """Forget every checked copy and its layouts."""
    _CACHE.clear()


# ---------------------------------------------------------------- snapshots (call plans compare against them)

def _libc_memcmp():
    try:
        f = (ctypes.cdll.msvcrt if os.name == "nt" else ctypes.CDLL(None)).memcmp
    except (OSError, AttributeError):
        return None
    f.argtypes, f.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t], ctypes.c_int
    return f


_MEMCMP = _libc_memcmp()


class Snapshot:
    """A private copy of a CPU tensor's bytes, compared with the tensor on every call: libc's memcmp (about a
    microsecond plus memory speed), numpy's comparison where there is no libc."""

    __slots__ = ("copy", "ptr", "nbytes")

    def __init__(self, t: torch.Tensor):
        self.copy = t.detach().contiguous().clone()
        self.ptr, self.nbytes = self.copy.data_ptr(), self.copy.numel() * self.copy.element_size()

    def same(self, t: torch.Tensor) -> bool:
        if not t.is_cpu or t.dtype != self.copy.dtype or t.shape != self.copy.shape or not t.is_contiguous():
            return False                                # (a device pointer never reaches memcmp)
        if _MEMCMP is not None:
            return self.nbytes == 0 or _MEMCMP(t.data_ptr(), self.ptr, self.nbytes) == 0
        return torch.equal(t.detach(), self.copy)
