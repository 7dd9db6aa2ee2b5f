"""The architecture a vqlab file records: the module tree as JSON nodes, and its rebuilding without running any
code from the file (no pickle).

Nodes, in post-order (children before their parent, the root last); a module held in several places (a shared
Codebook) is one node referenced several times:

    {"type": name, "training": bool, "children": [[name, node index or null], ...],
     "params"/"buffers": [[name, tensor index or null], ...], "nonpersistent": [buffer names],
     "config": {...}  (vqlab's own modules)  or  "state": {...}  (every other module), "unstorable": [...]}

Type names are stable registry names, never Python class paths of vqlab: "vqlab:linear" / "vqlab:conv2d" (the
quantized layers), "vqlab:codebook", "code:<kind>" (a registered `WeightCode`), "model:<name>" (the model zoo's
classes, `vqlab.models.MODULE_TYPES`); torch's and torchvision's modules by their public names ("torch.nn.Conv2d",
`ALLOWED_TYPES`).  vqlab's layers, codebooks and codes are written as their constructor arguments (`config()`) and
rebuilt by `from_config` on the meta device, so a renamed class or private attribute never breaks a file and a
file cannot ask for more memory than its tensors hold; every tensor the file gives such a module must have the
shape (and, for integers, the dtype) its config implies.  Other modules are created without running __init__
and get their plain attributes from "state": null/bool/int/float/str, lists, {"t": [...]} (a tuple),
{"cls": type} or {"partial": type, "kwargs": {...}} (allowed types only).

Files of format 2 and 3 recorded class paths and attributes; `vqlab.legacy` translates their nodes into these.
"""
from __future__ import annotations

import functools
import importlib
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from .codebook import Codebook
from .codes import CODES, WeightCode
from .dtypes import float_dtype
from .layers import QuantizedConv2d, QuantizedLinear
from .models import MODULE_TYPES

__all__ = ["ALLOWED_TYPES", "Entry", "module_nodes", "build_model", "short"]

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
_LAYERS = {"vqlab:linear": QuantizedLinear, "vqlab:conv2d": QuantizedConv2d}
_WB, _NORM_BUFFERS = ("weight", "bias"), ("running_mean", "running_var", "num_batches_tracked")
_MHA = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias")
# type -> (parameter slots, buffer slots, optional parameter slots, children) its forward reads: a by-state node of
# these types must name these (a slot: a tensor or null; a child: a module; more are allowed, e.g. a buffer of
# your own).  `tests/test_architecture_slots.py` holds the table
# to the classes.
_SLOTS = {
    **{f"torch.nn.{n}": (_WB, (), (), ()) for n in ("Linear", "Bilinear", "Conv1d", "Conv2d", "Conv3d",
                                                    "ConvTranspose1d", "ConvTranspose2d", "LayerNorm", "GroupNorm")},
    "torch.nn.modules.linear.NonDynamicallyQuantizableLinear": (_WB, (), (), ()),
    **{f"torch.nn.{n}": (_WB, _NORM_BUFFERS, (), ()) for n in ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
                                                               "InstanceNorm1d", "InstanceNorm2d")},
    "torch.nn.PReLU": (("weight",), (), (), ()), "torch.nn.Embedding": (("weight",), (), (), ()),
    "torch.nn.MultiheadAttention": (_MHA, (), ("bias_k", "bias_v"), ("out_proj",)),
    "model:LeNet5": ((), (), (), ("features", "classifier")),
    "model:SmallCNN": ((), (), (), ("features", "classifier")),
    "model:BasicBlock": ((), (), (), ("conv1", "bn1", "conv2", "bn2")),
    "model:CifarResNet": ((), (), (), ("conv1", "bn1", "layers", "fc")),
    "model:Attention": ((), (), (), ("qkv", "proj")),
    "model:TransformerBlock": ((), (), (), ("norm1", "attn", "norm2", "mlp")),
    "model:TinyViT": (("cls_token", "pos_embed"), (), (), ("patch_embed", "blocks", "norm", "head")),
}
_UNCHECKED_SLOTS = frozenset(["torch.nn.Sequential", "torch.nn.ModuleList", "torch.nn.ModuleDict",
                              "torch.nn.ParameterList"])
