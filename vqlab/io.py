"""Save and load compressed models: `save(model, path)` and `load(path, model=None)`.

File layout (all integers little-endian):

    offset 0   magic  b"\\x89VQLAB\\r\\n"                      8 bytes
               version u16, reserved u16, meta_len u32, payload_len u64   16 bytes
    24         meta: LZMA2 (raw) of UTF-8 JSON                            meta_len bytes
               payload: the tensor sections, then the skeleton             payload_len bytes
    end - 32   sha256 of everything before it                             32 bytes

JSON meta: {"format": "vqlab", "version": 1, "torch": version, "skeleton": [offset, length],
"tensors": [[name, kind, offset, length, bits], ...]} with offsets into the payload; kind is
"param" or "buffer"; bits > 0 marks a VQ `indices` buffer packed at ceil(log2 K) bits per index
(`vqlab.size.pack_indices`), bits = 0 raw little-endian bytes at the tensor's dtype.  Every
parameter and buffer is stored once (shared codebooks and tied weights too), including BatchNorm
statistics and non-persistent buffers; a VQ layer's training-only `latent` weights are not
(`load` rebuilds them from the codebook when reassign_every > 0).

Skeleton: the module tree pickled with every tensor replaced by a storage-less "meta" tensor
(shape, dtype and requires_grad only), then LZMA2-compressed; about 1 KB for LeNet-5 or ResNet-20.
So the file is compressed_size(model).compressed_bytes plus ~1-3 KB.  `load(path)` unpickles the
skeleton, which runs code from the file like `torch.load(weights_only=False)`: load only files you
trust, or pass `model=` (an already quantized model of the same architecture) to fill it in place
without unpickling anything.
"""
from __future__ import annotations

import copy
import hashlib
import json
import lzma
import os
import pickle
import struct

import torch
import torch.nn as nn

from ._utils import bits_for
from .layers import VQLayer
from .size import LZMA_FILTERS, pack_indices, unpack_indices

__all__ = ["save", "load", "VQFileError", "FORMAT_VERSION"]

MAGIC = b"\x89VQLAB\r\n"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sHHIQ")  # magic, version, reserved, meta_len, payload_len
_DIGEST = 32


class VQFileError(ValueError):
    """A vqlab file is truncated, corrupted, of another format or version, or does not fit the model."""


# ---------------------------------------------------------------- helpers

def _compress(b: bytes) -> bytes:
    return lzma.compress(b, format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)


def _decompress(b: bytes) -> bytes:
    return lzma.decompress(b, format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)


def _stored_tensors(model: nn.Module) -> list[tuple[str, str, torch.Tensor, int]]:
    """(name, kind, tensor, bits) for every unique tensor to store; bits > 0 for VQ indices."""
    packed = {id(m.indices): bits_for(m.k) for m in model.modules() if isinstance(m, VQLayer)}
    skip = {id(m.latent) for m in model.modules() if isinstance(m, VQLayer) and m.latent is not None}
    out, seen = [], set()
    for kind, items in (("param", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if id(t) in seen or id(t) in skip:
                continue
            seen.add(id(t))
            out.append((name, kind, t, packed.get(id(t), 0)))
    return out


def _raw_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _from_raw(b: bytes, like: torch.Tensor) -> torch.Tensor:
    if not b:
        return torch.empty(like.shape, dtype=like.dtype)
    return torch.frombuffer(bytearray(b), dtype=torch.uint8).view(like.dtype).reshape(like.shape)


def _skeleton(model: nn.Module) -> bytes:
    """Pickle the module tree with every parameter/buffer swapped for a meta tensor (no data copied)."""
    memo = {}
    for m in model.modules():
        for t in m._parameters.values():
            if t is not None:
                memo[id(t)] = nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=t.requires_grad)
        for t in m._buffers.values():
            if t is not None:
                memo[id(t)] = torch.empty_like(t, device="meta")
    skel = copy.deepcopy(model, memo)
    for m in skel.modules():
        if isinstance(m, VQLayer):
            m._parameters["latent"] = None   # training-only, rebuilt on load
    return _compress(pickle.dumps(skel, protocol=5))


def _slots(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, str]]]:
    """id(tensor) -> every (module, attribute, kind) that holds it (shared tensors have several)."""
    slots: dict[int, list] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        for k, t in m._parameters.items():
            if t is not None:
                slots.setdefault(id(t), []).append((m, k, "param"))
        for k, t in m._buffers.items():
            if t is not None:
                slots.setdefault(id(t), []).append((m, k, "buffer"))
    return slots


# ---------------------------------------------------------------- save

