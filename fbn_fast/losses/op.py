"""The fused objective as one ``torch.library`` op, shared by every fused backend.

``fbn_fast::objective`` returns the total (0-d), the term vector ``[total, *TERMS]`` (both float32, float64
for float64 logits) and the gradients of the total with respect to ``z_e``, ``z_a`` and ``v`` (in their
dtypes), all computed in the forward pass. The weights are data: a tensor of one weight per term
(:data:`~.reference.TERM_WEIGHTS`) on the logits' device that every kernel reads from memory, so new weight
values never recompile a compiled step, and that may require grad (d total / d w_i = L_i, the terms the
forward computed). Its autograd formula, by default, only scales the stored gradients by the incoming
gradient of the total, on the device: one multi-tensor kernel. With ``differentiable_terms=True`` every term is
differentiable too: by linearity the gradient is that of ``Σ_i c_i L_i`` with ``c_i = g_total w_i + g_i``,
so the backward relaunches the same fused kernel from the saved inputs with weights ``c`` (a device tensor,
no host sync) when some term's gradient is defined, and keeps the scaling otherwise. The backward of the
fused backends is not itself differentiable: a second-order gradient through it raises (backend ``torch``,
the autograd reference, is differentiable to any order). The total is an output of its own
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
same check. An empty batch (B = 0) gives zeros and zero gradients on every backend without a launch. An
expression class outside [0, C) under a true mask raises ``ValueError`` for CPU tensors (the values are on
the host) and makes the ``expr`` term and the total NaN on a GPU (checking would be a host sync): the op checks
the classes of CPU tensors itself (:func:`check_classes`) unless the backend registered that its kernel does
(``register_impl(..., checks_classes=True)``, as the ``cpu`` backend, whose kernel reports the first bad row).
The weights reach every kernel as float64 (:data:`KERNEL_WEIGHT_DTYPE`): a float64 weight tensor (the
module's buffer, the functional form's cache) is read as is, without a cast per call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..validation import check_shape
from .analytic import analytic_terms_and_grads
from .reference import TERM_WEIGHTS, TERMS, expand_weights, invalid_classes, weight_vector

#: impl name -> function(z_e, z_a, v, expr, expr_mask, au, au_mask, va, va_mask, R, mu, pos_weight, weights, T,
#: eps) returning (total, terms, grad_z_e, grad_z_a, grad_v); ``weights`` is the (8,) per-term weight tensor on the
#: inputs' device in the caller's floating dtype (the fused kernels read :func:`kernel_weights`); ``mu`` (C,2) and
#: ``pos_weight`` (K,: the weight of each AU's positive labels in ``L_au``) may be ``None``; ``total`` and
#: ``terms`` are in the compute dtype and ``total`` must not be a view of ``terms``.
ImplFn = Callable[..., tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]
#: A backend's own limits: ``limits(z_e, B, C, K)`` raises ``ValueError`` (naming the tensor) for inputs that
#: pass :func:`check_inputs` but that this backend cannot take.
LimitsFn = Callable[[Tensor, int, int, int], None]
_IMPLS: dict[str, ImplFn] = {}
_LIMITS: dict[str, LimitsFn | None] = {}
#: Backends whose implementation raises the invalid-class ``ValueError`` of :func:`check_classes` itself.
_CHECKS_CLASSES: set[str] = set()
#: The dtype in which every fused kernel reads the per-term weights.
KERNEL_WEIGHT_DTYPE = torch.float64

#: Storage dtypes of ``z_e``, ``z_a``, ``v`` (and of their gradients) that every backend reads.
LOGIT_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NAMES = ("z_e", "z_a", "v", "expr", "expr_mask", "au", "au_mask", "va", "va_mask", "relatedness", "va_means",
          "au_pos_weight")


def register_impl(name: str, fn: ImplFn, limits: LimitsFn | None = None, checks_classes: bool = False) -> None:
    """Make ``fn`` callable as ``impl=name`` through the op; ``limits`` adds the backend's own input limits;
    ``checks_classes``: ``fn`` raises :func:`invalid_class_error` for CPU tensors itself, so the op skips its
    own (value-reading) :func:`check_classes`."""
    _IMPLS[name] = fn
    _LIMITS[name] = limits
    if checks_classes:
        _CHECKS_CLASSES.add(name)
    else:
        _CHECKS_CLASSES.discard(name)


def registered_impls() -> tuple[str, ...]:
    return tuple(_IMPLS)


#: Why the fused backends' gradients cannot be differentiated again (raised by a second-order backward).
DOUBLE_BACKWARD = (b"fbn_fast::objective: the fused backends ('cpu', 'cuda', 'triton') are differentiable once; "
                   b"a second-order gradient (create_graph=True through the loss's gradients) needs "
                   b"backend='torch'")


def compute_dtype(z_e: Tensor) -> torch.dtype:
    """The dtype every backend computes in (as the reference): float64 for float64 logits, else float32."""
    return torch.float64 if z_e.dtype == torch.float64 else torch.float32


def kernel_weights(weights: Tensor | Sequence[float], device: torch.device) -> Tensor:
    """The (8,) per-term weights as the fused kernels read them: contiguous :data:`KERNEL_WEIGHT_DTYPE` on
    ``device``, detached; a float64 tensor is returned as is (no kernel)."""
    if torch.is_tensor(weights):
        return as_contiguous(weights.detach(), KERNEL_WEIGHT_DTYPE)
    return torch.tensor(expand_weights(weights), dtype=KERNEL_WEIGHT_DTYPE, device=device)


def as_contiguous(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` as a contiguous ``dtype`` tensor (what the native kernels read), without a call into torch when it
    already is one."""
    if t.dtype != dtype:
        t = t.to(dtype)
    return t if t.is_contiguous() else t.contiguous()