_MODULE_BASE = frozenset(nn.Module().__dict__)  # nn.Module's own bookkeeping (hooks, _parameters, ...)
_MAX_DEPTH = 8                # nesting of an attribute value (lists in lists ...)


class Entry(NamedTuple):
    """One checked entry of a file's tensor table."""

    name: str
    kind: str
    offset: int
    length: int
    bits: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    requires_grad: bool
    stored: str | None = None     # "ans", or the float dtype the raw bytes hold (version 3 and later)


class _Unstorable(Exception):
    """An attribute value the JSON skeleton cannot hold (internal to `module_nodes`)."""


def short(v: Any, n: int = 60) -> str:
    """repr(v), cut to n characters (for error messages about file contents)."""
    r = repr(v)
    return r if len(r) <= n else r[:n] + "..."


# ---------------------------------------------------------------- type names

def _registry() -> dict[str, type]:
    """Every registry name a file may use for a vqlab module -> its class (codes as registered now)."""
    return {**_LAYERS, "vqlab:codebook": Codebook, **{f"model:{k}": c for k, c in MODULE_TYPES.items()},
            **{f"code:{k}": c for k, c in CODES.items()}}


def _by_config(name: str) -> bool:
    """Whether nodes of this type are written and rebuilt as constructor arguments (vqlab's layers, codebooks
    and codes) rather than attributes."""
    return name in _LAYERS or name == "vqlab:codebook" or name.startswith("code:")


def type_name(m: nn.Module | type) -> str:
    """The name a module type is recorded under (module docstring)."""
    cls = m if isinstance(m, type) else type(m)
    for name, c in _registry().items():
        if c is cls:
            return name
    if getattr(nn, cls.__name__, None) is cls:
        return f"torch.nn.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def allowed(name: Any) -> bool:
    """Is `name` a module type a file may ask for: a registry name or one of `ALLOWED_TYPES`?"""
    return isinstance(name, str) and (name in ALLOWED_TYPES or name in _registry())


def resolve_type(name: str) -> type:
    """The class of an allowed type name (imports only the modules named in ALLOWED_TYPES)."""
    cls = _registry().get(name)
    if cls is not None:
        return cls
    if name not in ALLOWED_TYPES:
        raise ValueError(f"module type {short(name)} is not allowed")
    module, _, attr = name.rpartition(".")
    cls = getattr(nn, attr) if module == "torch.nn" else getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"{name} is not an nn.Module class")
    return cls


# ---------------------------------------------------------------- attribute values

def attr_ok(cls: type, name: Any) -> bool:
    """May a file set instance attribute `name` on a `cls` built without __init__?  Not nn.Module's own
    bookkeeping, dunders, or anything the class itself defines (methods, properties, hooks)."""
    return (isinstance(name, str) and name.isidentifier() and not name.startswith("__")
            and name not in _MODULE_BASE and not hasattr(cls, name))


def _encode(v: Any, depth: int = 0) -> Any:
    """Attribute value -> JSON value (module docstring); raises _Unstorable."""
    if depth > _MAX_DEPTH:
        raise _Unstorable("nested too deep")
    if v is None or type(v) in (bool, int, float, str):
        return v
    if type(v) is list:
        return [_encode(x, depth + 1) for x in v]
    if isinstance(v, tuple):
        return {"t": [_encode(x, depth + 1) for x in v]}
    if isinstance(v, type) and allowed(type_name(v)):
        return {"cls": type_name(v)}
    if (isinstance(v, functools.partial) and isinstance(v.func, type) and allowed(type_name(v.func))
            and not v.args and all(isinstance(k, str) for k in v.keywords)):
        return {"partial": type_name(v.func), "kwargs": {k: _encode(x, depth + 1) for k, x in v.keywords.items()}}
    raise _Unstorable(type(v).__name__)