def save(model: nn.Module, path: str | os.PathLike) -> int:
    """Write `model` (VQ or float) to `path` in the vqlab format; return the file size in bytes.

    The size is compressed_size(model).compressed_bytes plus the header, JSON metadata and skeleton
    (a few KB at most).  Example: `vqlab.save(model, "lenet.vq"); model2 = vqlab.load("lenet.vq")`.
    """
    sections, entries, offset = [], [], 0
    for name, kind, t, bits in _stored_tensors(model):
        b = pack_indices(t, bits) if bits else _raw_bytes(t)
        entries.append([name, kind, offset, len(b), bits])
        sections.append(b)
        offset += len(b)
    skel = _skeleton(model)
    sections.append(skel)
    meta = {"format": "vqlab", "version": FORMAT_VERSION, "torch": torch.__version__,
            "skeleton": [offset, len(skel)], "tensors": entries}
    meta_b = _compress(json.dumps(meta, separators=(",", ":")).encode())
    payload = b"".join(sections)
    body = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(meta_b), len(payload)) + meta_b + payload
    data = body + hashlib.sha256(body).digest()
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


# ---------------------------------------------------------------- load

def _read_checked(path: str | os.PathLike) -> tuple[dict, bytes]:
    with open(path, "rb") as f:
        data = f.read()
    where = f"vqlab file {os.fspath(path)!r}"
    if len(data) < _HEADER.size or data[:8] != MAGIC:
        if MAGIC.startswith(data[:8]) and len(data) < _HEADER.size:
            raise VQFileError(f"{where} is truncated: {len(data)} bytes, shorter than the {_HEADER.size}-byte header")
        raise VQFileError(f"{os.fspath(path)!r} is not a vqlab file (bad magic {data[:8]!r}, expected {MAGIC!r})")
    _, version, _, meta_len, payload_len = _HEADER.unpack_from(data)
    if version != FORMAT_VERSION:
        raise VQFileError(f"{where} has format version {version}; this vqlab reads version {FORMAT_VERSION}")
    expected = _HEADER.size + meta_len + payload_len + _DIGEST
    if len(data) < expected:
        raise VQFileError(f"{where} is truncated: {len(data)} bytes, the header announces {expected}")
    if len(data) > expected:
        raise VQFileError(f"{where} has {len(data) - expected} unexpected trailing bytes (expected {expected} bytes)")
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise VQFileError(f"{where} is corrupted: sha256 checksum mismatch")
    try:
        meta = json.loads(_decompress(body[_HEADER.size:_HEADER.size + meta_len]))
    except (lzma.LZMAError, ValueError) as e:
        raise VQFileError(f"{where}: unreadable metadata ({e})") from None
    return meta, body[_HEADER.size + meta_len:]


def load(path: str | os.PathLike, model: nn.Module | None = None, map_location: str | torch.device = "cpu") -> nn.Module:
    """Read a model written by `save`.

    model: None rebuilds the architecture from the file's pickled skeleton (trusted files only);
        or an already quantized model of the same architecture (same names, shapes and K), filled
        in place without unpickling.
    map_location: device for the loaded tensors.
    Raises VQFileError for a truncated, corrupted or foreign file, or a model that does not fit.
    """
    meta, payload = _read_checked(path)
    where = f"vqlab file {os.fspath(path)!r}"
    if model is None:
        off, n = meta["skeleton"]
        try:
            model = pickle.loads(_decompress(payload[off:off + n]))
        except (AttributeError, ImportError) as e:
            raise VQFileError(f"{where}: cannot rebuild the architecture ({e}); import the module that "
                              f"defines the model's classes, or pass model=") from None
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    slots = _slots(model)
    filled = set()
    for name, kind, off, n, bits in meta["tensors"]:
        if name not in named:
            raise VQFileError(f"{where}: the model has no {kind} {name!r}")
        like = named[name]
        b = payload[off:off + n]
        if bits:
            try:
                t = unpack_indices(b, bits, like.numel()).to(like.dtype).reshape(like.shape)
            except ValueError as e:
                raise VQFileError(f"{where}: indices {name!r} do not fit the model's {tuple(like.shape)}: {e}") from None
        elif n != like.numel() * like.element_size():
            raise VQFileError(f"{where}: {kind} {name!r} has {n} bytes, the model's {tuple(like.shape)} "
                              f"{like.dtype} needs {like.numel() * like.element_size()}")
        else:
            t = _from_raw(b, like)
        t = t.to(map_location)
        if kind == "param":
            t = nn.Parameter(t, requires_grad=like.requires_grad)
        for mod, attr, k in slots[id(like)]:  # one object for every holder: sharing survives the round trip
            (mod._parameters if k == "param" else mod._buffers)[attr] = t
        filled.add(id(like))
    latent = {id(m.latent) for m in model.modules() if isinstance(m, VQLayer) and m.latent is not None}
    missing = [n for n, t in named.items() if id(t) not in filled and id(t) not in latent]
    if missing:
        raise VQFileError(f"{where} has no data for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for m in model.modules():
        if isinstance(m, VQLayer) and m.reassign_every:
            m.init_latent()
    return model
