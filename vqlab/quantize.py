"""The driver: `quantize_(model, config, filter_fn, overrides)` swaps a model's nn.Linear / nn.Conv2d layers for
quantized ones in place, for any registered method; `quantize_layer(module, config)` quantizes one layer.

Design after torchao's `quantize_`: a method is a config plus a handler registered for its type
(`vqlab.config`); this module imports no method.  Which layers are quantized is decided here, by the arguments:
`filter_fn` (default `keep_first_last`: every Linear/Conv2d but the model's first Conv2d and last Linear) and
`overrides`, a name-pattern map to per-layer configs (or None: keep float).  `quantize_` walks the model, decides
per layer, checks every chosen layer before changing anything, runs the handlers, swaps the new modules in, and
returns a report DataFrame.
"""
from __future__ import annotations

import fnmatch
import re
from typing import Callable

import pandas as pd
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import distributed as _dist
from .config import HANDLERS, handler_for, method_name
from .layers import QuantizedLayer

__all__ = ["quantize_", "quantize_layer", "set_submodule", "keep_first_last", "all_layers", "UNSUPPORTED_LAYERS"]


def all_layers(module: nn.Module, name: str) -> bool:
    """A filter_fn that accepts every nn.Linear / nn.Conv2d (the first conv and the last linear too)."""
    return True


def _ends(walk: list[tuple[str, nn.Module]], first_name: dict[int, str]) -> dict[str, str]:
    """{name: "first conv" | "last linear"} of a walked model (module registration order)."""
    first_conv = next((first_name[id(m)] for _, m in walk if isinstance(m, nn.Conv2d)), None)
    last_linear = next((first_name[id(m)] for _, m in reversed(walk) if isinstance(m, nn.Linear)), None)
    return {n: what for n, what in ((first_conv, "first conv"), (last_linear, "last linear")) if n is not None}


def keep_first_last(model: nn.Module) -> Callable[[nn.Module, str], bool]:
    """The default targeting as a filter_fn of `model`: False for its first nn.Conv2d and its last nn.Linear
    (module registration order; a module under several names counts under all of them), True otherwise.
    `quantize_` applies it when filter_fn is None (reporting those layers as "float (first conv)" /
    "float (last linear)"); pass it to combine with a filter of your own."""
    walk = _walk(model)
    first_name = {}
    for name, m in walk:
        first_name.setdefault(id(m), name)
    ends = {id(dict(walk)[n]) for n in _ends(walk, first_name)}
    return lambda module, name: id(module) not in ends


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the dotted `name` of `model` ("features.3"), replacing what was there."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def quantize_layer(module: nn.Module, config, name: str = "layer") -> nn.Module:
    """The quantized layer `config` makes of one float nn.Linear / nn.Conv2d (which is left unchanged): the
    checks `quantize_` makes (an initialised layer, `config.check`), then the method's handler.  `name` is how
    errors name the layer."""
    handler = handler_for(config)
    _check_initialized(module, name)
    check = getattr(config, "check", None)
    if check is not None:
        check(module, name)
    ((_, new),) = list(handler([(name, module)], config))
    return new


# ---------------------------------------------------------------- quantize_

# weight-bearing compute layers the quantized layers do not stand for: reported as skipped, never changed
UNSUPPORTED_LAYERS = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                      nn.Embedding, nn.EmbeddingBag, nn.Bilinear)

# hook dicts moved to the new layer (the same dict objects, so the user's handles still remove them)
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_pre_hooks",
               "_backward_hooks")


