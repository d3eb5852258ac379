"""The fused objective as one ``torch.library`` op, shared by every fused backend.

``fbn_fast::objective`` returns the total (a 0-d float32 tensor), the term vector ``[total, *TERMS]``
(float32, for logging) and the gradients of the total with respect to ``z_e``, ``z_a`` and ``v`` (in their
dtypes), all computed in the forward pass. Its autograd formula only scales the stored gradients by the
incoming gradient of the total, on the device: one multi-tensor kernel. The total is an output of its own
rather than a view of the term vector because the backward of a view would scatter the incoming gradient
into a zero-filled vector (two more kernels). A fused backend is therefore two launches for forward and
backward: its forward kernel and that scaling. A backend plugs in with
:func:`register_impl`; the op dispatches on the ``impl`` string it is called with. Having a fake
(meta) implementation, the op traces under ``torch.compile(fullgraph=True)``, autocast and CUDA graphs.

The op's contract is :func:`check_inputs`, run once per call in the op's entry point (and by its fake
implementation, so that a traced call fails at trace time): shapes, dtypes and devices of every tensor, the
weights, temperature and eps, then the limits the chosen backend registered with its implementation (its
device type, Triton's largest C and K). Implementations read their inputs unchecked; the backends' own
entry points for tests and tuning (``triton_objective``, ``objective_cpu``, ``objective_cuda``) run the
same check.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..validation import check_shape
from .analytic import analytic_terms_and_grads
from .reference import TERMS, WEIGHTS

#: impl name -> function(z_e, z_a, v, expr, expr_mask, au, au_mask, va, va_mask, R, mu, weights, T, eps)
#: returning (total, terms, grad_z_e, grad_z_a, grad_v); ``total`` must not be a view of ``terms``.
ImplFn = Callable[..., tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]
#: A backend's own limits: ``limits(z_e, B, C, K)`` raises ``ValueError`` (naming the tensor) for inputs that
#: pass :func:`check_inputs` but that this backend cannot take.
LimitsFn = Callable[[Tensor, int, int, int], None]
_IMPLS: dict[str, ImplFn] = {}
_LIMITS: dict[str, LimitsFn | None] = {}

#: Storage dtypes of ``z_e``, ``z_a``, ``v`` (and of their gradients) that every backend reads.
LOGIT_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NAMES = ("z_e", "z_a", "v", "expr", "expr_mask", "au", "au_mask", "va", "va_mask", "relatedness", "va_means")


def register_impl(name: str, fn: ImplFn, limits: LimitsFn | None = None) -> None:
    """Make ``fn`` callable as ``impl=name`` through the op; ``limits`` adds the backend's own input limits."""
    _IMPLS[name] = fn
    _LIMITS[name] = limits


def registered_impls() -> tuple[str, ...]:
    return tuple(_IMPLS)


def compute_dtype(z_e: Tensor) -> torch.dtype:
    """The dtype every backend computes in (as the reference): float64 for float64 logits, else float32."""
    return torch.float64 if z_e.dtype == torch.float64 else torch.float32


