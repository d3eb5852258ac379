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
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .analytic import analytic_terms_and_grads
from .reference import TERMS

#: impl name -> function(z_e, z_a, v, expr, expr_mask, au, au_mask, va, va_mask, R, mu, weights, T, eps)
#: returning (total, terms, grad_z_e, grad_z_a, grad_v); ``total`` must not be a view of ``terms``.
ImplFn = Callable[..., tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]
_IMPLS: dict[str, ImplFn] = {}


def register_impl(name: str, fn: ImplFn) -> None:
    """Make ``fn`` callable as ``impl=name`` through the op."""
    _IMPLS[name] = fn


def registered_impls() -> tuple[str, ...]:
    return tuple(_IMPLS)


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
    try:
        fn = _IMPLS[impl]
    except KeyError:
        raise ValueError(f"fbn_fast::objective has no implementation {impl!r}; registered: {sorted(_IMPLS)}") from None
    return fn(z_e, z_a, v, expr, expr_mask, au, au_mask, va, va_mask, relatedness, va_means,
              tuple(weights), temperature, eps)


@objective.register_fake
def _(z_e, z_a, v, expr, expr_mask, au, au_mask, va, va_mask, relatedness, va_means, weights, temperature, eps,
      impl):
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
