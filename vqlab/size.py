"""Model size, counting every bit: `compressed_size(model or [models], store_dtype=None) -> SizeReport`.

What is counted (bytes):
    quantized    every quantized layer's weight as its code object reports it (`WeightCode.size`): packed
                 index streams, codebooks (a shared codebook once, at the first layer that reaches it, also
                 across the models of one call) and side tensors — exactly what `vqlab.save` writes
    other        every other parameter and buffer at its dtype: biases, float layers, BatchNorm
                 weight/bias/running_mean/running_var and num_batches_tracked (int64, 8 bytes)
    not counted  training-only state a code names in `training_only` (a VQ code's `latent`; not saved either)
    store_dtype  float16 / bfloat16 (or float32): every floating-point tensor stored raw — biases, float layers,
                 BatchNorm tensors, codebooks, codes' float side tensors — that is wider than it (float32,
                 float64) is counted at its itemsize, as `vqlab.save(..., store_dtype=...)` writes it; packed
                 index streams and integer buffers are unchanged.  `round_to_store_dtype_(model, dtype)` rounds
                 the model's values to what such a file holds, so that evaluating it gives what loading gives.
dense_bytes is the float32 model the quantized one came from: quantized layers' dense weights at 4 bytes per
weight, every other float parameter/buffer at 4 bytes per element, integer buffers at their dtype.

Entropy-coded figures, as the papers report them (Han et al. 2016, "Deep Compression"):
    huffman_bytes  compressed_bytes with each layer's index stream replaced by its entropy-coded figure
                   (VQ: Huffman from that layer's index histogram, sum count * code length bits, rounded up
                   to bytes, plus one code-length byte per codeword — canonical Huffman needs nothing else)
    ans_bytes      compressed_bytes with each code's bit-packed streams ANS-coded from their own histograms
                   (`vqlab.bits.ans_encode`: a static categorical model per stream, its counts as a varint
                   header; never more than packed + 1 byte per stream) — exactly the index bytes
                   `vqlab.save(..., index_coding="ans")` writes.  Codes without packed streams report their own
                   figure (the lattice code: its symbols ANS-coded, for comparison) or their index_bytes
    lzma_bytes     compressed_bytes with the concatenated packed index streams of all layers replaced
                   by their LZMA2 (raw, preset 9e) compression
"""
from __future__ import annotations

import lzma
from dataclasses import dataclass, field
from typing import Sequence

import pandas as pd
import torch
import torch.nn as nn

from .bits import (LZMA_FILTERS, ans_bytes, huffman_bytes, huffman_code_lengths, pack_indices, packed_bytes,
                   unpack_indices)
from .codebook import Codebook
from .codes import WeightCode, stored_bytes, stored_dtype, storing_as, tensor_bytes
from .dtypes import check_store_dtype

__all__ = ["SizeReport", "compressed_size", "round_to_store_dtype_", "training_only_ids", "model_store_dtype", "pack_indices", "unpack_indices",
           "huffman_code_lengths", "huffman_bytes", "ans_bytes", "packed_bytes", "LZMA_FILTERS"]


# ---------------------------------------------------------------- the report

@dataclass
class SizeReport:
    """Sizes in bytes of a (VQ) model; see the module docstring for what is counted.

    layers: one row per module holding tensors: (model, when several were counted), layer, type, method,
        K, d, index_bits, dense_bytes, index_bytes, codebook_bytes, other_bytes, compressed_bytes,
        huffman_index_bytes, ans_index_bytes, ratio.  The rows sum to the totals.
    per_model: one row per model counted: model, dense_bytes, index_bytes, codebook_bytes (shared codebooks
        at the first model that reaches them), other_bytes, compressed_bytes, ratio.
    """

    dense_bytes: int
    compressed_bytes: int
    index_bytes: int
    codebook_bytes: int
    other_bytes: int
    huffman_bytes: int
    lzma_bytes: int
    layers: pd.DataFrame = field(repr=False)
    per_model: pd.DataFrame = field(repr=False, default=None)
    ans_bytes: int | None = None
    store_dtype: torch.dtype | None = None

    @property
    def ratio(self) -> float:
        """dense float32 bytes / compressed bytes."""
        return self.dense_bytes / self.compressed_bytes

    @property
    def huffman_ratio(self) -> float:
        return self.dense_bytes / self.huffman_bytes

    @property
    def ans_ratio(self) -> float:
        return self.dense_bytes / self.ans_bytes

    @property
    def lzma_ratio(self) -> float:
        return self.dense_bytes / self.lzma_bytes

    def summary(self) -> pd.DataFrame:
        """One row per coding (packed, huffman, ans, lzma): bytes and ratio to the float32 model."""
        return pd.DataFrame({"coding": ["float32", "packed", "huffman", "ans", "lzma"],
                             "bytes": [self.dense_bytes, self.compressed_bytes, self.huffman_bytes, self.ans_bytes,
                                       self.lzma_bytes],
                             "ratio": [1.0, self.ratio, self.huffman_ratio, self.ans_ratio, self.lzma_ratio]})


