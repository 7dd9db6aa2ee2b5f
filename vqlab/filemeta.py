"""The compact metadata of a vqlab file, format version 5: the version-4 metadata (`vqlab.io`) less everything a
reader can derive, so a file's header costs a few hundred bytes, not kilobytes (a 7.8 KB LeNet-5 spent 1 KB on it).

    compact(meta) -> small      version-4 layout -> version-5 layout (what `save` writes)
    expand(small) -> meta       version-5 layout -> version-4 layout (what `load` checks, field by field, as before)
    deflate(meta) / inflate(b, cap)
                                the JSON bytes, DEFLATE-coded against a fixed preset dictionary of the words every
                                vqlab file uses (`PRESET`), and back (at most `cap` bytes, refused beyond)

Version 5 differs from version 4 only in the JSON ("format", "version", "torch", "models" as before):

    "params": P          the first P tensor entries are parameters, the rest buffers
    "store": dtype       the float dtype floats are stored at (absent: each at its own)
    "coding": "ans"      how packed entries are stored (absent: bit-packed)
    "tensors": [[length, bits, shape] or [length, bits, shape, {exceptions}], ...]
        offset: the sum of the lengths before it; name: the tensor's first name in the module tree, in torch's
        named_parameters / named_buffers order (`tree_names`); dtype "float32" (bits 0) or "uint8" (bits > 0);
        requires_grad: true for parameters, false for buffers; stored: "coding" for packed entries, "store" for a
        float entry of a wider dtype.  An entry that differs says so in {"n": name, "t": dtype, "g": bool,
        "s": stored or null}.
    "modules": the version-4 nodes with "training" present only when true, a child as its distance back
        (node i's child c written as i - c) and a tensor index as its step from the node list's previous index of
        the same list ("params" from -1, "buffers" from P - 1: t written as t - previous - 1), so blocks that repeat
        are written alike and compress to almost nothing.

`expand` checks only what it computes with (types of the numbers it adds); the expanded metadata then goes
through version 4's checks.
"""
from __future__ import annotations

import json
import zlib
from typing import Any

from .filemeta_preset import PRESET   # DEFLATE's preset dictionary, frozen with the format

__all__ = ["compact", "expand", "deflate", "inflate", "tree_names", "PRESET"]



_DEFAULT_DTYPE = ("float32", "uint8")      # (bits 0, bits > 0)
# node type -> (field, {key: default}): a value equal to its default is left out of the node's config/state; a
# key the node does not have at all is listed in the node's "~" (so expand gives back exactly what was there).
# Frozen with the format, like PRESET.
_ONE, _ZERO = [1, 1], [0, 0]
_NODE_DEFAULTS = {
    "vqlab:codebook": ("config", {"codebook_groups": 1, "frozen": False, "dtype": "float32"}),
    "code:vq": ("config", {"codebook_groups": 1, "dtype": "float32"}),
    "vqlab:linear": ("config", {"bias": True}),
    "vqlab:conv2d": ("config", {"stride": _ONE, "padding": _ZERO, "dilation": _ONE, "groups": 1, "bias": True,
                                "padding_mode": "zeros", "segment": "input"}),
    "torch.nn.ReLU": ("state", {"inplace": False}),
    "torch.nn.MaxPool2d": ("state", {"padding": 0, "dilation": 1, "return_indices": False, "ceil_mode": False}),
    "torch.nn.Flatten": ("state", {"start_dim": 1, "end_dim": -1}),
    "torch.nn.BatchNorm2d": ("state", {"eps": 1e-05, "momentum": 0.1, "affine": True, "track_running_stats": True}),
    "torch.nn.BatchNorm1d": ("state", {"eps": 1e-05, "momentum": 0.1, "affine": True, "track_running_stats": True}),
    "torch.nn.Conv2d": ("state", {"stride": {"t": _ONE}, "padding": {"t": _ZERO}, "dilation": {"t": _ONE},
                                  "transposed": False, "output_padding": {"t": _ZERO}, "groups": 1,
                                  "padding_mode": "zeros"}),
}
_FLOATS = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}   # float dtypes a file holds -> itemsize
_WBITS = -15                               # raw DEFLATE, 32 KiB window


def tree_names(nodes: list, n_tensors: int, n_params: int) -> list[str | None]:
    """The name torch gives each tensor of the module tree `nodes` (version-4 layout, root last): modules visited
    as `named_modules` does (pre-order, each once), parameters then buffers in their order, a tensor named where
    it is first met; entries [0, n_params) from "params" lists, the rest from "buffers".  None where the tree
    names no tensor.  Raises ValueError for a malformed tree (checked again in full after expanding)."""
    names: list[str | None] = [None] * n_tensors
    if not nodes:
        return names
    order, seen, stack = [], set(), [(len(nodes) - 1, "")]
    while stack:
        i, prefix = stack.pop()
        if i in seen:
            continue
        seen.add(i)
        order.append((i, prefix))
        children = nodes[i].get("children", [])
        for name, c in reversed(children):
            if c is not None:
                if not (type(c) is int and 0 <= c < i) or not isinstance(name, str):
                    raise ValueError(f"field 'modules[{i}]'.children has a bad child {[name, c]!r:.60} (children are earlier nodes)")
                stack.append((c, f"{prefix}.{name}" if prefix else name))
    for key, lo, hi in (("params", 0, n_params), ("buffers", n_params, n_tensors)):
        for i, prefix in order:
            for name, t in nodes[i].get(key, []):
                if type(t) is int and lo <= t < hi and names[t] is None and isinstance(name, str):
                    names[t] = f"{prefix}.{name}" if prefix else name
    return names


