"""Multi-process training through torchrun: environment detection, process-group set-up, small collectives.

One process per device. ``torchrun --nproc_per_node N -m fbn_fast.train ...`` sets ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed` reads them, binds the process to
GPU ``LOCAL_RANK`` and joins the group with NCCL on GPUs or gloo on CPUs. Without those variables everything
here degrades to a single process (rank 0 of 1) and the collectives are no-ops.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as dist

__all__ = [
    "DistEnv",
    "all_gather_objects",
    "all_reduce_max",
    "all_reduce_mean",
    "barrier",
    "broadcast_object",
    "cleanup",
    "detect",
    "exit_process",
    "init_distributed",
    "resolve_device",
]


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: its rank among ``world_size`` processes and the device it drives."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # "nccl" / "gloo" when a process group is up

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def detect() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` from the torchrun environment; ``(0, 0, 1)`` without it."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    return rank, local, world


def resolve_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """The device this process trains on: ``auto`` is GPU ``local_rank`` when CUDA is available, else CPU.

    ``cuda`` means ``cuda:<local_rank>`` (one process per GPU); ``cuda:N`` is taken as given.
    """
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ValueError(f"--device: {requested!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {requested}: CUDA is not available on this machine")
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {requested}: process with LOCAL_RANK={local_rank} needs GPU {index}, but only "
                             f"{torch.cuda.device_count()} are visible (one process per GPU)")
        device = torch.device("cuda", index)
    elif device.type != "cpu":
        raise ValueError(f"--device: {requested!r} is not supported (auto, cpu, cuda, cuda:N)")
    return device


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistEnv:
    """Detect torchrun, pick this process's device and (when ``WORLD_SIZE > 1``) join the process group.

    NCCL when the device is a GPU, gloo on CPU. Idempotent: an already initialised group is reused.
    """
    from datetime import timedelta

    rank, local_rank, world = detect()
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world == 1:
        return DistEnv(0, 0, 1, dev, None)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
        if dev.type == "cuda":
            kwargs["device_id"] = dev  # binds NCCL to this GPU eagerly (no lazy guess of the device)
        dist.init_process_group(**kwargs)
    return DistEnv(rank, local_rank, world, dev, dist.get_backend())


#: The backend of the group :func:`cleanup` left, for :func:`exit_process`.
_LAST_BACKEND: str | None = None


def cleanup() -> None:
    """Leave the process group (if one is up). No barrier: after a failure on one rank it would wait for ever."""
    if dist.is_available() and dist.is_initialized():
        global _LAST_BACKEND
        _LAST_BACKEND = dist.get_backend()
        dist.destroy_process_group()
        gc.collect()  # free what still held the group (a DDP reducer in a reference cycle) while Python is whole


def exit_process(code: int = 0) -> NoReturn:
    """End this process with ``code``; after a gloo run, without the interpreter's teardown.

    With torch's gloo backend the teardown of the interpreter after :func:`cleanup` sometimes aborts the
    process ("terminate called without an active exception"; in 2 to 20 % of runs of two CPU processes,
    depending on load, also in a script that only all-reduces), which would turn a finished run into a failed
    one. So a process that used gloo flushes its streams and log handlers and leaves through ``os._exit``.
    NCCL runs (where Nsight Systems and CUDA need their exit hooks) and single-process runs exit normally.
    """
    if _LAST_BACKEND == "gloo":
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed or broken stream: nothing more to say on it
                pass
        os._exit(code)
    sys.exit(code)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _active():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (pickled; for small things like a run name)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, indexed by rank (pickled; for checkpoint states, not tensors in the hot loop)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """In-place element-wise max over ranks (e.g. of stop / non-finite flags, so every rank decides alike)."""
    if _active():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """In-place element-wise mean over ranks (e.g. of loss sums for a log record)."""
    if _active():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t