def decode_value(v: Any, field: str, allowed_type=allowed, resolve=resolve_type, depth: int = 0) -> Any:
    """JSON value -> attribute value; raises ValueError naming `field`."""
    if depth > _MAX_DEPTH:
        raise ValueError(f"{field} is nested deeper than {_MAX_DEPTH}")
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, list):
        return [decode_value(x, field, allowed_type, resolve, depth + 1) for x in v]
    if isinstance(v, dict) and v.keys() == {"t"} and isinstance(v["t"], list):
        return tuple(decode_value(x, field, allowed_type, resolve, depth + 1) for x in v["t"])
    if isinstance(v, dict) and v.keys() == {"cls"} and allowed_type(v["cls"]):
        return resolve(v["cls"])
    if (isinstance(v, dict) and v.keys() == {"partial", "kwargs"} and allowed_type(v["partial"])
            and isinstance(v["kwargs"], dict) and all(str(k).isidentifier() for k in v["kwargs"])):
        kw = {k: decode_value(x, field, allowed_type, resolve, depth + 1) for k, x in v["kwargs"].items()}
        return functools.partial(resolve(v["partial"]), **kw)
    raise ValueError(f"{field} has an unsupported value {short(v)}")


def _plain_json(v: Any, field: str, depth: int = 0) -> Any:
    """A config value: null/bool/int/float/str or lists of them (ValueError naming `field` otherwise)."""
    if depth > _MAX_DEPTH:
        raise ValueError(f"{field} is nested deeper than {_MAX_DEPTH}")
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, list):
        return [_plain_json(x, field, depth + 1) for x in v]
    raise ValueError(f"{field} has an unsupported value {short(v)}")


# ---------------------------------------------------------------- save: modules -> nodes

def _node(m: nn.Module, children: list, tindex: dict[int, int]) -> dict:
    """One module's JSON node (module docstring)."""
    def slots(d: dict) -> list:
        return [[n, None if t is None else tindex.get(id(t))] for n, t in d.items()]

    name = type_name(m)
    node: dict[str, Any] = {"type": name, "training": m.training}
    state, bad = {}, []
    if _by_config(name):
        node["config"] = m.config()
    else:
        for k, v in m.__dict__.items():
            if k in _MODULE_BASE:
                continue
            try:
                if not attr_ok(type(m), k):
                    raise _Unstorable("name")
                state[k] = _encode(v)
            except _Unstorable:
                bad.append(f"{k} ({type(v).__name__})")
    params = {k: t for k, t in m._parameters.items() if not (t is None and _by_config(name))}
    for key, value in (("state", state), ("unstorable", bad), ("children", children), ("params", slots(params)),
                       ("buffers", slots(m._buffers)), ("nonpersistent", sorted(m._non_persistent_buffers_set))):
        if value:
            node[key] = value
    return node


def module_nodes(model: nn.Module, tindex: dict[int, int]) -> list[dict]:
    """The module tree in post-order (children first, root last); a shared module is one node.  tindex: id of a
    stored tensor -> its index in the tensor table (tensors left out, e.g. training-only ones, are not named)."""
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


# ---------------------------------------------------------------- load: the fields of modules rebuilt from state

_MAX_SIZE = (1 << 31) - 1
_SIZES = {"kernel_size": 1, "stride": 1, "dilation": 1, "padding": 0, "output_padding": 0}   # name -> least value
_COUNTS = ("in_channels", "out_channels", "in_features", "out_features", "in1_features", "in2_features",
           "num_features", "num_channels", "num_groups", "groups", "embed_dim", "num_heads", "kdim", "vdim",
           "num_embeddings", "embedding_dim", "upscale_factor", "heads")