def _default_stored(bits: int, dtype: str, store: str | None, coding: str | None) -> str | None:
    if bits:
        return coding
    if store is not None and dtype in _FLOATS and _FLOATS[store] < _FLOATS[dtype]:
        return store
    return None


def _int(v: Any, what: str) -> int:
    if type(v) is not int:
        raise ValueError(f"{what} must be an integer, got {v!r:.60}")
    return v


def compact(meta: dict) -> dict:
    """Version-4 metadata (entries [name, kind, offset, length, bits, dtype, shape, requires_grad(, stored)],
    absolute node indices) -> the version-5 layout (module docstring).  expand(compact(meta)) == meta."""
    entries, nodes = meta["tensors"], meta["modules"]
    n_params = sum(1 for e in entries if e[1] == "param")
    if any(e[1] != "param" for e in entries[:n_params]):
        raise ValueError("tensor entries must list parameters before buffers")
    floats = [e[8] for e in entries if len(e) > 8 and not e[4]]
    store = max(set(floats), key=floats.count) if floats else None
    coding = "ans" if any(len(e) > 8 and e[4] for e in entries) else None
    names = tree_names(nodes, len(entries), n_params)
    out: dict[str, Any] = {k: v for k, v in meta.items() if k not in ("tensors", "modules")}
    out["params"] = n_params
    if store:
        out["store"] = store
    if coding:
        out["coding"] = coding
    tensors, offset = [], 0
    for i, e in enumerate(entries):
        name, kind, off, length, bits, dtype, shape, rg = e[:8]
        stored = e[8] if len(e) > 8 else None
        if off != offset:
            raise ValueError(f"tensor {name!r} is not stored right after the one before it")
        offset += length
        extra: dict[str, Any] = {}
        if names[i] != name:
            extra["n"] = name
        if dtype != _DEFAULT_DTYPE[bool(bits)]:
            extra["t"] = dtype
        if rg != (kind == "param"):
            extra["g"] = rg
        if stored != _default_stored(bits, dtype, store, coding):
            extra["s"] = stored
        tensors.append([length, bits, shape] + ([extra] if extra else []))
    out["tensors"] = tensors
    mods = []
    for i, node in enumerate(nodes):
        small = {}
        last = {"params": -1, "buffers": n_params - 1}
        for key, value in node.items():
            if key == "training":
                if value:
                    small[key] = True
            elif key == "children":
                small[key] = [[n, None if c is None else i - c] for n, c in value]
            elif key in last:
                refs = []
                for n, t in value:
                    refs.append([n, None if t is None else t - last[key] - 1])
                    last[key] = last[key] if t is None else t
                small[key] = refs
            else:
                small[key] = value
        field, defaults = _NODE_DEFAULTS.get(node.get("type"), (None, {}))
        if isinstance(small.get(field), dict):
            values = small[field]
            small[field] = {k: v for k, v in values.items() if not (k in defaults and _same(v, defaults[k]))}
            absent = [k for k in defaults if k not in values]
            if absent:
                small["~"] = absent
        mods.append(small)
    out["modules"] = mods
    return out


