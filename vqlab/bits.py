"""Bits and bytes of stored codes: bit packing of index streams and Huffman code lengths (defined once;
used by the code objects, `vqlab.size` and `vqlab.io`)."""
from __future__ import annotations

import heapq
import lzma

import numpy as np
import torch

__all__ = ["pack_indices", "unpack_indices", "packed_bytes", "huffman_code_lengths", "huffman_bytes", "LZMA_FILTERS"]

LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
_CHUNK = 1 << 20  # indices per packing chunk (a multiple of 8, so chunks end on byte boundaries)


# ---------------------------------------------------------------- bit packing

def packed_bytes(count: int, bits: int) -> int:
    """Bytes `count` indices take at `bits` bits each: ceil(count * bits / 8)."""
    return -(-count * bits // 8)


def pack_indices(indices: torch.Tensor, bits: int) -> bytes:
    """Pack non-negative integers (any shape, row-major) at `bits` bits each, most significant bit first.

    returns ceil(numel * bits / 8) bytes; the last byte is zero-padded.
    """
    v = indices.detach().reshape(-1).cpu().numpy()
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be in 1..32, got {bits}")
    if v.size and (v.min() < 0 or int(v.max()) >= 1 << bits):
        raise ValueError(f"indices must lie in [0, 2**{bits}) to pack at {bits} bits, got range "
                         f"[{v.min()}, {v.max()}]")
    if bits == 8:
        return v.astype(np.uint8).tobytes()
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint32)
    out = []
    for start in range(0, v.size, _CHUNK):
        c = v[start:start + _CHUNK].astype(np.uint32)
        out.append(np.packbits(((c[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1)).tobytes())
    return b"".join(out)


def unpack_indices(data: bytes, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_indices`: (count,) int64."""
    need = packed_bytes(count, bits)
    if len(data) != need:
        raise ValueError(f"{count} indices at {bits} bits need {need} bytes, got {len(data)}")
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        return torch.from_numpy(raw.astype(np.int64))
    weights = (1 << np.arange(bits - 1, -1, -1, dtype=np.int64))
    out = []
    step = _CHUNK * bits // 8
    for i, start in enumerate(range(0, need, step)):
        n = min(_CHUNK, count - i * _CHUNK)
        b = np.unpackbits(raw[start:start + step], count=n * bits).reshape(n, bits)
        out.append(b.astype(np.int64) @ weights)
    return torch.from_numpy(np.concatenate(out) if out else np.zeros(0, np.int64))


# ---------------------------------------------------------------- Huffman code lengths

def huffman_code_lengths(counts) -> np.ndarray:
    """Huffman code length (bits) of every symbol from its count; 0 for unused symbols.

    counts: (K,) non-negative integers.  A single used symbol gets length 1.  Ties are broken by
    symbol order, so the result is deterministic.
    """
    counts = np.asarray(counts, dtype=np.int64)
    lengths = np.zeros(len(counts), dtype=np.int64)
    used = np.flatnonzero(counts)
    if len(used) == 1:
        lengths[used] = 1
    if len(used) <= 1:
        return lengths
    heap = [(int(counts[i]), int(i)) for i in used]
    heapq.heapify(heap)
    parent: dict[int, int] = {}
    node = len(counts)
    while len(heap) > 1:
        c1, a = heapq.heappop(heap)
        c2, b = heapq.heappop(heap)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (c1 + c2, node))
        node += 1
    depth = np.zeros(node, dtype=np.int64)
    for i in range(node - 2, -1, -1):            # parents have larger ids than their children
        if i in parent:
            depth[i] = depth[parent[i]] + 1
    lengths[used] = depth[used]
    return lengths


def huffman_bytes(indices: torch.Tensor, k: int) -> int:
    """Bytes of `indices` (values in [0, k)) Huffman-coded from their own histogram, plus a code table of
    one code-length byte per symbol (canonical Huffman needs nothing else)."""
    counts = np.bincount(indices.reshape(-1).long().cpu().numpy(), minlength=k)
    bits = int((counts * huffman_code_lengths(counts)).sum())
    return -(-bits // 8) + k  # coded stream + one code-length byte per codeword
