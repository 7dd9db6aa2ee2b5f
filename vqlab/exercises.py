"""Checks for the notebooks' fill-in exercises.

A fill-in cell holds a stub the learner completes (it raises NotImplementedError or returns None until then);
the check cell below it calls

    check("Fill-in 1: the codebook gradient", lambda: codebook_grad(g, idx, k), expected)

with `expected` computed by the library.  An untouched stub prints "not done yet" (so the notebook still runs
top to bottom, and CI stays green on the learner's version); a wrong answer raises AssertionError saying what
differs; a right one prints "correct".  The solutions live in notebooks/solutions/ (same file names), where
every check passes.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

__all__ = ["check", "NOT_DONE"]

NOT_DONE = "not done yet"


def _as_array(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    if hasattr(x, "to_numpy"):
        return np.asarray(x.to_numpy(), dtype=float)
    return np.asarray(x, dtype=float)


def check(name: str, attempt: Callable[[], Any], expected, *, atol: float = 1e-5, rtol: float = 1e-4,
          hint: str = "") -> None:
    """Run `attempt()` (the learner's code) and compare its result with `expected` (a tensor, array, number,
    or a tuple of them) to atol + rtol * |expected|.

    prints "<name>: not done yet" when the stub is untouched -- attempt() raises NotImplementedError or returns
    None -- and "<name>: correct." when every element is close; raises AssertionError naming the shape or the
    largest difference (and `hint`) otherwise.  Returns None, so a check cell shows only its message.
    """
    try:
        got = attempt()
    except NotImplementedError:
        got = None
    if got is None:
        print(f"{name}: {NOT_DONE} -- fill in the cell above, run it, then run this cell again.")
        return None
    pairs = list(zip(got, expected)) if isinstance(expected, tuple) else [(got, expected)]
    if isinstance(expected, tuple) and (not isinstance(got, tuple) or len(got) != len(expected)):
        raise AssertionError(f"{name}: expected a tuple of {len(expected)} results, got {type(got).__name__}")
    for i, (g, e) in enumerate(pairs):
        g, e = _as_array(g), _as_array(e)
        where = f" (result {i})" if len(pairs) > 1 else ""
        if g.shape != e.shape:
            raise AssertionError(f"{name}{where}: shape {g.shape}, expected {e.shape}. {hint}".rstrip())
        if not np.allclose(g, e, atol=atol, rtol=rtol, equal_nan=True):
            diff = np.abs(g - e)
            j = np.unravel_index(np.nanargmax(diff), diff.shape) if diff.ndim else ()
            raise AssertionError(f"{name}{where}: largest difference {float(diff[j]):.3g} at index {tuple(map(int, j))} "
                                 f"(got {float(g[j]):.6g}, expected {float(e[j]):.6g}). {hint}".rstrip())
    print(f"{name}: correct.")
