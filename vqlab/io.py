"""Save and load compressed models: `save(model, path, store_dtype=None, index_coding="packed")` and
`load(path, model=None)`.

Loading never runs code from the file: there is no pickle.  The architecture is stored as JSON data
and rebuilt only from an allow-list of module types; every field is checked before it is used.

File layout, format version 3 (all integers little-endian; version 2 files, written before, are read too):

    offset 0   magic  b"\\x89VQLAB\\r\\n"                      8 bytes
               version u16, reserved u16, meta_len u32, payload_len u64   16 bytes
    24         meta: raw LZMA2 (1 MiB dictionary) of UTF-8 JSON           meta_len bytes
               payload: the tensor sections, back to back                 payload_len bytes
    end - 32   sha256 of everything before it (a checksum against damage, not a signature)

JSON meta: {"format": "vqlab", "version": 3, "torch": version, "tensors": [...], "modules": [...]}.
The metadata may decompress to at most 16 MiB (`META_CAP`); a bigger one is refused before it is built.

"tensors": one entry per unique parameter/buffer (shared codebooks and tied weights are stored once),
    [name, kind, offset, length, bits, dtype, shape, requires_grad] or, version 3, the same and `stored`:
    kind "param" or "buffer"; offset/length: bytes into the payload; bits in 1..32 marks a VQ `indices`
    buffer (or another code's `packing()` buffer) packed at ceil(log2 K) bits per index
    (`vqlab.size.pack_indices`), bits = 0 raw bytes at `dtype` ("float32", "uint8", ...); dtype: the
    tensor's dtype in the model; shape: list of sizes.  `stored` (present only where the bytes are not
    what bits/dtype say):
        "ans"      (bits > 0; save(..., index_coding="ans")) the values ANS-coded, `vqlab.bits.ans_encode`
                   with k = 2**bits: a varint histogram header and constriction's AnsCoder words; the length
                   is the stream's; at most `ANS_CAP` + `ANS_PER_BYTE` * payload_len values per file
        "float16", "bfloat16", "float32"
                   (bits = 0; save(..., store_dtype=...)) a float tensor stored at that narrower float
                   dtype, numel * its itemsize bytes, cast back to `dtype` on load
    BatchNorm statistics and non-persistent buffers are included; a VQ layer's training-only `latent`
    weights are not (`load` rebuilds them from the codebook when reassign_every > 0).

"modules": the module tree in post-order (children before their parent, the root last), one node each;
    a module held in several places (a shared Codebook) is one node referenced several times:
    {"type": "torch.nn.Conv2d" | "vqlab.layers.VQLinear" | "vqlab.models.LeNet5" | ...,  "training": bool,
     "children": [[name, node index or null], ...], "params"/"buffers": [[name, tensor index or null], ...],
     "nonpersistent": [buffer names],
     "state": the module's own plain attributes (in_features, kernel_size, eps, n_pad, reassign_every,
              steps, backend, ...): null/bool/int/float/str, lists, {"t": [...]} (a tuple), {"cls": type}
              or {"partial": type, "kwargs": {...}} (types from the allow-list only),
     "unstorable": ["attr (type)", ...] attributes a file cannot hold (a lambda, a tensor attribute)}.

Rebuilding (`load(path)`): every node's type must be allowed: `ALLOWED_TYPES` (torch.nn layers and
containers, torchvision's resnet/vgg/vit building blocks) or an nn.Module class defined in an
already imported vqlab module (VQLinear, VQConv2d, Codebook, the zoo of `vqlab.models`, ...).  A
module is created without running its __init__ (like unpickling, but only from JSON data and only
these types), its attributes set from "state", its tensors from the payload.  Then every VQ layer is
checked: indices in [0, K), shape (out_dim, n_pad / d), codebook groups dividing the rows (the kernels
check the remaining geometry on every call).  A model with another module type (a class defined in your
script) or an unstorable attribute still saves; load it with `load(path, model=m)`, m an already
quantized model of the same architecture.  Forward hooks are not stored.

`save` writes a temporary file next to `path` (".<name>.<random>.tmp"), fsyncs it and renames it over `path`: a failed save
leaves the previous file as it was.  Files of format version 1 (pickled skeleton) are not read.
`save` always writes version 3; a file without `stored` fields differs from version 2 only in the version
number (version 2 entries have exactly 8 fields).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import json
import lzma
import math
import os
import secrets
import stat
import struct
import sys
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from .bits import ans_decode, ans_encode, pack_indices, packed_bytes, unpack_indices
from .quantized import CODES, QuantizedLayer, WeightCode, check_store_dtype, stored_dtype
from .size import check_store_range

__all__ = ["save", "load", "VQFileError", "FORMAT_VERSION", "READ_VERSIONS", "ALLOWED_TYPES", "META_CAP",
           "ANS_CAP", "ANS_PER_BYTE", "INDEX_CODINGS"]

MAGIC = b"\x89VQLAB\r\n"
FORMAT_VERSION = 3
READ_VERSIONS = (2, 3)        # versions `load` reads (2: entries without `stored`)
META_CAP = 16 << 20           # bytes the JSON metadata may decompress to
ANS_CAP, ANS_PER_BYTE = 1 << 26, 64   # values ANS entries may decode to: ANS_CAP + ANS_PER_BYTE * payload bytes
INDEX_CODINGS = ("packed", "ans")
_STORED_FLOATS = ("float16", "bfloat16", "float32")
_HEADER = struct.Struct("<8sHHIQ")  # magic, version, reserved, meta_len, payload_len
_DIGEST = 32
_META_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": 1 << 20}]
_MAX_NDIM = 16                # dimensions a stored tensor may have
_MAX_DEPTH = 8                # nesting of an attribute value (lists in lists ...)

_NN_TYPES = (
    "Identity", "Linear", "Bilinear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d",
    "ReLU", "ReLU6", "LeakyReLU", "PReLU", "ELU", "SELU", "GELU", "SiLU", "Mish", "Sigmoid", "Tanh",
    "Hardswish", "Hardsigmoid", "Hardtanh", "Softmax", "LogSoftmax",
    "MaxPool1d", "MaxPool2d", "AvgPool1d", "AvgPool2d", "AdaptiveAvgPool1d", "AdaptiveAvgPool2d",
    "AdaptiveMaxPool2d", "Flatten", "Unflatten", "Dropout", "Dropout1d", "Dropout2d", "ZeroPad2d",
    "ConstantPad2d", "Upsample", "PixelShuffle", "Embedding", "MultiheadAttention",
    "Sequential", "ModuleList", "ModuleDict", "ParameterList",
)
ALLOWED_TYPES = frozenset(
    [f"torch.nn.{n}" for n in _NN_TYPES] + [
        "torch.nn.modules.linear.NonDynamicallyQuantizableLinear",
        "torchvision.models.resnet.ResNet", "torchvision.models.resnet.BasicBlock",
        "torchvision.models.resnet.Bottleneck", "torchvision.models.vgg.VGG",
        "torchvision.models.vision_transformer.VisionTransformer",
        "torchvision.models.vision_transformer.Encoder", "torchvision.models.vision_transformer.EncoderBlock",
        "torchvision.models.vision_transformer.MLPBlock",
    ])

_DTYPES = {str(t).removeprefix("torch."): t for t in (
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128,
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)}
_MODULE_BASE = frozenset(nn.Module().__dict__)  # nn.Module's own bookkeeping (hooks, _parameters, ...)


class VQFileError(ValueError):
    """A vqlab file is truncated, corrupted, malformed, of another format or version, or does not fit the model."""


class _Unstorable(Exception):
    """An attribute value the JSON skeleton cannot hold (internal to `save`)."""


def _short(v: Any, n: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= n else r[:n] + "..."


# ---------------------------------------------------------------- module types and attribute values

def _type_name(cls: type) -> str:
    """The name a module type is recorded under: "torch.nn.Conv2d", "vqlab.models.LeNet5", ..."""
    if getattr(nn, cls.__name__, None) is cls:
        return f"torch.nn.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _vqlab_type(name: str) -> type | None:
    """The nn.Module class `name` ("vqlab.layers.VQLinear") when an imported vqlab module defines it, else None.

    Looks in sys.modules only: a name from a file never triggers an import of vqlab code.
    """
    module, _, attr = name.rpartition(".")
    mod = sys.modules.get(module) if module.startswith("vqlab.") and module != "vqlab.__main__" else None
    cls = getattr(mod, attr, None) if mod is not None and attr.isidentifier() else None
    ok = isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__ == module
    return cls if ok else None


def _registered_code(name: str) -> type | None:
    """A WeightCode class registered with `vqlab.register_code` under the recorded type name, else None
    (so a method defined outside vqlab loads once its module has registered it)."""
    return next((c for c in CODES.values() if _type_name(c) == name), None)


def _allowed(name: Any) -> bool:
    """Is `name` a module type a file may ask for (ALLOWED_TYPES, a class of an imported vqlab module, or a
    registered weight code)?"""
    return isinstance(name, str) and (name in ALLOWED_TYPES or _vqlab_type(name) is not None
                                      or _registered_code(name) is not None)


def _resolve_type(name: str) -> type:
    """The class of an allowed type name (imports only the modules named in ALLOWED_TYPES)."""
    cls = _vqlab_type(name) or _registered_code(name)
    if cls is not None:
        return cls
    if name not in ALLOWED_TYPES:
        raise ValueError(f"module type {_short(name)} is not allowed")
    module, _, attr = name.rpartition(".")
    cls = getattr(nn, attr) if module == "torch.nn" else getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"{name} is not an nn.Module class")
    return cls


def _attr_ok(cls: type, name: Any) -> bool:
    """May a file set instance attribute `name` on a `cls` built without __init__?  Not nn.Module's own
    bookkeeping, dunders, or anything the class itself defines (methods, properties, hooks)."""
    return (isinstance(name, str) and name.isidentifier() and not name.startswith("__")
            and name not in _MODULE_BASE and not hasattr(cls, name))


def _encode(v: Any, depth: int = 0) -> Any:
    """Attribute value -> JSON value (see the module docstring); raises _Unstorable."""
    if depth > _MAX_DEPTH:
        raise _Unstorable("nested too deep")
    if v is None or type(v) in (bool, int, float, str):
        return v
    if type(v) is list:
        return [_encode(x, depth + 1) for x in v]
    if isinstance(v, tuple):
        return {"t": [_encode(x, depth + 1) for x in v]}
    if isinstance(v, type) and _allowed(_type_name(v)):
        return {"cls": _type_name(v)}
    if (isinstance(v, functools.partial) and isinstance(v.func, type) and _allowed(_type_name(v.func))
            and not v.args and all(isinstance(k, str) for k in v.keywords)):
        return {"partial": _type_name(v.func), "kwargs": {k: _encode(x, depth + 1) for k, x in v.keywords.items()}}
    raise _Unstorable(type(v).__name__)


def _decode(v: Any, field: str, depth: int = 0) -> Any:
    """JSON value -> attribute value; raises ValueError naming `field`."""
    if depth > _MAX_DEPTH:
        raise ValueError(f"{field} is nested deeper than {_MAX_DEPTH}")
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, list):
        return [_decode(x, field, depth + 1) for x in v]
    if isinstance(v, dict) and v.keys() == {"t"} and isinstance(v["t"], list):
        return tuple(_decode(x, field, depth + 1) for x in v["t"])
    if isinstance(v, dict) and v.keys() == {"cls"} and _allowed(v["cls"]):
        return _resolve_type(v["cls"])
    if (isinstance(v, dict) and v.keys() == {"partial", "kwargs"} and _allowed(v["partial"])
            and isinstance(v["kwargs"], dict) and all(str(k).isidentifier() for k in v["kwargs"])):
        kw = {k: _decode(x, field, depth + 1) for k, x in v["kwargs"].items()}
        return functools.partial(_resolve_type(v["partial"]), **kw)
    raise ValueError(f"{field} has an unsupported value {_short(v)}")


# ---------------------------------------------------------------- save

def _training_only(model: nn.Module) -> set[int]:
    """ids of the tensors layers name in `training_only` (a VQ layer's latent): neither saved nor loaded."""
    return {id(t) for m in model.modules() for n in getattr(m, "training_only", ())
            if isinstance(t := getattr(m, n, None), torch.Tensor)}


def _stored_tensors(model: nn.Module) -> list[tuple[str, str, torch.Tensor, int]]:
    """(name, kind, tensor, bits) for every unique tensor to store; bits > 0 where a code packs a buffer
    (`WeightCode.packing`, e.g. VQ indices at ceil(log2 K) bits)."""
    packed = {id(getattr(c, n)): bits for c in model.modules() if isinstance(c, WeightCode)
              for n, bits in c.packing().items()}
    skip = _training_only(model)
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
    """Refuse meta tensors, unsupported dtypes and out-of-range VQ indices before writing anything."""
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if t.is_meta:
                raise ValueError(f"cannot save: {kind} {name!r} is on the meta device (no data); materialise "
                                 f"the model first (model.to_empty(device='cpu') and load its weights)")
            if str(t.dtype).removeprefix("torch.") not in _DTYPES:
                raise ValueError(f"cannot save: {kind} {name!r} has dtype {t.dtype}; a vqlab file holds "
                                 f"{sorted(_DTYPES)}")
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLayer):
            try:
                m.validate()
            except ValueError as e:
                raise ValueError(f"cannot save: layer {name!r}: {e}") from None


