"""torch.distributed glue: vqlab runs unchanged under `torchrun` (DDP over gloo on CPU, NCCL on GPUs).

    torchrun --nproc_per_node 2 -m vqlab finetune --dataset digits --k 16 --d 2 --out model.vqz

`init()` joins the process group torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) unless one is initialised already; every other helper here is a no-op (or
the identity) in a single process, so library code calls them unconditionally.

"Distributed" means: a process group of more than one process is initialised, or torchrun's
environment asks for one (WORLD_SIZE > 1).  A world of one behaves exactly like no torch.distributed
at all.  The CUDA path (NCCL, one GPU per LOCAL_RANK) is written device-agnostically but is untested.

A rank that stops answering (killed, stopped with SIGSTOP, hung in a kernel) would leave the others waiting in
their next collective for torch's default 30 minutes.  `init` sets the collective timeout to $VQLAB_DIST_TIMEOUT
seconds (default 300), and every rank beats a heartbeat counter in the process group's store (a daemon thread,
twice a second); a collective that times out in vqlab's helpers, in `fit` or `evaluate` raises `SilentRankError`
naming the ranks whose heartbeat stopped.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import functools
import math
import os
import socket
import threading
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

__all__ = ["env_world_size", "active", "init", "rank", "world_size", "local_rank", "is_main", "device",
           "barrier", "all_reduce_sum", "broadcast", "all_gather_objects", "broadcast_object", "free_port",
           "launch_local", "timeout_seconds", "SilentRankError", "naming_silent_ranks", "silent_ranks",
           "show_progress", "DEFAULT_TIMEOUT"]

DEFAULT_TIMEOUT = 300.0       # seconds a collective waits for the other ranks ($VQLAB_DIST_TIMEOUT)
_BEAT = 0.5                   # seconds between heartbeats
_BEATING: list = []           # the heartbeat thread's (store, stop event), once started


class SilentRankError(RuntimeError):
    """A collective got no answer within the timeout: another rank stopped, hung or died (the message names the
    ranks whose heartbeat stopped)."""


def timeout_seconds() -> float:
    """The collective timeout: $VQLAB_DIST_TIMEOUT seconds (a finite number > 0), default 300.
    raises ValueError naming the variable for anything else."""
    raw = os.environ.get("VQLAB_DIST_TIMEOUT", "")
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"VQLAB_DIST_TIMEOUT must be a finite number of seconds > 0, got {raw!r}")
    return value


def show_progress(progress: bool) -> bool:
    """Whether this process draws a progress bar: asked for, and rank 0 (every process of a torchrun job would
    draw its own bar otherwise)."""
    return bool(progress) and is_main()


def env_world_size() -> int:
    """WORLD_SIZE from the environment (torchrun sets it), 1 when unset."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def active() -> bool:
    """True when more than one process takes part: an initialised group of > 1, or torchrun's env asks for one."""
    if _initialised():
        return dist.get_world_size() > 1
    return dist.is_available() and env_world_size() > 1 and "RANK" in os.environ and "MASTER_ADDR" in os.environ


def init(backend: str | None = None) -> bool:
    """Join the process group torchrun describes (if not initialised yet); return `active()`.

    backend: default "gloo" on CPU-only machines, "cpu:gloo,cuda:nccl" when CUDA is present (CPU tensors
    then still reduce over gloo).  With CUDA, the process also selects GPU LOCAL_RANK.
    """
    if not active():
        return False
    if not _initialised():
        if backend is None:
            backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank() % torch.cuda.device_count())
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_seconds()))
        _start_heartbeat()
    return True


def _store():
    """The default process group's key-value store (torchrun's), or None where torch does not expose it."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:                                  # noqa: BLE001  a private API: no heartbeat without it
        return None


def _start_heartbeat() -> None:
    """A daemon thread adding 1 to this rank's counter "vqlab/alive/<rank>" in the store every _BEAT seconds; it
    stops with the process (or when the store goes away).  A stopped or dead rank's counter stands still."""
    store = _store()
    if store is None or _BEATING:
        return
    key, stop = f"vqlab/alive/{dist.get_rank()}", threading.Event()

    def beat():
        while not stop.is_set():
            try:
                store.add(key, 1)
            except Exception:                          # noqa: BLE001  the store is gone: the job is ending
                return
            stop.wait(_BEAT)
    thread = threading.Thread(target=beat, name="vqlab-heartbeat", daemon=True)
    thread.start()
    _BEATING.append((store, stop))
    atexit.register(_stop_heartbeat, stop, thread)


