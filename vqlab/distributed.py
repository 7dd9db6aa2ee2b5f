"""torch.distributed glue: vqlab runs unchanged under `torchrun` (DDP over gloo on CPU, NCCL on GPUs).

    torchrun --nproc_per_node 2 -m vqlab finetune --dataset digits --k 16 --d 2 --out model.vqz

`init()` joins the process group torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) unless one is initialised already; every other helper here is a no-op (or
the identity) in a single process, so library code calls them unconditionally.

"Distributed" means: a process group of more than one process is initialised, or torchrun's
environment asks for one (WORLD_SIZE > 1).  A world of one behaves exactly like no torch.distributed
at all.  The CUDA path (NCCL, one GPU per LOCAL_RANK) is written device-agnostically but is untested.
"""
from __future__ import annotations

import os
import socket
from typing import Any, Callable

import torch
import torch.distributed as dist

__all__ = ["env_world_size", "active", "init", "rank", "world_size", "local_rank", "is_main", "device",
           "barrier", "all_reduce_sum", "broadcast", "all_gather_objects", "broadcast_object", "free_port",
           "launch_local"]


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
        dist.init_process_group(backend=backend)
    return True


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


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if active():
        init()
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over all processes, in place; returns t (unchanged in a single process)."""
    if active():
        init()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite `t` with rank `src`'s tensor, in place; returns t."""
    if active():
        init()
        dist.broadcast(t, src=src)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s picklable `obj` on every process (obj itself in a single process)."""
    if not active():
        return obj
    init()
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


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