def model_store_dtype(model) -> str | None:
    """The storage dtype a model carries (`round_to_store_dtype_` sets it, e.g. on what `vqlab.compress` returns):
    what `compressed_size(model)` and `save(model, path)` use when no store_dtype is given; None for most models.
    A list of models carries the first model's."""
    first = model[0] if isinstance(model, (list, tuple)) and model else model
    return getattr(first, "vqlab_store_dtype", None) if isinstance(first, nn.Module) else None


def training_only_ids(model: nn.Module) -> set[int]:
    """ids of the tensors codes name in `training_only` (a VQ code's latent): neither counted, saved nor loaded."""
    return {id(t) for m in model.modules() if isinstance(m, WeightCode) for n in m.training_only
            if isinstance(t := getattr(m, n, None), torch.Tensor)}


def _dense32_bytes(t: torch.Tensor) -> int:
    return t.numel() * 4 if t.is_floating_point() else tensor_bytes(t)


def _code_of(mod: nn.Module) -> WeightCode | None:
    code = getattr(mod, "_modules", {}).get("code")
    return code if isinstance(code, WeightCode) else None


def _model_rows(model: nn.Module, seen: set[int], streams: list[bytes]) -> list[dict]:
    """One row per module holding tensors not counted yet; `seen` and `streams` are updated."""
    rows, skip = [], training_only_ids(model)
    for name, mod in model.named_modules():
        row = {"layer": name or "(root)", "type": type(mod).__name__, "method": pd.NA, "K": pd.NA, "d": pd.NA,
               "index_bits": pd.NA, "dense_bytes": 0, "index_bytes": 0, "codebook_bytes": 0,
               "other_bytes": 0, "huffman_index_bytes": 0, "ans_index_bytes": 0}
        code = _code_of(mod)
        if code is not None:
            c = code.size(seen)
            seen.update(id(t) for t in list(code.parameters()) + list(code.buffers()))
            row.update(method=code.describe()["method"], K=c.k if c.k is not None else pd.NA,
                       d=c.d if c.d is not None else pd.NA, index_bits=c.index_bits if c.index_bits is not None else pd.NA,
                       index_bytes=c.index_bytes, codebook_bytes=c.codebook_bytes, other_bytes=c.other_bytes,
                       huffman_index_bytes=c.entropy_index_bytes, ans_index_bytes=c.ans_index_bytes,
                       dense_bytes=4 * mod.weight_numel)
            streams.extend(c.streams)
        for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
            if id(t) in seen or id(t) in skip:
                continue
            seen.add(id(t))
            row["other_bytes"] += stored_bytes(t)
            row["dense_bytes"] += _dense32_bytes(t)
        if row["dense_bytes"] or row["index_bytes"] or row["codebook_bytes"] or row["other_bytes"]:
            rows.append(row)
    return rows


_COLUMNS = ["model", "layer", "type", "method", "K", "d", "index_bits", "dense_bytes", "index_bytes",
            "codebook_bytes", "other_bytes", "compressed_bytes", "huffman_index_bytes", "ans_index_bytes", "ratio"]


