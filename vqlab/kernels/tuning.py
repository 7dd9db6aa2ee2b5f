"""Timing the backends on a model's real inputs -- only when asked: `auto` itself never times (`cost`).

    report = vqlab.kernels.tune(model, example_input)     # per layer: seconds per backend, the fastest recorded

Each quantized layer whose code has a `backend` (a VQ code) is run on the input it receives in
model(example_input), once per exact backend available here ("torch", "dense", "numba", ...), and the fastest is
written into the layer's `backend` (record=True), which `vqlab.save` keeps.  On a busy machine the timings, and so
the choices, vary from run to run: that is why this is a separate, explicit step.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn as nn

from .registry import available_backends

__all__ = ["tune"]


def _time_best(fn: Callable[[], object], budget: float = 0.05, max_runs: int = 5) -> float:
    """Fastest of up to max_runs timed calls after one warm-up; stops once budget seconds are spent, so a
    slow path is timed once and a fast one several times (a single sample misjudged ~1 ms calls by 20-30 %)."""
    fn()
    best, spent = math.inf, 0.0
    for _ in range(max_runs):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
        if spent > budget:
            break
    return best


def _tunable(module: nn.Module) -> bool:
    code = getattr(module, "code", None)
    return isinstance(code, nn.Module) and "backend" in getattr(type(code), "layer_attrs", ())


@torch.no_grad()
def tune(model: nn.Module, example_input: torch.Tensor, backends: list[str] | None = None, record: bool = True,
         budget: float = 0.05):
    """Time each backend on every tunable quantized layer of `model` (in eval mode) with the input that layer
    receives in model(example_input); returns a DataFrame (layer, backend, seconds, chosen).

    backends: the names to try (default: "torch" and every exact backend available here); record: write each
    layer's fastest into its `backend` (else every layer keeps the one it had); budget: seconds of timed calls per
    layer and backend (at least one call after a warm-up).  raises ValueError for a name that is not available.
    """
    import pandas as pd

    names = list(backends) if backends is not None else available_backends()[:-1]
    usable = available_backends(approximate=True)[:-1]
    bad = [n for n in names if n not in usable]
    if bad or not names:
        raise ValueError(f"tune: backends {bad or names} are not available here; available: {usable}")
    layers = [(name, m) for name, m in model.named_modules() if _tunable(m)]
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: inputs.setdefault(name, args[0]))
             for name, m in layers]
    was_training = model.training
    model.eval()
    try:
        model(example_input)
    finally:
        for h in hooks:
            h.remove()
    rows = []
    try:
        for name, m in layers:
            if name not in inputs:
                continue
            x, before = inputs[name], m.code.backend
            seconds = {}
            for b in names:
                m.code.backend = b
                seconds[b] = _time_best(lambda: m(x), budget)
            best = min(seconds, key=seconds.get)
            m.code.backend = best if record else before
            rows += [{"layer": name, "backend": b, "seconds": s, "chosen": b == best} for b, s in seconds.items()]
    finally:
        model.train(was_training)
    return pd.DataFrame(rows, columns=["layer", "backend", "seconds", "chosen"])
