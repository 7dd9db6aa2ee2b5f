"""Which path one kernel call takes, decided in one place for `vq_matmul` and `vq_conv2d`:

    "reference"  the torch reference (dequantize + F.linear / F.conv2d): on CUDA, for float64 inputs (exact in
                 float64; native kernels compute in float32), for backend "torch" (or "auto" pinned to it), and
                 when the asked backend is not available here (for "auto": no exact native backend is)
    "direct"     a backend with a `direct` entry (today "simd"), asked for by name or pinned, given contiguous
                 uint8 CPU indices it supports: it reads the caller's tensor itself and range-checks every
                 index on every call (no copy, no cache)
    "checked"    every other native call: the indices' checked private copy (`checked.checked_indices`), and
                 the backend named, pinned, or chosen by `auto` (`choose`)

`auto` picks the candidate whose cost formula predicts the fewest seconds for the call's work (`cost`: counted
table FLOPs, lookups and bytes, with per-machine constants measured once and cached on disk): it never runs the
user's call to time it, costs microseconds, and gives the same answer on a busy machine.  The choice is kept per
shape and batch bucket (`auto_choices()` shows it); `set_backend` / $VQLAB_BACKEND pin one instead, and
`vqlab.kernels.tune(model, example)` times the backends on a model's real inputs when asked.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .checked import clear_checked
from .cost import Work, constants
from .registry import KernelBackend, available_backends, get_backend, pinned_backend

__all__ = ["Route", "route", "choose", "predicted", "auto_choices", "clear_caches"]

_AUTO: dict = {}           # shape/batch key -> backend name (what the cost model picked)


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


def _candidates(k: int, d: int) -> list[str]:
    """The backends `auto` chooses among for a (K, d) codebook: available, exact, taking part in auto."""
    return [n for n in available_backends()[1:-1]
            if get_backend(n).auto and get_backend(n).exact and get_backend(n).supports(k, d)]


def predicted(names: list[str], work: Work) -> dict[str, float]:
    """Predicted seconds of one call of `work` per backend name that has a cost formula ({} where the machine's
    constants cannot be had: measuring them failed)."""
    formulas = {n: get_backend(n).cost for n in names if get_backend(n).cost is not None}
    if not formulas:
        return {}
    try:
        c = constants()
    except Exception:  # noqa: BLE001  a failed measurement must not fail the user's product: first candidate
        return {}
    return {n: float(f(work, c)) for n, f in formulas.items()}


def choose(name: str, k: int, d: int, key: tuple, work: Work) -> str:
    """The native backend a "checked" route runs: `name` itself ("dense" when it does not support (K, d)), or
    for "auto" the candidate with the smallest predicted cost of `work` (ties: registration order; candidates
    without a cost formula only when none has one), kept per `key`.  Nothing is timed."""
    if name != "auto":
        return name if get_backend(name).supports(k, d) else "dense"
    names = _candidates(k, d)
    key = (*key, tuple(names))
    choice = _AUTO.get(key)
    if choice is None:
        costs = predicted(names, work) if len(names) > 1 else {}
        choice = min(costs, key=lambda n: (costs[n], names.index(n))) if costs else names[0]
        _AUTO[key] = choice
    return choice


def auto_choices() -> dict:
    """What `auto` picked so far, per (shape key, candidates)."""
    return dict(_AUTO)


def clear_caches() -> None:
    """Forget every checked index copy, kernel layout (and cached dense weight), call plan and `auto` choice (the machine's
    cost constants stay: `cost.forget()`)."""
    clear_checked()
    _AUTO.clear()
    from .plan import forget_plans
    forget_plans()