def _stop_heartbeat(stop: threading.Event, thread: threading.Thread) -> None:
    """At exit: end the heartbeat thread before the interpreter (and the store's client) go away."""
    stop.set()
    thread.join(timeout=4 * _BEAT)


def silent_ranks(wait: float = 4 * _BEAT) -> list[int] | None:
    """The ranks whose heartbeat did not move within `wait` seconds (stopped, hung with the GIL held, or dead);
    None when unknown (no heartbeat store here)."""
    if not _BEATING:
        return None
    store = _BEATING[0][0]
    try:
        before = [store.add(f"vqlab/alive/{r}", 0) for r in range(world_size())]
        time.sleep(wait)
        after = [store.add(f"vqlab/alive/{r}", 0) for r in range(world_size())]
    except Exception:                                  # noqa: BLE001
        return None
    return [r for r, (a, b) in enumerate(zip(before, after)) if a == b]


_TIMEOUT_WORDS = ("timed out", "timeout", "pair closure", "connection closed", "connection reset")


@contextlib.contextmanager
def naming_silent_ranks():
    """Turn a collective's timeout inside the block into a SilentRankError naming the silent ranks."""
    try:
        yield
    except SilentRankError:
        raise
    except RuntimeError as e:
        if not _initialised() or not any(w in str(e).lower() for w in _TIMEOUT_WORDS):
            raise
        silent = silent_ranks()
        who = ("could not be told (no heartbeat store)" if silent is None else
               f"rank(s) {silent} went silent (no heartbeat: stopped, hung or dead)" if silent else
               "every rank still beats (one is stuck outside a collective)")
        raise SilentRankError(f"rank {rank()}: a collective got no answer from the other ranks within "
                              f"{timeout_seconds():g} s ($VQLAB_DIST_TIMEOUT); {who}") from e


def _named(fn):
    """Decorator: run a collective helper inside `naming_silent_ranks`."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        with naming_silent_ranks():
            return fn(*args, **kwargs)
    return call


def rank() -> int:
    """Global rank (0 in a single process)."""
    if _initialised():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if active() else 0


def world_size() -> int:
    """Number of processes (1 in a single process)."""
    if _initialised():
        return dist.get_world_size()
    return env_world_size() if active() else 1


def local_rank() -> int:
    """Rank on this machine (LOCAL_RANK; 0 in a single process)."""
    return int(os.environ.get("LOCAL_RANK", "0")) if active() else 0


def is_main() -> bool:
    """True on rank 0 (and in a single process): the process that shows progress and writes files."""
    return rank() == 0


def device() -> torch.device:
    """This process's device: cuda:LOCAL_RANK when CUDA is present, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


@_named
def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if active():
        init()
        dist.barrier()


@_named
def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over all processes, in place; returns t (unchanged in a single process)."""
    if active():
        init()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


@_named
def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite `t` with rank `src`'s tensor, in place; returns t."""
    if active():
        init()
        dist.broadcast(t, src=src)
    return t


@_named
def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s picklable `obj` on every process (obj itself in a single process)."""
    if not active():
        return obj
    init()
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@_named
def all_gather_objects(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every process ([obj] in a single process)."""
    if not active():
        return [obj]
    init()
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def free_port() -> int:
    """A TCP port that was free a moment ago (bind to port 0 and let the OS choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(fn: Callable[..., Any], nprocs: int, *args: Any) -> dict[int, Any]:
    """Run fn(*args) in `nprocs` local processes joined in one gloo/NCCL group; return {rank: result}.

    Uses torch's elastic launcher (the engine behind `torchrun`) with a c10d rendezvous on a free local
    port: the children see the same environment as under `torchrun --nproc_per_node nprocs`, so
    `fn` calls `init()` like any torchrun program.  fn must be importable (a module-level function).
    A failing child raises torch.distributed.elastic's ChildFailedError here; all children are reaped.
    """
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nprocs, run_id=f"vqlab-{os.getpid()}",
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}", max_restarts=0,
                          monitor_interval=0.1, start_method="spawn")
    return elastic_launch(config, fn)(*args)
