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
from typing import Callable, Iterator

import pandas as pd
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ._utils import bits_for
from .codebook import Codebook
from .layers import FLOAT_DTYPES, VQLayer, check_quantizable, fit_codebook, vq_layer_class, weight_segments

__all__ = ["VQConfig", "quantize_", "register_handler", "HANDLERS"]

# ---------------------------------------------------------------- config

_DTYPE_NAMES = {"float16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
                "float32": torch.float32, "float": torch.float32, "float64": torch.float64, "double": torch.float64}


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
            channels) or "shared" (one Codebook object for every layer this config quantizes).
        groups: codebooks per layer when codebook="group" (>= 2; must divide the output channels).
        reassign_every: re-fit assignments to the nearest codeword every N training steps (0 = never;
            keeps a float `latent` weight per layer during training, see vqlab.layers).
        pad: allow d not dividing the segmented dimension by zero-padding rows.
        seed: k-means seed.
        quantize_first_last: also quantize the first nn.Conv2d and the last nn.Linear.
        codebook_dtype: stored codebook dtype (torch dtype or name); None = the weight's dtype.

    Example:
        >>> report = quantize_(model, VQConfig(k=256, d=4), overrides={"classifier.1": VQConfig(k=16, d=2)})
    """

    k: int = 256
    d: int = 4
    iters: int = 25
    init: str = "kmeans++"
    batch_size: int | None = None
    segment: str = "input"
    codebook: str = "layer"
    groups: int = 1
    reassign_every: int = 0
    pad: bool = False
    seed: int = 0
    quantize_first_last: bool = False
    codebook_dtype: torch.dtype | str | None = None

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
        if self.codebook not in ("layer", "group", "shared"):
            raise ValueError(f"VQConfig.codebook must be 'layer', 'group' or 'shared', got {self.codebook!r}")
        _int("groups", self.groups, 1)
        if self.codebook == "group" and self.groups < 2:
            raise ValueError(f"VQConfig.groups must be >= 2 with codebook='group', got groups={self.groups}")
        if self.codebook != "group" and self.groups != 1:
            raise ValueError(f"VQConfig.groups={self.groups} needs codebook='group' (got codebook={self.codebook!r})")
        for flag in ("pad", "quantize_first_last"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"VQConfig.{flag} must be True or False, got {getattr(self, flag)!r}")
        dt = self.codebook_dtype
        if isinstance(dt, str):
            if dt.removeprefix("torch.") not in _DTYPE_NAMES:
                raise ValueError(f"VQConfig.codebook_dtype {dt!r} is not a float dtype; use one of {sorted(_DTYPE_NAMES)}")
            object.__setattr__(self, "codebook_dtype", _DTYPE_NAMES[dt.removeprefix("torch.")])
        elif dt is not None and dt not in FLOAT_DTYPES:
            raise ValueError(f"VQConfig.codebook_dtype must be a float dtype {[str(t) for t in FLOAT_DTYPES]}, got {dt!r}")

    @property
    def bits_per_weight(self) -> float:
        """Index bits per weight, ceil(log2 K) / d (codebooks not included)."""
        return bits_for(self.k) / self.d

    def check(self, module: nn.Module, name: str) -> None:
        """Raise a clear error if this config cannot quantize `module` (named `name`)."""
        check_quantizable(module, self.k, self.d, groups=self.groups, segment=self.segment, pad=self.pad,
                          name=name, check_k=self.codebook != "shared")


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
    shared = None
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
                               seed=config.seed, dtype=dtype)
        shared = Codebook.from_tensor(book)
    for name, m in modules:
        cls = vq_layer_class(m)
        if shared is not None:
            yield name, cls.from_float(m, codebook=shared, name=name, **_vq_kwargs(m, config))
        else:
            yield name, cls.from_float(m, config.k, config.d, groups=config.groups, iters=config.iters,
                                       init=config.init, batch_size=config.batch_size, seed=config.seed,
                                       codebook_dtype=config.codebook_dtype, name=name, **_vq_kwargs(m, config))


# ---------------------------------------------------------------- quantize_

def _matches(pattern, name: str) -> bool:
    if isinstance(pattern, re.Pattern):
        return pattern.fullmatch(name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _row(name: str, old: nn.Module, new: nn.Module | None, status: str, counted: set) -> dict:
    w = old.weight
    before = w.numel() + (old.bias.numel() if old.bias is not None else 0)
    row = {"layer": name, "type": type(old).__name__, "shape": tuple(w.shape), "K": pd.NA, "d": pd.NA,
           "bits_per_weight": float(torch.finfo(w.dtype).bits), "weight_mse": 0.0,
           "params_before": before, "params_after": before, "status": status}
    if new is not None and isinstance(new, VQLayer):
        book = new.codebook.weight
        after = new.indices.numel() + (new.bias.numel() if new.bias is not None else 0)
        if id(book) not in counted:  # a shared codebook is counted at the first layer that uses it
            counted.add(id(book))
            after += book.numel()
        with torch.no_grad():
            mse = (w.detach().double() - new.dequantize().double()).pow(2).mean().item()
        row.update(K=new.k, d=new.d, bits_per_weight=new.bits_per_weight, weight_mse=mse, params_after=after)
    return row


def quantize_(model: nn.Module, config, filter_fn: Callable[[nn.Module, str], bool] | None = None,
              overrides: dict | None = None, *, progress: bool = True) -> pd.DataFrame:
    """Replace eligible nn.Linear / nn.Conv2d layers of `model` by VQ layers, in place.

    config: a registered config (VQConfig, or a method's config from vqlab.methods).
    filter_fn(module, name) -> bool: quantize only the Linear/Conv2d layers it accepts.
    overrides: {pattern: config or None}; a pattern is a glob on the module name (fnmatch, e.g.
        "layers.*.conv1") or a compiled regex (full match); the first matching pattern decides that
        module: a config quantizes it with that config (also the first/last layer), None keeps it float.
        A pattern that matches nothing, or a config matched to a module with weights that is not
        Linear/Conv2d (BatchNorm, LayerNorm, ...), raises.
    The first nn.Conv2d and the last nn.Linear (module registration order) stay float unless
    config.quantize_first_last.  Every chosen layer is checked before anything is changed, so a
    bad input leaves the model untouched.
    returns: one row per Linear/Conv2d layer: layer, type, shape, K, d, bits_per_weight, weight_mse,
        params_before, params_after (stored numbers: indices + bias + codebook, a shared codebook
        at its first layer), status: vq, vq (override), float (first conv), float (last linear),
        skipped (override) or skipped (filter_fn).
    """
    if type(config) not in HANDLERS:
        raise TypeError(f"config must be one of {[c.__name__ for c in HANDLERS]}, got {type(config).__name__}")
    overrides = dict(overrides or {})
    for pat, cfg in overrides.items():
        if not isinstance(pat, (str, re.Pattern)):
            raise TypeError(f"override pattern must be a glob string or a compiled regex, got {pat!r}")
        if cfg is not None and type(cfg) not in HANDLERS:
            raise TypeError(f"override {pat!r}: value must be a config or None, got {cfg!r}")

    inside_vq = set()
    named = []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside_vq):
            continue
        if isinstance(m, VQLayer):
            inside_vq.add(name)
        named.append((name, m))
    layers = [n for n, m in named if isinstance(m, (nn.Linear, nn.Conv2d))]
    first_conv = next((n for n, m in named if isinstance(m, nn.Conv2d)), None)
    last_linear = next((n for n, m in reversed(named) if isinstance(m, nn.Linear)), None)
    ends = {n: what for n, what in ((first_conv, "first conv"), (last_linear, "last linear")) if n is not None}
    if "" in layers:
        raise ValueError(f"quantize_ replaces modules in place and cannot replace the model itself "
                         f"({type(model).__name__}); wrap it, e.g. nn.Sequential(model)")

    hits: dict = {p: [] for p in overrides}
    plan: list[tuple[str, nn.Module, object | None, str]] = []  # (name, module, config, status)
    for name, m in named:
        pat = next((p for p in overrides if _matches(p, name)), None)
        eligible = isinstance(m, (nn.Linear, nn.Conv2d))
        if pat is not None:
            cfg = overrides[pat]
            if cfg is not None and not eligible:
                if isinstance(m, VQLayer):
                    raise TypeError(f"override {pat!r} asks to quantize layer {name!r}, which is already a "
                                    f"{type(m).__name__}")
                if any(True for _ in m.parameters(recurse=False)):
                    raise TypeError(f"override {pat!r} asks to quantize layer {name!r} ({type(m).__name__}); "
                                    f"vector quantization supports nn.Linear and nn.Conv2d — narrow the "
                                    f"pattern or map it to None")
                continue  # containers and parameter-free modules (ReLU, Sequential) are not layers
            hits[pat].append(name)
            if eligible:
                plan.append((name, m, cfg, "vq (override)" if cfg is not None else "skipped (override)"))
            continue
        if not eligible:
            continue
        if filter_fn is not None and not filter_fn(m, name):
            plan.append((name, m, None, "skipped (filter_fn)"))
        elif name in ends and not getattr(config, "quantize_first_last", False):
            plan.append((name, m, None, f"float ({ends[name]})"))
        else:
            plan.append((name, m, config, "vq"))
    for pat, names in hits.items():
        if not names:
            what = "module" if overrides[pat] is None else "module that can be quantized"
            raise ValueError(f"override pattern {pat!r} matches no {what}; Linear/Conv2d names look like {layers[:4]}")

    todo: dict = {}
    for name, m, cfg, _ in plan:
        if cfg is not None:
            check = getattr(cfg, "check", None)
            if check is not None:
                check(m, name)
            todo.setdefault(cfg, []).append((name, m))

    new: dict[str, nn.Module] = {}
    with tqdm(total=sum(len(v) for v in todo.values()), desc="quantize_", unit="layer",
              disable=not progress, leave=False) as bar:
        for cfg, mods in todo.items():
            for name, q in HANDLERS[type(cfg)](mods, cfg):
                new[name] = q
                bar.update(1)
    for name, q in new.items():
        _set_module(model, name, q)
    counted: set = set()
    rows = [_row(name, m, new.get(name), status, counted) for name, m, _, status in plan]
    cols = ["layer", "type", "shape", "K", "d", "bits_per_weight", "weight_mse", "params_before",
            "params_after", "status"]
    return pd.DataFrame(rows, columns=cols).astype({"K": "Int64", "d": "Int64"})
