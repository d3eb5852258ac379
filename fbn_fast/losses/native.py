"""Backends ``cpu`` and ``cuda``: the fused objective of ``csrc/`` (C++ and CUDA) behind the shared op.

- ``cpu``: the extension ``fbn_fast._native``; rows in parallel (OpenMP), float32 rows 4, 8 or 16 to a SIMD
  pack by instruction set (:func:`cpu_isas`, :func:`cpu_isa`), reductions in a fixed chunk order, so results
  do not depend on the thread count. Float64 inputs are computed in float64; half types are computed in
  float32 (converted on the way in and out). An invalid class under a true mask raises ``ValueError``.
- ``cuda``: one cooperative kernel launch for all terms and gradients, from the built extension
  ``fbn_fast._native_cuda`` or, where none was built, from the same ``.cu`` source compiled at run time by
  cupy/NVRTC (cached by cupy on disk and here per shape). float32, float16, bfloat16 and float64 inputs are
  read and written in their own dtype, with float32 (float64) math.

Both take raw buffer addresses, so neither depends on torch's C++ ABI. Threads of the ``cpu`` backend:
:func:`set_num_threads` (default: ``torch.get_num_threads()``).
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from .op import register_impl

#: Why a backend cannot run when the extension module is missing.
NOT_BUILT = "native extension not built (FBN_FAST_NO_EXT=1 or no compiler)"
#: Rows of pass sums per block on the GPU: pass-1 sums (counts, VA moments) and pass-2 sums (terms);
#: must match NSUM1 / NSUM2 in csrc/objective_math.h.
_NSUM1, _NSUM2 = 16, 7
#: Tables of the relatedness matrix go to shared memory up to this size (else they are read from global).
_SMEM_TABLE_LIMIT = 32 * 1024
_FACE = (7, 17)

_threads: int | None = None


def _load(name: str) -> tuple[Any, str | None]:
    try:
        return importlib.import_module(f"fbn_fast.{name}"), None
    except ImportError as exc:
        return None, f"{NOT_BUILT}: {exc}"


_cpu_ext, _cpu_missing = _load("_native")
_cuda_ext, _cuda_missing = _load("_native_cuda")


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


# ------------------------------------------------------------------------------------------- checks
def _shapes(z_e: Tensor, z_a: Tensor, v: Tensor, expr: Tensor, expr_mask: Tensor, au: Tensor, au_mask: Tensor,
            va: Tensor, va_mask: Tensor, relatedness: Tensor, va_means: Tensor | None) -> tuple[int, int, int]:
    """``B, C, K`` after checking every shape and device (the kernels read raw memory)."""
    if z_e.ndim != 2 or z_a.ndim != 2:
        raise ValueError(f"z_e, z_a must be (B,C), (B,K); got {tuple(z_e.shape)}, {tuple(z_a.shape)}")
    b, c = z_e.shape
    k = z_a.shape[1]
    if b < 1 or c < 1 or k < 1:
        raise ValueError(f"the native objective needs B, C, K >= 1; got B={b}, C={c}, K={k}")
    dev = z_e.device
    checks = [("z_a", z_a, (b, k)), ("v", v, (b, 2)), ("expr", expr, (b,)), ("expr_mask", expr_mask, (b,)),
              ("au", au, (b, k)), ("au_mask", au_mask, (b, k)), ("va", va, (b, 2)), ("va_mask", va_mask, (b,)),
              ("relatedness", relatedness, (c, k))]
    if va_means is not None:
        checks.append(("va_means", va_means, (c, 2)))
    for name, t, shape in checks:
        if t.shape != shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)}, expected {shape}")
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device}, z_e on {dev}: all inputs must share one device")
    return b, c, k


def _check_call(backend: str, weights: tuple[float, ...], z_e: Tensor, *rest: Tensor | None) -> tuple[int, int, int]:
    """``B, C, K`` of a call of ``backend`` (``cpu`` / ``cuda``: also the device type it takes), checked."""
    if z_e.device.type != backend:
        raise ValueError(f"backend '{backend}' takes {backend.upper()} tensors, got z_e on {z_e.device}")
    shapes = _shapes(z_e, *rest)
    if len(weights) != 6:
        raise ValueError(f"weights: expected 6 values (expr, au, va, ca, dm, ev), got {len(weights)}")
    return shapes


def _compute_dtype(z_e: Tensor) -> torch.dtype:
    # As the reference: float64 math for float64 logits, float32 otherwise.
    return torch.float64 if z_e.dtype == torch.float64 else torch.float32


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` as a contiguous ``dtype`` tensor, without a call into torch when it already is one."""
    if t.dtype != dtype:
        t = t.to(dtype)
    return t if t.is_contiguous() else t.contiguous()


