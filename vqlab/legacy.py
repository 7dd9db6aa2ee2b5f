"""Reading the architecture of files written before format 4 (formats 2 and 3, vqlab before the redesign of
issue 24): their nodes name Python class paths ("vqlab.layers.VQLinear") and hold the modules' attributes; here
they are translated into format-4 nodes (registry names and constructor arguments), using the tensor table for
the sizes those files kept only in their tensors.  Old files load with identical outputs (`tests/test_fixtures.py`).
"""
from __future__ import annotations

from typing import Any

from .architecture import Entry, allowed, build_model, decode_value, resolve_type, short
from .codes import CODES

__all__ = ["build_legacy_model"]

# old class path -> registry name of format 4
_RENAMED = {
    "vqlab.layers.VQLinear": "vqlab:linear", "vqlab.quantized.QuantizedLinear": "vqlab:linear",
    "vqlab.methods.qaf.QAFLinear": "vqlab:linear",
    "vqlab.layers.VQConv2d": "vqlab:conv2d", "vqlab.quantized.QuantizedConv2d": "vqlab:conv2d",
    "vqlab.methods.qaf.QAFConv2d": "vqlab:conv2d",
    "vqlab.codebook.Codebook": "vqlab:codebook",
    "vqlab.layers.VQCode": "code:vq", "vqlab.packed.SimdCode": "code:vq_simd", "vqlab.baselines.UniformCode": "code:uniform",
    "vqlab.methods.gong.BinaryCode": "code:gong_binary", "vqlab.methods.gong.ScalarCode": "code:gong_scalar",
    "vqlab.methods.gong.PQCode": "code:gong_pq", "vqlab.methods.gong.RVQCode": "code:gong_rvq",
    "vqlab.methods.lattice.LatticeCode": "code:lattice", "vqlab.methods.vq4all.VQ4ALLCode": "code:vq4all",
    "vqlab.methods.qaf.QAFCode": "code:qaf",
    "vqlab.models.LeNet5": "model:LeNet5", "vqlab.models.SmallCNN": "model:SmallCNN",
    "vqlab.models._BasicBlock": "model:BasicBlock", "vqlab.models.CifarResNet": "model:CifarResNet",
    "vqlab.models._Attention": "model:Attention", "vqlab.models._TransformerBlock": "model:TransformerBlock",
    "vqlab.models.TinyViT": "model:TinyViT",
}
_VQ_LAYER_STATE = ("reassign_every", "steps", "backend")     # VQ layers kept these; the VQ code holds them now


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _old_code(name: str) -> type | None:
    """A WeightCode registered outside vqlab under its old recorded class path (kept loadable by attributes)."""
    return next((c for c in CODES.values() if _class_path(c) == name and not name.startswith("vqlab.")), None)


def _allowed_old(name: Any) -> bool:
    return allowed(name) or (isinstance(name, str) and _old_code(name) is not None)


def _resolve_old(name: str) -> type:
    return _old_code(name) or resolve_type(name)


def _decode_old(v: Any, field: str) -> Any:
    """Attribute values of old files: {"cls": ...} may also name a renamed class."""
    return decode_value(v, field, lambda n: _allowed_old(_RENAMED.get(n, n)),
                        lambda n: _resolve_old(_RENAMED.get(n, n)))


class _Node:
    """Read access to one old node: its decoded state and the entries of its tensors."""

    def __init__(self, node: dict, nodes: list, entries: list[Entry], field: str):
        self.node, self.nodes, self.entries, self.field = node, nodes, entries, field
        raw = node.get("state", {})
        if not isinstance(raw, dict):
            raise ValueError(f"{field}.state must be an object, got {short(raw)}")
        self.state = {k: _decode_old(v, f"{field}.state.{k}") for k, v in raw.items()}

    def get(self, key: str, default: Any = ...) -> Any:
        if key in self.state:
            return self.state[key]
        if default is ...:
            raise ValueError(f"{self.field}.state lacks {key!r}")
        return default

    def tensor(self, key: str, name: str) -> Entry | None:
        """The entry of param/buffer `name` (key "params" or "buffers"), None when the slot is null or absent."""
        for n, ti in self.node.get(key, []):
            if n == name and ti is not None:
                return self.entries[ti]
        return None

    def child(self, name: str) -> "_Node":
        for n, c in self.node.get("children", []):
            if n == name and c is not None:
                return _Node(self.nodes[c], self.nodes, self.entries, f"modules[{c}]")
        raise ValueError(f"{self.field} has no child {name!r}")

    def need(self, key: str, name: str) -> Entry:
        e = self.tensor(key, name)
        if e is None:
            raise ValueError(f"{self.field}.{key} has no {name!r}")
        return e


def _book(n: _Node) -> dict:
    """k, d, codebook_groups, dtype of the old Codebook child of a code node."""
    w = n.child("codebook").need("params", "weight")
    if len(w.shape) != 3:
        raise ValueError(f"{n.field}: the codebook weight must be (G, K, d), got {list(w.shape)}")
    g, k, d = w.shape
    return {"k": k, "d": d, "codebook_groups": g, "dtype": str(w.dtype).removeprefix("torch.")}


def _shape2(e: Entry, what: str) -> tuple[int, int]:
    if len(e.shape) != 2:
        raise ValueError(f"{what} must be 2-D, got {list(e.shape)}")
    return e.shape


