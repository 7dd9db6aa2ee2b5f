"""Save and load compressed models: `save(model, path, store_dtype=None, index_coding="packed")` and
`load(path, model=None)`.

Loading never runs code from the file: there is no pickle.  The architecture is stored as JSON data and rebuilt
only from registry names and an allow-list of module types (`vqlab.architecture`); every field is checked
before it is used, and `load` knows every built-in method without being told.

File layout, format version 5 (all integers little-endian; versions 2-4, written before, are read too):

    offset 0   magic  b"\\x89VQLAB\\r\\n"                      8 bytes
               version u16, reserved u16, meta_len u32, payload_len u64   16 bytes
    24         meta: UTF-8 JSON, raw DEFLATE against a preset dictionary  meta_len bytes
               (`vqlab.filemeta`; versions 2-4: raw LZMA2, 1 MiB dictionary)
               payload: the tensor sections, back to back                 payload_len bytes
    end - 32   sha256 of everything before it (a checksum against damage, not a signature)

`load` reads the 24-byte header first and checks it against the file's size before reading anything else, reads
regular files only, inflates the metadata to at most 16 MiB (`META_CAP`) and hashes the payload in place (a
memory map), so neither a huge file nor a device (/dev/zero) nor a decompression bomb can exhaust memory.  Codes
that decode compressed streams (lattice) may together decode at most `DECODE_CAP` + `DECODE_PER_BYTE` values per
payload byte, checked before any is decoded, and each stream at most what its layer's size needs.

JSON meta, as version 4 wrote it (version 5 writes the compact form of `vqlab.filemeta`, which leaves out what a
reader derives: offsets, names, default dtypes and flags; `load` expands it to this and checks it the same way):
{"format": "vqlab", "version": 4, "torch": version, "tensors": [...], "modules": [...],
"models": count (only for a list of models)}.

"tensors": one entry per unique parameter/buffer (shared codebooks and tied weights are stored once),
    [name, kind, offset, length, bits, dtype, shape, requires_grad] and, where the bytes are not what bits/dtype
    say, a ninth field `stored`: kind "param" or "buffer"; offset/length: bytes into the payload; bits in 1..32
    marks a buffer a code packs (`WeightCode.packing`, e.g. VQ indices at ceil(log2 K) bits, `vqlab.bits`), bits
    = 0 raw bytes at `dtype` ("float32", "uint8", ...); dtype: the tensor's dtype in the model; shape: list of
    sizes.  `stored`:
        "ans"      (bits > 0; save(..., index_coding="ans")) the values ANS-coded, `vqlab.bits.ans_encode`
                   with k = 2**bits: a varint histogram header and constriction's AnsCoder words; the length
                   is the stream's; at most `ANS_CAP` + `ANS_PER_BYTE` * payload_len values per file
        "float16", "bfloat16", "float32"
                   (bits = 0; save(..., store_dtype=...)) a float tensor stored at that narrower float
                   dtype, numel * its itemsize bytes, cast back to `dtype` on load
    BatchNorm statistics and non-persistent buffers are included; training-only tensors (a VQ code's `latent`)
    are not (`load` rebuilds them).

"modules": the module tree, `vqlab.architecture` (node format, type names, config vs state).

A model with another module type (a class defined in your script) or an attribute a file cannot hold still
saves; load it with `load(path, model=m)`, m an already quantized model of the same architecture.  Forward hooks
are not stored.  `save` writes a temporary file next to `path` (".<name>.<random>.tmp"), fsyncs it and renames it
over `path`: a failed save leaves the previous file as it was.  Files of format version 1 (pickled skeleton) are
not read.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import lzma
import math
import mmap
import os
import secrets
import stat
import struct
from typing import Any

import torch
import torch.nn as nn

from . import methods as _methods  # noqa: F401  every built-in method is registered before a file is read
from .architecture import ALLOWED_TYPES, Entry, TreeError, build_model, module_nodes, short
from .bits import ans_decode, ans_encode, pack_indices, packed_bytes, unpack_indices
from .codes import WeightCode, stored_dtype
from .dtypes import FILE_DTYPES, check_store_dtype, dtype_name
from .filemeta import compact, deflate, expand, inflate
from .layers import QuantizedLayer
from .legacy import build_legacy_model
from .size import check_store_range, model_store_dtype, training_only_ids

__all__ = ["save", "load", "VQFileError", "FORMAT_VERSION", "READ_VERSIONS", "ALLOWED_TYPES", "META_CAP",
           "ANS_CAP", "ANS_PER_BYTE", "DECODE_CAP", "DECODE_PER_BYTE", "INDEX_CODINGS"]

MAGIC = b"\x89VQLAB\r\n"
FORMAT_VERSION = 5
READ_VERSIONS = (2, 3, 4, 5)  # versions `load` reads (2: entries without `stored`; 2-3: class-path nodes; 2-4: LZMA'd
                              # metadata in full, 5: the compact metadata of `vqlab.filemeta`)
META_CAP = 16 << 20           # bytes the JSON metadata may decompress to
ANS_CAP, ANS_PER_BYTE = 1 << 26, 64   # values ANS entries may decode to: ANS_CAP + ANS_PER_BYTE * payload bytes
DECODE_CAP, DECODE_PER_BYTE = 1 << 22, 64   # values codes may decode from their streams (lattice coordinates)
INDEX_CODINGS = ("packed", "ans")
_STORED_FLOATS = ("float16", "bfloat16", "float32")
_HEADER = struct.Struct("<8sHHIQ")  # magic, version, reserved, meta_len, payload_len
_DIGEST = 32
_META_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": 1 << 20}]
_MAX_NDIM = 16                # dimensions a stored tensor may have
_HASH_CHUNK = 1 << 24         # bytes hashed at a time


class VQFileError(ValueError):
    """A vqlab file is truncated, corrupted, malformed, of another format or version, or does not fit the model."""


# ---------------------------------------------------------------- save

def _stored_tensors(model: nn.Module) -> list[tuple[str, str, torch.Tensor, int]]:
    """(name, kind, tensor, bits) for every unique tensor to store; bits > 0 where a code packs a buffer
    (`WeightCode.packing`, e.g. VQ indices at ceil(log2 K) bits)."""
    packed = {id(getattr(c, n)): bits for c in model.modules() if isinstance(c, WeightCode)
              for n, bits in c.packing().items()}
    skip = training_only_ids(model)
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


def _check_savable(model: nn.Module) -> None:
    """Refuse meta tensors, unsupported dtypes and out-of-range codes before writing anything."""
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if t.is_meta:
                raise ValueError(f"cannot save: {kind} {name!r} is on the meta device (no data); materialise "
                                 f"the model first (model.to_empty(device='cpu') and load its weights)")
            if dtype_name(t.dtype) not in FILE_DTYPES:
                raise ValueError(f"cannot save: {kind} {name!r} has dtype {t.dtype}; a vqlab file holds "
                                 f"{sorted(FILE_DTYPES)}")
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLayer):
            try:
                m.validate()
            except ValueError as e:
                raise ValueError(f"cannot save: layer {name!r}: {e}") from None


def _create_temp(folder: str, base: str) -> tuple[int, str]:
    """A new file ".<base>.<random>.tmp" in `folder`, created exclusively with mode 0o666 & ~umask."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = os.path.join(folder, f".{base}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary file name in {folder!r}")


