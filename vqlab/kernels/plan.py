"""Call plans: what a quantized layer's eval call decides, decided once per input signature.

A call of `vq_matmul` / `vq_conv2d` checks its arguments, routes (`route.route`), compares the index bytes with
their checked copy, asks `auto` for a backend and, on the dense backend, compares the codebook with the one its
cached weight was rebuilt from: about 0.1 ms of Python around a product that takes microseconds on a small layer
(LeNet-5 at batch 1 ran 3x slower than its float self on that alone).  `linear` / `conv2d` here keep the outcome
per owner (a layer's code) as a plan and, on the next call with the same signature, check only what can change:

    the input's signature   dtype, device, trailing shape, batch bucket (as `auto` buckets it)
    global switches         the backend pinned (`set_backend`), torch's thread count, the backend registry, the
                            process (a forked child never runs a parent's plan), `clear_caches`
    the code's tensors      the same index, codebook and bias objects, and the same index and codebook bytes,
                            compared with the plan's private snapshots on every call (about memory speed): a
                            write through `.numpy()`, `load_state_dict`, `fit` or `copy_` is seen -- none of
                            them is visible to anything cheaper -- and the next call re-plans

and then run the product the plan holds: for the dense backend the cached rebuilt weight and one GEMM (or conv),
for a lookup-table backend its kernel on the checked copy, for a `direct` backend (simd) its kernel on the caller's
tensors (which it range-checks itself on every call).  Any mismatch runs the full call and makes a new plan, so a
plan's outputs are the full call's, bit for bit.  Calls that need the custom op (autograd through the codebook or
input, FlopCounterMode and other modes, tracing, torch.compile), other dtypes than float32 and other devices than
the CPU never use a plan.
"""
from __future__ import annotations

import os
import weakref
from typing import Callable

import torch
import torch.nn.functional as F

from .backends import DENSE_CACHE_FLOATS, as_float32, conv_weight_from_rows, group_book, rebuilt_weight
from .checked import Snapshot, checked_indices
from .ops import (batch_bucket, by_groups, conv_choice, conv_im2col, conv_with, direct_matmul, int_pair,
                  matmul_choice, plain_eager, RawRows, vq_conv2d, vq_matmul)
from .registry import get_backend, pinned_backend, registry_changes
from .route import route

__all__ = ["linear", "conv2d", "forget_plans"]

_PLANS: "weakref.WeakKeyDictionary[object, _Plan]" = weakref.WeakKeyDictionary()
_FORGOTTEN = [0]     # bumped by forget_plans (route.clear_caches calls it)


class _Plan:
    __slots__ = ("key", "codebook", "indices", "bias", "index_copy", "book_copy", "run")

    def __init__(self, key, codebook, indices, bias, index_copy, book_copy, run: Callable):
        self.key, self.codebook, self.indices, self.bias = key, codebook, indices, bias
        self.index_copy, self.book_copy, self.run = index_copy, book_copy, run

    def fresh(self, codebook: torch.Tensor, indices: torch.Tensor, bias) -> bool:
        """The same tensor objects holding the bytes the plan was made from."""
        return (self.codebook is codebook and self.indices is indices and self.bias is bias
                and (self.index_copy is None or self.index_copy.same(indices))
                and (self.book_copy is None or self.book_copy.same(codebook)))


def forget_plans() -> None:
    """Drop every call plan (the next call of each layer plans again)."""
    _PLANS.clear()
    _FORGOTTEN[0] += 1


def _switches() -> tuple:
    return pinned_backend(), torch.get_num_threads(), registry_changes(), _FORGOTTEN[0], os.getpid()


def _plannable(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor) -> bool:
    return (x.dtype == torch.float32 and x.device.type == "cpu" and codebook.dtype == torch.float32
            and codebook.device.type == "cpu" and codebook.is_contiguous() and indices.device.type == "cpu"
            and indices.is_contiguous() and plain_eager(x, codebook, indices))


def _snapshots(codebook: torch.Tensor, indices: torch.Tensor) -> tuple[Snapshot, Snapshot]:
    return Snapshot(indices), Snapshot(codebook)


# ---------------------------------------------------------------- matmul

