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


# ---------------------------------------------------------------- a byte-level canonical Huffman coder

HUFFMAN_MAX_BITS = 15


def _limited_lengths(counts: np.ndarray, max_bits: int = HUFFMAN_MAX_BITS) -> np.ndarray:
    """Huffman code lengths of the 256 byte values, at most `max_bits` long: while the longest code is too
    long, the counts are flattened (halved, keeping used symbols >= 1) and the code rebuilt."""
    counts = counts.astype(np.int64)
    while True:
        lengths = huffman_code_lengths(counts)
        if lengths.max(initial=0) <= max_bits:
            return lengths
        counts = np.where(counts > 0, np.maximum(counts // 2, 1), 0)


def _canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical Huffman codes (as integers) for code lengths; symbols ordered by (length, value)."""
    codes = np.zeros(len(lengths), dtype=np.int64)
    code, prev = 0, 0
    for sym in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[sym]) - prev
        codes[sym], prev = code, int(lengths[sym])
        code += 1
    return codes


def huffman_encode(data: bytes) -> bytes:
    """Static canonical Huffman coding of a byte string from its own histogram.

    Layout: uint32 little-endian byte count, 128 bytes of code lengths (two 4-bit lengths per byte, symbol 2i
    in the low nibble, 0 = unused, at most 15), then the codes MSB-first, zero-padded to a whole byte.
    """
    raw = np.frombuffer(data, dtype=np.uint8)
    lengths = _limited_lengths(np.bincount(raw, minlength=256))
    codes = _canonical_codes(lengths)
    nib = lengths.astype(np.uint8)
    header = len(raw).to_bytes(4, "little") + (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8).tobytes()
    if len(raw) == 0:
        return header
    lens, vals = lengths[raw], codes[raw]
    starts = np.concatenate(([0], np.cumsum(lens)[:-1]))
    total = int(lens.sum())
    owner = np.repeat(np.arange(len(raw)), lens)
    shift = np.repeat(lens, lens) - 1 - (np.arange(total) - starts[owner])
    bits = ((vals[owner] >> shift) & 1).astype(np.uint8)
    return header + np.packbits(bits).tobytes()


def huffman_decode(coded: bytes, limit: int) -> bytes:
    """Inverse of `huffman_encode`.  raises ValueError for a stream that decodes to more than `limit` bytes,
    a code table that is not a complete prefix code, or a bit stream that ends early or has bytes left over."""
    if len(coded) < 132:
        raise ValueError(f"the huffman stream has {len(coded)} bytes, less than its 132-byte header")
    count = int.from_bytes(coded[:4], "little")
    if count > limit:
        raise ValueError(f"the huffman stream decodes to {count} bytes, more than {limit}")
    nib = np.frombuffer(coded[4:132], dtype=np.uint8)
    lengths = np.empty(256, dtype=np.int64)
    lengths[0::2], lengths[1::2] = nib & 15, nib >> 4
    used = np.flatnonzero(lengths)
    if count == 0:
        if len(coded) != 132:
            raise ValueError("the huffman stream has bytes after its end")
        return b""
    kraft = sum(2.0 ** -int(lengths[s]) for s in used)
    if not used.size or (kraft != 1.0 and not (len(used) == 1 and lengths[used[0]] == 1)):
        raise ValueError("the huffman code table is not a complete prefix code")
    codes = _canonical_codes(lengths)
    width = HUFFMAN_MAX_BITS
    table_sym = np.zeros(1 << width, dtype=np.int64)
    table_len = np.zeros(1 << width, dtype=np.int64)
    for s in used:
        ln = int(lengths[s])
        lo = int(codes[s]) << (width - ln)
        table_sym[lo:lo + (1 << (width - ln))], table_len[lo:lo + (1 << (width - ln))] = s, ln
    bits = np.unpackbits(np.frombuffer(coded[132:], dtype=np.uint8))
    if len(bits) < count * int(lengths[used].min()):
        raise ValueError("the huffman stream is truncated")
    padded = np.concatenate((bits, np.zeros(width, dtype=np.uint8))).astype(np.int64)
    windows = np.zeros(len(bits), dtype=np.int64)
    for j in range(width):                                       # the `width` bits from every position
        windows |= padded[j:j + len(bits)] << (width - 1 - j)
    sym_of, len_of, win = table_sym.tolist(), table_len.tolist(), windows.tolist()
    out = bytearray(count)
    pos, end = 0, len(bits)
    for i in range(count):
        if pos >= end:
            raise ValueError("the huffman stream is truncated")
        w = win[pos]
        out[i] = sym_of[w]
        pos += len_of[w]
    if pos > end:
        raise ValueError("the huffman stream is truncated")
    if end - pos >= 8:
        raise ValueError(f"the huffman stream has {(end - pos) // 8} bytes after its end")
    return bytes(out)