def _write_atomic(path: str | os.PathLike, chunks: list[bytes]) -> None:
    """Write `chunks` to a temporary file beside `path`, fsync, rename over `path`; on failure remove it.

    An existing `path` keeps its permission bits; a symlink is followed (its target is replaced).  An OSError
    names `path` as the caller wrote it, never the hidden temporary file; a folder at `path` is refused first.
    """
    try:
        _replace_with(path, chunks)
    except OSError as e:
        if e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, os.fspath(path)) from None


def _replace_with(path: str | os.PathLike, chunks: list[bytes]) -> None:
    """`_write_atomic`'s work (its OSErrors name whatever file failed)."""
    target = os.path.realpath(os.fspath(path))
    if os.path.isdir(target):
        raise IsADirectoryError(errno.EISDIR, "Is a folder; save takes a file name such as 'model.vqz'", target)
    folder = os.path.dirname(target)
    mode = stat.S_IMODE(os.stat(target).st_mode) if os.path.exists(target) else None
    fd, tmp = _create_temp(folder, os.path.basename(target))
    try:
        try:
            f = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            raise
        with f:
            for c in chunks:
                f.write(c)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):   # make the rename durable (POSIX); not possible everywhere
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _as_module(model: nn.Module | list | tuple) -> tuple[nn.Module, int | None]:
    """A model, or several models as one nn.ModuleList (shared objects then stored once); and their count."""
    if isinstance(model, (list, tuple)):
        if not model or not all(isinstance(m, nn.Module) for m in model):
            raise TypeError(f"save/load take an nn.Module or a non-empty list of them, got {short(model)}")
        return nn.ModuleList(model), len(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"save/load take an nn.Module or a list of them, got {type(model).__name__}")
    return model, None


