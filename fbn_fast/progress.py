"""What a training run tells its user while it runs: the progress bar, the running-window meter behind each log
record, and where the ``fbn_fast`` log goes (the console, and a run folder's ``train.log``)."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

__all__ = [
    "RunningWindow",
    "WindowStats",
    "add_file_log",
    "configure_console_logging",
    "format_terms",
    "progress_bar",
    "remove_log_handler",
]

#: The logger every module of the package logs under (``fbn_fast.<module>``).
PACKAGE_LOGGER = "fbn_fast"
_TERM_ORDER = ("total", "expr", "au", "va", "ca_ea", "ca_ae", "dm_ea", "dm_ae")


# ---------------------------------------------------------------------------------------------------- meter
@dataclass(frozen=True)
class WindowStats:
    """What a :class:`RunningWindow` collected since its last reset."""

    means: list[float] | None  #: mean of each value over the finite steps; ``None`` when no step was finite
    steps: int
    finite_steps: int
    images: int
    seconds: float
    data_seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)

    @property
    def data_wait_fraction(self) -> float:
        return self.data_seconds / max(self.seconds, 1e-9)


class RunningWindow:
    """Sums over the steps since the last log record: loss values of the finite steps, steps, images, time.

    The sums stay on the values' device in float64 (adding a step's values never waits for the device); only
    :meth:`take` reads them back.
    """

    def __init__(self, size: int, device: torch.device | str = "cpu") -> None:
        self.sums = torch.zeros(size, device=device, dtype=torch.float64)
        self.reset()

    def reset(self, now: float | None = None) -> None:
        """Start a new window at ``now`` (``time.perf_counter()``; default: this moment)."""
        self.sums.zero_()
        self.steps = self.finite_steps = self.images = 0
        self.data_seconds = 0.0
        self.t0 = time.perf_counter() if now is None else now

    def add(self, values: Tensor | None, images: int, data_seconds: float = 0.0) -> None:
        """Count one step of ``images`` images; ``values`` is ``None`` for a step whose loss was not finite."""
        self.steps += 1
        self.images += images
        self.data_seconds += data_seconds
        if values is not None:
            self.sums += values.double()
            self.finite_steps += 1

    def take(self, reduce: Callable[[Tensor], Tensor] | None = None) -> WindowStats:
        """The window's statistics, then a new window from this moment on.

        ``reduce`` combines the sums across processes in place (e.g. a mean over ranks, which all count the same
        finite steps) before the means are taken.
        """
        now = time.perf_counter()
        sums = self.sums.clone()
        if reduce is not None:
            reduce(sums)
        means = (sums / self.finite_steps).tolist() if self.finite_steps else None
        stats = WindowStats(means, self.steps, self.finite_steps, self.images, now - self.t0, self.data_seconds)
        self.reset(now)
        return stats


def format_terms(values: Mapping[str, float], keys: tuple[str, ...] = _TERM_ORDER) -> str:
    """``total=… expr=… au=…``: the loss terms of a record, three decimals each, in the usual order."""
    return " ".join(f"{k}={values[k]:.3f}" for k in keys if k in values)


# ---------------------------------------------------------------------------------------------------- bar
@contextlib.contextmanager
def progress_bar(total: int, initial: int = 0, enabled: bool = True) -> Iterator[tqdm]:
    """A tqdm bar over training steps: done/total, elapsed time, ETA, steps/s and a postfix set by the caller.

    While it is shown, the ``fbn_fast`` console log writes above the bar instead of through it. Disabled (``--no-
    progress``, or a process other than rank 0) it is tqdm's no-op bar. Off a terminal it redraws at most every
    30 s, so a captured log does not fill with redraws.
    """
    interval = 0.1 if sys.stderr.isatty() else 30.0
    bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=interval,
               disable=not enabled, file=sys.stderr)
    redirect = logging_redirect_tqdm([logging.getLogger(PACKAGE_LOGGER)]) if enabled else contextlib.nullcontext()
    with bar, redirect:
        yield bar


# ---------------------------------------------------------------------------------------------------- logging
class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (it may be redirected after set-up)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_console_logging(rank: int) -> None:
    """The ``fbn_fast`` log on stderr at INFO, once per process; ranks other than 0 only report problems."""
    logger = logging.getLogger(PACKAGE_LOGGER)
    if not any(getattr(h, "_fbn_console", False) for h in logger.handlers):
        handler = _StderrHandler()
        prefix = f"rank {rank} " if rank else ""
        handler.setFormatter(logging.Formatter(f"[{prefix}%(levelname)s] %(message)s"))
        handler._fbn_console = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if rank != 0:
        for h in logger.handlers:
            h.setLevel(logging.WARNING)


def add_file_log(path: Path) -> logging.Handler:
    """Also write the ``fbn_fast`` log to ``path`` (with time stamps); remove it with :func:`remove_log_handler`."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger(PACKAGE_LOGGER).addHandler(handler)
    return handler


def remove_log_handler(handler: logging.Handler) -> None:
    logging.getLogger(PACKAGE_LOGGER).removeHandler(handler)
    handler.close()