def check_inputs(impl: str, z_e: Tensor, z_a: Tensor, v: Tensor, expr: Tensor, expr_mask: Tensor, au: Tensor,
                 au_mask: Tensor, va: Tensor, va_mask: Tensor, relatedness: Tensor, va_means: Tensor | None,
                 au_pos_weight: Tensor | None, weights: Tensor | Sequence[float], temperature: float,
                 eps: float) -> tuple[int, int, int]:
    """``B, C, K`` of a call of the op with backend ``impl``, after the one input check of the op's contract.

    Every problem raises ``ValueError`` naming the tensor (or argument): shapes, ``C, K >= 1`` (``B = 0`` is
    an empty batch), dtypes (logits in :data:`LOGIT_DTYPES`, integer class indices, bool or integer masks —
    float masks are rejected, never thresholded — floating labels, tables and ``au_pos_weight``), one device for
    all tensors, the weights (a floating (8,) tensor on that device, or 8 floats, or the 6 of :data:`WEIGHTS`),
    ``temperature > 0``, ``0 < eps < 0.5``; then the limits that ``impl`` registered. Values are not read
    here (that would be a host sync).
    """
    check_shape("z_e", z_e.shape, (None, None), "= (B, C)")
    check_shape("z_a", z_a.shape, (z_e.shape[0], None), "= (B, K) with B from z_e")
    b, c = z_e.shape
    k = z_a.shape[1]
    if c < 1 or k < 1:
        raise ValueError(f"z_e, z_a: C = {c} and K = {k} must be >= 1")
    tensors = (z_e, z_a, v, expr, expr_mask, au, au_mask, va, va_mask, relatedness, va_means, au_pos_weight)
    shapes = ((b, c), (b, k), (b, 2), (b,), (b,), (b, k), (b, k), (b, 2), (b,), (c, k), (c, 2), (k,))
    dev = z_e.device
    for name, t, shape in zip(_NAMES, tensors, shapes):
        if t is None:
            continue
        check_shape(name, t.shape, shape, "from z_e and z_a")
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device}, z_e on {dev}: all inputs must share one device")
        _check_dtype(name, t.dtype)
    if torch.is_tensor(weights):
        check_shape("weights", weights.shape, (len(TERM_WEIGHTS),), f"= one per term {TERM_WEIGHTS}")
        if not weights.dtype.is_floating_point:
            raise ValueError(f"weights: dtype {weights.dtype}, expected a floating dtype")
        if weights.device != dev:
            raise ValueError(f"weights is on {weights.device}, z_e on {dev}: all inputs must share one device")
    else:
        expand_weights(weights)  # 8 per-term weights or the 6 of WEIGHTS
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps!r}")
    limits = _LIMITS.get(impl)
    if limits is not None:
        limits(z_e, b, c, k)
    return b, c, k