def save(model: nn.Module | list[nn.Module], path: str | os.PathLike, store_dtype: torch.dtype | str | None = None,
         index_coding: str = "packed") -> int:
    """Write `model` (quantized or float), or several models in one file, to `path`; return the file size in bytes.

    model: one nn.Module, or a list of them: every object they share (a universal codebook) is stored once,
        and `load(path)` returns the list.
    store_dtype: None (the dtype the model carries, `vqlab.size.model_store_dtype`, else every tensor at its
        dtype), or torch.float16 / torch.bfloat16 / torch.float32 or the name: every float tensor wider than it (codebooks, biases, float layers, BatchNorm, side tensors) is
        written at it and loaded back as its own dtype, rounded — `vqlab.size.round_to_store_dtype_(model,
        store_dtype)` first makes the model in memory equal to the loaded one.
    index_coding: "packed" (bit-packed at ceil(log2 K) bits) or "ans": every bit-packed stream (VQ indices, the
        other codes' packed buffers) ANS-coded from its own histogram (`vqlab.bits.ans_encode`).
    The size is compressed_size(model, store_dtype=store_dtype).compressed_bytes (index_coding="ans": its
    ans_bytes) plus the 56-byte envelope and the compact metadata (a few hundred bytes, `vqlab.filemeta`).
    The file is replaced atomically: if saving fails, an existing `path` is left unchanged.
    Raises ValueError for a meta-device model, out-of-range indices, a bad store_dtype or index_coding, or a
    value beyond store_dtype's range (float16: |x| > 65504).
    Example: `vqlab.save(model, "lenet.vqz"); model2 = vqlab.load("lenet.vqz")`;
        `vqlab.save([m1, m2, m3], "three.vqz"); m1, m2, m3 = vqlab.load("three.vqz")`;
        `vqlab.save(model, "small.vqz", store_dtype="float16", index_coding="ans")`.
    """
    store = check_store_dtype(store_dtype if store_dtype is not None else model_store_dtype(model))
    if index_coding not in INDEX_CODINGS:
        raise ValueError(f"index_coding must be one of {list(INDEX_CODINGS)}, got {index_coding!r}")
    model, count = _as_module(model)
    _check_savable(model)
    sections, entries, tindex, offset = [], [], {}, 0
    for name, kind, t, bits in _stored_tensors(model):
        stored = None
        if bits and index_coding == "ans":
            b, stored = ans_encode(t, 1 << bits), "ans"
        elif bits:
            b = pack_indices(t, bits)
        elif stored_dtype(t, store) != t.dtype:
            b, stored = _raw_bytes(check_store_range(name, t, store)), dtype_name(store)
        else:
            b = _raw_bytes(t)
        tindex[id(t)] = len(entries)
        entries.append([name, kind, offset, len(b), bits, dtype_name(t.dtype), list(t.shape),
                        t.requires_grad] + ([stored] if stored else []))
        sections.append(b)
        offset += len(b)
    meta = {"format": "vqlab", "version": FORMAT_VERSION, "torch": torch.__version__, "tensors": entries,
            "modules": module_nodes(model, tindex)}
    if count is not None:
        meta["models"] = count
    meta_b = deflate(compact(meta))
    chunks = [_HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(meta_b), offset), meta_b, *sections]
    digest = hashlib.sha256()
    for c in chunks:
        digest.update(c)
    chunks.append(digest.digest())
    _write_atomic(path, chunks)
    return sum(len(c) for c in chunks)


# ---------------------------------------------------------------- load: the envelope

