"""Model size, counting every bit: `compressed_size(model) -> SizeReport`.

What is counted (bytes):
    indices      each VQ layer's index tensor packed at ceil(log2 K) bits per index, rounded up to
                 whole bytes per layer (exactly what `vqlab.save` writes)
    codebooks    every unique Codebook at its stored dtype, once however many layers share it
    other        every other parameter and buffer at its dtype: biases, float layers, BatchNorm
                 weight/bias/running_mean/running_var and num_batches_tracked (int64, 8 bytes)
    not counted  a VQ layer's training-only `latent` weights (not saved either)
dense_bytes is the float32 model the VQ model came from: VQ layers' dense weights at 4 bytes per
weight, every other float parameter/buffer at 4 bytes per element, integer buffers at their dtype.

Entropy-coded figures, as the papers report them (Han et al. 2016, "Deep Compression"):
    huffman_bytes  compressed_bytes with each layer's index stream Huffman-coded from that layer's
                   index histogram (sum count * code length bits, rounded up to bytes) plus its code
                   table at one byte (a code length) per codeword — canonical Huffman needs nothing else
    lzma_bytes     compressed_bytes with the concatenated packed index streams of all layers replaced
                   by their LZMA2 (raw, preset 9e) compression
"""
from __future__ import annotations

import heapq
import lzma
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from ._utils import bits_for
from .codebook import Codebook
from .layers import VQLayer

__all__ = ["SizeReport", "compressed_size", "pack_indices", "unpack_indices", "huffman_code_lengths",
           "packed_bytes", "LZMA_FILTERS"]

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


def _huffman_bytes(indices: torch.Tensor, k: int) -> int:
    counts = np.bincount(indices.reshape(-1).long().cpu().numpy(), minlength=k)
    bits = int((counts * huffman_code_lengths(counts)).sum())
    return -(-bits // 8) + k  # coded stream + one code-length byte per codeword


# ---------------------------------------------------------------- the report

@dataclass
class SizeReport:
    """Sizes in bytes of a (VQ) model; see the module docstring for what is counted.

    layers: one row per module holding tensors: layer, type, K, d, index_bits, dense_bytes,
        index_bytes, codebook_bytes, other_bytes, compressed_bytes, huffman_index_bytes, ratio.
        The rows sum to the totals.
    """

    dense_bytes: int
    compressed_bytes: int
    index_bytes: int
    codebook_bytes: int
    other_bytes: int
    huffman_bytes: int
    lzma_bytes: int
    layers: pd.DataFrame = field(repr=False)

    @property
    def ratio(self) -> float:
        """dense float32 bytes / compressed bytes."""
        return self.dense_bytes / self.compressed_bytes

    @property
    def huffman_ratio(self) -> float:
        return self.dense_bytes / self.huffman_bytes

    @property
    def lzma_ratio(self) -> float:
        return self.dense_bytes / self.lzma_bytes

    def summary(self) -> pd.DataFrame:
        """One row per coding (packed, huffman, lzma): bytes and ratio to the float32 model."""
        return pd.DataFrame({"coding": ["float32", "packed", "huffman", "lzma"],
                             "bytes": [self.dense_bytes, self.compressed_bytes, self.huffman_bytes, self.lzma_bytes],
                             "ratio": [1.0, self.ratio, self.huffman_ratio, self.lzma_ratio]})


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _dense32_bytes(t: torch.Tensor) -> int:
    return t.numel() * 4 if t.is_floating_point() else _tensor_bytes(t)


@torch.no_grad()
def compressed_size(model: nn.Module) -> SizeReport:
    """Count the bytes of `model` as stored by `vqlab.save` (packed indices) and as a float32 model.

    Example: `r = compressed_size(model); r.ratio, r.layers`.
    raises ValueError, naming the model's type, when it holds no parameters or buffers at all (an
    activation, an empty Sequential): there is nothing to count and no ratio to report.
    """
    rows, seen, streams = [], set(), []
    for name, mod in model.named_modules():
        row = {"layer": name or "(root)", "type": type(mod).__name__, "K": pd.NA, "d": pd.NA,
               "index_bits": pd.NA, "dense_bytes": 0, "index_bytes": 0, "codebook_bytes": 0,
               "other_bytes": 0, "huffman_index_bytes": 0}
        tensors = list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
        if isinstance(mod, VQLayer):
            bits = bits_for(mod.k)
            idx = mod.indices
            row.update(K=mod.k, d=mod.d, index_bits=bits, index_bytes=packed_bytes(idx.numel(), bits),
                       dense_bytes=mod.out_dim * mod.n * 4, huffman_index_bytes=_huffman_bytes(idx, mod.k))
            streams.append(pack_indices(idx, bits))
            seen.add(id(idx))
            book = mod.codebook.weight
            if id(book) not in seen:
                row["codebook_bytes"] = _tensor_bytes(book)
                seen.add(id(book))
            tensors = [(n, t) for n, t in tensors if n not in ("indices", "latent")]
        elif isinstance(mod, Codebook):
            t = mod.weight
            if id(t) not in seen:
                row["codebook_bytes"] = _tensor_bytes(t)
                seen.add(id(t))
            tensors = [(n, t) for n, t in tensors if t is not mod.weight]
        for _, t in tensors:
            if id(t) in seen:
                continue
            seen.add(id(t))
            row["other_bytes"] += _tensor_bytes(t)
            row["dense_bytes"] += _dense32_bytes(t)
        if row["dense_bytes"] or row["index_bytes"] or row["codebook_bytes"] or row["other_bytes"]:
            rows.append(row)
    cols = ["layer", "type", "K", "d", "index_bits", "dense_bytes", "index_bytes", "codebook_bytes",
            "other_bytes", "compressed_bytes", "huffman_index_bytes", "ratio"]
    df = pd.DataFrame(rows, columns=[c for c in cols if c not in ("compressed_bytes", "ratio")])
    df["compressed_bytes"] = df["index_bytes"] + df["codebook_bytes"] + df["other_bytes"]
    df["ratio"] = df["dense_bytes"] / df["compressed_bytes"].where(df["compressed_bytes"] > 0)
    df = df[cols].astype({"K": "Int64", "d": "Int64", "index_bits": "Int64"})
    index, book, other = (int(df[c].sum()) for c in ("index_bytes", "codebook_bytes", "other_bytes"))
    compressed = index + book + other
    if compressed == 0:
        raise ValueError(f"compressed_size: the {type(model).__name__} model has no parameters or buffers "
                         f"(0 bytes), so it has no size to count and no compression ratio; pass the model "
                         f"that holds the layers")
    huff = compressed - index + int(df["huffman_index_bytes"].sum())
    lz = compressed - index + len(lzma.compress(b"".join(streams), format=lzma.FORMAT_RAW,
                                                filters=LZMA_FILTERS)) if streams else compressed
    return SizeReport(dense_bytes=int(df["dense_bytes"].sum()), compressed_bytes=compressed, index_bytes=index,
                      codebook_bytes=book, other_bytes=other, huffman_bytes=huff, lzma_bytes=lz, layers=df)