# ----------------------------------------------------------------------------------------------- cpu
def objective_cpu(z_e: Tensor, z_a: Tensor, v: Tensor, expr: Tensor, expr_mask: Tensor, au: Tensor,
                  au_mask: Tensor, va: Tensor, va_mask: Tensor, relatedness: Tensor, va_means: Tensor | None,
                  weights: tuple[float, ...], temperature: float, eps: float,
                  threads: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The ``cpu`` backend: ``[total, *TERMS]`` in the compute dtype (float64 for float64 logits) and the
    gradients of the total w.r.t. ``z_e``, ``z_a``, ``v`` in their dtypes."""
    if _cpu_ext is None:
        raise RuntimeError(f"backend 'cpu': {_cpu_missing}")
    b, c, k = _check_call("cpu", weights, z_e, z_a, v, expr, expr_mask, au, au_mask, va, va_mask, relatedness,
                          va_means)
    dt = _compute_dtype(z_e)
    ze, za, vv = _as(z_e.detach(), dt), _as(z_a.detach(), dt), _as(v.detach(), dt)
    ex = _as(expr, torch.int64)
    me, ma, mv = _as(expr_mask, torch.bool), _as(au_mask, torch.bool), _as(va_mask, torch.bool)
    ya, yv, rel = _as(au, dt), _as(va, dt), _as(relatedness, dt)
    mu = None if va_means is None else _as(va_means, dt)
    terms = torch.empty(9, dtype=dt)
    ge, ga, gv = torch.empty_like(ze), torch.empty_like(za), torch.empty_like(vv)
    bad = _cpu_ext.objective(
        dt == torch.float64, b, c, k, ze.data_ptr(), za.data_ptr(), vv.data_ptr(), ex.data_ptr(), me.data_ptr(),
        ya.data_ptr(), ma.data_ptr(), yv.data_ptr(), mv.data_ptr(), rel.data_ptr(),
        0 if mu is None else mu.data_ptr(), [float(w) for w in weights], 1.0 / float(temperature), float(eps),
        terms.data_ptr(), ge.data_ptr(), ga.data_ptr(), gv.data_ptr(), threads or get_num_threads())
    if bad >= 0:
        raise ValueError(f"expr: row {bad} has class {int(ex[bad])} outside [0, {c}) under a true expr_mask")
    return terms, _as(ge, z_e.dtype), _as(ga, z_a.dtype), _as(gv, v.dtype)


def _cpu_impl(*args: Any) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    terms, ge, ga, gv = objective_cpu(*args)
    terms = terms.float()
    return terms[0].clone(), terms, ge, ga, gv


# ---------------------------------------------------------------------------------------------- cuda
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_NVRTC_TYPE = {torch.float32: "float", torch.float16: "fbn::f16", torch.bfloat16: "fbn::bf16",
               torch.float64: "double"}


def _csrc_dir() -> str | None:
    """Where the CUDA sources are: shipped inside the package, or the source tree next to it."""
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for d in (os.path.join(pkg, "_csrc"), os.path.join(os.path.dirname(pkg), "csrc")):
        if os.path.isfile(os.path.join(d, "objective_cuda.cu")) and os.path.isfile(os.path.join(d, "objective_math.h")):
            return d
    return None


def nvrtc_source(csrc: str | None = None) -> str:
    """``objective_cuda.cu`` with ``objective_math.h`` pasted in: one self-contained NVRTC translation unit
    (and, through its text, the key of cupy's compile cache)."""
    csrc = csrc or _csrc_dir()
    if csrc is None:
        raise FileNotFoundError("the CUDA sources (objective_cuda.cu, objective_math.h) are not installed")
    with open(os.path.join(csrc, "objective_cuda.cu")) as f:
        cu = f.read()
    with open(os.path.join(csrc, "objective_math.h")) as f:
        header = f.read()
    include = '#include "objective_math.h"'
    if include not in cu:
        raise RuntimeError(f"objective_cuda.cu no longer includes objective_math.h as {include!r}")
    return cu.replace(include, header.replace("#pragma once", "", 1))


def _cuda_include_dirs() -> list[str]:
    """The toolkit's include folder for cooperative_groups.h, and its cccl/ folder (libcu++, which that header
    includes in CUDA 13), when a toolkit is installed."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for r in roots:
        inc = os.path.join(r or "", "include")
        if r and os.path.isfile(os.path.join(inc, "cooperative_groups.h")):
            return [d for d in (inc, os.path.join(inc, "cccl")) if os.path.isdir(d)]
    return []


def _cupy_reason() -> str | None:
    try:
        import cupy  # noqa: F401
    except Exception as exc:  # ImportError, or a CUDA library that does not load
        return f"cupy is not importable ({type(exc).__name__}: {exc})"
    if _csrc_dir() is None:
        return "the CUDA sources are not installed next to the package"
    return None


class _Nvrtc:
    """Kernels compiled at run time by cupy/NVRTC, one per (dtype, shape class), cached."""

    def __init__(self) -> None:
        import cupy

        self.cupy = cupy
        self.lock = threading.Lock()
        self.kernels: dict[tuple, Any] = {}
        self.streams: dict[tuple[int, int], Any] = {}
        self.source = nvrtc_source()
        self.options = ("-std=c++17", *("-I" + d for d in _cuda_include_dirs()))

    @staticmethod
    def specialise(c: int, k: int) -> bool:
        # Shapes whose row arrays fit in registers get a kernel with C and K fixed at compile time.
        return 6 * c + 2 * k <= 128

    def kernel(self, dtype: torch.dtype, c: int, k: int, device: torch.device) -> Any:
        cc, kk = (c, k) if self.specialise(c, k) else (0, 0)
        key = (dtype, cc, kk, device.index)
        with self.lock:
            if key not in self.kernels:
                t = "double" if dtype == torch.float64 else "float"
                name = f"fbn::objective_kernel<{_NVRTC_TYPE[dtype]}, {t}, {cc}, {kk}>"
                with self.cupy.cuda.Device(device.index):
                    mod = self.cupy.RawModule(code=self.source, options=self.options, name_expressions=[name],
                                              enable_cooperative_groups=True)
                    self.kernels[key] = mod.get_function(name)
            return self.kernels[key]

    def max_blocks(self, kern: Any, block: int, smem: int, device: torch.device) -> int:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        try:
            from cupy.cuda import driver

            per_sm = driver.occupancyMaxActiveBlocksPerMultiprocessor(kern.kernel.ptr, block, smem)
        except Exception:  # no occupancy API in this cupy: one block per SM always fits
            per_sm = 1
        return sms * max(1, int(per_sm))

    def stream(self, ptr: int, device: torch.device) -> Any:
        key = (ptr, device.index)
        if key not in self.streams:
            self.streams[key] = self.cupy.cuda.ExternalStream(ptr, device.index)
        return self.streams[key]


@lru_cache(maxsize=1)
def _nvrtc() -> _Nvrtc:
    return _Nvrtc()


def _cuda_path(path: str) -> str:
    if path not in ("auto", "built", "nvrtc"):
        raise ValueError(f"path must be 'auto', 'built' or 'nvrtc', got {path!r}")
    if path == "auto":
        path = "nvrtc" if os.environ.get("FBN_FAST_CUDA_NVRTC", "0") == "1" or _cuda_ext is None else "built"
    if path == "built" and _cuda_ext is None:
        raise RuntimeError(f"backend 'cuda': {_cuda_missing}")
    return path


def _workspace_bytes(c: int, k: int, grid: int, block: int, itemsize: int, generic: bool) -> int:
    # Mirrors the layout in objective_kernel (objective_cuda.cu): tables, pass sums, row scratch.
    tab = (4 * c * k + 3 * c) * itemsize
    size = (tab + 15) // 16 * 16 + grid * (_NSUM1 + _NSUM2) * 8
    return size + (grid * block * (6 * c + 2 * k) * itemsize if generic else 0)


@lru_cache(maxsize=256)
def _max_blocks_built(code: int, face: bool, block: int, smem: int, device: int) -> int:
    return _cuda_ext.max_blocks(code, face, block, smem, device)


def objective_cuda(z_e: Tensor, z_a: Tensor, v: Tensor, expr: Tensor, expr_mask: Tensor, au: Tensor,
                   au_mask: Tensor, va: Tensor, va_mask: Tensor, relatedness: Tensor, va_means: Tensor | None,
                   weights: tuple[float, ...], temperature: float, eps: float,
                   path: str = "auto", total: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The ``cuda`` backend: one kernel launch (when the inputs are contiguous and of one dtype).

    Returns ``[total, *TERMS]`` in the compute dtype and the gradients in the inputs' dtypes; ``total`` (a 0-d
    float32 tensor on the device), when given, also receives the total from the same launch. ``path``:
    ``built`` (the compiled extension), ``nvrtc`` (cupy at run time) or ``auto`` (built when present;
    ``FBN_FAST_CUDA_NVRTC=1`` forces NVRTC). An expression class outside [0, C) under a true mask makes the
    ``expr`` term and the total NaN (checking it on the host would need a sync).
    """
    b, c, k = _check_call("cuda", weights, z_e, z_a, v, expr, expr_mask, au, au_mask, va, va_mask, relatedness,
                          va_means)
    path = _cuda_path(path)
    dev = z_e.device
    same = z_e.dtype == z_a.dtype == v.dtype and z_e.dtype in _DTYPE_CODE
    tin = z_e.dtype if same else _compute_dtype(z_e)
    dt = torch.float64 if tin == torch.float64 else torch.float32
    ze, za, vv = _as(z_e.detach(), tin), _as(z_a.detach(), tin), _as(v.detach(), tin)
    ex = _as(expr, torch.int64)
    me, ma, mv = _as(expr_mask, torch.bool), _as(au_mask, torch.bool), _as(va_mask, torch.bool)
    ya, yv, rel = _as(au, dt), _as(va, dt), _as(relatedness, dt)
    mu = None if va_means is None else _as(va_means, dt)
    itemsize = 8 if dt == torch.float64 else 4
    tab_bytes = (4 * c * k + 3 * c) * itemsize
    use_smem = tab_bytes <= _SMEM_TABLE_LIMIT
    smem = tab_bytes if use_smem else 0

    if path == "built":
        face = (c, k) == _FACE
        block = 256 if face else 128
        cap = _max_blocks_built(_DTYPE_CODE[tin], face, block, smem, dev.index)
        kern = None
    else:
        nv = _nvrtc()
        face = nv.specialise(c, k)
        block = 256 if face else 128
        kern = nv.kernel(tin, c, k, dev)
        cap = nv.max_blocks(kern, block, smem, dev)
    if cap < 1:
        raise RuntimeError(f"backend 'cuda': a block of {block} threads does not fit on {dev}")
    grid = max(1, min((b + block - 1) // block, cap))
    work_bytes = _workspace_bytes(c, k, grid, block, itemsize, generic=not face)
    work = torch.empty(work_bytes, dtype=torch.uint8, device=dev)
    terms = torch.empty(9, dtype=dt, device=dev)
    ge, ga, gv = torch.empty_like(ze), torch.empty_like(za), torch.empty_like(vv)
    if total is not None and (total.shape != () or total.dtype != torch.float32 or total.device != dev):
        raise ValueError(f"total: expected a 0-d float32 tensor on {dev}, got {tuple(total.shape)} "
                         f"{total.dtype} on {total.device}")
    ptrs = [t.data_ptr() for t in (ze, za, vv, ex, me, ya, ma, yv, mv, rel)]
    ptrs += [0 if mu is None else mu.data_ptr(), terms.data_ptr(), 0 if total is None else total.data_ptr()]
    ptrs += [t.data_ptr() for t in (ge, ga, gv, work)]
    w = [float(x) for x in weights]
    stream = torch.cuda.current_stream(dev).cuda_stream
    if path == "built":
        _cuda_ext.launch(_DTYPE_CODE[tin], face, dev.index, stream, grid, block, smem, ptrs, work_bytes, b, c, k,
                         mu is not None, use_smem, w, 1.0 / float(temperature), float(eps))
    else:
        import numpy as np

        args = [np.uint64(p) for p in ptrs] + [np.int64(work_bytes), np.int64(b), np.int32(c), np.int32(k),
                                                np.int32(mu is not None), np.int32(use_smem)]
        args += [np.float64(x) for x in w] + [np.float64(1.0 / float(temperature)), np.float64(eps)]
        with nv.cupy.cuda.Device(dev.index):
            kern((grid,), (block,), tuple(args), shared_mem=smem, stream=nv.stream(stream, dev))
    return terms, _as(ge, z_e.dtype), _as(ga, z_a.dtype), _as(gv, v.dtype)


def _cuda_impl(*args: Any) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    total = torch.empty((), dtype=torch.float32, device=args[0].device)
    terms, ge, ga, gv = objective_cuda(*args, total=total)
    return total, terms.float(), ge, ga, gv


# -------------------------------------------------------------------------------------- availability
_cuda_reasons: dict[str, str | None] = {}


def _cuda_reason(device_type: str) -> str | None:
    # A plain dict as the cache: the check runs on every loss call and stays traceable by torch.compile.
    if device_type not in _cuda_reasons:
        _cuda_reasons[device_type] = _find_cuda_reason(device_type)
    return _cuda_reasons[device_type]


def _find_cuda_reason(device_type: str) -> str | None:
    if device_type != "cuda":
        return f"the cuda backend runs on CUDA tensors, not {device_type}"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    if os.environ.get("FBN_FAST_CUDA_NVRTC", "0") != "1" and _cuda_ext is not None:
        return None
    why = _cupy_reason()
    if why is None:
        return None
    return f"{_cuda_missing or 'NVRTC forced (FBN_FAST_CUDA_NVRTC=1)'}; runtime compilation unavailable: {why}"


def availability(backend: str, device: torch.device) -> str | None:
    """``None`` when ``backend`` (``cpu`` or ``cuda``) can run on ``device``, else the reason it cannot."""
    device = torch.device(device)
    if backend == "cpu":
        if _cpu_ext is None:
            return _cpu_missing
        if device.type != "cpu":
            return f"the cpu backend runs on CPU tensors, not {device.type}"
        return None
    if backend == "cuda":
        return _cuda_reason(device.type)
    return f"fbn_fast.losses.native provides 'cpu' and 'cuda', not {backend!r}"


register_impl("cpu", _cpu_impl)
register_impl("cuda", _cuda_impl)