def as_contiguous(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` as a contiguous ``dtype`` tensor (what the native kernels read), without a call into torch when it
    already is one."""
    if t.dtype != dtype:
        t = t.to(dtype)
    return t if t.is_contiguous() else t.contiguous()


def check_inputs(impl: str, z_e: Tensor, z_a: Tensor, v: Tensor, expr: Tensor, expr_mask: Tensor, au: Tensor,
                 au_mask: Tensor, va: Tensor, va_mask: Tensor, relatedness: Tensor, va_means: Tensor | None,
                 weights: Sequence[float], temperature: float, eps: float) -> tuple[int, int, int]:
    """``B, C, K`` of a call of the op with backend ``impl``, after the one input check of the op's contract.

    Every problem raises ``ValueError`` naming the tensor (or argument): shapes, ``B, C, K >= 1``, dtypes
    (logits in :data:`LOGIT_DTYPES`, integer class indices, bool or integer masks, floating labels and tables),
    one device for all tensors, six weights, ``temperature > 0``, ``0 < eps < 0.5``; then the limits that
    ``impl`` registered. Values are not read (that would be a host sync): an invalid class makes the ``expr``
    term NaN (or, on the ``cpu`` backend, raises).
    """
    check_shape("z_e", z_e.shape, (None, None), "= (B, C)")
    check_shape("z_a", z_a.shape, (z_e.shape[0], None), "= (B, K) with B from z_e")
    b, c = z_e.shape
    k = z_a.shape[1]
    if b < 1:
        raise ValueError("z_e: the batch is empty (B = 0)")
    if c < 1 or k < 1:
        raise ValueError(f"z_e, z_a: C = {c} and K = {k} must be >= 1")
    tensors = (z_e, z_a, v, expr, expr_mask, au, au_mask, va, va_mask, relatedness, va_means)
    shapes = ((b, c), (b, k), (b, 2), (b,), (b,), (b, k), (b, k), (b, 2), (b,), (c, k), (c, 2))
    dev = z_e.device
    for name, t, shape in zip(_NAMES, tensors, shapes):
        if t is None:
            continue
        check_shape(name, t.shape, shape, "from z_e and z_a")
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device}, z_e on {dev}: all inputs must share one device")
        _check_dtype(name, t.dtype)
    if len(weights) != len(WEIGHTS):
        raise ValueError(f"weights: expected {len(WEIGHTS)} weights {WEIGHTS}, got {len(weights)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps!r}")
    limits = _LIMITS.get(impl)
    if limits is not None:
        limits(z_e, b, c, k)
    return b, c, k


def _check_dtype(name: str, dtype: torch.dtype) -> None:
    integer = not (dtype.is_floating_point or dtype.is_complex) and dtype != torch.bool
    if name in ("z_e", "z_a", "v"):
        ok, want = dtype in LOGIT_DTYPES, "one of float16, bfloat16, float32, float64"
    elif name == "expr":
        ok, want = integer, "an integer dtype (class indices)"
    elif name.endswith("_mask"):
        ok, want = dtype == torch.bool or integer, "bool (or an integer dtype holding 0/1)"
    else:
        ok, want = dtype.is_floating_point, "a floating dtype"
    if not ok:
        raise ValueError(f"{name}: dtype {dtype}, expected {want}")


@torch.library.custom_op("fbn_fast::objective", mutates_args=())
def objective(
    z_e: Tensor,
    z_a: Tensor,
    v: Tensor,
    expr: Tensor,
    expr_mask: Tensor,
    au: Tensor,
    au_mask: Tensor,
    va: Tensor,
    va_mask: Tensor,
    relatedness: Tensor,
    va_means: Tensor | None,
    weights: list[float],
    temperature: float,
    eps: float,
    impl: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    fn = _impl(impl)
    check_inputs(impl, z_e, z_a, v, expr, expr_mask, au, au_mask, va, va_mask, relatedness, va_means, weights,
                 temperature, eps)
    return fn(z_e, z_a, v, expr, expr_mask, au, au_mask, va, va_mask, relatedness, va_means,
              tuple(weights), temperature, eps)


def _impl(impl: str) -> ImplFn:
    try:
        return _IMPLS[impl]
    except KeyError:
        raise ValueError(f"fbn_fast::objective has no implementation {impl!r}; registered: {sorted(_IMPLS)}") from None


@objective.register_fake
def _(z_e, z_a, v, expr, expr_mask, au, au_mask, va, va_mask, relatedness, va_means, weights, temperature, eps,
      impl):
    _impl(impl)
    check_inputs(impl, z_e, z_a, v, expr, expr_mask, au, au_mask, va, va_mask, relatedness, va_means, weights,
                 temperature, eps)
    total = z_e.new_empty((), dtype=torch.float32)
    terms = z_e.new_empty((1 + len(TERMS),), dtype=torch.float32)
    return total, terms, torch.empty_like(z_e), torch.empty_like(z_a), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    _, _, g_e, g_a, g_v = output
    ctx.save_for_backward(g_e, g_a, g_v)


def _backward(ctx, g_total, _g_terms, _g_e, _g_a, _g_v):
    g_e, g_a, g_v = ctx.saved_tensors
    # Only the total is differentiable (the terms are for logging); one multi-tensor kernel scales all three.
    grads = torch._foreach_mul([g_e, g_a, g_v], g_total)
    return (*grads, None, None, None, None, None, None, None, None, None, None, None, None)


torch.library.register_autograd("fbn_fast::objective", _backward, setup_context=_setup_context)


register_impl("torch", analytic_terms_and_grads)
