"""How training fails: the exit status of each class of fatal error, the one line that reports it, and the guards
that keep saved state usable (signals in loader workers, finite checkpoints, physical limits of options).

=====  ================================================================================================
exit   meaning
=====  ================================================================================================
0      done (or paused by ``--max-steps-per-run``)
1      an unexpected internal error (a bug: the traceback is in ``train.log``, and on stderr with ``--debug``)
2      usage: a bad option, recipe or run folder (in use by another run, or holding a run and no ``--resume``)
3      non-finite: ``--max-nonfinite`` consecutive non-finite steps; the message names the last finite checkpoint
4      data: the images cannot be read (a whole dataset bad: the message names it and its first bad files)
5      I/O: a file could not be written or read (disk full: the message says how much space a checkpoint needs)
75     SIGUSR1 (a batch system's warning before a time limit): checkpoint saved; requeue with ``--resume auto``
130    SIGINT, 143 SIGTERM (128 + the signal's number): checkpoint of the last completed step saved
=====  ================================================================================================

``docs/reliability.md`` lists every fault, what is kept and what is lost at most.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import signal
import sys
import traceback
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "EXIT_BUG",
    "EXIT_DATA",
    "EXIT_DIVERGED",
    "EXIT_IO",
    "EXIT_OK",
    "EXIT_REQUEUE",
    "EXIT_USAGE",
    "STOP_SIGNALS",
    "DataError",
    "NonFiniteLossError",
    "check_physical_limits",
    "exit_status",
    "ignore_stop_signals",
    "is_disk_full",
    "nonfinite_tensors",
    "one_line",
    "report_fatal",
    "sigchld_deferred",
    "signal_exit_status",
]

EXIT_OK, EXIT_BUG, EXIT_USAGE, EXIT_DIVERGED, EXIT_DATA, EXIT_IO = 0, 1, 2, 3, 4, 5
#: sysexits' EX_TEMPFAIL ("try again later"): saved after SIGUSR1, continue in a requeued job.
EXIT_REQUEUE = 75
#: Signals that stop a run with a checkpoint of the last completed step.
STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))

log = logging.getLogger("fbn_fast.train")


class DataError(RuntimeError):
    """The training or evaluation data cannot be used (e.g. every image of a dataset is bad)."""


class NonFiniteLossError(RuntimeError):
    """Raised when ``--max-nonfinite`` consecutive steps had a non-finite loss or gradient."""


# ---------------------------------------------------------------------------------------------------- statuses
def signal_exit_status(signum: int) -> int:
    """The exit status of a run stopped (after saving) by signal ``signum``: 75 for SIGUSR1, else 128 + N."""
    if hasattr(signal, "SIGUSR1") and signum == signal.SIGUSR1:
        return EXIT_REQUEUE
    return 128 + int(signum)


def _from_worker(exc: BaseException) -> tuple[str, str] | None:
    """``(class name, message)`` of the original error of an exception re-raised from a DataLoader worker."""
    text = str(exc)
    if "Original Traceback" not in text:
        return None
    last = [ln for ln in text.splitlines() if ln.strip()][-1]
    name, _, msg = last.partition(": ")
    return name.rsplit(".", 1)[-1], msg or last


def exit_status(exc: BaseException) -> int:
    """The documented exit status (see the module doc) of a fatal exception."""
    worker = _from_worker(exc)
    if isinstance(exc, DataError) or (worker is not None and worker[0] == "DataError"):
        return EXIT_DATA
    if isinstance(exc, NonFiniteLossError):
        return EXIT_DIVERGED
    if isinstance(exc, ValueError):
        return EXIT_USAGE
    if isinstance(exc, OSError):
        return EXIT_IO
    return EXIT_BUG


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (the original message of an error raised in a loader worker)."""
    worker = _from_worker(exc)
    msg = worker[1] if worker is not None else str(exc)
    if isinstance(exc, OSError) and not msg.strip() and exc.strerror:
        msg = exc.strerror
    msg = " ".join(msg.split()) or type(exc).__name__
    if exit_status(exc) == EXIT_BUG:
        msg = f"internal error ({type(exc).__name__}: {msg}); the traceback is in train.log (or rerun with --debug)"
    return msg


def report_fatal(exc: BaseException, debug: bool = False) -> int:
    """Log ``exc`` as one ERROR line (stderr and ``train.log``), its traceback into every log file (and on stderr
    under ``debug``); returns its exit status."""
    log.error("%s", one_line(exc))
    record = log.makeRecord(log.name, logging.DEBUG, __file__, 0, "traceback of the error above",
                            (), (type(exc), exc, exc.__traceback__))
    for handler in logging.getLogger("fbn_fast").handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    return exit_status(exc)