def _config(new: str, n: _Node) -> dict:
    """The format-4 config of an old node translated to type `new`."""
    g = n.get
    if new == "vqlab:linear":
        return {"in_features": g("in_features"), "out_features": g("out_features"),
                "bias": n.tensor("params", "bias") is not None}
    if new == "vqlab:conv2d":
        pad = g("padding")
        return {"in_channels": g("in_channels"), "out_channels": g("out_channels"),
                "kernel_size": list(g("kernel_size")), "stride": list(g("stride")),
                "padding": pad if isinstance(pad, str) else list(pad), "dilation": list(g("dilation")),
                "groups": g("groups"), "bias": n.tensor("params", "bias") is not None,
                "padding_mode": g("padding_mode", "zeros"), "segment": g("segment", "kernel")}
    if new == "vqlab:codebook":
        w = n.need("params", "weight")
        if len(w.shape) != 3:
            raise ValueError(f"{n.field}: the codebook weight must be (G, K, d), got {list(w.shape)}")
        return {"k": w.shape[1], "d": w.shape[2], "codebook_groups": w.shape[0], "frozen": not w.requires_grad,
                "dtype": str(w.dtype).removeprefix("torch.")}
    if new == "code:vq":
        book = _book(n)
        rows, s = _shape2(n.need("buffers", "indices"), "indices")
        return {"rows": rows, "n_pad": s * book["d"], **book, "pinned_zero": g("_pinned_zero", False)}
    if new == "code:vq_simd":
        book = _book(n)
        return {"rows": g("m"), "n_pad": g("s") * book["d"], **book, "table_group": g("group"),
                "pinned_zero": g("_pinned_zero", False)}
    if new == "code:uniform":
        rows, cols = _shape2(n.need("buffers", "codes"), "codes")
        return {"rows": rows, "n": cols, "bits": g("bits")}
    if new == "code:gong_binary":
        rows, cols = _shape2(n.need("buffers", "signs"), "signs")
        return {"rows": rows, "n": cols}
    if new == "code:gong_scalar":
        rows, cols = _shape2(n.need("buffers", "indices"), "indices")
        return {"rows": rows, "n": cols, "k": g("k")}
    if new == "code:gong_pq":
        return {"rows": g("rows_"), "n": g("n"), "k": g("k"), "subspaces": g("subspaces"), "axis": g("axis")}
    if new == "code:gong_rvq":
        return {"rows": g("rows_"), "n": g("n"), "k": g("k"), "stages": g("stages"), "d": g("d")}
    if new == "code:lattice":
        stream = n.need("buffers", "stream")
        words = n.tensor("params", "codewords")
        return {"rows": g("n_rows"), "n": g("n_cols"), "lattice": g("lattice"), "step": g("step"), "seed": g("seed"),
                "coder": g("coder"), "nbytes": stream.shape[0] if len(stream.shape) == 1 else -1,
                "finetune": g("finetune"), "n_codewords": words.shape[0] if words is not None else 0}
    if new == "code:vq4all":
        book = _book(n)
        return {"rows": g("rows_"), "n": g("n"), "k": book["k"], "d": book["d"], "candidates": g("candidates"),
                "alpha": g("alpha")}
    if new == "code:qaf":
        return {"dims": list(g("dims")), "rank": g("rank"), "bits": g("bits"), "algorithm": g("algorithm"),
                "rel_error": g("rel_error")}
    raise ValueError(f"{n.field}: no translation for {new}")


def _translate(nodes: Any, entries: list[Entry]) -> Any:
    """Format-2/3 nodes -> format-4 nodes (nodes of other types unchanged)."""
    if not isinstance(nodes, list):
        return nodes                                     # build_model names the problem
    out = []
    for i, node in enumerate(nodes):
        name = node.get("type") if isinstance(node, dict) else None
        new = _RENAMED.get(name) if isinstance(name, str) else None
        if new is None:
            out.append(node)
            continue
        if new.startswith("model:"):
            out.append({**node, "type": new})
            continue
        n = _Node(node, nodes, entries, f"modules[{i}]")
        fresh = {k: v for k, v in node.items() if k not in ("state", "type")}
        fresh.update(type=new, config=_config(new, n))
        if new == "code:vq":                             # the old VQ layer above it kept the training state
            fresh["params"] = [p for p in node.get("params", []) if p[0] != "latent"]
        if new in ("vqlab:linear", "vqlab:conv2d"):
            fresh["params"] = [p for p in node.get("params", []) if p[0] != "latent"]
            if name in ("vqlab.layers.VQLinear", "vqlab.layers.VQConv2d"):
                code = n.child("code")
                extra = {k: n.get(k) for k in _VQ_LAYER_STATE if k in n.state}
                c_index = next(c for cn, c in node["children"] if cn == "code")
                out[c_index] = {**out[c_index], "config": {**out[c_index]["config"], **extra}}
                del code
        out.append(fresh)
    return out


def build_legacy_model(nodes: Any, entries: list[Entry]):
    """The model of a format-2/3 file (meta-device tensors, as `architecture.build_model`)."""
    from .architecture import TreeError

    try:
        translated = _translate(nodes, entries)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, StopIteration) as e:
        raise TreeError(f"field 'modules' (format 3 or earlier): {e}") from None
    return build_model(translated, entries, allowed_type=_allowed_old, resolve=_resolve_old, decode=_decode_old)