def _node(m: nn.Module, children: list, tindex: dict[int, int]) -> dict:
    """One module's JSON node (see the module docstring)."""
    def slots(d: dict) -> list:
        return [[n, None if t is None else tindex.get(id(t))] for n, t in d.items()]

    node: dict[str, Any] = {"type": _type_name(type(m)), "training": m.training}
    state, bad = {}, []
    for k, v in m.__dict__.items():
        if k in _MODULE_BASE:
            continue
        try:
            if not _attr_ok(type(m), k):
                raise _Unstorable("name")
            state[k] = _encode(v)
        except _Unstorable:
            bad.append(f"{k} ({type(v).__name__})")
    for key, value in (("state", state), ("unstorable", bad), ("children", children), ("params", slots(m._parameters)), ("buffers", slots(m._buffers)),
                       ("nonpersistent", sorted(m._non_persistent_buffers_set))):
        if value:
            node[key] = value
    return node


def _module_nodes(model: nn.Module, tindex: dict[int, int]) -> list[dict]:
    """The module tree in post-order (children first, root last); a shared module is one node."""
    nodes: list[dict] = []
    index: dict[int, int] = {}

    def visit(m: nn.Module) -> int:
        if id(m) not in index:
            children = [[n, None if c is None else visit(c)] for n, c in m._modules.items()]
            nodes.append(_node(m, children, tindex))
            index[id(m)] = len(nodes) - 1
        return index[id(m)]

    visit(model)
    return nodes


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

    An existing `path` keeps its permission bits; a symlink is followed (its target is replaced).
    """
    target = os.path.realpath(os.fspath(path))
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
            raise TypeError(f"save/load take an nn.Module or a non-empty list of them, got {_short(model)}")
        return nn.ModuleList(model), len(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"save/load take an nn.Module or a list of them, got {type(model).__name__}")
    return model, None


def save(model: nn.Module | list[nn.Module], path: str | os.PathLike, store_dtype: torch.dtype | str | None = None,
         index_coding: str = "packed") -> int:
    """Write `model` (VQ or float), or several models in one file, to `path`; return the file size in bytes.

    model: one nn.Module, or a list of them: every object they share (a universal codebook) is stored once,
        and `load(path)` returns the list.
    store_dtype: None (every tensor at its dtype), or torch.float16 / torch.bfloat16 / torch.float32 or the
        name: every float tensor wider than it (codebooks, biases, float layers, BatchNorm, side tensors) is
        written at it and loaded back as its own dtype, rounded — `vqlab.size.round_to_store_dtype_(model,
        store_dtype)` first makes the model in memory equal to the loaded one.
    index_coding: "packed" (bit-packed at ceil(log2 K) bits) or "ans": every bit-packed stream (VQ indices, the
        other codes' packed buffers) ANS-coded from its own histogram (`vqlab.bits.ans_encode`).
    The size is compressed_size(model, store_dtype=store_dtype).compressed_bytes (index_coding="ans": its
    ans_bytes) plus the header and the JSON metadata (a few KB at most).  The file is replaced atomically:
    if saving fails, an existing `path` is left unchanged.
    Raises ValueError for a meta-device model, out-of-range indices, a bad store_dtype or index_coding, or a
    value beyond store_dtype's range (float16: |x| > 65504).
    Example: `vqlab.save(model, "lenet.vqz"); model2 = vqlab.load("lenet.vqz")`;
        `vqlab.save([m1, m2, m3], "three.vqz"); m1, m2, m3 = vqlab.load("three.vqz")`;
        `vqlab.save(model, "small.vqz", store_dtype="float16", index_coding="ans")`.
    """
    store = check_store_dtype(store_dtype)
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
            b, stored = _raw_bytes(check_store_range(name, t, store)), str(store).removeprefix("torch.")
        else:
            b = _raw_bytes(t)
        tindex[id(t)] = len(entries)
        entries.append([name, kind, offset, len(b), bits, str(t.dtype).removeprefix("torch."), list(t.shape),
                        t.requires_grad] + ([stored] if stored else []))
        sections.append(b)
        offset += len(b)
    meta = {"format": "vqlab", "version": FORMAT_VERSION, "torch": torch.__version__, "tensors": entries,
            "modules": _module_nodes(model, tindex)}
    if count is not None:
        meta["models"] = count
    meta_b = lzma.compress(json.dumps(meta, separators=(",", ":")).encode(), format=lzma.FORMAT_RAW,
                           filters=_META_FILTERS)
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


def _read_checked(path: str | os.PathLike) -> tuple[dict, bytes, str]:
    """Check magic, version, length and checksum; return (meta, payload, where)."""
    with open(path, "rb") as f:
        data = f.read()
    where = f"vqlab file {os.fspath(path)!r}"
    if len(data) < _HEADER.size or data[:8] != MAGIC:
        if MAGIC.startswith(data[:8]) and len(data) < _HEADER.size:
            raise VQFileError(f"{where} is truncated: {len(data)} bytes, shorter than the {_HEADER.size}-byte header")
        raise VQFileError(f"{os.fspath(path)!r} is not a vqlab file (bad magic {data[:8]!r}, expected {MAGIC!r})")
    _, version, _, meta_len, payload_len = _HEADER.unpack_from(data)
    if version not in READ_VERSIONS:
        hint = (" (format 1 kept a pickle, which this vqlab never loads: load the file with the vqlab that "
                "wrote it, only if you trust it, and save it again)" if version == 1 else "")
        raise VQFileError(f"{where} has format version {version}; this vqlab reads version {FORMAT_VERSION} "
                          f"(and {', '.join(map(str, READ_VERSIONS[:-1]))}){hint}")
    expected = _HEADER.size + meta_len + payload_len + _DIGEST
    if len(data) < expected:
        raise VQFileError(f"{where} is truncated: {len(data)} bytes, the header announces {expected}")
    if len(data) > expected:
        raise VQFileError(f"{where} has {len(data) - expected} unexpected trailing bytes (expected {expected} bytes)")
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise VQFileError(f"{where} is corrupted: sha256 checksum mismatch")
    raw = _decompress_meta(body[_HEADER.size:_HEADER.size + meta_len], where)
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise VQFileError(f"{where}: metadata is not valid JSON ({_short(str(e), 120)})") from None
    if not isinstance(meta, dict):
        raise VQFileError(f"{where}: metadata must be a JSON object, got {type(meta).__name__}")
    if meta.get("format") != "vqlab":
        raise VQFileError(f"{where}: field 'format' must be 'vqlab', got {_short(meta.get('format'))}")
    if meta.get("version") != version or isinstance(meta.get("version"), bool):
        raise VQFileError(f"{where}: field 'version' is {_short(meta.get('version'))}, the header says {version}")
    return meta, body[_HEADER.size + meta_len:], where


# ---------------------------------------------------------------- load: the tensor table

class _Entry(NamedTuple):
    name: str
    kind: str
    offset: int
    length: int
    bits: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    requires_grad: bool
    stored: str | None = None     # "ans", or the float dtype the raw bytes hold (version 3)


def _is_int(v: Any, lo: int = 0, hi: int | None = None) -> bool:
    return type(v) is int and v >= lo and (hi is None or v <= hi)


def _is_name(v: Any) -> bool:
    """A valid attribute name of a module (no '.', not empty)."""
    return isinstance(v, str) and v != "" and "." not in v


def _parse_entry(e: Any, i: int, payload_len: int, where: str, version: int = FORMAT_VERSION) -> _Entry:
    """Check one "tensors" entry field by field; sizes must match the bytes it claims (an ANS stream: any
    length inside the payload, its values checked when decoded)."""
    f = f"field 'tensors[{i}]'"
    lengths = (8, 9) if version >= 3 else (8,)
    if not isinstance(e, list) or len(e) not in lengths:
        raise VQFileError(f"{where}: {f} must be [name, kind, offset, length, bits, dtype, shape, requires_grad"
                          f"{', stored' if version >= 3 else ''}], got {_short(e)}")
    name, kind, off, n, bits, dt, shape, rg = e[:8]
    stored = e[8] if len(e) == 9 else None
    checks = [("name", name, isinstance(name, str) and all(map(_is_name, name.split(".")))),
              ("kind", kind, kind in ("param", "buffer")),
              ("offset", off, _is_int(off)), ("length", n, _is_int(n)),
              ("bits", bits, _is_int(bits, 0, 32)), ("dtype", dt, isinstance(dt, str) and dt in _DTYPES),
              ("shape", shape, isinstance(shape, list) and len(shape) <= _MAX_NDIM and all(map(_is_int, shape))),
              ("requires_grad", rg, isinstance(rg, bool))]
    for field, value, ok in checks:
        if not ok:
            raise VQFileError(f"{where}: {f} has a bad {field} {_short(value)}")
    if off + n > payload_len:
        raise VQFileError(f"{where}: {f} ({name!r}) spans bytes [{off}, {off + n}) outside the "
                          f"{payload_len}-byte payload")
    dtype, numel = _DTYPES[dt], math.prod(shape)
    if bits and (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool):
        raise VQFileError(f"{where}: {f} ({name!r}) is packed at {bits} bits but has dtype {dt}")
    if stored is not None:
        as_float = (not bits and stored in _STORED_FLOATS and dtype.is_floating_point
                    and _DTYPES[stored].itemsize < dtype.itemsize)
        if not (as_float or (bits and stored == "ans")):
            raise VQFileError(f"{where}: {f} ({name!r}) has a bad stored {_short(stored)}: a packed entry may be "
                              f"stored as 'ans', a raw float entry as a narrower float among {list(_STORED_FLOATS)} "
                              f"(its dtype is {dt}, bits {bits})")
        if stored == "ans":
            return _Entry(name, kind, off, n, bits, dtype, tuple(shape), rg, stored)
    itemsize = _DTYPES[stored].itemsize if stored else dtype.itemsize
    need = packed_bytes(numel, bits) if bits else numel * itemsize
    if n != need:
        raise VQFileError(f"{where}: {f} ({name!r}) has length {n} bytes; shape {shape} {stored or dt}"
                          f"{f' at {bits} bits' if bits else ''} needs {need}")
    return _Entry(name, kind, off, n, bits, dtype, tuple(shape), rg, stored)


def _parse_tensors(meta: dict, payload_len: int, where: str) -> list[_Entry]:
    table = meta.get("tensors")
    if not isinstance(table, list):
        raise VQFileError(f"{where}: field 'tensors' must be a list, got {_short(table)}")
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


def _tensor_from(payload: bytes, e: _Entry, where: str, i: int = 0) -> torch.Tensor:
    """The entry's bytes (tensors[i]) as a CPU tensor of its dtype and shape."""
    b = payload[e.offset:e.offset + e.length]
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
        return t.view(_DTYPES[e.stored]).to(e.dtype).reshape(e.shape)
    return t.view(e.dtype).reshape(e.shape)


# ---------------------------------------------------------------- load: the module tree

def _node_list(meta: dict, n_tensors: int, where: str) -> list[dict]:
    """Structural checks of "modules": node fields, child references to earlier nodes, tensor indices."""
    nodes = meta.get("modules")
    if not isinstance(nodes, list) or not nodes:
        raise VQFileError(f"{where}: field 'modules' must be a non-empty list of module nodes, got {_short(nodes)}; "
                          f"pass model= to fill an existing model")
    for i, node in enumerate(nodes):
        f = f"field 'modules[{i}]'"
        if not isinstance(node, dict) or not isinstance(node.get("type"), str):
            raise VQFileError(f"{where}: {f} must be an object with a string 'type', got {_short(node)}")
        if not isinstance(node.get("training", True), bool):
            raise VQFileError(f"{where}: {f}.training must be true or false, got {_short(node['training'])}")
        for key, limit in (("children", i), ("params", n_tensors), ("buffers", n_tensors)):
            items = node.get(key, [])
            ok = isinstance(items, list) and all(
                isinstance(it, list) and len(it) == 2 and _is_name(it[0]) and (it[1] is None or _is_int(it[1], 0, limit - 1))
                for it in items)
            if not ok:
                what = "earlier node indices" if key == "children" else f"tensor indices below {n_tensors}"
                raise VQFileError(f"{where}: {f}.{key} must be a list of [name, index or null] with {what}, "
                                  f"got {_short(items)}")
        if not isinstance(node.get("state", {}), dict):
            raise VQFileError(f"{where}: {f}.state must be an object, got {_short(node['state'])}")
        np_ = node.get("nonpersistent", [])
        if not isinstance(np_, list) or not all(_is_name(b) for b in np_):
            raise VQFileError(f"{where}: {f}.nonpersistent must be a list of buffer names, got {_short(np_)}")
    return nodes


def _node_paths(nodes: list[dict]) -> list[str]:
    """Dotted module name of every node ('' for the root = last node), for error messages."""
    paths = [f"<unreachable node {i}>" for i in range(len(nodes))]
    paths[-1] = ""
    seen = {len(nodes) - 1}
    for i in range(len(nodes) - 1, -1, -1):
        for name, c in nodes[i].get("children", []):
            if c is not None and c not in seen:
                seen.add(c)
                paths[c] = f"{paths[i]}.{name}" if paths[i] else name
    return paths


def _check_types(nodes: list[dict], paths: list[str], where: str) -> None:
    """Every node's type on the allow-list and no unstorable attribute, else a VQFileError saying to pass model=."""
    for node, path in zip(nodes, paths):
        label = f"module {path!r}" if path else "the root module"
        if not _allowed(node["type"]):
            raise VQFileError(f"{where}: {label} has type {_short(node['type'], 120)}, which is not on vqlab's "
                              f"allow-list of module types (see vqlab.io), so the architecture cannot be "
                              f"rebuilt from the file; build the model yourself and pass it: load(path, model=m)")
        bad = node.get("unstorable")
        if bad:
            raise VQFileError(f"{where}: {label} ({node['type']}) had attribute(s) {_short(bad, 120)} that a vqlab "
                              f"file cannot store; build the model yourself and pass it: load(path, model=m)")


def _build_by_state(cls: type, node: dict, field: str) -> nn.Module:
    """Create `cls` without __init__ and set its plain attributes from the file (no code runs)."""
    m = cls.__new__(cls)
    nn.Module.__init__(m)
    for k, v in node.get("state", {}).items():
        if not _attr_ok(cls, k):
            raise ValueError(f"{field}.state may not set attribute {_short(k)} on {cls.__name__}")
        m.__dict__[k] = _decode(v, f"{field}.state.{k}")
    return m


def _attach_tensors(m: nn.Module, node: dict, entries: list[_Entry], holders: dict[int, torch.Tensor],
                    field: str) -> None:
    """Put a shared meta placeholder for every recorded tensor slot (one per tensor index)."""
    for key, kind, slots in (("params", "param", m._parameters), ("buffers", "buffer", m._buffers)):
        for name, ti in node.get(key, []):
            if ti is None:
                slots[name] = None
                continue
            e = entries[ti]
            if e.kind != kind:
                raise ValueError(f"{field}.{key} {name!r} refers to tensors[{ti}], a {e.kind}")
            if ti not in holders:
                t = torch.empty(e.shape, dtype=e.dtype, device="meta")
                holders[ti] = nn.Parameter(t, requires_grad=e.requires_grad) if kind == "param" else t
            slots[name] = holders[ti]
    nonpersistent = set(node.get("nonpersistent", []))
    if not nonpersistent <= set(m._buffers):
        raise ValueError(f"{field}.nonpersistent names unknown buffers {sorted(nonpersistent - set(m._buffers))}")
    m._non_persistent_buffers_set = nonpersistent


def _build_model(meta: dict, entries: list[_Entry], where: str) -> nn.Module:
    """Rebuild the architecture from "modules" with meta-device tensors (filled by `_fill`)."""
    nodes = _node_list(meta, len(entries), where)
    paths = _node_paths(nodes)
    _check_types(nodes, paths, where)
    built: list[nn.Module] = []
    holders: dict[int, torch.Tensor] = {}
    for i, node in enumerate(nodes):
        field = f"modules[{i}]"
        try:
            m = _build_by_state(_resolve_type(node["type"]), node, field)
            for name, c in node.get("children", []):
                m._modules[name] = None if c is None else built[c]
            _attach_tensors(m, node, entries, holders, field)
            m.training = node.get("training", True)
        except ImportError as e:
            raise VQFileError(f"{where}: module {paths[i]!r} needs {node['type']}, which cannot be imported "
                              f"({e}); install it or pass model=") from None
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError, OverflowError) as e:
            raise VQFileError(f"{where}: field '{field}' (module {paths[i]!r}, {node['type']}): {e}") from None
        built.append(m)
    return built[-1]


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


