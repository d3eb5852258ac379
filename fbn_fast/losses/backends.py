"""Backend discovery and selection for the objective.

A fused backend lives in a module that, on import, registers its implementation with
:func:`fbn_fast.losses.op.register_impl` under the backend's name and defines
``availability(backend: str, device: torch.device) -> str | None`` (``None`` when that backend can run
on that device, else the reason it cannot). Importing is lazy, so a missing Triton or native build
costs nothing until asked for.

Launch mode on CUDA devices (backends ``triton`` and ``cuda``): by default the *split plan*, passes of the
objective as consecutive launches that never wait on one another. The *grid barrier* mode (one launch whose
programs wait at a barrier in device memory, or at ``grid.sync()``, for all others) is opt-in until a GPU
check has verified it on a card: ``FBN_FAST_GRID_BARRIER=1`` in the environment or
:func:`set_grid_barrier`. :func:`available_backends` says which mode runs and why.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

#: backend -> module defining it (``torch`` is the reference and needs none).
_MODULES: dict[str, str] = {
    "triton": "fbn_fast.kernels.objective",
    "cpu": "fbn_fast.losses.cpu",
    "cuda": "fbn_fast.losses.cuda",
}
#: Backends whose CUDA launch has a split plan and a grid-barrier mode.
_BARRIER_BACKENDS = ("triton", "cuda")
#: The documented switch of the grid-barrier mode.
GRID_BARRIER_ENV = "FBN_FAST_GRID_BARRIER"
_grid_barrier: bool | None = None
#: Why a native backend cannot run when its extension module is missing.
NOT_BUILT = "native extension not built (FBN_FAST_NO_EXT=1 or no compiler)"


def load_extension(name: str) -> tuple[ModuleType | None, str | None]:
    """``fbn_fast.<name>`` (a compiled extension) and ``None``, or ``None`` and the reason it is missing."""
    try:
        return importlib.import_module(f"fbn_fast.{name}"), None
    except ImportError as exc:
        return None, f"{NOT_BUILT}: {exc}"


def set_grid_barrier(enabled: bool | None) -> None:
    """Switch the single-launch grid-barrier mode on or off for ``triton`` and ``cuda`` on CUDA devices;
    ``None`` follows the environment (``FBN_FAST_GRID_BARRIER=1``; off when unset)."""
    global _grid_barrier
    if enabled is not None and not isinstance(enabled, bool):
        raise ValueError(f"set_grid_barrier: expected True, False or None, got {enabled!r}")
    _grid_barrier = enabled


def grid_barrier() -> bool:
    """Whether CUDA launches use the grid-barrier mode (else the split plan, the default)."""
    if _grid_barrier is not None:
        return _grid_barrier
    value = os.environ.get(GRID_BARRIER_ENV, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{GRID_BARRIER_ENV} must be 0 or 1, got {value!r}")
    return value == "1"


def launch_mode() -> str:
    """The CUDA launch mode that runs now and why, in words (for :func:`available_backends` and logs)."""
    if grid_barrier():
        why = "set_grid_barrier(True)" if _grid_barrier else f"{GRID_BARRIER_ENV}=1"
        return f"grid barrier: one launch whose programs wait for each other ({why})"
    return (f"split plan: launches that never wait on each other (the default; the grid-barrier mode is "
            f"opt-in through {GRID_BARRIER_ENV}=1 until verified on a card)")
#: ``auto`` tries these in order for each device type.
_PREFERENCE: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpu", "torch"),
}
BACKENDS: tuple[str, ...] = ("torch", *_MODULES)


#: (backend, device) -> reason it cannot run (None: it can), probed once per pair.
_REASONS: dict[tuple[str, torch.device], str | None] = {}


# Constant for a given (backend, device): torch.compile runs it once at trace time instead of tracing the import.
@torch.compiler.assume_constant_result
def _why_not(name: str, device: torch.device) -> str | None:
    key = (name, device)
    if key not in _REASONS:
        _REASONS[key] = _probe(name, device)
    return _REASONS[key]


def _probe(name: str, device: torch.device) -> str | None:
    if name == "torch":
        return None
    try:
        module = importlib.import_module(_MODULES[name])
    except ImportError as exc:
        return f"cannot import {_MODULES[name]}: {exc}"
    return module.availability(name, device)


def available_backends(device: str | torch.device = "cpu") -> dict[str, str]:
    """Every backend with ``"available"`` or the reason it cannot run on ``device``; on a CUDA device,
    ``"available (<launch mode and why>)"`` for ``triton`` and ``cuda`` (see :func:`launch_mode`)."""
    device = torch.device(device)
    out = {}
    for name in BACKENDS:
        why = _why_not(name, device)
        if why is None and device.type == "cuda" and name in _BARRIER_BACKENDS:
            why = f"available ({launch_mode()})"
        out[name] = why or "available"
    return out


def resolve_backend(name: str, device: str | torch.device) -> str:
    """The concrete backend for ``name`` (``auto`` picks the fastest available) on ``device``.

    Raises ``ValueError`` naming the reason when an explicitly requested backend cannot run there.
    """
    device = torch.device(device)
    if name == "auto":
        for candidate in _PREFERENCE.get(device.type, ("torch",)):
            if _why_not(candidate, device) is None:
                return candidate
        return "torch"
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto', *BACKENDS)}, got {name!r}")
    reason = _why_not(name, device)
    if reason is not None:
        raise ValueError(f"backend {name!r} is not available on {device}: {reason}")
    return name