def _decompress_meta(b: bytes, where: str) -> bytes:
    """Inflate the metadata, refusing more than META_CAP bytes before allocating them."""
    dec = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_META_FILTERS)
    try:
        out = dec.decompress(b, max_length=META_CAP + 1)
    except lzma.LZMAError as e:
        raise VQFileError(f"{where}: unreadable metadata ({e})") from None
    if len(out) > META_CAP:
        raise VQFileError(f"{where}: metadata decompresses to more than {META_CAP} bytes (the limit); "
                          f"the file is corrupted or crafted")
    if not dec.eof or dec.unused_data:
        raise VQFileError(f"{where}: metadata is not one complete LZMA stream of {len(b)} bytes")
    return out


class _Payload:
    """The payload of an open file: a read-only memory map (or nothing when empty); slices are bytes."""

    def __init__(self, f, offset: int, length: int):
        self.length = length
        self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if length else None
        self._offset = offset

    def __len__(self) -> int:
        return self.length

    def read(self, start: int, length: int) -> bytes:
        if not length:
            return b""
        a = self._offset + start
        return self._map[a:a + length]

    def hash_into(self, digest) -> None:
        for a in range(0, self.length, _HASH_CHUNK):
            digest.update(self._map[self._offset + a:self._offset + min(a + _HASH_CHUNK, self.length)])

    def close(self) -> None:
        if self._map is not None:
            self._map.close()


def _open_checked(path: str | os.PathLike, stack: contextlib.ExitStack) -> tuple[dict, _Payload, str]:
    """Check the header against the file's size, the metadata and the checksum; return (meta, payload, where).
    Reads the header first and nothing a header cannot account for."""
    where = f"vqlab file {os.fspath(path)!r}"
    f = stack.enter_context(open(path, "rb"))
    info = os.fstat(f.fileno())
    if not stat.S_ISREG(info.st_mode):
        raise VQFileError(f"{where} is not a regular file (a device, pipe or folder); vqlab files are regular files")
    head = f.read(_HEADER.size)
    if len(head) < _HEADER.size or head[:8] != MAGIC:
        if MAGIC.startswith(head[:8]) and len(head) < _HEADER.size:
            raise VQFileError(f"{where} is truncated: {len(head)} bytes, shorter than the {_HEADER.size}-byte header")
        raise VQFileError(f"{os.fspath(path)!r} is not a vqlab file (bad magic {head[:8]!r}, expected {MAGIC!r})")
    _, version, _, meta_len, payload_len = _HEADER.unpack_from(head)
    if version not in READ_VERSIONS:
        hint = (" (format 1 kept a pickle, which this vqlab never loads: load the file with the vqlab that "
                "wrote it, only if you trust it, and save it again)" if version == 1 else "")
        raise VQFileError(f"{where} has format version {version}; this vqlab reads version {FORMAT_VERSION} "
                          f"(and {', '.join(map(str, READ_VERSIONS[:-1]))}){hint}")
    expected = _HEADER.size + meta_len + payload_len + _DIGEST
    if info.st_size < expected:
        raise VQFileError(f"{where} is truncated: {info.st_size} bytes, the header announces {expected}")
    if info.st_size > expected:
        raise VQFileError(f"{where} has {info.st_size - expected} unexpected trailing bytes (expected {expected} bytes)")
    meta_b = f.read(meta_len)
    payload = _Payload(f, _HEADER.size + meta_len, payload_len)
    stack.callback(payload.close)
    f.seek(_HEADER.size + meta_len + payload_len)
    digest = hashlib.sha256(head)
    digest.update(meta_b)
    payload.hash_into(digest)
    if digest.digest() != f.read(_DIGEST):
        raise VQFileError(f"{where} is corrupted: sha256 checksum mismatch")
    if version >= 5:
        try:
            raw = inflate(meta_b, META_CAP)
        except ValueError as e:
            raise VQFileError(f"{where}: {e}") from None
    else:
        raw = _decompress_meta(meta_b, where)
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise VQFileError(f"{where}: metadata is not valid JSON ({short(str(e), 120)})") from None
    if not isinstance(meta, dict):
        raise VQFileError(f"{where}: metadata must be a JSON object, got {type(meta).__name__}")
    if meta.get("format") != "vqlab":
        raise VQFileError(f"{where}: field 'format' must be 'vqlab', got {short(meta.get('format'))}")
    if meta.get("version") != version or isinstance(meta.get("version"), bool):
        raise VQFileError(f"{where}: field 'version' is {short(meta.get('version'))}, the header says {version}")
    if version >= 5:
        try:
            meta = expand(meta)
        except (ValueError, TypeError, KeyError, IndexError, RecursionError) as e:
            raise VQFileError(f"{where}: {str(e)[:300]}") from None
    return meta, payload, where


