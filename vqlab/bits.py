"""Bits and bytes of stored codes: bit packing of index streams, Huffman code lengths and ANS coding of
index streams (defined once; used by the code objects, `vqlab.size` and `vqlab.io`)."""
from __future__ import annotations

import heapq
import lzma
import math

import numpy as np
import torch

__all__ = ["bits_for", "index_bits_per_weight", "effective_bits_per_weight", "pack_indices", "unpack_indices", "packed_bytes", "huffman_code_lengths", "huffman_bytes", "LZMA_FILTERS",
           "ans_encode", "ans_decode", "ans_bytes"]

LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
_CHUNK = 1 << 20  # indices per packing chunk (a multiple of 8, so chunks end on byte boundaries)


# ---------------------------------------------------------------- bits per index

def bits_for(k: int) -> int:
    """Bits one index into a K-entry codebook takes: ceil(log2 K), at least 1."""
    if k < 2:
        raise ValueError(f"codebook size K must be >= 2, got K={k}")
    return max(1, math.ceil(math.log2(k)))


def index_bits_per_weight(k: int, d: int) -> float:
    """Index bits per weight of a K-word codebook over segments of d weights, as stored: ceil(log2 K) / d
    (codebooks not included).  The one definition every report, sweep and widget uses."""
    return bits_for(k) / d


