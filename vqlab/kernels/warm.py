"""numba's kernels loaded ahead, in a background thread started when `vqlab.kernels` is imported, so the first
product a user waits for does not load (~1 s) or, the first time on a machine, compile (several seconds) them.

The thread loads every kernel (`lut_numba.warm`) and this machine's cost constants if they are stored on disk
(`cost.load_stored`; it never measures them: measuring sets thread counts, which must not happen behind the
user's back).  $VQLAB_WARM=0 turns it off.  Before a fork() the parent waits for the thread to finish
(os.register_at_fork), so no child starts with numba's compiler or import locks held by a thread it does not have.
Errors are kept (`status()`), never raised: the kernels then load at their first use, as without warming.
"""
from __future__ import annotations

import os
import threading

__all__ = ["start", "wait", "status"]

_THREAD: list[threading.Thread | None] = [None]
_STATUS: dict = {"state": "not started", "kernels": [], "error": None}


def _work() -> None:
    _STATUS["state"] = "running"
    try:
        from .backends import numba_usable
        if numba_usable():
            from . import lut_numba
            _STATUS["kernels"] = lut_numba.warm()
            from .cost import load_stored
            load_stored()
        _STATUS["state"] = "done"
    except Exception as err:  # warming is an optimisation: the kernels load at first use instead
        _STATUS["state"], _STATUS["error"] = "failed", f"{type(err).__name__}: {err}"


def start() -> threading.Thread | None:
    """Start the warm-up thread once per process (not with $VQLAB_WARM=0); returns it (None when off)."""
    if os.environ.get("VQLAB_WARM", "1").strip() in ("0", "false", "no", "off"):
        return None
    if _THREAD[0] is None:
        _THREAD[0] = threading.Thread(target=_work, name="vqlab-warm", daemon=True)
        _THREAD[0].start()
    return _THREAD[0]


def wait(timeout: float | None = None) -> dict:
    """Wait for the warm-up thread (if any) to finish; returns `status()`."""
    t = _THREAD[0]
    if t is not None and t is not threading.current_thread():
        t.join(timeout)
    return status()


def status() -> dict:
    """state ("not started", "running", "done", "failed"), the kernels loaded, the error if it failed."""
    return dict(_STATUS)


def _before_fork() -> None:
    wait()


def _after_fork_in_child() -> None:
    _THREAD[0] = None                  # the child has no warm-up thread (the parent's finished before the fork)


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