# ---------------------------------------------------------------- load: the tensor table

def _is_int(v: Any, lo: int = 0, hi: int | None = None) -> bool:
    return type(v) is int and v >= lo and (hi is None or v <= hi)


def _is_name(v: Any) -> bool:
    return isinstance(v, str) and v != "" and "." not in v


def _parse_entry(e: Any, i: int, payload_len: int, where: str, version: int = FORMAT_VERSION) -> Entry:
    """Check one "tensors" entry field by field; sizes must match the bytes it claims (an ANS stream: any
    length inside the payload, its values checked when decoded)."""
    f = f"field 'tensors[{i}]'"
    lengths = (8, 9) if version >= 3 else (8,)
    if not isinstance(e, list) or len(e) not in lengths:
        raise VQFileError(f"{where}: {f} must be [name, kind, offset, length, bits, dtype, shape, requires_grad"
                          f"{', stored' if version >= 3 else ''}], got {short(e)}")
    name, kind, off, n, bits, dt, shape, rg = e[:8]
    stored = e[8] if len(e) == 9 else None
    checks = [("name", name, isinstance(name, str) and all(map(_is_name, name.split(".")))),
              ("kind", kind, kind in ("param", "buffer")),
              ("offset", off, _is_int(off)), ("length", n, _is_int(n)),
              ("bits", bits, _is_int(bits, 0, 32)), ("dtype", dt, isinstance(dt, str) and dt in FILE_DTYPES),
              ("shape", shape, isinstance(shape, list) and len(shape) <= _MAX_NDIM and all(map(_is_int, shape))),
              ("requires_grad", rg, isinstance(rg, bool))]
    for field, value, ok in checks:
        if not ok:
            raise VQFileError(f"{where}: {f} has a bad {field} {short(value)}")
    if off + n > payload_len:
        raise VQFileError(f"{where}: {f} ({name!r}) spans bytes [{off}, {off + n}) outside the "
                          f"{payload_len}-byte payload")
    dtype, numel = FILE_DTYPES[dt], math.prod(shape)
    if bits and (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool):
        raise VQFileError(f"{where}: {f} ({name!r}) is packed at {bits} bits but has dtype {dt}")
    if stored is not None:
        as_float = (not bits and stored in _STORED_FLOATS and dtype.is_floating_point
                    and FILE_DTYPES[stored].itemsize < dtype.itemsize)
        if not (as_float or (bits and stored == "ans")):
            raise VQFileError(f"{where}: {f} ({name!r}) has a bad stored {short(stored)}: a packed entry may be "
                              f"stored as 'ans', a raw float entry as a narrower float among {list(_STORED_FLOATS)} "
                              f"(its dtype is {dt}, bits {bits})")
        if stored == "ans":
            return Entry(name, kind, off, n, bits, dtype, tuple(shape), rg, stored)
    itemsize = FILE_DTYPES[stored].itemsize if stored else dtype.itemsize
    need = packed_bytes(numel, bits) if bits else numel * itemsize
    if n != need:
        raise VQFileError(f"{where}: {f} ({name!r}) has length {n} bytes; shape {shape} {stored or dt}"
                          f"{f' at {bits} bits' if bits else ''} needs {need}")
    return Entry(name, kind, off, n, bits, dtype, tuple(shape), rg, stored)


