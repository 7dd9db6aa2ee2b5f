"""Which path one kernel call takes, decided in one place for `vq_matmul` and `vq_conv2d`:

    "reference"  the torch reference (dequantize + F.linear / F.conv2d): on CUDA, for float64 inputs (exact in
                 float64; native kernels compute in float32), for backend "torch" (or "auto" pinned to it), and
                 when the asked backend is not available here (for "auto": no exact native backend is)
    "direct"     a backend with a `direct` entry (today "simd"), asked for by name or pinned, given contiguous
                 uint8 CPU indices it supports: it reads the caller's tensor itself and range-checks every
                 index on every call (no copy, no cache)
    "checked"    every other native call: the indices' checked private copy (`checked.checked_indices`), and
                 the backend named, pinned, or chosen by `auto` (`choose`)

`auto` times its candidates once per shape and batch bucket and keeps the faster (`auto_choices()` shows what it
picked); `set_backend` / $VQLAB_BACKEND pin one instead.
"""
from __future__ import annotations

import time
from typing import Callable, NamedTuple

import torch

from .checked import clear_checked
from .registry import KernelBackend, available_backends, get_backend, pinned_backend

__all__ = ["Route", "route", "choose", "auto_choices", "clear_caches"]

_AUTO: dict = {}           # shape/batch key -> backend name


class Route(NamedTuple):
    """path: "reference", "direct" or "checked"; name: the backend asked for after pinning ("auto" when auto
    chooses); backend: the backend object of a "direct" route (else None)."""

    path: str
    name: str
    backend: KernelBackend | None = None


def route(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, backend: str) -> Route:
    """The path of one call (module docstring).  `backend` is a checked backend name."""
    name = (pinned_backend() or "auto") if backend == "auto" else backend
    native = available_backends(approximate=True)[1:-1]
    if (x.device.type != "cpu" or x.dtype == torch.float64 or name == "torch"
            or (name == "auto" and not _candidates(codebook.shape[-2], codebook.shape[-1]))
            or (name != "auto" and name not in native)):
        return Route("reference", name)
    if name != "auto":
        be = get_backend(name)
        if (be.direct is not None and indices.dtype == torch.uint8 and indices.device.type == "cpu"
                and indices.is_contiguous() and be.supports(codebook.shape[-2], codebook.shape[-1])
                and be.direct_ready()):
            return Route("direct", name, be)
    return Route("checked", name)


def _time_best(fn: Callable[[], object], budget: float = 0.05, max_runs: int = 5) -> float:
    """Fastest of up to max_runs timed calls after one warm-up; stops once budget seconds are spent, so a
    slow path is timed once and a fast one several times (a single sample misjudged ~1 ms calls by 20-30 %)."""
    fn()
    best, spent = float("inf"), 0.0
    for _ in range(max_runs):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
        if spent > budget:
            break
    return best


def _candidates(k: int, d: int) -> list[str]:
    """The backends `auto` chooses among for a (K, d) codebook: available, exact, taking part in auto."""
    return [n for n in available_backends()[1:-1]
            if get_backend(n).auto and get_backend(n).exact and get_backend(n).supports(k, d)]


def choose(name: str, k: int, d: int, key: tuple, run: Callable[[str], object]) -> str:
    """The native backend a "checked" route runs: `name` itself ("dense" when it does not support (K, d)), or
    for "auto" the fastest candidate for `key`, timed once by calling run(backend name)."""
    if name != "auto":
        return name if get_backend(name).supports(k, d) else "dense"
    names = _candidates(k, d)
    key = (*key, tuple(names))
    choice = _AUTO.get(key)
    if choice is None:
        choice = names[0] if len(names) == 1 else min(names, key=lambda n: _time_best(lambda: run(n)))
        _AUTO[key] = choice
    return choice


def auto_choices() -> dict:
    """What `auto` picked so far, per (shape key, candidates)."""
    return dict(_AUTO)


def clear_caches() -> None:
    """Forget every checked index copy, kernel layout and `auto` timing decision."""
    clear_checked()
    _AUTO.clear()