def _matches(pattern, name: str) -> bool:
    if isinstance(pattern, re.Pattern):
        return pattern.fullmatch(name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _is_uninitialized(m: nn.Module) -> bool:
    """A lazy module (LazyLinear, LazyConv2d, ...) whose parameters have no shape yet."""
    return isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params()


def _check_overrides(overrides: dict) -> None:
    for pat, cfg in overrides.items():
        if not isinstance(pat, (str, re.Pattern)):
            raise TypeError(f"override pattern must be a glob string or a compiled regex, got {pat!r}")
        if cfg is not None and type(cfg) not in HANDLERS:
            raise TypeError(f"override {pat!r}: value must be a config or None, got {cfg!r}")


def _walk(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every (name, module) of `model` in registration order, a module reachable under several names once
    per name (named_modules(remove_duplicate=False)); nothing inside a quantized layer."""
    inside_vq: set[str] = set()
    out = []
    for name, m in model.named_modules(remove_duplicate=False):
        if any(name.startswith(p + ".") for p in inside_vq):
            continue
        if isinstance(m, QuantizedLayer):
            inside_vq.add(name)
        out.append((name, m))
    return out


def _param_places(model: nn.Module) -> dict[int, list[tuple[int, str]]]:
    """id(parameter) -> [(id(owning module), "module.param"), ...] over every name of every module."""
    places: dict[int, list[tuple[int, str]]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        for pname, p in m.named_parameters(recurse=False):
            places.setdefault(id(p), []).append((id(m), f"{name}.{pname}" if name else pname))
    return places


def _check_not_tied(m: nn.Module, name: str, places: dict[int, list[tuple[int, str]]]) -> None:
    """Refuse a layer whose weight or bias is also a parameter of another module (tied weights)."""
    for pname in ("weight", "bias"):
        p = getattr(m, pname, None)
        if p is None:
            continue
        others = sorted({where for mid, where in places.get(id(p), []) if mid != id(m)})
        if others:
            raise ValueError(f"layer {name!r} ({type(m).__name__}): its {pname} {name + '.' + pname!r} is the same "
                             f"Parameter as {', '.join(map(repr, others))} (tied weights); vector quantization "
                             f"would untie them.  Keep the layer float with overrides={{{name!r}: None}}")


def _check_initialized(m: nn.Module, name: str) -> None:
    """A chosen layer must have weights with values: not a lazy module before its first forward, not on the meta
    device (every method reads the values)."""
    if _is_uninitialized(m):
        raise ValueError(f"layer {name!r} ({type(m).__name__}) has uninitialized parameters (a lazy module); "
                         f"run one forward pass, e.g. model(example_input), before quantize_, or keep it "
                         f"float with overrides={{{name!r}: None}}")
    if any(t.is_meta for t in (getattr(m, "weight", None), getattr(m, "bias", None)) if isinstance(t, torch.Tensor)):
        raise ValueError(f"layer {name!r} ({type(m).__name__}) is on the meta device: its weight has no values to "
                         f"quantize; materialise the model first (model.to_empty(device='cpu') and load its "
                         f"weights)")


def _carry_over(old: nn.Module, new: nn.Module) -> None:
    """Give the new layer the old one's train/eval mode and its forward/backward hooks."""
    new.train(old.training)
    for attr in _HOOK_DICTS:
        if hasattr(old, attr):
            setattr(new, attr, getattr(old, attr))
    new._is_full_backward_hook = getattr(old, "_is_full_backward_hook", None)


def _weight_numbers(old: nn.Module) -> tuple[tuple | None, float, object]:
    """(weight shape, bits per stored weight, weight + bias numbers) of a float layer; None/NA if lazy."""
    w, b = old.weight, getattr(old, "bias", None)
    bits = float(w.dtype.itemsize * 8)
    if _is_uninitialized(old):
        return None, bits, pd.NA
    return tuple(w.shape), bits, w.numel() + (b.numel() if isinstance(b, torch.Tensor) else 0)


def _row(name: str, old: nn.Module, new: nn.Module | None, status: str, counted: set) -> dict:
    shape, bits, before = _weight_numbers(old)
    row = {"layer": name, "type": type(old).__name__, "shape": shape, "method": "float", "setting": "",
           "K": pd.NA, "d": pd.NA,
           "bits_per_weight": bits, "weight_mse": 0.0, "params_before": before, "params_after": before,
           "status": status}
    if isinstance(new, QuantizedLayer):       # ask the layer's code object, whatever the method
        skip = {id(getattr(new.code, n)) for n in new.code.training_only if getattr(new.code, n, None) is not None}
        stored = [t for t in list(new.code.parameters()) + list(new.code.buffers())
                  if id(t) not in counted and id(t) not in skip]
        counted.update(id(t) for t in stored)  # a shared codebook is counted at the first layer that uses it
        after = sum(t.numel() for t in stored) + (new.bias.numel() if new.bias is not None else 0)
        with torch.no_grad():
            mse = (old.weight.detach().double() - new.dequantize().double()).pow(2).mean().item()
        info = new.code.describe()
        row.update(method=info["method"], setting=info.get("setting", ""),
                   K=info["K"] if info["K"] is not None else pd.NA,
                   d=info["d"] if info["d"] is not None else pd.NA, bits_per_weight=new.bits_per_weight,
                   weight_mse=mse, params_after=after)
    return row


def _alias_row(row: dict, name: str) -> dict:
    """The report row of a further name of a module already reported under row["layer"]."""
    return {**row, "layer": name, "params_before": 0, "params_after": 0,
            "status": f"same module as {row['layer']!r}"}


def _decide(name: str, m: nn.Module, aliases: list[str], config, filter_fn, overrides: dict,
            hits: dict, ends: dict) -> tuple[object | None, str] | None:
    """(config or None, report status) for one module, or None when it gets no report row."""
    pat = next((p for p in overrides if any(_matches(p, n) for n in aliases)), None)
    eligible = isinstance(m, (nn.Linear, nn.Conv2d))
    if pat is not None:
        cfg = overrides[pat]
        if cfg is not None and not eligible:
            if isinstance(m, QuantizedLayer):
                raise TypeError(f"override {pat!r} asks to quantize layer {name!r}, which is already a "
                                f"{type(m).__name__}")
            if any(True for _ in m.parameters(recurse=False)):
                raise TypeError(f"override {pat!r} asks to quantize layer {name!r} ({type(m).__name__}); "
                                f"vector quantization supports nn.Linear and nn.Conv2d — narrow the "
                                f"pattern or map it to None")
            return None  # containers and parameter-free modules (ReLU, Sequential) are not layers
        hits[pat].append(name)
        if eligible or isinstance(m, UNSUPPORTED_LAYERS):
            return (cfg, f"{_status(cfg)} (override)") if cfg is not None else (None, "skipped (override)")
        return None
    if isinstance(m, UNSUPPORTED_LAYERS):
        return None, f"skipped ({type(m).__name__} not supported)"
    if not eligible:
        return None
    if filter_fn is not None:
        if not filter_fn(m, name):
            return None, "skipped (filter_fn)"
    elif name in ends:
        return None, f"float ({ends[name]})"
    return config, _status(config)


def _status(config) -> str:
    """The report status of a layer a config quantizes: the method's one name (`config.name`)."""
    return method_name(config)


def quantize_(model: nn.Module, config, filter_fn: Callable[[nn.Module, str], bool] | None = None,
              overrides: dict | None = None, *, progress: bool = True) -> pd.DataFrame:
    """Replace eligible nn.Linear / nn.Conv2d layers of `model` by quantized layers, in place.

    config: a registered config (VQConfig, UniformConfig, gong.PQConfig, ... or any config registered with
        register_handler).
    filter_fn(module, name) -> bool: quantize only the Linear/Conv2d layers it accepts.  None (the default)
        is `keep_first_last(model)`: the first nn.Conv2d and the last nn.Linear (module registration order) stay
        float, reported as "float (first conv)" / "float (last linear)"; `all_layers` quantizes them too.
    overrides: {pattern: config or None}; a pattern is a glob on the module name (fnmatch, e.g.
        "layers.*.conv1") or a compiled regex (full match); the first matching pattern decides that
        module: a config quantizes it with that config (whatever filter_fn says), None keeps it float.
        A pattern that matches nothing, or a config matched to a module with weights that is not
        Linear/Conv2d (BatchNorm, LayerNorm, ...), raises.
    Every chosen layer is checked before anything is changed, so a bad input leaves the model untouched.

    One module reachable under several names (`nn.Sequential(lin, act, lin)`) is one layer: it is
    decided under its first name (filter_fn gets that name; an override pattern may match any of its
    names; it is the last Linear if any of its names is), quantized once, and the one new layer is
    set under every name.  A layer whose weight or bias is a Parameter of another module too (tied
    weights) is refused, naming both places; keep it float with overrides={name: None}.  Lazy layers
    (LazyLinear) must have run a forward pass first.  A new layer takes over the old one's train/eval
    mode and its forward and backward hooks (the same hook dicts, so existing handles still work).

    returns: one row per name of every Linear/Conv2d layer and of every weight-bearing layer the quantized
        layers do not stand for (UNSUPPORTED_LAYERS: Conv1d/3d, ConvTranspose*, Embedding(Bag), Bilinear;
        normalisation layers are not listed): layer, type, shape, method, setting, K, d, bits_per_weight,
        weight_mse, params_before, params_after (stored numbers: indices + bias + codebook, a shared codebook
        at its first layer; training-only state not counted), status: the method's name (e.g. "vq"),
        "<name> (override)", float (first conv), float (last linear), skipped (override), skipped (filter_fn)
        or skipped (<Type> not supported).  A further name
        of a module reported above has status "same module as '<first name>'", the module's K, d,
        bits and weight_mse, and params_before = params_after = 0 (so the columns still sum to the
        model's numbers).  An unused lazy layer has shape None and params NA.
    """
    handler_for(config)                                       # TypeError for an unregistered config
    overrides = dict(overrides or {})
    _check_overrides(overrides)

    walk = _walk(model)
    names_of: dict[int, list[str]] = {}
    for name, m in walk:
        names_of.setdefault(id(m), []).append(name)
    first_name = {id(m): names_of[id(m)][0] for _, m in walk}
    layers = [n for n, m in walk if isinstance(m, (nn.Linear, nn.Conv2d)) and first_name[id(m)] == n]
    ends = _ends(walk, first_name)
    if "" in layers:
        raise ValueError(f"quantize_ replaces modules in place and cannot replace the model itself "
                         f"({type(model).__name__}); wrap it, e.g. nn.Sequential(model)")

    hits: dict = {p: [] for p in overrides}
    plan: list[tuple[str, nn.Module, object | None, str]] = []  # (first name, module, config, status)
    for name, m in walk:
        if first_name[id(m)] != name:
            continue
        decision = _decide(name, m, names_of[id(m)], config, filter_fn, overrides, hits, ends)
        if decision is not None:
            plan.append((name, m, *decision))
    for pat, names in hits.items():
        if not names:
            what = "module" if overrides[pat] is None else "module that can be quantized"
            raise ValueError(f"override pattern {pat!r} matches no {what}; Linear/Conv2d names look like {layers[:4]}")

    todo: dict = {}
    places = _param_places(model)
    for name, m, cfg, _ in plan:
        if cfg is not None:
            _check_initialized(m, name)
            _check_not_tied(m, name, places)
            check = getattr(cfg, "check", None)
            if check is not None:
                check(m, name)
            todo.setdefault(cfg, []).append((name, m))

    new: dict[str, nn.Module] = {}
    with tqdm(total=sum(len(v) for v in todo.values()), desc="quantize_", unit="layer",
              disable=not progress or not _dist.is_main(), leave=False) as bar:   # one bar under torchrun
        for cfg, mods in todo.items():
            for name, q in handler_for(cfg)(mods, cfg):
                new[name] = q
                bar.update(1)
    module_at = {name: m for name, m, _, _ in plan}
    for name, q in new.items():
        _carry_over(module_at[name], q)
        for alias in names_of[id(module_at[name])]:
            set_submodule(model, alias, q)
    return _report(plan, new, names_of, walk)


def _report(plan: list, new: dict[str, nn.Module], names_of: dict[int, list[str]],
            walk: list[tuple[str, nn.Module]]) -> pd.DataFrame:
    """The report DataFrame: the plan's rows, then a row per further name at that name's place."""
    counted: set = set()
    rows = {name: _row(name, m, new.get(name), status, counted) for name, m, _, status in plan}
    first = {id(m): name for name, m, _, _ in plan}
    ordered = []
    for name, m in walk:
        if id(m) not in first:
            continue
        ordered.append(rows[name] if first[id(m)] == name else _alias_row(rows[first[id(m)]], name))
    cols = ["layer", "type", "shape", "method", "setting", "K", "d", "bits_per_weight", "weight_mse",
            "params_before", "params_after", "status"]
    return pd.DataFrame(ordered, columns=cols).astype({"K": "Int64", "d": "Int64"})