def check_classes(expr: Tensor, expr_mask: Tensor, num_classes: int) -> None:
    """Raise ``ValueError`` for an expression class outside [0, C) under a true mask, for CPU tensors only
    (on a device the check would be a host sync; there the ``expr`` term becomes NaN instead)."""
    if expr.device.type != "cpu" or expr.numel() == 0:
        return
    bad = invalid_classes(expr, expr_mask, num_classes)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise invalid_class_error(row, int(expr[row]), num_classes)


def invalid_class_error(row: int, cls: int, num_classes: int) -> ValueError:
    return ValueError(f"expr: row {row} has class {cls} outside [0, {num_classes}) under a true expr_mask "
                      f"(use expr_mask False, or -1 without a mask, for a missing label)")


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
def _objective_op(
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
    au_pos_weight: Tensor | None,
    weights: Tensor,
    temperature: float,
    eps: float,
    impl: str,
    differentiable_terms: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    fn = _impl(impl)
    tensors = (z_e, z_a, v, expr, expr_mask, au, au_mask, va, va_mask, relatedness, va_means, au_pos_weight)
    b, c, _ = check_inputs(impl, *tensors, weights, temperature, eps)
    if impl not in _CHECKS_CLASSES:
        check_classes(expr, expr_mask, c)
    return _launch(fn, tensors, weights, temperature, eps)


def _launch(fn: ImplFn, tensors: tuple, weights: Tensor, temperature: float,
            eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    z_e, z_a, v = tensors[:3]
    if z_e.shape[0] == 0:  # an empty batch: every term 0 (docs/method.md §3), nothing to launch
        terms = z_e.new_zeros((1 + len(TERMS),), dtype=compute_dtype(z_e))
        return terms[0].clone(), terms, torch.zeros_like(z_e), torch.zeros_like(z_a), torch.zeros_like(v)
    return fn(*tensors, weights, temperature, eps)


def objective(z_e: Tensor, z_a: Tensor, v: Tensor, expr: Tensor, expr_mask: Tensor, au: Tensor, au_mask: Tensor,
              va: Tensor, va_mask: Tensor, relatedness: Tensor, va_means: Tensor | None,
              au_pos_weight: Tensor | None, weights: Tensor | Sequence[float], temperature: float, eps: float,
              impl: str, differentiable_terms: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The op ``fbn_fast::objective``: ``(total, [total, *TERMS], grad_z_e, grad_z_a, grad_v)``.

    ``au_pos_weight``: (K,) weights of the AUs' positive labels in ``L_au`` (``None``: plain BCE).

    ``weights``: the (8,) per-term tensor (:data:`~.reference.TERM_WEIGHTS`, on the logits' device; it may
    require grad), or 8 floats, or the 6 of :data:`WEIGHTS` (made into that tensor here). ``differentiable_terms``:
    make the terms differentiable as well as the total (see the module docstring).
    """
    if not torch.is_tensor(weights):
        weights = weight_vector(weights, z_e.new_empty((), dtype=KERNEL_WEIGHT_DTYPE))
    return _objective_op(z_e, z_a, v, expr, expr_mask, au, au_mask, va, va_mask, relatedness, va_means,
                         au_pos_weight, weights, float(temperature), float(eps), impl, bool(differentiable_terms))


def _impl(impl: str) -> ImplFn:
    try:
        return _IMPLS[impl]
    except KeyError:
        raise ValueError(f"fbn_fast::objective has no implementation {impl!r}; registered: {sorted(_IMPLS)}") from None


@_objective_op.register_fake
def _(z_e, z_a, v, expr, expr_mask, au, au_mask, va, va_mask, relatedness, va_means, au_pos_weight, weights,
      temperature, eps, impl, differentiable_terms):
    _impl(impl)
    check_inputs(impl, z_e, z_a, v, expr, expr_mask, au, au_mask, va, va_mask, relatedness, va_means, au_pos_weight,
                 weights, temperature, eps)
    dt = compute_dtype(z_e)
    total = z_e.new_empty((), dtype=dt)
    terms = z_e.new_empty((1 + len(TERMS),), dtype=dt)
    return total, terms, torch.empty_like(z_e), torch.empty_like(z_a), torch.empty_like(v)


_N_INPUTS = 12  # the tensors before ``weights`` in the op's signature


def _setup_context(ctx, inputs, output) -> None:
    _, terms, g_e, g_a, g_v = output
    tensors, weights = inputs[:_N_INPUTS], inputs[_N_INPUTS]
    ctx.temperature, ctx.eps, ctx.impl, ctx.differentiable_terms = inputs[_N_INPUTS + 1:]
    ctx.absent = tuple(i for i, t in enumerate(tensors) if t is None)  # the optional tables not given
    # Undefined incoming gradients stay None, so the backward can tell whether any term's gradient is used.
    ctx.set_materialize_grads(False)
    saved = [g_e, g_a, g_v, terms, weights]
    if ctx.differentiable_terms:  # the relaunch of the backward needs the inputs
        saved += [t if t is not None else weights for t in tensors]
    ctx.save_for_backward(*saved)


def _backward(ctx, g_total, g_terms, _g_e, _g_a, _g_v):
    saved = ctx.saved_tensors
    g_e, g_a, g_v, terms, weights = saved[:5]
    none = (None,) * (_N_INPUTS + 5)
    if g_total is None and g_terms is None:
        return none
    with torch.no_grad():
        # terms[0] is the total again, so its gradient joins that of the total.
        g = g_total if g_terms is None else (g_terms[0] if g_total is None else g_total + g_terms[0])
        if ctx.differentiable_terms and g_terms is not None:
            # d/dz of Σ_i (g w_i + g_i) L_i: the fused kernel again, weighted by c on the device.
            c = g.to(weights.dtype) * weights + g_terms[1:].to(weights.dtype)
            tensors = list(saved[5:])
            for i in ctx.absent:
                tensors[i] = None
            # Through the op (not its implementation), so that a compiled backward traces its fake version.
            grads = _objective_op(*tensors, c, ctx.temperature, ctx.eps, ctx.impl, False)[2:]
        else:
            grads = torch._foreach_mul([g_e, g_a, g_v], g)
        g_w = (g.to(terms.dtype) * terms[1:]).to(weights.dtype) if ctx.needs_input_grad[_N_INPUTS] else None
    out = [*grads, g_w]
    if torch.is_grad_enabled():  # create_graph=True: differentiating these again must fail loudly, not give 0
        out = list(_twice_error(out, [g_e, g_a, g_v, weights]))
    g_z = out[:3]
    return (*g_z, *(None,) * (_N_INPUTS - 3), out[3], None, None, None, None)


def _twice_error(tensors: list[Tensor | None], upstream: list[Tensor]) -> tuple[Tensor | None, ...]:
    """``tensors`` behind a node whose backward raises :data:`DOUBLE_BACKWARD` (as ``once_differentiable``);
    ``upstream`` (the saved outputs and the weights) joins that node to the graph of the op's inputs, so a
    gradient asked of any of them reaches it and fails, rather than reporting an unused input or 0."""
    live = [t for t in tensors if t is not None]
    links = [t for t in upstream if t.requires_grad]
    flagged = torch._C._functions.DelayedError(DOUBLE_BACKWARD, len(live) + len(links))(
        *[t.detach().requires_grad_() for t in live], *links)
    flagged = iter(flagged if isinstance(flagged, tuple) else (flagged,))
    return tuple(None if t is None else next(flagged) for t in tensors)


torch.library.register_autograd("fbn_fast::objective", _backward, setup_context=_setup_context)


register_impl("torch", analytic_terms_and_grads)
