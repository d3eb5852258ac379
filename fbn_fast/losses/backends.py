"""Backend discovery and selection for the objective.

A fused backend lives in a module that, on import, registers its implementation with
:func:`fbn_fast.losses.op.register_impl` under the backend's name and defines
``availability(backend: str, device: torch.device) -> str | None`` (``None`` when that backend can run
on that device, else the reason it cannot). Importing is lazy, so a missing Triton or native build
costs nothing until asked for.
"""

from __future__ import annotations

import importlib

import torch

#: backend -> module defining it (``torch`` is the reference and needs none).
_MODULES: dict[str, str] = {
    "triton": "fbn_fast.kernels.objective",
    "cpu": "fbn_fast.losses.native",
    "cuda": "fbn_fast.losses.native",
}
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
    """Every backend with ``"available"`` or the reason it cannot run on ``device``."""
    device = torch.device(device)
    return {name: _why_not(name, device) or "available" for name in BACKENDS}


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