def _fill(model: nn.Module, entries: list[_Entry], payload: bytes, where: str,
          map_location: str | torch.device) -> None:
    """Replace every tensor the file names (and all its holders) by the file's data; all must be covered."""
    named = {"param": dict(model.named_parameters(remove_duplicate=False)),
             "buffer": dict(model.named_buffers(remove_duplicate=False))}
    slots = _slots(model)
    filled = set()
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
        for mod, attr, k in slots[id(like)]:  # one object for every holder: sharing survives the round trip
            (mod._parameters if k == "param" else mod._buffers)[attr] = t
        filled.add(id(like))
    latent = _training_only(model)
    missing = [n for d in named.values() for n, t in d.items() if id(t) not in filled and id(t) not in latent]
    if missing:
        raise VQFileError(f"{where} has no data for {missing[:5]}{' ...' if len(missing) > 5 else ''}")


def _check_layers(model: nn.Module, where: str) -> None:
    """Check every quantized layer of a loaded model (`QuantizedLayer.validate`: for VQ, indices in [0, K) of
    shape (out_dim, n_pad / d) and codebook groups dividing the rows), then let it rebuild training-only
    state; VQFileError naming the layer."""
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLayer):
            try:
                m.validate()
                m.after_load()
            except (ValueError, TypeError, AttributeError, ZeroDivisionError, RuntimeError) as e:
                raise VQFileError(f"{where}: layer {name!r}: {e}") from None


