"""Backend ``cpu``: the fused objective of ``csrc/objective_cpu.cpp`` (the extension ``fbn_fast._native``)
behind the shared op.

Rows run in parallel (OpenMP), float32 rows 4, 8 or 16 to a SIMD pack by instruction set (:func:`cpu_isas`,
:func:`cpu_isa`), reductions in a fixed chunk order, so results do not depend on the thread count. Float64
inputs are computed in float64 (and give float64 terms); half types are computed in float32 (converted on
the way in and out). An invalid class under a true mask raises ``ValueError`` (the values are on the host
anyway). The per-term weights are read from a float64 buffer. The extension takes
raw buffer addresses, so it does not depend on torch's C++ ABI. Threads: :func:`set_num_threads` (default:
``torch.get_num_threads()``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from .backends import load_extension
from .op import as_contiguous, check_inputs, compute_dtype, invalid_class_error, kernel_weights, register_impl

_cpu_ext, _cpu_missing = load_extension("_native")
_threads: int | None = None


# --------------------------------------------------------------------------------------------- threads
def set_num_threads(n: int | None) -> None:
    """Threads of the ``cpu`` backend; ``None`` follows ``torch.get_num_threads()``."""
    global _threads
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"set_num_threads: n must be a positive int or None, got {n!r}")
    _threads = n


def get_num_threads() -> int:
    return _threads if _threads is not None else torch.get_num_threads()


@contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """Run the ``cpu`` backend with ``n`` threads inside the block."""
    old = _threads
    set_num_threads(n)
    try:
        yield
    finally:
        set_num_threads(old)


def cpu_isas() -> list[str]:
    """Instruction sets of the ``cpu`` backend's float32 body that this CPU runs (``baseline``, ``avx2``,
    ``avx512``); empty without the extension."""
    return [] if _cpu_ext is None else list(_cpu_ext.supported_isas())


@contextmanager
def cpu_isa(name: str | None) -> Iterator[None]:
    """Run the ``cpu`` backend's float32 body with instruction set ``name`` inside the block (``None``: the
    best one; for tests and benchmarks: results may differ across instruction sets by float32 rounding)."""
    if _cpu_ext is None:
        raise RuntimeError(f"backend 'cpu': {_cpu_missing}")
    old = _cpu_ext.isa()
    _cpu_ext.set_isa(name)  # ValueError for an unknown or unsupported name
    try:
        yield
    finally:
        _cpu_ext.set_isa(old)


# ---------------------------------------------------------------------------------------------- backend
def limits(z_e: Tensor, b: int, c: int, k: int) -> None:
    """The ``cpu`` backend's own limit on top of the op's contract: CPU tensors."""
    if z_e.device.type != "cpu":
        raise ValueError(f"z_e is on {z_e.device}: backend 'cpu' takes CPU tensors")


def objective_cpu(z_e: Tensor, z_a: Tensor, v: Tensor, expr: Tensor, expr_mask: Tensor, au: Tensor,
                  au_mask: Tensor, va: Tensor, va_mask: Tensor, relatedness: Tensor, va_means: Tensor | None,
                  au_pos_weight: Tensor | None, weights: Tensor | Sequence[float], temperature: float, eps: float,
                  threads: int | None = None, check: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The ``cpu`` backend: ``[total, *TERMS]`` in the compute dtype (float64 for float64 logits) and the
    gradients of the total w.r.t. ``z_e``, ``z_a``, ``v`` in their dtypes. ``check`` runs the op's input check
    (the op calls this with ``check=False``, having checked). ``weights``: one per term (a tensor, read by the
    kernel from memory, or floats; or the six of ``WEIGHTS``)."""
    if check:
        check_inputs("cpu", z_e, z_a, v, expr, expr_mask, au, au_mask, va, va_mask, relatedness, va_means,
                     au_pos_weight, weights, temperature, eps)
    if _cpu_ext is None:
        raise RuntimeError(f"backend 'cpu': {_cpu_missing}")
    b, c = z_e.shape
    k = z_a.shape[1]
    dt = compute_dtype(z_e)
    ze, za, vv = (as_contiguous(t.detach(), dt) for t in (z_e, z_a, v))
    ex = as_contiguous(expr, torch.int64)
    me, ma, mv = (as_contiguous(t, torch.bool) for t in (expr_mask, au_mask, va_mask))
    ya, yv, rel = (as_contiguous(t, dt) for t in (au, va, relatedness))
    mu = None if va_means is None else as_contiguous(va_means, dt)
    pw = None if au_pos_weight is None else as_contiguous(au_pos_weight, dt)
    wts = kernel_weights(weights, ze.device)
    terms = torch.empty(9, dtype=dt)
    ge, ga, gv = torch.empty_like(ze), torch.empty_like(za), torch.empty_like(vv)
    bad = _cpu_ext.objective(
        dt == torch.float64, b, c, k, ze.data_ptr(), za.data_ptr(), vv.data_ptr(), ex.data_ptr(), me.data_ptr(),
        ya.data_ptr(), ma.data_ptr(), yv.data_ptr(), mv.data_ptr(), rel.data_ptr(),
        0 if mu is None else mu.data_ptr(), 0 if pw is None else pw.data_ptr(), wts.data_ptr(),
        1.0 / float(temperature), float(eps),
        terms.data_ptr(), ge.data_ptr(), ga.data_ptr(), gv.data_ptr(), threads or get_num_threads())
    if bad >= 0:
        raise invalid_class_error(bad, int(ex[bad]), c)
    return terms, as_contiguous(ge, z_e.dtype), as_contiguous(ga, z_a.dtype), as_contiguous(gv, v.dtype)


def _cpu_impl(*args: Any) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    terms, ge, ga, gv = objective_cpu(*args, check=False)
    return terms[0].clone(), terms, ge, ga, gv


def availability(backend: str, device: torch.device) -> str | None:
    """``None`` when ``backend`` (``cpu``) can run on ``device``, else the reason it cannot."""
    if backend != "cpu":
        return f"{__name__} provides only the 'cpu' backend, not {backend!r}"
    if _cpu_ext is None:
        return _cpu_missing
    device = torch.device(device)
    if device.type != "cpu":
        return f"the cpu backend runs on CPU tensors, not {device.type}"
    return None


register_impl("cpu", _cpu_impl, limits, checks_classes=True)  # the kernel reports a bad class (``bad`` above)
