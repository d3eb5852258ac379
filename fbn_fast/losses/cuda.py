"""Backend ``cuda``: the fused objective of ``csrc/objective_cuda.cu`` behind the shared op.

The kernel comes from the built extension ``fbn_fast._native_cuda`` or, where none was built, from the same
``.cu`` source compiled at run time by cupy/NVRTC (cached by cupy on disk and here per shape). float32,
float16, bfloat16 and float64 inputs are read and written in their own dtype, with float32 (float64) math;
float64 labels and tables stay float64. The extension takes raw device addresses and a raw stream, so it
does not depend on torch's C++ ABI.

Launch (on the tensors' device; the caller's current device is kept):

- *split plan* (the default): two ordinary launches on the current stream, statistics then rows; the last
  block of the second to finish reduces the terms. No block ever waits for another.
- *grid barrier* (opt-in, :func:`fbn_fast.losses.backends.set_grid_barrier` or ``FBN_FAST_GRID_BARRIER=1``):
  one cooperative launch whose two barriers are ``grid.sync()``.

The grid is ``min(ceil(B / block), #SMs × resident blocks per SM)``, the latter from CUDA's occupancy API for
the kernel build (registers, shared memory): a function of (device, kernel build) only, the same in both
modes, so the two modes and repeated calls give the same bits for the same batch.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from .backends import grid_barrier, load_extension
from .op import as_contiguous, check_inputs, compute_dtype, kernel_weights, register_impl

_cuda_ext, _cuda_missing = load_extension("_native_cuda")

#: Rows of pass sums per block on the GPU: pass-1 sums (counts, VA moments) and pass-2 sums (terms);
#: NSUM1 / NSUM2 of csrc/objective_math.h (tests/test_op_contract.py ties them to the header).
_NSUM1, _NSUM2 = 16, 7
#: Bytes of the split plan's ticket counter in the workspace: TICKET_BYTES of objective_cuda.cu.
_TICKET_BYTES = 16
#: Values of the kernel's ``phase`` argument (enum Phase of objective_cuda.cu).
_PHASE_ALL, _PHASE_STATS, _PHASE_ROWS = 0, 1, 2
#: Tables of the relatedness matrix go to shared memory up to this size (else they are read from global).
_SMEM_TABLE_LIMIT = 32 * 1024
_FACE = (7, 17)
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_NVRTC_TYPE = {torch.float32: "float", torch.float16: "fbn::f16", torch.bfloat16: "fbn::bf16",
               torch.float64: "double"}


# -------------------------------------------------------------------------------------------- sources
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


def nvrtc_options() -> tuple[str, ...]:
    """The options the run-time path passes to NVRTC (through cupy, which adds ``-ftz=true`` and, for cooperative
    groups, ``--device-c``); ``profiling/compile_targets.py`` compiles with the same."""
    return ("-std=c++17", *("-I" + d for d in _cuda_include_dirs()))


def _cupy_reason() -> str | None:
    try:
        import cupy  # noqa: F401
    except Exception as exc:  # ImportError, or a CUDA library that does not load
        return f"cupy is not importable ({type(exc).__name__}: {exc})"
    if _csrc_dir() is None:
        return "the CUDA sources are not installed next to the package"
    return None


class _Nvrtc:
    """Kernels compiled at run time by cupy/NVRTC, one per (dtype, shape class, device), cached."""

    def __init__(self) -> None:
        import cupy

        self.cupy = cupy
        self.lock = threading.Lock()
        self.kernels: dict[tuple, Any] = {}
        self.streams: dict[tuple[int, int], Any] = {}
        self.source = nvrtc_source()
        self.options = nvrtc_options()

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

            with self.cupy.cuda.Device(device.index):  # the kernel's module lives in that device's context
                per_sm = driver.occupancyMaxActiveBlocksPerMultiprocessor(kern.kernel.ptr, block, smem)
        except AttributeError:  # no occupancy API in this cupy: one block per SM always fits
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


# ------------------------------------------------------------------------------------------ workspace
def _tab_size(c: int, k: int) -> int:
    """Entries of the relatedness tables: tab_size() of objective_math.h."""
    return 4 * c * k + 3 * c + k


def _workspace_bytes(c: int, k: int, grid: int, block: int, itemsize: int, generic: bool) -> int:
    # The layout of objective_kernel (objective_cuda.cu): tables, pass sums, the ticket, row scratch.
    size = (_tab_size(c, k) * itemsize + 15) // 16 * 16 + grid * (_NSUM1 + _NSUM2) * 8 + _TICKET_BYTES
    return size + (grid * block * (6 * c + 2 * k) * itemsize if generic else 0)


@lru_cache(maxsize=256)
def _max_blocks_built(code: int, face: bool, cooperative: bool, block: int, smem: int, device: int) -> int:
    return _cuda_ext.max_blocks(code, face, cooperative, block, smem, device)


# ---------------------------------------------------------------------------------------------- backend
def limits(z_e: Tensor, b: int, c: int, k: int) -> None:
    """The ``cuda`` backend's own limit on top of the op's contract: CUDA tensors (any of
    :data:`~fbn_fast.losses.op.LOGIT_DTYPES`, read in their own dtype when z_e, z_a and v share it)."""
    if z_e.device.type != "cuda":
        raise ValueError(f"z_e is on {z_e.device}: backend 'cuda' takes CUDA tensors")


def objective_cuda(z_e: Tensor, z_a: Tensor, v: Tensor, expr: Tensor, expr_mask: Tensor, au: Tensor,
                   au_mask: Tensor, va: Tensor, va_mask: Tensor, relatedness: Tensor, va_means: Tensor | None,
                   au_pos_weight: Tensor | None, weights: Tensor | Sequence[float], temperature: float, eps: float,
                   path: str = "auto",
                   total: Tensor | None = None, barrier: bool | None = None,
                   check: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The ``cuda`` backend; ``check`` runs the op's input check (the op calls this with ``check=False``).

    Returns ``[total, *TERMS]`` in the compute dtype and the gradients in the inputs' dtypes; ``total`` (a 0-d
    tensor of the compute dtype on the device), when given, also receives the total. ``weights``: one per term
    (a tensor on the device, which the kernel reads: new values never recompile; or floats; or the six of
    ``WEIGHTS``); ``au_pos_weight``: (K,) weights of the AUs' positive labels in ``L_au`` (``None``: 1).
    ``path``: ``built`` (the compiled
    extension), ``nvrtc`` (cupy at run time) or ``auto`` (built when present; ``FBN_FAST_CUDA_NVRTC=1``
    forces NVRTC). ``barrier``: the grid-barrier mode instead of the split plan (``None``: the documented
    switch, :func:`fbn_fast.losses.backends.grid_barrier`). An expression class outside [0, C) under a true
    mask makes the ``expr`` term and the total NaN (checking it on the host would need a sync).
    """
    if check:
        check_inputs("cuda", z_e, z_a, v, expr, expr_mask, au, au_mask, va, va_mask, relatedness, va_means,
                     au_pos_weight, weights, temperature, eps)
    path = _cuda_path(path)
    cooperative = grid_barrier() if barrier is None else barrier
    b, c = z_e.shape
    k = z_a.shape[1]
    dev = z_e.device
    same = z_e.dtype == z_a.dtype == v.dtype
    tin = z_e.dtype if same else compute_dtype(z_e)
    dt = compute_dtype(z_e)  # labels and tables: float64 for float64 logits, never narrowed
    ze, za, vv = (as_contiguous(t.detach(), tin) for t in (z_e, z_a, v))
    ex = as_contiguous(expr, torch.int64)
    me, ma, mv = (as_contiguous(t, torch.bool) for t in (expr_mask, au_mask, va_mask))
    ya, yv, rel = (as_contiguous(t, dt) for t in (au, va, relatedness))
    mu = None if va_means is None else as_contiguous(va_means, dt)
    pw = None if au_pos_weight is None else as_contiguous(au_pos_weight, dt)
    itemsize = 8 if dt == torch.float64 else 4
    tab_bytes = _tab_size(c, k) * itemsize
    use_smem = tab_bytes <= _SMEM_TABLE_LIMIT
    smem = tab_bytes if use_smem else 0

    if path == "built":
        face = (c, k) == _FACE
        block = 256 if face else 128
        cap = _max_blocks_built(_DTYPE_CODE[tin], face, cooperative, block, smem, dev.index)
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
    if total is not None and (total.shape != () or total.dtype != dt or total.device != dev):
        raise ValueError(f"total: expected a 0-d {dt} tensor on {dev}, got {tuple(total.shape)} "
                         f"{total.dtype} on {total.device}")
    wts = kernel_weights(weights, dev)
    ptrs = [t.data_ptr() for t in (ze, za, vv, ex, me, ya, ma, yv, mv, rel)]
    ptrs += [0 if t is None else t.data_ptr() for t in (mu, pw)]
    ptrs += [terms.data_ptr(), 0 if total is None else total.data_ptr()]
    ptrs += [t.data_ptr() for t in (ge, ga, gv, work, wts)]
    stream = torch.cuda.current_stream(dev).cuda_stream
    if path == "built":
        _cuda_ext.launch(_DTYPE_CODE[tin], face, cooperative, dev.index, stream, grid, block, smem, ptrs, work_bytes,
                         b, c, k, mu is not None, use_smem, 1.0 / float(temperature), float(eps))
    else:
        import numpy as np

        args = [np.uint64(p) for p in ptrs] + [np.int64(work_bytes), np.int64(b), np.int32(c), np.int32(k),
                                                np.int32(mu is not None), np.int32(use_smem)]
        args += [np.float64(1.0 / float(temperature)), np.float64(eps)]
        # cupy launches this module's kernels cooperatively; the split plan's grid fits all the same (same cap).
        phases = (_PHASE_ALL,) if cooperative else (_PHASE_STATS, _PHASE_ROWS)
        with nv.cupy.cuda.Device(dev.index):
            for phase in phases:
                kern((grid,), (block,), (*args, np.int32(phase)), shared_mem=smem, stream=nv.stream(stream, dev))
    return terms, as_contiguous(ge, z_e.dtype), as_contiguous(ga, z_a.dtype), as_contiguous(gv, v.dtype)


def _cuda_impl(*args: Any) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    total = torch.empty((), dtype=compute_dtype(args[0]), device=args[0].device)
    terms, ge, ga, gv = objective_cuda(*args, total=total, check=False)
    return total, terms, ge, ga, gv


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
    """``None`` when ``backend`` (``cuda``) can run on ``device``, else the reason it cannot."""
    if backend != "cuda":
        return f"{__name__} provides only the 'cuda' backend, not {backend!r}"
    return _cuda_reason(torch.device(device).type)


register_impl("cuda", _cuda_impl, limits)