def _parse_tensors(meta: dict, payload_len: int, where: str) -> list[Entry]:
    table = meta.get("tensors")
    if not isinstance(table, list):
        raise VQFileError(f"{where}: field 'tensors' must be a list, got {short(table)}")
    version = meta.get("version", FORMAT_VERSION)
    entries = [_parse_entry(e, i, payload_len, where, version) for i, e in enumerate(table)]
    coded = sum(math.prod(e.shape) for e in entries if e.stored == "ans")
    if coded > ANS_CAP + ANS_PER_BYTE * payload_len:
        raise VQFileError(f"{where}: field 'tensors': the ANS-coded entries hold {coded} values, more than the "
                          f"{ANS_CAP} + {ANS_PER_BYTE} per payload byte = {ANS_CAP + ANS_PER_BYTE * payload_len} "
                          f"a file may decode to; the file is corrupted or crafted")
    seen: set[tuple[str, str]] = set()
    for e in entries:
        if (e.kind, e.name) in seen:
            raise VQFileError(f"{where}: field 'tensors' names {e.kind} {e.name!r} twice")
        seen.add((e.kind, e.name))
    return entries


def _tensor_from(payload: _Payload, e: Entry, where: str, i: int = 0) -> torch.Tensor:
    """The entry's bytes (tensors[i]) as a CPU tensor of its dtype and shape."""
    b = payload.read(e.offset, e.length)
    if e.stored == "ans":
        try:
            v = torch.from_numpy(ans_decode(b, math.prod(e.shape), 1 << e.bits))
        except ValueError as err:
            raise VQFileError(f"{where}: field 'tensors[{i}]' ({e.kind} {e.name!r}, stored 'ans'): {err}") from None
    elif e.bits:
        v = unpack_indices(b, e.bits, math.prod(e.shape))
    if e.bits:
        hi = torch.iinfo(e.dtype).max
        if v.numel() and int(v.max()) > hi:
            raise VQFileError(f"{where}: {e.kind} {e.name!r} holds values up to {int(v.max())}, more than its "
                              f"dtype {e.dtype} can hold ({hi})")
        return v.to(e.dtype).reshape(e.shape)
    if not b:
        return torch.empty(e.shape, dtype=e.dtype)
    t = torch.frombuffer(bytearray(b), dtype=torch.uint8)
    if e.dtype == torch.bool and int(t.max()) > 1:
        raise VQFileError(f"{where}: bool {e.kind} {e.name!r} holds bytes other than 0 and 1")
    if e.stored:                                   # a narrower float, cast back to the tensor's dtype
        return t.view(FILE_DTYPES[e.stored]).to(e.dtype).reshape(e.shape)
    return t.view(e.dtype).reshape(e.shape)


# ---------------------------------------------------------------- load: filling and checking

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


def _staged(model: nn.Module, entries: list[Entry], payload: _Payload, where: str,
            map_location: str | torch.device) -> list[tuple[list, torch.Tensor]]:
    """Every tensor the file names, decoded and matched to the model's slots, before anything is changed:
    [(holders of the model's tensor, the file's tensor)]; all of the model's tensors must be covered."""
    named = {"param": dict(model.named_parameters(remove_duplicate=False)),
             "buffer": dict(model.named_buffers(remove_duplicate=False))}
    slots = _slots(model)
    staged, filled = [], set()
    for i, e in enumerate(entries):
        like = named[e.kind].get(e.name)
        if like is None:
            raise VQFileError(f"{where}: the model has no {e.kind} {e.name!r}")
        if tuple(like.shape) != e.shape or like.dtype != e.dtype:
            raise VQFileError(f"{where}: {e.kind} {e.name!r} is {list(e.shape)} {e.dtype} in the file, but "
                              f"{list(like.shape)} {like.dtype} in the model")
        t = _tensor_from(payload, e, where, i).to(map_location)
        if e.kind == "param":
            t = nn.Parameter(t, requires_grad=like.requires_grad)
        staged.append((slots[id(like)], t))
        filled.add(id(like))
    latent = training_only_ids(model)
    missing = [n for d in named.values() for n, t in d.items() if id(t) not in filled and id(t) not in latent]
    if missing:
        raise VQFileError(f"{where} has no data for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return staged


def _put(staged: list[tuple[list, torch.Tensor]]) -> list[tuple[dict, str, Any]]:
    """Give every holder its file tensor (one object for every holder: sharing survives the round trip); returns
    what was there, for `_restore`."""
    old = []
    for holders, t in staged:
        for mod, attr, kind in holders:
            table = mod._parameters if kind == "param" else mod._buffers
            old.append((table, attr, table[attr]))
            table[attr] = t
    return old


def _restore(old: list[tuple[dict, str, Any]]) -> None:
    for table, attr, t in reversed(old):
        table[attr] = t


_LAYER_ERRORS = (ValueError, TypeError, AttributeError, ZeroDivisionError, RuntimeError, IndexError, KeyError,
                 OverflowError)


def _check_decoded(model: nn.Module, payload_len: int, where: str) -> None:
    """Refuse, before anything is decoded, codes that would decode more values from their compressed streams
    (`WeightCode.decoded_values`: lattice coordinates) than DECODE_CAP + DECODE_PER_BYTE per payload byte: a size
    the file cannot inflate by claiming large layers, so a small file cannot make `load` inflate gigabytes."""
    total, cap = 0, DECODE_CAP + DECODE_PER_BYTE * payload_len
    for name, m in model.named_modules():
        if isinstance(m, WeightCode):
            try:
                total += int(m.decoded_values())
            except _LAYER_ERRORS as e:
                raise VQFileError(f"{where}: module {name!r}: {e}") from None
            if total > cap:
                raise VQFileError(f"{where}: module {name!r}: the codes decode {total} values from their streams, "
                                  f"more than the {DECODE_CAP} + {DECODE_PER_BYTE} per payload byte = {cap} a file of "
                                  f"this size may decode to; the file is corrupted or crafted")


def _check_layers(model: nn.Module, where: str) -> None:
    """Check every quantized layer of a loaded model (`QuantizedLayer.validate`: the code fits the layer and its
    values are usable, e.g. VQ indices in [0, K)); VQFileError naming the layer."""
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLayer):
            try:
                m.validate()
            except _LAYER_ERRORS as e:
                raise VQFileError(f"{where}: layer {name!r}: {e}") from None