def effective_bits_per_weight(n_weights: int, k: int, d: int, *, codebooks: int = 1, stages: int = 1,
                              entry_bits: int = 32) -> float:
    """Stored bits per weight of a VQ code, codebooks included: (index bits + codebook bits) / N.

    For N weights cut into N/d segments, `stages` indices of ceil(log2 K) bits per segment (residual VQ: one per
    stage) and `codebooks` codebooks of K codewords of d entries of `entry_bits` bits each:

        R_eff = stages * ceil(log2 K) / d  +  codebooks * K * d * entry_bits / N

    The first term is `index_bits_per_weight` (what "bits/weight" means in the tables); the second is the codebook
    amortized over the layer -- small when N >> K*d*entry_bits / (index bits), large when the codebook holds about
    as many floats as the layer has weights (then VQ memorizes the layer instead of compressing it).
    Product quantization with M sub-spaces: pass d = the sub-vector length and codebooks=M (every weight lies in
    one sub-vector, which has one index: stages=1).  Notebook 01 plots weight error against both rates.

    >>> round(effective_bits_per_weight(48000, 256, 4), 3)     # LeNet-5 classifier.1, K=256, d=4
    2.683
    """
    for name, v in (("n_weights", n_weights), ("d", d), ("codebooks", codebooks), ("stages", stages),
                    ("entry_bits", entry_bits)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    return stages * bits_for(k) / d + codebooks * k * d * entry_bits / n_weights


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


# ---------------------------------------------------------------- ANS coding of index streams
#
# A static order-0 model per stream (Duda 2013, "Asymmetric numeral systems"): the stream's own histogram,
# stored exactly as a header of varint counts, is the categorical model of an ANS coder over the symbols
# that occur (the `constriction` package's AnsCoder: 32-bit words, 64-bit state, probabilities quantized to
# 24 bits by its `Categorical(perfect=False)`).  Layout of `ans_encode(x, k)` for n = len(x) symbols:
#
#   n == 0                b""
#   header                varint h; mode = h & 3, size = h >> 2 (varints: LEB128, 7 bits a byte, low first)
#     mode 0, dense       size = M = max symbol + 1 (<= k), then M varint counts (count[M - 1] > 0)
#     mode 1, sparse      size = u = symbols that occur, then u pairs of varints (gap, count): symbol =
#                         previous symbol + 1 + gap (the first: gap), count >= 1
#     mode 2, packed      size = 0, then the n symbols bit-packed at ceil(log2 k) bits (`pack_indices`)
#   body (modes 0, 1)     the AnsCoder's words, uint32 little-endian, coding each symbol's rank among the
#                         symbols that occur; empty when only one symbol occurs (it costs no bits)
#
# The encoder writes the shorter of the dense and sparse headers (dense on a tie), and mode 2 whenever the ANS stream would be
# longer than 1 + the packed stream: so `ans_bytes(x, k) <= packed_bytes(n, ceil(log2 k)) + 1`, always.
# The counts must sum to n and the decoded symbols must reproduce them exactly, which refuses almost every
# damaged stream; what a checksum would catch beyond that is left to the file's sha256 (`vqlab.io`).

_ANS_DENSE, _ANS_SPARSE, _ANS_PACKED = 0, 1, 2
_VARINT_MAX = 9               # bytes: values below 2**63
_ANS_MAX_N = 1 << 48          # symbols one stream may hold


def _stream_bits(k: int) -> int:
    """Bits of one symbol in [0, k) when packed (mode 2): ceil(log2 k), at least 1."""
    return max(1, (k - 1).bit_length())


def _varint_lengths(v: np.ndarray) -> np.ndarray:
    """Bytes of each value's LEB128 varint (uint64 values below 2**63): 1 + one per further 7 bits."""
    nbytes = np.ones(v.shape, dtype=np.int64)
    for j in range(1, _VARINT_MAX):
        nbytes[(v >> np.uint64(7 * j)) > 0] = j + 1
    return nbytes


def _varints(values: np.ndarray) -> bytes:
    """LEB128 varints of non-negative integers below 2**63, back to back."""
    v = np.asarray(values, dtype=np.uint64).reshape(-1)
    if v.size == 0:
        return b""
    groups = np.stack([(v >> np.uint64(7 * j)) & np.uint64(0x7F) for j in range(_VARINT_MAX)], 1).astype(np.uint8)
    nbytes = _varint_lengths(v)
    cols = np.arange(_VARINT_MAX)
    groups[cols < nbytes[:, None] - 1] |= 0x80             # continuation bit on every byte but the last
    return groups[cols < nbytes[:, None]].tobytes()        # row-major: value by value


def _read_varints(data: bytes, start: int, count: int, what: str) -> tuple[np.ndarray, int]:
    """`count` varints from data[start:] -> (uint64 values, offset after them); ValueError when truncated
    or a varint is longer than 9 bytes."""
    if count == 0:
        return np.zeros(0, dtype=np.uint64), start
    b = np.frombuffer(data, dtype=np.uint8)[start:start + _VARINT_MAX * count]
    ends = np.flatnonzero(b < 0x80)[:count]
    if len(ends) < count and len(b) == _VARINT_MAX * count:   # count varints of <= 9 bytes would fit
        raise ValueError(f"the ANS header has a varint longer than {_VARINT_MAX} bytes in {what}")
    if len(ends) < count:
        raise ValueError(f"the ANS header is truncated: {what} needs {count} varints")
    starts = np.concatenate(([0], ends[:-1] + 1))
    lens = ends - starts + 1
    if int(lens.max()) > _VARINT_MAX:
        raise ValueError(f"the ANS header has a varint longer than {_VARINT_MAX} bytes in {what}")
    seg = b[:ends[-1] + 1].astype(np.uint64)
    shift = (np.arange(len(seg)) - np.repeat(starts, lens)).astype(np.uint64) * np.uint64(7)
    return np.add.reduceat((seg & np.uint64(0x7F)) << shift, starts), start + int(ends[-1]) + 1


def _symbols(symbols, k: int) -> np.ndarray:
    """(n,) int64 of an integer array or tensor, any shape; ValueError outside [0, k)."""
    if not (isinstance(k, (int, np.integer)) and not isinstance(k, bool) and 1 <= k <= 1 << 32):
        raise ValueError(f"k (the alphabet size) must be an integer in 1..2**32, got {k!r}")
    if isinstance(symbols, torch.Tensor):
        symbols = symbols.detach().cpu().numpy()
    x = np.asarray(symbols)
    if x.dtype.kind not in "iub":
        raise ValueError(f"ANS coding takes integer symbols, got dtype {x.dtype}")
    x = x.reshape(-1).astype(np.int64)
    if x.size and (int(x.min()) < 0 or int(x.max()) >= k):
        raise ValueError(f"symbols must lie in [0, {k}) to code with k={k}, got range [{x.min()}, {x.max()}]")
    return x


def _ans_model(counts: np.ndarray):
    """constriction's categorical model over the symbols that occur, from their counts (the same floats on both
    sides, so encoder and decoder quantize them identically)."""
    import constriction                                    # a dependency; imported when first used
    return constriction.stream.model.Categorical(counts.astype(np.float64), perfect=False)


def ans_encode(symbols: np.ndarray | torch.Tensor, k: int) -> bytes:
    """ANS-code integer symbols in [0, k) (any shape, row-major) with a static model from their own
    histogram (layout above).  returns at most packed_bytes(n, ceil(log2 k)) + 1 bytes; b"" for n = 0.

    Example: `data = ans_encode(layer.indices, 16); ans_decode(data, layer.indices.numel(), 16)`.
    """
    x = _symbols(symbols, k)
    n = x.size
    if n == 0:
        return b""
    m = int(x.max()) + 1                                   # the dense header's M
    if m <= max(1 << 16, 4 * n):                           # a histogram over [0, M) is cheap
        counts = np.bincount(x, minlength=m)
        used = np.flatnonzero(counts)
        count, rank = counts[used], np.cumsum(counts > 0) - 1
        rank = rank[x]
    else:                                                  # a few symbols spread over a large alphabet
        used, count = np.unique(x, return_counts=True)
        rank = np.searchsorted(used, x)
    gaps = np.diff(used, prepend=-1) - 1
    sparse = _varints(np.concatenate(([len(used) << 2 | _ANS_SPARSE], np.stack([gaps, count], 1).reshape(-1))))
    # the dense header's length without building it: M zero-or-not counts, each at least one byte
    dense_len = int(_varint_lengths(np.array([m << 2], np.uint64))[0] + (m - len(used))
                    + _varint_lengths(count.astype(np.uint64)).sum())
    if dense_len <= len(sparse):
        dense = np.zeros(m, dtype=np.int64)
        dense[used] = count
        header = _varints(np.concatenate(([m << 2 | _ANS_DENSE], dense)))
    else:
        header = sparse
    body = b""
    if len(used) > 1:
        import constriction
        coder = constriction.stream.stack.AnsCoder()
        coder.encode_reverse(rank.astype(np.int32), _ans_model(count))
        body = coder.get_compressed().astype("<u4").tobytes()
    bits = _stream_bits(k)
    if len(header) + len(body) > 1 + packed_bytes(n, bits):
        return bytes([_ANS_PACKED]) + pack_indices(torch.from_numpy(x), bits)
    return header + body


def ans_bytes(indices: np.ndarray | torch.Tensor, k: int) -> int:
    """Exact length in bytes of `ans_encode(indices, k)` (header included)."""
    return len(ans_encode(indices, k))


def ans_decode(data: bytes, n: int, k: int) -> np.ndarray:
    """Inverse of `ans_encode`: (n,) int64 symbols in [0, k).

    raises ValueError for a stream that is truncated or too long, a bad header (unknown mode, a symbol >= k,
    counts that do not sum to n, a zero count), words that do not decode to exactly the header's counts, or
    packed symbols >= k.  Allocates n values: a caller reading untrusted data bounds n first.
    """
    if not (isinstance(n, (int, np.integer)) and not isinstance(n, bool) and 0 <= n <= _ANS_MAX_N):
        raise ValueError(f"n (the number of symbols) must be an integer in 0..2**48, got {n!r}")
    _symbols(np.zeros(0, np.int64), k)                      # checks k
    data = bytes(data)
    n = int(n)
    if n == 0:
        if data:
            raise ValueError(f"an ANS stream of 0 symbols is empty, got {len(data)} bytes")
        return np.zeros(0, dtype=np.int64)
    if not data:
        raise ValueError(f"the ANS stream is empty, but {n} symbols were expected")
    (h,), pos = _read_varints(data, 0, 1, "the mode")
    mode, size = int(h) & 3, int(h) >> 2
    if mode == _ANS_PACKED:
        bits = _stream_bits(k)
        need = packed_bytes(n, bits)
        if size != 0 or len(data) - pos != need:
            raise ValueError(f"a packed ANS stream of {n} symbols at {bits} bits has 1 + {need} bytes, got "
                             f"{len(data)} (mode word {int(h)})")
        x = unpack_indices(data[pos:], bits, n).numpy()
        if int(x.max()) >= k:
            raise ValueError(f"the packed ANS stream holds symbol {int(x.max())} >= k={k}")
        return x
    if mode == _ANS_DENSE:
        if not 1 <= size <= k:
            raise ValueError(f"the ANS header has {size} counts (symbols 0..{size - 1}); k={k} allows 1..{k}")
        counts, pos = _read_varints(data, pos, size, "the counts")
        if counts[-1] == 0:
            raise ValueError("the ANS header's last count is 0 (the encoder ends at the largest symbol)")
        used = np.flatnonzero(counts)
        counts = counts[used]
    elif mode == _ANS_SPARSE:
        if not 1 <= size <= min(k, n):
            raise ValueError(f"the ANS header lists {size} symbols; {n} symbols below k={k} allow 1..{min(k, n)}")
        pairs, pos = _read_varints(data, pos, 2 * size, "the symbols and counts")
        gaps, counts = pairs[0::2], pairs[1::2]
        if float(gaps.astype(np.float64).sum()) + size > k:
            raise ValueError(f"the ANS header lists a symbol >= k={k}")
        used = np.cumsum(gaps.astype(np.int64) + 1) - 1
        if int(counts.min()) == 0:
            raise ValueError("the ANS header lists a symbol with count 0")
    else:
        raise ValueError(f"the ANS stream has an unknown mode {mode} (mode word {int(h)})")
    if int(counts.max()) > n or int(counts.sum(dtype=np.uint64)) != n or float(counts.astype(np.float64).sum()) > 2 * n:
        raise ValueError(f"the ANS header's counts sum to {int(counts.astype(np.float64).sum())}, not to the "
                         f"{n} symbols of the stream")
    body = data[pos:]
    if len(used) == 1:
        if body:
            raise ValueError(f"an ANS stream of one repeated symbol has no body, got {len(body)} bytes more")
        return np.full(n, int(used[0]), dtype=np.int64)
    if not body or len(body) % 4:
        raise ValueError(f"the ANS body must be a non-empty whole number of 4-byte words, got {len(body)} bytes "
                         f"(truncated or damaged)")
    import constriction
    try:
        coder = constriction.stream.stack.AnsCoder(np.frombuffer(body, dtype="<u4").astype(np.uint32))
        ranks = coder.decode(_ans_model(counts), n)
    except (ValueError, RuntimeError, OverflowError) as e:
        raise ValueError(f"the ANS body does not decode ({e})") from None
    if not coder.is_empty():
        raise ValueError("the ANS body has words left over after the last symbol (damaged or too long)")
    ranks = np.asarray(ranks, dtype=np.int64)
    if not np.array_equal(np.bincount(ranks, minlength=len(used)), counts.astype(np.int64)):
        raise ValueError("the ANS body decodes to other counts than its header's (truncated or damaged)")
    return used[ranks]