_FLAGS = ("ceil_mode", "return_indices", "count_include_pad", "inplace", "affine", "track_running_stats",
          "elementwise_affine", "transposed", "batch_first", "add_zero_attn", "_qkv_same_embed_dim",
          "scale_grad_by_freq", "sparse", "recompute_scale_factor")
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _is_size(v: Any, low: int) -> bool:
    return type(v) is int and low <= v <= _MAX_SIZE


def _size_ok(name: str, v: Any, m: nn.Module) -> bool:
    """A conv / pool geometry field: an int, or a tuple of ints (a conv: one per spatial dimension), each in
    [least, 2**31); conv padding may also be 'same' / 'valid'; a pool's stride may be None."""
    low = _SIZES[name]
    conv = isinstance(m, nn.modules.conv._ConvNd)
    if conv and name == "padding" and v in ("same", "valid"):
        return True
    if name == "stride" and v is None and not conv:
        return True
    if _is_size(v, low):
        return not conv
    dims = m.weight.dim() - 2 if conv and isinstance(m._parameters.get("weight"), torch.Tensor) else None
    return (isinstance(v, tuple) and 1 <= len(v) <= 3 and all(_is_size(t, low) for t in v)
            and (dims is None or len(v) == dims))


def _field_ok(name: str, v: Any, m: nn.Module) -> bool | None:
    """Whether attribute `name` holds a value torch's modules accept for it (None: a name without a rule)."""
    if name in _SIZES:
        return _size_ok(name, v, m)
    if name in _COUNTS:
        return _is_size(v, 1)
    if name in _FLAGS:
        return isinstance(v, bool) or (name == "recompute_scale_factor" and v is None)
    if name in ("start_dim", "end_dim", "dim"):
        return (type(v) is int and abs(v) <= 64) or (v is None and name == "dim")
    if name == "eps":
        return type(v) in (int, float) and 0 < v < float("inf")
    if name == "momentum":
        return v is None or (type(v) in (int, float) and 0 <= v <= 1)
    if name == "p":
        return type(v) in (int, float) and 0 <= v <= 1
    if name in ("negative_slope", "alpha", "min_val", "max_val", "lambd", "beta", "threshold", "value"):
        return type(v) in (int, float) and abs(v) < float("inf")
    if name == "padding_mode":
        return v in _PADDING_MODES
    if name == "approximate":
        return v in ("none", "tanh")
    if name == "pad":
        return _is_size(v, 0)
    return None


def _shape_of(m: nn.Module, name: str) -> tuple[int, ...] | None:
    t = m._parameters.get(name, m._buffers.get(name))
    return None if t is None else tuple(t.shape)