def _after_load(model: nn.Module, where: str) -> None:
    """Let every quantized layer rebuild its training-only state (a VQ code's latent weights)."""
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLayer):
            try:
                m.after_load()
            except _LAYER_ERRORS as e:
                raise VQFileError(f"{where}: layer {name!r}: {e}") from None


def load(path: str | os.PathLike, model: nn.Module | list[nn.Module] | None = None,
         map_location: str | torch.device = "cpu") -> nn.Module | list[nn.Module]:
    """Read a model (or the list of models) written by `save`.  Never runs code from the file.

    model: None rebuilds the architecture from the file (registry names and `ALLOWED_TYPES` only); or an
        already quantized model of the same architecture (same names, shapes, dtypes and K), filled in place —
        needed for models with your own module classes.  A load that fails leaves this model as it was.
    map_location: device for the loaded tensors.
    Tensors saved with store_dtype come back at their own dtype (the rounded values); ANS-coded streams are
    decoded (their header, length and histogram checked) and then range-checked like packed ones.
    Raises VQFileError (a ValueError) for a truncated, corrupted, malformed or foreign file, indices
    outside [0, K), or a model that does not fit; the message names the file, the field and the value.
    """
    with contextlib.ExitStack() as stack:
        meta, payload, where = _open_checked(path, stack)
        entries = _parse_tensors(meta, len(payload), where)
        count = meta.get("models")
        if count is not None and (not _is_int(count, 1) or isinstance(count, bool)):
            raise VQFileError(f"{where}: field 'models' must be a positive integer, got {short(count)}")
        given = model is not None
        if given:
            model, given_count = _as_module(model)
            if given_count != count:
                raise VQFileError(f"{where} holds {count or 1} model(s) "
                                  f"({'a list' if count else 'one model'}); pass model= the same way")
        else:
            build = build_model if meta["version"] >= 4 else build_legacy_model
            try:
                model = build(meta.get("modules"), entries)
            except TreeError as e:
                raise VQFileError(f"{where}: {e}") from None
        _check_decoded(model, len(payload), where)
        old = _put(_staged(model, entries, payload, where, map_location))
    try:
        _check_layers(model, where)
        if count is not None and (not isinstance(model, nn.ModuleList) or len(model) != count):
            raise VQFileError(f"{where}: field 'models' says {count} but the architecture is not a list of them")
    except BaseException:
        if given:
            _restore(old)                              # a failed load changes nothing
        raise
    _after_load(model, where)
    return list(model) if count is not None else model
