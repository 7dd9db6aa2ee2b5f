"""Kernel backends in one place: name -> `KernelBackend` (availability, matmul, optional conv, what it supports).

A backend computes y = x @ W.T for one (K, d) codebook over a block of checked indices (`CheckedIndices`);
`vqlab.kernels.ops` checks every argument and splits codebook groups and convolution groups into such blocks, and
`vqlab.kernels.route` decides which path a call takes.  `auto` picks, among the registered backends that are available,
take part in auto and support the layer's (K, d), the one whose cost formula (`vqlab.kernels.cost`) predicts the
fewest seconds for the call's shape -- it never times the call (`vqlab.kernels.tune` does, when asked);
`set_backend(name)` or the environment variable VQLAB_BACKEND pins one instead, so that outputs are reproducible
run to run.  The built-in adapters live in `backends.py` ("dense", "numba") and `simd.py` ("simd").

Registering a new kernel (e.g. a SIMD one) is one call in its own module:

    register_backend(KernelBackend("simd", matmul=my_matmul, available=compiler_found, supports=lambda k, d: k <= 16))
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

__all__ = ["KernelBackend", "register_backend", "get_backend", "backend_names", "available_backends",
           "set_backend", "pinned_backend", "unregister_backend", "RESERVED"]


RESERVED = ("torch", "auto")          # the reference and the cost-model choice: not registry entries


@dataclass(frozen=True)
class KernelBackend:
    """One native kernel.

    matmul(x (B, n) float32 contiguous CPU, codebook (K, d), checked: CheckedIndices (m, S)) -> (B, m) float32.
    direct: optional direct(x (B, n) float32 contiguous CPU, codebook (K, d) | (G, K, d), indices) -> (B, m)
        float32.  Called instead of matmul when the caller's indices are a contiguous uint8 CPU (m, S) tensor and
        `direct_ready()` is true, with that tensor itself: no checked copy is made, so the backend must itself
        read every index on every call, raise ValueError (as `check_indices`) for a value >= K, and stay
        memory-safe whatever the values (e.g. a concurrent write).  Only for backends that are asked for by name
        or pinned (`vqlab.kernels.route`).
    direct_ready() -> bool: whether `direct` runs natively here (else the checked path runs `matmul`).
    conv: optional conv(x, codebook (K, d) | (G, K, d), checked, weight_shape, stride, padding, dilation, groups,
        segment) -> y; None = im2col + matmul per (conv group, codebook group) block.
    available() -> bool: usable on this machine (imports lazily inside, so unused kernels are never loaded).
    supports(k, d) -> bool: the codebook sizes it handles (others fall back to "dense" when asked directly).
    auto: a candidate for backend="auto".
    cost: optional cost(work: cost.Work, constants: cost.Constants) -> predicted seconds of one call (`auto` picks
        the candidate with the smallest; a candidate without a formula is picked only when none has one).
    exact: computes x @ W.T to float32 rounding.  An approximate backend (e.g. "simd": quantized tables) must
        set exact=False and auto=False: it runs only when asked for by name or pinned with set_backend, and
        `available_backends()` lists it only with approximate=True.
    """

    name: str
    matmul: Callable
    conv: Callable | None = None
    direct: Callable | None = None
    direct_ready: Callable[[], bool] = lambda: True
    available: Callable[[], bool] = lambda: True
    supports: Callable[[int, int], bool] = lambda k, d: True
    auto: bool = True
    cost: Callable | None = None
    exact: bool = True
    description: str = ""


_REGISTRY: dict[str, KernelBackend] = {}
_PINNED: list[str | None] = [None]
_CHANGES = [0]         # bumped by every register / unregister: call plans made before are not used again


def registry_changes() -> int:
    """How many times a backend was registered or unregistered (call plans remember it, `plan`)."""
    return _CHANGES[0]


def register_backend(backend: KernelBackend) -> KernelBackend:
    """Add (or replace) a backend by name; returns it."""
    if backend.name in RESERVED:
        raise ValueError(f"backend name {backend.name!r} is reserved ({RESERVED})")
    _REGISTRY[backend.name] = backend
    _CHANGES[0] += 1
    return backend


def unregister_backend(name: str) -> None:
    """Remove a registered backend (a no-op for an unknown name); a pin on it is dropped."""
    _REGISTRY.pop(name, None)
    _CHANGES[0] += 1
    if _PINNED[0] == name:
        _PINNED[0] = None


def backend_names() -> tuple[str, ...]:
    """Every name vq_matmul accepts: "torch", the registered backends, "auto"."""
    return ("torch", *_REGISTRY, "auto")


def get_backend(name: str) -> KernelBackend:
    if name not in _REGISTRY:
        raise ValueError(f"backend must be one of {backend_names()}, got {name!r}")
    return _REGISTRY[name]


def available_backends(approximate: bool = False) -> list[str]:
    """Backends usable here: "torch", every registered exact backend whose available() is true, "auto";
    approximate=True also lists the approximate ones (exact=False, e.g. "simd")."""
    return ["torch", *(n for n, b in _REGISTRY.items() if (approximate or b.exact) and b.available()), "auto"]


def set_backend(name: str | None) -> None:
    """Pin the backend that "auto" resolves to (None: choose by the cost model again).  The environment variable
    VQLAB_BACKEND does the same at start-up.  raises ValueError for an unknown or unavailable name."""
    usable = available_backends(approximate=True)[:-1]
    if name is not None and name not in usable:
        raise ValueError(f"set_backend: {name!r} is not an available backend; available: {usable}")
    _PINNED[0] = name


def pinned_backend() -> str | None:
    """The backend "auto" is pinned to (set_backend, else $VQLAB_BACKEND), or None."""
    if _PINNED[0] is None and os.environ.get("VQLAB_BACKEND"):
        set_backend(os.environ["VQLAB_BACKEND"])
    return _PINNED[0]
