"""`quantize_(model, VQConfig(...))`: swap a model's nn.Linear / nn.Conv2d layers for VQ layers in place.

Design after torchao's `quantize_`: a method is a frozen dataclass config validated in `__post_init__`
plus a handler registered for its type with `@register_handler(ConfigClass)`.  `quantize_` walks the
model, decides per layer (overrides, filter_fn, first/last rule), checks every chosen layer before
changing anything, runs the handlers and swaps the new modules in, and returns a report DataFrame.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator

import pandas as pd
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ._utils import FLOAT_DTYPE_NAMES, index_bits_per_weight
from .codebook import Codebook
from .layers import FLOAT_DTYPES, check_prune, check_quantizable, fit_codebook, vq_layer_class, weight_segments
from .quantized import QuantizedLayer

__all__ = ["VQConfig", "quantize_", "register_handler", "HANDLERS", "UNSUPPORTED_LAYERS"]

# ---------------------------------------------------------------- config


def _int(name: str, v, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"VQConfig.{name} must be an integer >= {lo}, got {v!r}")


@dataclass(frozen=True)
class VQConfig:
    """Vector quantization of weights with k-means codebooks (one config = one method).

    Args:
        k: codewords per codebook K (>= 2); indices take ceil(log2 K) bits.
        d: segment length (weights per index); bits per weight = ceil(log2 K) / d.
        iters: k-means iterations.
        init: k-means initialisation, "kmeans++" or "random".
        batch_size: None for Lloyd k-means on all segments, an int for mini-batch k-means.
        segment: conv row layout, "input" (runs of d input channels) or "kernel" (flattened kernel).
        codebook: "layer" (one per layer), "group" (`groups` per layer, over blocks of output
            channels), "shared" (one Codebook object fit on every layer this config quantizes), or a
            `vqlab.Codebook` object: every layer is assigned to it (no k-means) and holds that very object,
            shared with whatever else holds it (other layers, other models); k and d are taken from it.
        groups: codebooks per layer when codebook="group" (>= 2; must divide the output channels).
        reassign_every: re-fit assignments to the nearest codeword every N training steps (0 = never;
            keeps a float `latent` weight per layer during training, see vqlab.layers).
        pad: allow d not dividing the segmented dimension by zero-padding rows.
        seed: k-means seed.
        quantize_first_last: also quantize the first nn.Conv2d and the last nn.Linear.
        codebook_dtype: stored codebook dtype (torch dtype or name); None = the weight's dtype.
        distributed: under torchrun, every rank runs quantize_ on the same float model and each layer's
            k-means is spread over the ranks (each fits its rows [rank::world] of the segments,
            `kmeans(..., distributed=True)`); every rank ends with the same codebooks and indices.  Lloyd
            only (batch_size must be None).  In one process the same as False.
        prune: magnitude pruning, a fraction p in [0, 1) (0.0 = none, the default).  Before k-means, in every
            codebook group the floor(p * N_g + 1/2) segments of smallest L2 norm (N_g segments per group) are
            assigned to codeword 0, pinned to the zero vector; k-means fits codewords 1..K-1 on the other
            segments.  Codeword 0 stays exactly zero through `vqlab.fit` (float16 codebooks included) and
            re-assignment keeps the pruned segments on it and every other segment off it, so the sparsity
            pattern is fixed (vqlab.layers, "Magnitude pruning").  Needs K >= 3 and codebook "layer" or
            "group"; indices stay K-ary, so only their entropy (Huffman / ANS sizes) drops.

    Example:
        >>> report = quantize_(model, VQConfig(k=256, d=4), overrides={"classifier.1": VQConfig(k=16, d=2)})
        >>> quantize_(model, VQConfig(k=16, d=2, prune=0.5, reassign_every=20))   # half the segments zero
    """

    report_status: ClassVar[str] = "vq"

    k: int = 256
    d: int = 4
    iters: int = 25
    init: str = "kmeans++"
    batch_size: int | None = None
    segment: str = "input"
    codebook: str | Codebook = "layer"
    groups: int = 1
    reassign_every: int = 0
    pad: bool = False
    seed: int = 0
    quantize_first_last: bool = False
    codebook_dtype: torch.dtype | str | None = None
    distributed: bool = False
    prune: float = 0.0

    def __post_init__(self):
        _int("k", self.k, 2)
        _int("d", self.d, 1)
        _int("iters", self.iters, 1)
        _int("reassign_every", self.reassign_every, 0)
        _int("seed", self.seed, 0)
        if self.batch_size is not None:
            _int("batch_size", self.batch_size, 1)
        if self.init not in ("kmeans++", "random"):
            raise ValueError(f"VQConfig.init must be 'kmeans++' or 'random', got {self.init!r}")
        if self.segment not in ("input", "kernel"):
            raise ValueError(f"VQConfig.segment must be 'input' or 'kernel', got {self.segment!r}")
        if isinstance(self.codebook, Codebook):
            if self.groups != 1:
                raise ValueError(f"VQConfig.groups={self.groups} cannot be combined with a given Codebook object "
                                 f"(it has {self.codebook.groups} group(s) of its own)")
            object.__setattr__(self, "k", self.codebook.k)
            object.__setattr__(self, "d", self.codebook.d)
        elif self.codebook not in ("layer", "group", "shared"):
            raise ValueError(f"VQConfig.codebook must be 'layer', 'group', 'shared' or a vqlab.Codebook, got "
                             f"{self.codebook!r}")
        _int("groups", self.groups, 1)
        if self.codebook == "group" and self.groups < 2:
            raise ValueError(f"VQConfig.groups must be >= 2 with codebook='group', got groups={self.groups}")
        if self.codebook != "group" and self.groups != 1:
            raise ValueError(f"VQConfig.groups={self.groups} needs codebook='group' (got codebook={self.codebook!r})")
        for flag in ("pad", "quantize_first_last", "distributed"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"VQConfig.{flag} must be True or False, got {getattr(self, flag)!r}")
        if self.distributed and self.batch_size is not None:
            raise ValueError(f"VQConfig.distributed=True runs Lloyd k-means over the ranks; mini-batch k-means is "
                             f"single-process: set batch_size=None (got batch_size={self.batch_size})")
        dt = self.codebook_dtype
        if isinstance(dt, str):
            if dt.removeprefix("torch.") not in FLOAT_DTYPE_NAMES:
                raise ValueError(f"VQConfig.codebook_dtype {dt!r} is not a float dtype; use one of {sorted(FLOAT_DTYPE_NAMES)}")
            object.__setattr__(self, "codebook_dtype", FLOAT_DTYPE_NAMES[dt.removeprefix("torch.")])
        elif dt is not None and dt not in FLOAT_DTYPES:
            raise ValueError(f"VQConfig.codebook_dtype must be a float dtype {[str(t) for t in FLOAT_DTYPES]}, got {dt!r}")
        object.__setattr__(self, "prune", check_prune(self.prune, "VQConfig"))
        if self.prune:
            if self.k < 3:
                raise ValueError(f"VQConfig: prune={self.prune} pins codeword 0 to zero and needs K >= 3 (the zero "
                                 f"codeword and at least 2 learned ones), got k={self.k}")
            if not (self.codebook == "layer" or self.codebook == "group"):
                what = "a given Codebook object" if isinstance(self.codebook, Codebook) else "codebook='shared'"
                raise ValueError(f"VQConfig: prune={self.prune} pins codeword 0 of each layer's own codebook to zero "
                                 f"and cannot be combined with {what}; use codebook='layer' or 'group'")

    @property
    def bits_per_weight(self) -> float:
        """Index bits per weight, ceil(log2 K) / d (codebooks not included)."""
        return index_bits_per_weight(self.k, self.d)

    def check(self, module: nn.Module, name: str) -> None:
        """Raise a clear error if this config cannot quantize `module` (named `name`)."""
        given = isinstance(self.codebook, Codebook)
        check_quantizable(module, self.k, self.d, groups=self.codebook.groups if given else self.groups,
                          segment=self.segment, pad=self.pad, name=name, check_k=self.codebook == "layer" or
                          self.codebook == "group", prune=self.prune)


# ---------------------------------------------------------------- handler registry

Handler = Callable[[list[tuple[str, nn.Module]], object], Iterator[tuple[str, nn.Module]]]
HANDLERS: dict[type, Handler] = {}


def register_handler(config_cls: type) -> Callable[[Handler], Handler]:
    """Register `handler(modules, config)` for a config class.

    The handler gets every (name, module) the config was chosen for (in model order, so shared
    state such as one codebook can be fit on all of them) and yields (name, new_module) pairs.
    A config class may define `check(module, name)`; quantize_ calls it on every layer first.
    """
    def deco(fn: Handler) -> Handler:
        HANDLERS[config_cls] = fn
        return fn
    return deco


def _vq_kwargs(module: nn.Module, config: VQConfig) -> dict:
    kw = dict(pad=config.pad, reassign_every=config.reassign_every)
    if isinstance(module, nn.Conv2d):
        kw["segment"] = config.segment
    return kw


@register_handler(VQConfig)
def _vq_handler(modules: list[tuple[str, nn.Module]], config: VQConfig) -> Iterator[tuple[str, nn.Module]]:
    shared = config.codebook if isinstance(config.codebook, Codebook) else None
    if config.codebook == "shared":
        segs = [weight_segments(m, config.d, segment=config.segment, pad=config.pad) for _, m in modules]
        total = sum(len(s) for s in segs)
        if config.k > total:
            names = [n for n, _ in modules]
            raise ValueError(f"shared codebook for layers {names}: K={config.k} is larger than their "
                             f"{total} segments (d={config.d}); use K <= {total}")
        dtype = config.codebook_dtype or modules[0][1].weight.dtype
        book, _ = fit_codebook(torch.cat([s.to(segs[0].device) for s in segs])[None], config.k,
                               iters=config.iters, init=config.init, batch_size=config.batch_size,
                               seed=config.seed, dtype=dtype, distributed=config.distributed)
        shared = Codebook.from_tensor(book)
    for name, m in modules:
        cls = vq_layer_class(m)
        if shared is not None:
            yield name, cls.from_float(m, codebook=shared, name=name, **_vq_kwargs(m, config))
        else:
            yield name, cls.from_float(m, config.k, config.d, groups=config.groups, iters=config.iters,
                                       init=config.init, batch_size=config.batch_size, seed=config.seed,
                                       codebook_dtype=config.codebook_dtype, name=name,
                                       distributed=config.distributed, prune=config.prune,
                                       **_vq_kwargs(m, config))


# ---------------------------------------------------------------- quantize_

# weight-bearing compute layers that VQ does not handle: reported as skipped, never changed
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


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


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
    per name (named_modules(remove_duplicate=False)); nothing inside a VQ layer."""
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
    if _is_uninitialized(m):
        raise ValueError(f"layer {name!r} ({type(m).__name__}) has uninitialized parameters (a lazy module); "
                         f"run one forward pass, e.g. model(example_input), before quantize_, or keep it "
                         f"float with overrides={{{name!r}: None}}")


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
    row = {"layer": name, "type": type(old).__name__, "shape": shape, "method": "float", "K": pd.NA, "d": pd.NA,
           "bits_per_weight": bits, "weight_mse": 0.0, "params_before": before, "params_after": before,
           "status": status}
    if isinstance(new, QuantizedLayer):       # ask the layer's code object, whatever the method
        stored = [t for t in list(new.code.parameters()) + list(new.code.buffers()) if id(t) not in counted]
        counted.update(id(t) for t in stored)  # a shared codebook is counted at the first layer that uses it
        after = sum(t.numel() for t in stored) + (new.bias.numel() if new.bias is not None else 0)
        with torch.no_grad():
            mse = (old.weight.detach().double() - new.dequantize().double()).pow(2).mean().item()
        info = new.code.describe()
        row.update(method=info["method"], K=info["K"] if info["K"] is not None else pd.NA,
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
    if filter_fn is not None and not filter_fn(m, name):
        return None, "skipped (filter_fn)"
    if name in ends and not getattr(config, "quantize_first_last", False):
        return None, f"float ({ends[name]})"
    return config, _status(config)


def _status(config) -> str:
    """The report status of a layer a config quantizes: "vq" for VQConfig, else the config's
    `report_status` or "quantized"."""
    return getattr(config, "report_status", "quantized")


def quantize_(model: nn.Module, config, filter_fn: Callable[[nn.Module, str], bool] | None = None,
              overrides: dict | None = None, *, progress: bool = True) -> pd.DataFrame:
    """Replace eligible nn.Linear / nn.Conv2d layers of `model` by VQ layers, in place.

    config: a registered config (VQConfig, UniformConfig, or any config registered with register_handler).
    filter_fn(module, name) -> bool: quantize only the Linear/Conv2d layers it accepts.
    overrides: {pattern: config or None}; a pattern is a glob on the module name (fnmatch, e.g.
        "layers.*.conv1") or a compiled regex (full match); the first matching pattern decides that
        module: a config quantizes it with that config (also the first/last layer), None keeps it float.
        A pattern that matches nothing, or a config matched to a module with weights that is not
        Linear/Conv2d (BatchNorm, LayerNorm, ...), raises.
    The first nn.Conv2d and the last nn.Linear (module registration order) stay float unless
    config.quantize_first_last.  Every chosen layer is checked before anything is changed, so a
    bad input leaves the model untouched.

    One module reachable under several names (`nn.Sequential(lin, act, lin)`) is one layer: it is
    decided under its first name (filter_fn gets that name; an override pattern may match any of its
    names; it is the last Linear if any of its names is), quantized once, and the one new VQ layer is
    set under every name.  A layer whose weight or bias is a Parameter of another module too (tied
    weights) is refused, naming both places; keep it float with overrides={name: None}.  Lazy layers
    (LazyLinear) must have run a forward pass first.  A new layer takes over the old one's train/eval
    mode and its forward and backward hooks (the same hook dicts, so existing handles still work).

    returns: one row per name of every Linear/Conv2d layer and of every weight-bearing layer VQ does
        not handle (UNSUPPORTED_LAYERS: Conv1d/3d, ConvTranspose*, Embedding(Bag), Bilinear;
        normalisation layers are not listed): layer, type, shape, K, d, bits_per_weight, weight_mse,
        params_before, params_after (stored numbers: indices + bias + codebook, a shared codebook
        at its first layer), status: vq, vq (override), float (first conv), float (last linear),
        skipped (override), skipped (filter_fn) or skipped (<Type> not supported).  A further name
        of a module reported above has status "same module as '<first name>'", the module's K, d,
        bits and weight_mse, and params_before = params_after = 0 (so the columns still sum to the
        model's numbers).  An unused lazy layer has shape None and params NA.
    """
    if type(config) not in HANDLERS:
        raise TypeError(f"config must be one of {[c.__name__ for c in HANDLERS]}, got {type(config).__name__}")
    overrides = dict(overrides or {})
    _check_overrides(overrides)

    walk = _walk(model)
    names_of: dict[int, list[str]] = {}
    for name, m in walk:
        names_of.setdefault(id(m), []).append(name)
    first_name = {id(m): names_of[id(m)][0] for _, m in walk}
    layers = [n for n, m in walk if isinstance(m, (nn.Linear, nn.Conv2d)) and first_name[id(m)] == n]
    first_conv = next((first_name[id(m)] for _, m in walk if isinstance(m, nn.Conv2d)), None)
    last_linear = next((first_name[id(m)] for _, m in reversed(walk) if isinstance(m, nn.Linear)), None)
    ends = {n: what for n, what in ((first_conv, "first conv"), (last_linear, "last linear")) if n is not None}
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

    from . import distributed as _dist

    new: dict[str, nn.Module] = {}
    with tqdm(total=sum(len(v) for v in todo.values()), desc="quantize_", unit="layer",
              disable=not progress or not _dist.is_main(), leave=False) as bar:   # one bar under torchrun
        for cfg, mods in todo.items():
            for name, q in HANDLERS[type(cfg)](mods, cfg):
                new[name] = q
                bar.update(1)
    module_at = {name: m for name, m, _, _ in plan}
    for name, q in new.items():
        _carry_over(module_at[name], q)
        for alias in names_of[id(module_at[name])]:
            _set_module(model, alias, q)
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
    cols = ["layer", "type", "shape", "method", "K", "d", "bits_per_weight", "weight_mse", "params_before",
            "params_after", "status"]
    return pd.DataFrame(ordered, columns=cols).astype({"K": "Int64", "d": "Int64"})