@torch.no_grad()
def compressed_size(model: nn.Module | Sequence[nn.Module], codebook_in_rom: bool = False,
                    store_dtype: torch.dtype | str | None = None) -> SizeReport:
    """Count the bytes of a model, or of several models stored together, as `vqlab.save` writes them
    (packed indices; `ans_bytes`: ANS-coded indices, index_coding="ans") and as float32 models.

    model: one nn.Module, or a list of them: then every shared object (a codebook used by several models)
        is counted once, at the first model that reaches it, and `per_model` has one row per model.
    codebook_in_rom: leave out every frozen `vqlab.Codebook` (a universal codebook held in ROM, as VQ4ALL
        reports it): its bytes are counted nowhere.
    store_dtype: None (the dtype the model carries, `model_store_dtype`, else every tensor at its dtype),
        torch.float16 / torch.bfloat16 / torch.float32 or the name: floating-point tensors wider than it are counted
        at its itemsize, as `save(..., store_dtype=...)` writes them (codebooks, biases, float layers, BatchNorm,
        side tensors; indices unchanged).  ValueError for another value.
    Example: `r = compressed_size(model); r.ratio, r.layers`;  `compressed_size([m1, m2, m3]).per_model`;
        `compressed_size(model, store_dtype="float16").summary()`.
    raises ValueError, naming the model's type, when it holds no parameters or buffers at all (an
    activation, an empty Sequential): there is nothing to count and no ratio to report.
    """
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    if not models or not all(isinstance(m, nn.Module) for m in models):
        raise TypeError(f"compressed_size takes an nn.Module or a non-empty list of them, got {model!r:.80}")
    store = check_store_dtype(store_dtype if store_dtype is not None else model_store_dtype(models))
    rows, seen, streams = [], set(), []
    if codebook_in_rom:
        seen.update(id(b.weight) for m in models for b in m.modules() if isinstance(b, Codebook) and b.frozen)
    with storing_as(store):
        for i, m in enumerate(models):
            rows += [{"model": i, **r} for r in _model_rows(m, seen, streams)]
    df = pd.DataFrame(rows, columns=[c for c in _COLUMNS if c not in ("compressed_bytes", "ratio")])
    df["compressed_bytes"] = df["index_bytes"] + df["codebook_bytes"] + df["other_bytes"]
    df["ratio"] = df["dense_bytes"] / df["compressed_bytes"].where(df["compressed_bytes"] > 0)
    df = df[_COLUMNS].astype({"K": "Int64", "d": "Int64", "index_bits": "Int64"})
    index, book, other = (int(df[c].sum()) for c in ("index_bytes", "codebook_bytes", "other_bytes"))
    compressed = index + book + other
    if compressed == 0:
        what = type(models[0]).__name__ if len(models) == 1 else f"{len(models)} models"
        raise ValueError(f"compressed_size: the {what} model has no parameters or buffers "
                         f"(0 bytes), so it has no size to count and no compression ratio; pass the model "
                         f"that holds the layers")
    huff = compressed - index + int(df["huffman_index_bytes"].sum())
    ans = compressed - index + int(df["ans_index_bytes"].sum())
    lz = compressed - index + len(lzma.compress(b"".join(streams), format=lzma.FORMAT_RAW,
                                                filters=LZMA_FILTERS)) if streams else compressed
    per = df.groupby("model", sort=True)[["dense_bytes", "index_bytes", "codebook_bytes", "other_bytes",
                                          "compressed_bytes"]].sum().reindex(range(len(models)), fill_value=0)
    per["ratio"] = per["dense_bytes"] / per["compressed_bytes"].where(per["compressed_bytes"] > 0)
    per = per.reset_index()
    layers = df if len(models) > 1 else df.drop(columns="model")
    return SizeReport(dense_bytes=int(df["dense_bytes"].sum()), compressed_bytes=compressed, index_bytes=index,
                      codebook_bytes=book, other_bytes=other, huffman_bytes=huff, lzma_bytes=lz, layers=layers,
                      per_model=per, ans_bytes=ans, store_dtype=store)


# ---------------------------------------------------------------- rounding to the storage dtype

def _stored_floats(model: nn.Module, store: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every unique parameter/buffer that `save(..., store_dtype=store)` writes at `store`:
    floats wider than it, training-only tensors (`training_only`, a VQ code's latent) left out."""
    skip = training_only_ids(model)
    out, seen = [], set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in seen or id(t) in skip:
            continue
        seen.add(id(t))
        if stored_dtype(t, store) != t.dtype:
            out.append((name, t))
    return out


def check_store_range(name: str, t: torch.Tensor, store: torch.dtype) -> torch.Tensor:
    """`t` rounded to `store` (round to nearest even, torch's cast); ValueError naming the tensor when a finite
    value does not fit (beyond float16's +-65504): the stored file would hold inf."""
    r = t.detach().to(store)
    bad = torch.isfinite(t.detach()) & ~torch.isfinite(r)
    if bool(bad.any()):
        big = float(t.detach()[bad].abs().max())
        raise ValueError(f"{name!r} holds {big:.6g}, beyond the range of {str(store).removeprefix('torch.')} "
                         f"(largest finite {torch.finfo(store).max:.6g}); store it as bfloat16 or at its own dtype "
                         f"(store_dtype=None)")
    return r


@torch.no_grad()
def round_to_store_dtype_(model: nn.Module, store_dtype: torch.dtype | str) -> nn.Module:
    """Round, in place, every tensor that `save(model, path, store_dtype=...)` would store at `store_dtype` to the
    nearest value of that dtype, keeping each tensor's own dtype (float32 values that are exactly float16 ones):
    evaluating the model then gives exactly what the saved and re-loaded model gives.  Training-only tensors
    (a VQ code's `latent`) are left as they are.  The model then carries the dtype (`vqlab_store_dtype`), so
    `compressed_size(model)` and `save(model, path)` count and write it that way unless told otherwise.
    returns `model`.

    store_dtype: torch.float16 / torch.bfloat16 / torch.float32 or the name (None: nothing to round).
    raises ValueError for another store_dtype, or naming a tensor with a finite value beyond the dtype's range.
    Example: `round_to_store_dtype_(model, "float16"); save(model, "m.vqz", store_dtype="float16")`.
    """
    store = check_store_dtype(store_dtype)
    if store is None:
        return model
    rounded = [(t, check_store_range(name, t, store)) for name, t in _stored_floats(model, store)]
    for t, r in rounded:                      # all checked first: an error leaves the model unchanged
        t.copy_(r.to(t.dtype))
    model.vqlab_store_dtype = str(store).removeprefix("torch.")     # what save / compressed_size now default to
    return model