def load(path: str | os.PathLike, model: nn.Module | list[nn.Module] | None = None,
         map_location: str | torch.device = "cpu") -> nn.Module | list[nn.Module]:
    """Read a model (or the list of models) written by `save`.  Never runs code from the file.

    model: None rebuilds the architecture from the file (module types on `ALLOWED_TYPES` only); or an
        already quantized model of the same architecture (same names, shapes, dtypes and K), filled
        in place — needed for models with your own module classes.
    map_location: device for the loaded tensors.
    Tensors saved with store_dtype come back at their own dtype (the rounded values); ANS-coded streams are
    decoded (their header, length and histogram checked) and then range-checked like packed ones.
    Raises VQFileError (a ValueError) for a truncated, corrupted, malformed or foreign file, indices
    outside [0, K), or a model that does not fit; the message names the file, the field and the value.
    """
    meta, payload, where = _read_checked(path)
    entries = _parse_tensors(meta, len(payload), where)
    count = meta.get("models")
    if count is not None and (not _is_int(count, 1) or isinstance(count, bool)):
        raise VQFileError(f"{where}: field 'models' must be a positive integer, got {_short(count)}")
    given = model is not None
    if given:
        model, given_count = _as_module(model)
        if given_count != count:
            raise VQFileError(f"{where} holds {count or 1} model(s) "
                              f"({'a list' if count else 'one model'}); pass model= the same way")
    else:
        model = _build_model(meta, entries, where)
    _fill(model, entries, payload, where, map_location)
    _check_layers(model, where)
    if count is not None:
        if not isinstance(model, nn.ModuleList) or len(model) != count:
            raise VQFileError(f"{where}: field 'models' says {count} but the architecture is not a list of them")
        return list(model)
    return model