def expand(small: dict) -> dict:
    """Version-5 metadata -> the version-4 layout, which `vqlab.io` checks field by field.  Raises ValueError
    (with the field) where a number it computes with is not an integer or a field is not of its kind."""
    if not isinstance(small, dict):
        raise ValueError(f"metadata must be a JSON object, got {type(small).__name__}")
    table, nodes = small.get("tensors"), small.get("modules")
    if not isinstance(table, list):
        raise ValueError(f"field 'tensors' must be a list, got {table!r:.60}")
    if not isinstance(nodes, list):
        raise ValueError(f"field 'modules' must be a list, got {nodes!r:.60}")
    n_params = _int(small.get("params"), "field 'params'")
    if not 0 <= n_params <= len(table):
        raise ValueError(f"field 'params' is {n_params}, outside [0, {len(table)}] (the tensor entries)")
    store, coding = small.get("store"), small.get("coding")
    if store is not None and store not in _FLOATS:
        raise ValueError(f"field 'store' must be one of {sorted(_FLOATS)}, got {store!r:.60}")
    if coding not in (None, "ans"):
        raise ValueError(f"field 'coding' must be 'ans' or absent, got {coding!r:.60}")
    mods = []
    for i, node in enumerate(nodes):
        f = f"field 'modules[{i}]'"
        if not isinstance(node, dict):
            raise ValueError(f"{f} must be an object, got {node!r:.60}")
        full = {"training": False, **{k: v for k, v in node.items() if k != "~"}}
        field, defaults = _NODE_DEFAULTS.get(node.get("type"), (None, {}))
        if field is not None and isinstance(node.get(field, {}), dict):
            absent = node.get("~", [])
            if not isinstance(absent, list) or not all(isinstance(k, str) for k in absent):
                raise ValueError(f"{f}.~ must be a list of field names, got {absent!r:.60}")
            given = node.get(field, {})
            full[field] = {**{k: json.loads(json.dumps(v)) for k, v in defaults.items() if k not in absent
                              and k not in given}, **given}
            if not full[field] and field not in node:
                del full[field]
        elif "~" in node:
            raise ValueError(f"{f} has a '~' field, which a {node.get('type')!r:.60} node does not take")
        last = {"params": -1, "buffers": n_params - 1}
        for key in ("children", "params", "buffers"):
            value = node.get(key)
            if value is None:
                continue
            if not isinstance(value, list) or not all(isinstance(it, list) and len(it) == 2 for it in value):
                raise ValueError(f"{f}.{key} must be a list of [name, index or null], got {value!r:.60}")
            refs = []
            for n, d in value:
                if d is None:
                    refs.append([n, None])
                elif key == "children":
                    refs.append([n, i - _int(d, f"{f}.children")])
                else:
                    last[key] = last[key] + 1 + _int(d, f"{f}.{key}")
                    if not 0 <= last[key] < len(table):
                        raise ValueError(f"{f}.{key} refers to tensor {last[key]}, not among the {len(table)} "
                                         f"tensor indices below {len(table)}")
                    refs.append([n, last[key]])
            full[key] = refs
        mods.append(full)
    names = tree_names(mods, len(table), n_params) if all(_plain_tree(n) for n in mods) else [None] * len(table)
    entries, offset = [], 0
    for i, e in enumerate(table):
        f = f"field 'tensors[{i}]'"
        if not (isinstance(e, list) and len(e) in (3, 4) and (len(e) == 3 or isinstance(e[3], dict))):
            raise ValueError(f"{f} must be [length, bits, shape] or [length, bits, shape, {{exceptions}}], "
                             f"got {e!r:.60}")
        length, bits = _int(e[0], f"{f} length"), _int(e[1], f"{f} bits")
        extra = e[3] if len(e) == 4 else {}
        unknown = set(extra) - {"n", "t", "g", "s"}
        if unknown:
            raise ValueError(f"{f} has unknown fields {sorted(unknown)}")
        kind = "param" if i < n_params else "buffer"
        dtype = extra.get("t", _DEFAULT_DTYPE[bool(bits)])
        name = extra.get("n", names[i])
        if name is None:
            raise ValueError(f"{f} has no name and the module tree names no tensor {i}")
        stored = extra["s"] if "s" in extra else _default_stored(bits, dtype, store, coding)
        entries.append([name, kind, offset, length, bits, dtype, e[2], extra.get("g", kind == "param")]
                       + ([stored] if stored is not None else []))
        offset += max(length, 0)
    out = {k: v for k, v in small.items() if k not in ("tensors", "modules", "params", "store", "coding")}
    out["tensors"], out["modules"] = entries, mods
    return out


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON values, types included (1 is not 1.0 or True)."""
    return type(a) is type(b) and (a == b if not isinstance(a, (list, dict)) else
                                   json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True))


def _plain_tree(node: dict) -> bool:
    """Whether a node's reference lists are lists of [str, int or None] (what tree_names reads)."""
    return all(isinstance(n, str) and (t is None or type(t) is int)
               for key in ("children", "params", "buffers") for n, t in node.get(key) or [])


def deflate(meta: dict) -> bytes:
    """The metadata's compact JSON, raw DEFLATE (level 9) against `PRESET`."""
    z = zlib.compressobj(9, zlib.DEFLATED, _WBITS, 9, zlib.Z_DEFAULT_STRATEGY, zdict=PRESET)
    return z.compress(json.dumps(meta, separators=(",", ":")).encode()) + z.flush()


def inflate(b: bytes, cap: int) -> bytes:
    """The JSON bytes of `deflate`'s output; ValueError when it is not DEFLATE data, is cut short, has bytes after
    its end, or inflates to more than `cap` bytes (checked before they are allocated)."""
    z = zlib.decompressobj(_WBITS, zdict=PRESET)
    try:
        raw = z.decompress(b, cap + 1)
    except zlib.error as e:
        raise ValueError(f"metadata is not DEFLATE data ({e})") from None
    if len(raw) > cap:
        raise ValueError(f"metadata inflates to more than {cap} bytes")
    if not z.eof:
        raise ValueError("metadata is cut short (its DEFLATE stream does not end)")
    if z.unused_data:
        raise ValueError(f"{len(z.unused_data)} bytes follow the metadata's DEFLATE stream")
    return raw