def _check_conv(m: nn.modules.conv._ConvNd) -> None:
    """A convolution's fields agree with each other and with its weight and bias."""
    if m.in_channels % m.groups or m.out_channels % m.groups:
        raise ValueError(f"groups={m.groups} must divide in_channels={m.in_channels} and out_channels={m.out_channels}")
    k = tuple(m.kernel_size)
    want = ((m.in_channels, m.out_channels // m.groups) if m.transposed else
            (m.out_channels, m.in_channels // m.groups)) + k
    if _shape_of(m, "weight") != want:
        raise ValueError(f"weight {list(_shape_of(m, 'weight') or ())} does not fit in_channels={m.in_channels}, "
                         f"out_channels={m.out_channels}, groups={m.groups}, kernel_size={k}")
    if _shape_of(m, "bias") not in (None, (m.out_channels,)):
        raise ValueError(f"bias {list(_shape_of(m, 'bias'))} does not fit out_channels={m.out_channels}")
    if m.padding == "same" and (m.transposed or any(s != 1 for s in m.stride)):
        raise ValueError(f"padding='same' needs stride 1, got stride={m.stride}")
    if m.padding == "valid":
        pads = [0] * 2 * len(k)
    elif m.padding == "same":
        total = [d * (kk - 1) for d, kk in zip(reversed(m.dilation), reversed(k))]
        pads = [t for tot in total for t in (tot // 2, tot - tot // 2)]
    else:
        pads = [p for p in reversed(m.padding) for _ in range(2)]
    if list(getattr(m, "_reversed_padding_repeated_twice", pads)) != pads:
        raise ValueError(f"_reversed_padding_repeated_twice must be {pads} for padding={m.padding!r}")


def _check_pool(m: nn.Module) -> None:
    """A max / average pool's padding is at most half its (dilated) kernel, as torch requires at forward."""
    k = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size,)
    dil = getattr(m, "dilation", 1)
    for name, v in (("padding", m.padding), ("dilation", dil)):
        if isinstance(v, tuple) and len(v) not in (1, len(k)):
            raise ValueError(f"{name}={v!r} does not match kernel_size={m.kernel_size!r}")

    def at(v, i):
        return v[min(i, len(v) - 1)] if isinstance(v, tuple) else v
    for i, kk in enumerate(k):
        if 2 * at(m.padding, i) > at(dil, i) * (kk - 1) + 1:
            raise ValueError(f"padding={m.padding!r} must be at most half of the (dilated) kernel_size={m.kernel_size!r}")


def _check_shapes(m: nn.Module) -> None:
    """Linear, BatchNorm, LayerNorm and GroupNorm fields agree with their tensors; Flatten's dims are in order."""
    if isinstance(m, nn.Linear) and _shape_of(m, "weight") not in (None, (m.out_features, m.in_features)):
        raise ValueError(f"weight {list(_shape_of(m, 'weight'))} does not fit in_features={m.in_features}, "
                         f"out_features={m.out_features}")
    if isinstance(m, nn.Linear) and _shape_of(m, "bias") not in (None, (m.out_features,)):
        raise ValueError(f"bias {list(_shape_of(m, 'bias'))} does not fit out_features={m.out_features}")
    if isinstance(m, nn.modules.batchnorm._NormBase):
        for t in ("weight", "bias", "running_mean", "running_var"):
            if _shape_of(m, t) not in (None, (m.num_features,)):
                raise ValueError(f"{t} {list(_shape_of(m, t))} does not fit num_features={m.num_features}")
    if isinstance(m, nn.LayerNorm):
        shape = m.normalized_shape
        if not (isinstance(shape, tuple) and all(_is_size(t, 1) for t in shape)):
            raise ValueError(f"normalized_shape must be a tuple of positive ints, got {short(shape)}")
        for t in ("weight", "bias"):
            if _shape_of(m, t) not in (None, shape):
                raise ValueError(f"{t} {list(_shape_of(m, t))} does not fit normalized_shape={shape}")
    if isinstance(m, nn.Flatten) and (m.start_dim < 0) == (m.end_dim < 0) and m.start_dim > m.end_dim:
        raise ValueError(f"start_dim={m.start_dim} comes after end_dim={m.end_dim}")
    if isinstance(m, nn.GroupNorm) and m.num_channels % m.num_groups:
        raise ValueError(f"num_groups={m.num_groups} must divide num_channels={m.num_channels}")


def check_state(m: nn.Module, field: str) -> None:
    """Check the fields a module rebuilt from a file's "state" holds: every name in its class's `__constants__`
    present (what torch's modules and the zoo's read in forward); by name (kernel_size, stride, padding, dilation,
    groups, channel and feature counts, flags, eps, momentum, p, dims, padding_mode, ...: torch's meanings); for
    convolutions, pools, Linear, Flatten and the norms, against each other and their tensors; no null child in a
    container or a zoo model; no pool returning indices.  So a file with a bad field is refused on load instead of
    failing at forward.  raises ValueError naming the field."""
    cls = type(m)
    missing = [c for c in getattr(cls, "__constants__", ()) if c not in m.__dict__ and not hasattr(cls, c)]
    if missing:
        raise ValueError(f"{field}.state misses {missing}, which a {cls.__name__} needs")
    for name, v in m.__dict__.items():
        if name in _MODULE_BASE:
            continue
        if _field_ok(name, v, m) is False:
            raise ValueError(f"{field}.state.{name} has a value a {cls.__name__} cannot use: {short(v)}")
    if getattr(m, "return_indices", False):
        raise ValueError(f"{field}.state.return_indices is true: a pool returning indices feeds no module a file can "
                         f"rebuild (pass model= to load such a model)")
    if (isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) or cls in MODULE_TYPES.values()) and \
            any(c is None for c in m._modules.values()):
        raise ValueError(f"{field}.children: a {cls.__name__} cannot hold an empty (null) child")
    try:
        if isinstance(m, nn.modules.conv._ConvNd):
            _check_conv(m)
        elif isinstance(m, (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd)):
            _check_pool(m)
        _check_shapes(m)
    except AttributeError as e:
        raise ValueError(f"{field}: a {type(m).__name__} misses a field ({e})") from None
    except ValueError as e:
        raise ValueError(f"{field} ({type(m).__name__}): {e}") from None


# ---------------------------------------------------------------- load: nodes -> modules

class TreeError(ValueError):
    """A node cannot be rebuilt; the message is complete (`load` adds which file)."""


def _is_int(v: Any, lo: int = 0, hi: int | None = None) -> bool:
    return type(v) is int and v >= lo and (hi is None or v <= hi)


def is_name(v: Any) -> bool:
    """A valid attribute name of a module (no '.', not empty)."""
    return isinstance(v, str) and v != "" and "." not in v


def check_nodes(nodes: Any, n_tensors: int) -> list[dict]:
    """Structural checks of "modules": node fields, child references to earlier nodes, tensor indices."""
    if not isinstance(nodes, list) or not nodes:
        raise TreeError(f"field 'modules' must be a non-empty list of module nodes, got {short(nodes)}; "
                        f"pass model= to fill an existing model")
    for i, node in enumerate(nodes):
        f = f"field 'modules[{i}]'"
        if not isinstance(node, dict) or not isinstance(node.get("type"), str):
            raise TreeError(f"{f} must be an object with a string 'type', got {short(node)}")
        if not isinstance(node.get("training", True), bool):
            raise TreeError(f"{f}.training must be true or false, got {short(node['training'])}")
        for key, limit in (("children", i), ("params", n_tensors), ("buffers", n_tensors)):
            items = node.get(key, [])
            ok = isinstance(items, list) and all(
                isinstance(it, list) and len(it) == 2 and is_name(it[0]) and (it[1] is None or _is_int(it[1], 0, limit - 1))
                for it in items)
            if not ok:
                what = "earlier node indices" if key == "children" else f"tensor indices below {n_tensors}"
                raise TreeError(f"{f}.{key} must be a list of [name, index or null] with {what}, got {short(items)}")
        for key in ("state", "config"):
            if not isinstance(node.get(key, {}), dict):
                raise TreeError(f"{f}.{key} must be an object, got {short(node[key])}")
        np_ = node.get("nonpersistent", [])
        if not isinstance(np_, list) or not all(is_name(b) for b in np_):
            raise TreeError(f"{f}.nonpersistent must be a list of buffer names, got {short(np_)}")
    return nodes


def node_paths(nodes: list[dict]) -> list[str]:
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


def _check_types(nodes: list[dict], paths: list[str], allowed_type) -> None:
    """Every node's type allowed and no unstorable attribute, else a TreeError saying to pass model=."""
    for node, path in zip(nodes, paths):
        label = f"module {path!r}" if path else "the root module"
        if not allowed_type(node["type"]):
            raise TreeError(f"{label} has type {short(node['type'], 120)}, which is not on vqlab's allow-list of "
                            f"module types (see vqlab.architecture), so the architecture cannot be rebuilt from the "
                            f"file; build the model yourself and pass it: load(path, model=m)")
        bad = node.get("unstorable")
        if bad:
            raise TreeError(f"{label} ({node['type']}) had attribute(s) {short(bad, 120)} that a vqlab file cannot "
                            f"store; build the model yourself and pass it: load(path, model=m)")
        if _by_config(node["type"]) and "state" in node:
            raise TreeError(f"{label} ({node['type']}) is rebuilt from its config; a state field is not allowed")


def build_by_state(cls: type, node: dict, field: str, decode=decode_value) -> nn.Module:
    """Create `cls` without __init__ and set its plain attributes from the file (no code runs)."""
    m = cls.__new__(cls)
    nn.Module.__init__(m)
    for k, v in node.get("state", {}).items():
        if not attr_ok(cls, k):
            raise ValueError(f"{field}.state may not set attribute {short(k)} on {cls.__name__}")
        m.__dict__[k] = decode(v, f"{field}.state.{k}")
    return m


def _build_by_config(name: str, node: dict, children: dict[str, nn.Module | None], field: str) -> nn.Module:
    """A vqlab layer, codebook or code from its constructor arguments, built on the meta device (no memory)."""
    config = {k: _plain_json(v, f"{field}.config.{k}") for k, v in node.get("config", {}).items()}
    if not all(isinstance(k, str) and k.isidentifier() for k in config):
        raise ValueError(f"{field}.config has a key that is not a name: {short(list(config))}")
    with torch.device("meta"):
        if name in _LAYERS:
            if set(children) != {"code"} or not isinstance(children["code"], WeightCode):
                raise ValueError(f"{field}: a quantized layer needs exactly one child 'code', a weight code, got "
                                 f"{short(sorted(children))}")
            m = _LAYERS[name](**config, code=children["code"])
        elif name == "vqlab:codebook":
            if children:
                raise ValueError(f"{field}: a codebook has no children, got {short(sorted(children))}")
            dtype = float_dtype(config.pop("dtype", "float32"), f"{field}.config.dtype")
            m = Codebook(**config, dtype=dtype)
        else:
            m = CODES[name.removeprefix("code:")].from_config(**config)
            for child, sub in children.items():
                if child not in m._modules:
                    raise ValueError(f"{field}: a {name} code has no child {child!r} (it has {sorted(m._modules)})")
                m._modules[child] = sub
    return m


def _check_slots(name: str, node: dict, field: str) -> None:
    """A by-state torch or model-zoo module names (at least, each once) the parameter, buffer and child slots its
    class's forward reads (`_SLOTS`): a renamed slot would load and then fail in forward."""
    if name in _UNCHECKED_SLOTS or not (name.startswith("torch.nn.") or name in _SLOTS):
        return
    params, buffers, _, children = _SLOTS.get(name, ((), (), (), ()))
    for key, want in (("params", params), ("buffers", buffers), ("children", children)):
        got = [n for n, _ in node.get(key, [])]
        if not set(want) <= set(got) or len(got) != len(set(got)):
            raise ValueError(f"{field}.{key} names {got}, but a {name} has {list(want)} (each once)")
    if any(c is None for n, c in node.get("children", []) if n in children):
        raise ValueError(f"{field}.children: a {name} needs its child modules {list(children)}, got "
                         f"{node['children']}")


def _attach_tensors(m: nn.Module, node: dict, entries: list[Entry], holders: dict[int, torch.Tensor],
                    field: str, by_config: bool) -> None:
    """Put a shared meta placeholder for every recorded tensor slot (one per tensor index).  A module built from
    its config only takes slots it has, with the shape (integers: the dtype) its config implies; a torch module
    built from its state only the slots its class has (`_check_slots`)."""
    if not by_config:
        _check_slots(node["type"], node, field)
    for key, kind, slots in (("params", "param", m._parameters), ("buffers", "buffer", m._buffers)):
        for name, ti in node.get(key, []):
            if by_config and name not in slots:
                raise ValueError(f"{field}.{key} names {name!r}, which a {type(m).__name__} does not have "
                                 f"(it has {sorted(slots)})")
            if ti is None:
                slots[name] = None
                continue
            e = entries[ti]
            if e.kind != kind:
                raise ValueError(f"{field}.{key} {name!r} refers to tensors[{ti}], a {e.kind}")
            made = slots.get(name)
            if by_config and made is None:
                raise ValueError(f"{field}.{key} gives {name!r} a tensor, but its config makes it None")
            if by_config and made is not None and (tuple(made.shape) != e.shape or (
                    made.dtype != e.dtype and not (made.is_floating_point() and e.dtype.is_floating_point))):
                raise ValueError(f"{field}.{key} {name!r} is {list(e.shape)} {e.dtype} in the file, but its config "
                                 f"gives {list(made.shape)} {made.dtype}")
            if ti not in holders:
                t = torch.empty(e.shape, dtype=e.dtype, device="meta")
                holders[ti] = nn.Parameter(t, requires_grad=e.requires_grad) if kind == "param" else t
            slots[name] = holders[ti]
    nonpersistent = set(node.get("nonpersistent", []))
    if not nonpersistent <= set(m._buffers):
        raise ValueError(f"{field}.nonpersistent names unknown buffers {sorted(nonpersistent - set(m._buffers))}")
    m._non_persistent_buffers_set = nonpersistent


def _check_parts(name: str, children: dict, field: str) -> None:
    """Codes are held only by quantized layers, codebooks only by codes: neither has a forward of its own, so a
    file that hangs one into a Sequential would load and then fail in forward."""
    for cname, c in children.items():
        if isinstance(c, WeightCode) and name not in _LAYERS:
            raise ValueError(f"{field}.children {cname!r} is a code ({type(c).__name__}), which only a quantized "
                             f"layer may hold, not a {name}")
        if isinstance(c, Codebook) and not name.startswith("code:"):
            raise ValueError(f"{field}.children {cname!r} is a codebook, which only a code may hold, not a {name}")


def build_model(nodes: Any, entries: list[Entry], *, allowed_type=allowed, resolve=resolve_type,
                decode=decode_value) -> nn.Module:
    """Rebuild the architecture from checked nodes with meta-device tensors (filled by `vqlab.io`).  raises
    TreeError naming the node, the module's path and the bad field.  allowed_type / resolve / decode: how type
    names are checked and resolved (`vqlab.legacy` passes its own for old files)."""
    nodes = check_nodes(nodes, len(entries))
    paths = node_paths(nodes)
    _check_types(nodes, paths, allowed_type)
    built: list[nn.Module] = []
    holders: dict[int, torch.Tensor] = {}
    for i, node in enumerate(nodes):
        field, name = f"modules[{i}]", node["type"]
        try:
            children = {cname: None if c is None else built[c] for cname, c in node.get("children", [])}
            _check_parts(name, children, field)
            by_config = _by_config(name)
            if by_config:
                m = _build_by_config(name, node, children, field)
            else:
                m = build_by_state(resolve(name), node, field, decode)
                for cname, c in children.items():
                    m._modules[cname] = c
            _attach_tensors(m, node, entries, holders, field, by_config)
            if not by_config:
                check_state(m, field)
            m.training = node.get("training", True)
        except ImportError as e:
            raise TreeError(f"module {paths[i]!r} needs {name}, which cannot be imported ({e}); install it or pass "
                            f"model=") from None
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError, OverflowError,
                NotImplementedError) as e:
            raise TreeError(f"field '{field}' (module {paths[i]!r}, {name}): {e}") from None
        built.append(m)
    return built[-1]