# ---------------------------------------------------------------------------------------------------- loader workers
def ignore_stop_signals(worker_id: int = 0) -> None:
    """``worker_init_fn`` of loader workers: the :data:`STOP_SIGNALS` (sent to a whole process group by a terminal,
    SLURM or Kubernetes) are the parent's to handle. A worker that died of one would make the parent's next step,
    or its checkpoint write, fail; the parent shuts the workers down after saving."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def sigchld_deferred() -> Iterator[None]:
    """Hold back SIGCHLD in this thread: the DataLoader's handler of a worker's exit raises wherever the main
    process is, a checkpoint write included; blocked, the notice arrives after the write (and after the workers
    were shut down, when the block spans that too, it finds nothing to report)."""
    if not hasattr(signal, "pthread_sigmask") or not hasattr(signal, "SIGCHLD"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# ---------------------------------------------------------------------------------------------------- finite state
def _floating(tensors: Iterable[tuple[str, Any]]) -> list[tuple[str, torch.Tensor]]:
    return [(k, t) for k, t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()]


def nonfinite_tensors(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> list[str]:
    """Names of the model's parameters/buffers and optimizer state tensors holding a NaN or an infinity.

    One host sync when everything is finite (the usual case); the names are only looked up otherwise.
    """
    named = _floating(model.state_dict().items())
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                for key, t in optimizer.state.get(p, {}).items():
                    named += _floating([(f"optimizer.{names.get(id(p), '?')}.{key}", t)])
    if not named:
        return []
    # One flag per tensor, stacked where the tensors live and read once per device (a blocking copy: a
    # non-blocking one would need an explicit synchronize before the host reads it).
    finite: dict[str, bool] = {}
    for device in {t.device for _, t in named}:
        group = [(n, t) for n, t in named if t.device == device]
        flags = torch.stack([torch.isfinite(t).all() for _, t in group]).cpu()
        finite.update(zip((n for n, _ in group), flags.tolist()))
    return [name for name, _ in named if not finite[name]]


# ---------------------------------------------------------------------------------------------------- physical limits
def _available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def activation_bytes(build: Mapping[str, Any], image_size: int, element_size: int = 4) -> tuple[int, int]:
    """``(sum, largest)`` bytes of the layer outputs of one image through the model ``build_model(**build)``,
    traced on the meta device (nothing is allocated). Training keeps about the sum for the backward pass;
    evaluation at least the largest."""
    from .model import build_model

    with torch.device("meta"):
        model = build_model(**{**build, "pretrained": False})
    total, largest = 0, 0

    def hook(_mod: nn.Module, _inp: Any, out: Any) -> None:
        nonlocal total, largest
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                total += t.numel() * element_size
                largest = max(largest, t.numel() * element_size)

    hooks = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(torch.empty(1, 3, image_size, image_size, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return total, largest


def check_physical_limits(build: Mapping[str, Any], *, image_size: int, batch_size: int, eval_batch_size: int,
                          device: torch.device, element_size: int = 4) -> None:
    """Refuse (``ValueError`` naming the options) an ``--image-size`` / batch size whose layer outputs alone do not
    fit the memory available on ``device``, before anything is allocated. A lower bound: passing it does not
    promise the run fits."""
    available = _available_bytes(device)
    if available is None:
        return
    try:
        total, largest = activation_bytes(build, image_size, element_size)
    except Exception as exc:  # a trunk that cannot run on the meta device: the first step is the check
        log.debug("activation estimate unavailable: %s", exc)
        return
    gib = 1024**3
    where = f"{device} has {available / gib:.1f} GiB available"
    if total * batch_size > available:
        raise ValueError(f"--image-size {image_size} with --batch-size {batch_size}: the layer outputs alone need "
                         f"{total * batch_size / gib:.1f} GiB and {where}; lower --image-size or --batch-size")
    if largest * eval_batch_size > available:
        raise ValueError(f"--image-size {image_size} with --eval-batch-size {eval_batch_size}: the largest layer "
                         f"output alone needs {largest * eval_batch_size / gib:.1f} GiB and {where}; lower "
                         f"--image-size or --eval-batch-size")


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (an ``OSError``, or torch's writer error wrapping one) means no space was left."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return "file write failed" in str(exc) or "No space left" in str(exc)