def linear(owner: object, x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, backend: str = "auto",
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """vq_matmul(x, codebook, indices, backend) + bias, through `owner`'s plan (module docstring).
    x: (..., n) -> (..., m)."""
    rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
    key = ("linear", x.dtype, x.is_cpu, x.dim(), x.shape[-1], batch_bucket(rows) if rows else 0, backend,
           codebook.shape, indices.shape, *_switches())
    p = _PLANS.get(owner)
    if p is not None and p.key == key and plain_eager(x, codebook, indices) and p.fresh(codebook, indices, bias):
        return p.run(x)
    y = vq_matmul(x, codebook, indices, backend=backend)
    y = y if bias is None else y + bias.to(y.dtype)
    p = _linear_plan(key, x, rows, codebook, indices, backend, bias) if rows and _plannable(x, codebook, indices) else None
    if p is None:
        _PLANS.pop(owner, None)
    else:
        _PLANS[owner] = p
    return y


def _add(bias):
    return (lambda y: y) if bias is None else (lambda y: y + bias)


def _linear_plan(key, x, rows, codebook, indices, backend, bias) -> _Plan | None:
    r = route(x, codebook, indices, backend)
    add, m, n = _add(bias), indices.shape[0], x.shape[-1]
    if r.path == "direct":
        be = r.backend
        return _Plan(key, codebook, indices, bias, None, None,
                     lambda x: add(direct_matmul(x, codebook, indices, be)))
    if r.path != "checked":
        return None
    checked = checked_indices(indices, codebook.shape[-2])
    name = matmul_choice(rows, codebook, indices, r.name)
    index_copy, book_copy = _snapshots(codebook, indices)
    if name == "dense" and (codebook.dim() == 2 or codebook.shape[0] == 1) and m * n <= DENSE_CACHE_FLOATS:
        w = rebuilt_weight("dense", group_book(codebook, 0), checked.rows(0, m))     # as `by_groups` calls it

        if bias is None:
            def run(x):
                return F.linear(x, w) if x.dim() == 2 else F.linear(x.reshape(-1, n), w).reshape(*x.shape[:-1], m)
        else:
            def run(x):                     # y + bias, added in place into the product's fresh output
                return (F.linear(x, w) if x.dim() == 2 else
                        F.linear(x.reshape(-1, n), w).reshape(*x.shape[:-1], m)).add_(bias)
    else:
        be = get_backend(name)

        def run(x):
            return add(by_groups(be, as_float32(x.reshape(-1, n)), codebook, checked).reshape(*x.shape[:-1], m))
    return _Plan(key, codebook, indices, bias, index_copy, book_copy, run)


# ---------------------------------------------------------------- convolution

def conv2d(owner: object, x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, weight_shape, stride=1,
           padding=0, dilation=1, groups: int = 1, segment: str = "input", bias: torch.Tensor | None = None,
           backend: str = "auto") -> torch.Tensor:
    """vq_conv2d(...) with the same arguments, through `owner`'s plan (module docstring).
    x: (B, C, H, W) -> (B, out, Ho, Wo)."""
    geometry = (tuple(weight_shape), stride, padding, dilation, groups, segment)
    key = ("conv", x.dtype, x.is_cpu, x.shape[1:], batch_bucket(x.shape[0]) if x.dim() and x.shape[0] else 0,
           geometry, backend, codebook.shape, indices.shape, *_switches())
    p = _PLANS.get(owner)
    if p is not None and p.key == key and plain_eager(x, codebook, indices) and p.fresh(codebook, indices, bias):
        return p.run(x)
    y = vq_conv2d(x, codebook, indices, weight_shape, stride, padding, dilation, groups, segment, bias, backend)
    p = (_conv_plan(key, x, codebook, indices, geometry, backend, bias)
         if x.shape[0] and _plannable(x, codebook, indices) else None)
    if p is None:
        _PLANS.pop(owner, None)
    else:
        _PLANS[owner] = p
    return y


def _conv_plan(key, x, codebook, indices, geometry, backend, bias) -> _Plan | None:
    weight_shape, stride, padding, dilation, groups, segment = geometry
    geo = ([int(v) for v in weight_shape], int_pair("stride", stride, 1), int_pair("padding", padding, 0),
           int_pair("dilation", dilation, 1), int(groups), segment)
    if bias is None:
        def add(y):
            return y
    else:
        def add(y):     # y + bias, into the product's fresh output where the dtypes agree
            col = bias.view(1, -1, 1, 1)
            return y.add_(col) if col.dtype == y.dtype and not col.requires_grad else y + col.to(y.dtype)
    r = route(x, codebook, indices, backend)
    if r.path == "direct":
        be = r.backend
        return _Plan(key, codebook, indices, bias, None, None,
                     lambda x: add(conv_im2col(be.direct, x, codebook, RawRows(indices), *geo)))
    if r.path != "checked":
        return None
    checked = checked_indices(indices, codebook.shape[-2])
    name = conv_choice(x, codebook, indices, geo, r.name)
    index_copy, book_copy = _snapshots(codebook, indices)
    if name == "dense" and indices.shape[0] * indices.shape[1] * codebook.shape[-1] <= DENSE_CACHE_FLOATS:
        w = conv_weight_from_rows(rebuilt_weight("dense-conv", codebook, checked), geo[0], segment)
        _, st, pad, dil, g, _ = geo

        def run(x):
            return add(F.conv2d(x, w, None, st, pad, dil, g))
    else:
        def run(x):
            return add(conv_with(name, x, codebook, checked, *geo))
    return _Plan(key, codebook, indices, bias, index_copy, book_copy, run)
