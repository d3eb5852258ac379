"""The co-training objective of docs/method.md §3: :class:`FaceBehaviorLoss` and its functional twin.

>>> loss_fn = FaceBehaviorLoss(relatedness.prior())
>>> out = loss_fn(z_e, z_a, v, expr=..., expr_mask=..., au=..., au_mask=..., va=..., va_mask=...)
>>> out.total.backward(); log(out.terms)   # terms: dict of 0-d tensors, detached, no host sync

Weights are data: one per term (:data:`TERM_WEIGHTS`), as :class:`LossWeights` (floats) or as a tensor of 8
on the logits' device, which may require grad (d total / d w_i = L_i) and may change every step without
recompiling a compiled step. ``differentiable_terms=True`` makes every term differentiable from the same
call (GradNorm, PCGrad, MGDA). ``counts=True`` adds ``out.counts``, how many labelled entries each term
averaged over (a few small kernels more, so off by default; always there with ``process_group``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass, fields
from typing import ClassVar, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from ..validation import validate_labels, validate_pos_weight, validate_relatedness
from .backends import BACKENDS, available_backends, resolve_backend
from .distributed import global_objective
from .op import KERNEL_WEIGHT_DTYPE, check_classes, check_inputs, compute_dtype, objective
from .reference import DEFAULT_EPS, TERM_WEIGHTS, TERMS, WEIGHT_GROUPS, WEIGHTS, expand_weights, reference_terms
from .tables import TableModule

__all__ = [
    "BACKENDS",
    "TERMS",
    "TERM_WEIGHTS",
    "WEIGHTS",
    "WEIGHT_GROUPS",
    "FaceBehaviorLoss",
    "LossOutput",
    "LossWeights",
    "available_backends",
    "face_behavior_loss",
    "reference_terms",
    "resolve_backend",
]


@dataclass(frozen=True)
class LossWeights:
    """One weight per term of docs/method.md §3 (:attr:`TERMS`), as floats; 0 switches a term off.

    The six fields of docs/method.md — the supervised terms (1 in the paper), λ_ca, λ_dm, λ_ev — set their terms
    (``ca`` both co-annotation terms, ``dm`` both expression/AU matching terms, ``ev`` ``dm_ev``); the
    per-term fields ``ca_ea, ca_ae, dm_ea, dm_ae, dm_ev`` override one term (``None``: its group's weight).
    :meth:`vector` gives the eight per-term weights in :attr:`TERMS` order. For weights that change every
    step or are learned, pass a tensor of eight instead (see :func:`face_behavior_loss`).
    """

    expr: float = 1.0
    au: float = 1.0
    va: float = 1.0
    ca: float = 1.0
    dm: float = 1.0
    ev: float = 1.0
    _: KW_ONLY  # the per-term overrides by name only: positional weights stay the six of docs/method.md
    ca_ea: float | None = None
    ca_ae: float | None = None
    dm_ea: float | None = None
    dm_ae: float | None = None
    dm_ev: float | None = None

    #: The terms, in the order of :meth:`vector` (and of a weight tensor).
    TERMS: ClassVar[tuple[str, ...]] = TERM_WEIGHTS

    def __post_init__(self) -> None:
        for f in fields(self):
            w = getattr(self, f.name)
            if w is not None and not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
                raise ValueError(f"loss weight {f.name!r} must be a finite float >= 0, got {w!r} (pass a tensor "
                                 f"of {len(TERM_WEIGHTS)} as weights= for weights that are learned or change)")

    def vector(self) -> tuple[float, ...]:
        """The eight per-term weights, in :attr:`TERMS` order."""
        group = {t: g for g, ts in WEIGHT_GROUPS.items() for t in ts}
        out = []
        for t in TERM_WEIGHTS:
            own = getattr(self, t) if t not in WEIGHT_GROUPS else None
            out.append(float(own if own is not None else getattr(self, group[t])))
        return tuple(out)

    @classmethod
    def coerce(cls, weights: LossWeights | dict | Sequence[float] | None) -> LossWeights:
        """``weights`` as :class:`LossWeights`: ``None`` (all 1), a dict of field names, or a sequence of the
        eight per-term weights (or of the six of docs/method.md)."""
        if weights is None:
            return cls()
        if isinstance(weights, cls):
            return weights
        if isinstance(weights, dict):
            known = [f.name for f in fields(cls)]
            unknown = set(weights) - set(known)
            if unknown:
                raise ValueError(f"unknown loss weight(s) {sorted(unknown)}; known: {known}")
            return cls(**weights)
        if torch.is_tensor(weights):
            raise ValueError("weights: a tensor is passed to the loss as is (weights=tensor), not coerced to floats")
        return cls(**{t: w for t, w in zip(TERM_WEIGHTS, expand_weights(weights))})


class LossOutput(NamedTuple):
    """``total`` is differentiable; ``terms`` holds each term of docs/method.md §3 (detached for logging, unless
    ``differentiable_terms=True``); ``counts``, when asked for (``counts=True``, or with ``process_group``;
    else ``None``), the number of labelled entries each term averages over (0-d int64 tensors, no host sync:
    ``expr``, ``va``, ``ca_ae`` count rows, ``au``, ``ca_ea`` (row, AU) entries, ``dm_ea`` B·K, ``dm_ae`` B,
    ``dm_ev`` B with VA means, else 0); ``values`` the vector ``[total, *TERMS]`` that ``terms`` views (one
    tensor to log or accumulate, detached like ``terms``)."""

    total: Tensor
    terms: dict[str, Tensor]
    counts: dict[str, Tensor] | None = None
    values: Tensor | None = None


#: Float weights of the functional form as device tensors in the dtype the kernels read, by (values, device):
#: a step with fixed weights then copies and casts nothing (on CUDA a copy from the host waits for the stream).
#: At most :data:`_WEIGHT_CACHE_SIZE` entries, least recently used dropped first. Dropping an entry only
#: drops the cache's reference (a tensor still referenced stays alive), but a CUDA graph holds no reference to
#: what it reads: capture the module (whose weights live in a buffer), not the functional form with float
#: weights.
_WEIGHT_TENSORS: OrderedDict[tuple, Tensor] = OrderedDict()
_WEIGHT_CACHE_SIZE = 16


def _weight_tensor(weights: LossWeights, device: torch.device) -> Tensor:
    values = weights.vector()
    if torch.compiler.is_compiling():  # a graph constant under torch.compile
        return torch.tensor(values, dtype=KERNEL_WEIGHT_DTYPE, device=device)
    key = (values, device)
    t = _WEIGHT_TENSORS.get(key)
    if t is None:
        t = _WEIGHT_TENSORS[key] = torch.tensor(values, dtype=KERNEL_WEIGHT_DTYPE, device=device)
        if len(_WEIGHT_TENSORS) > _WEIGHT_CACHE_SIZE:
            _WEIGHT_TENSORS.popitem(last=False)
    else:
        _WEIGHT_TENSORS.move_to_end(key)
    return t


def _labels(name: str, label: Tensor | None, mask: Tensor | None) -> None:
    if (label is None) != (mask is None):
        given, missing = (name, f"{name}_mask") if mask is None else (f"{name}_mask", name)
        raise ValueError(f"{given} is given without {missing}: pass both (a label without its mask, or a mask "
                         f"without its label, would be ignored or train towards zeros)")


def term_counts(expr_mask: Tensor, au_mask: Tensor, va_mask: Tensor, has_va_means: bool) -> Tensor:
    """Labelled entries per term in :data:`TERMS` order (see :class:`LossOutput`): an (8,) int64 tensor on the
    masks' device. A few small kernels: computed only when asked for, or for a DDP reduction."""
    b, k = au_mask.shape
    me, mv = (expr_mask != 0).to(torch.int32), (va_mask != 0).to(torch.int32)
    n_ann = (au_mask != 0).sum(1, dtype=torch.int32)  # annotated AUs per row
    h = (n_ann > 0).to(torch.int32) * (1 - me)
    # One reduction for the five label counts.
    per_row = torch.stack([me, n_ann, mv, me * (k - n_ann), h], 1).sum(0, dtype=torch.int64)
    fixed = per_row.new_full((3,), b)  # B·K, B, B (0 without VA means): fills, no copy from the host
    fixed[0] = b * k
    if not has_va_means:
        fixed[2] = 0
    return torch.cat([per_row, fixed])


def face_behavior_loss(
    z_e: Tensor,
    z_a: Tensor,
    v: Tensor,
    relatedness: Tensor,
    expr: Tensor | None = None,
    expr_mask: Tensor | None = None,
    au: Tensor | None = None,
    au_mask: Tensor | None = None,
    va: Tensor | None = None,
    va_mask: Tensor | None = None,
    va_means: Tensor | None = None,
    weights: LossWeights | dict | Sequence[float] | Tensor | None = None,
    temperature: float = 1.0,
    eps: float = DEFAULT_EPS,
    backend: str = "auto",
    validate: bool = False,
    differentiable_terms: bool = False,
    process_group: dist.ProcessGroup | None = None,
    counts: bool = False,
    au_pos_weight: Tensor | None = None,
) -> LossOutput:
    """The objective of docs/method.md §3 for one batch; see :class:`FaceBehaviorLoss`.

    Labels come with their masks: a label without its mask (or a mask without its label) is an error, except
    ``expr`` alone, where -1 marks a missing label (an ignore index). A task whose labels are ``None`` counts
    as unlabelled on every sample. Masks are bool (or integer 0/1): float masks are rejected, not thresholded.
    ``weights``: :class:`LossWeights` (or a dict or sequence of floats for it), or a floating tensor of one
    weight per term (:data:`TERM_WEIGHTS`) on the logits' device, which may require grad and may change
    every step without recompiling. ``au_pos_weight``: a (K,) floating tensor on the logits' device weighting
    each AU's positive labels in ``L_au``, as ``pos_weight`` of ``torch.nn.BCEWithLogitsLoss`` (``None``: 1);
    :func:`fbn_fast.coupling.balanced_pos_weight` derives it from training labels.
    ``differentiable_terms=True``: ``out.terms`` are differentiable too (the
    fused backends' backward then relaunches their kernel once when a term's gradient is used).
    ``validate=True`` checks label values and the table first (a host sync: for debugging and data loading,
    not for the hot loop). An expression class outside [0, C) under a true mask raises ``ValueError`` on CPU
    tensors (NaN ``expr`` term and total on a GPU, or under ``torch.compile``).
    ``process_group`` (e.g. ``torch.distributed.group.WORLD``): normalise over the global batch of its ranks
    (label counts and VA statistics all-reduced; values and ``counts`` of the global batch, gradients scaled
    for DDP's mean over ranks; see :mod:`fbn_fast.losses.distributed`).
    ``counts=True``: ``out.counts`` holds the labelled entries of each term (a few small kernels more per
    call, so off by default: ``out.counts`` is then ``None``; with ``process_group`` always there).
    Float weights are cached on the device (a bounded cache): under CUDA graph capture use
    :class:`FaceBehaviorLoss`, or a weight tensor, not float weights here.
    """
    dev = z_e.device
    _labels("au", au, au_mask)
    _labels("va", va, va_mask)
    if expr is None and expr_mask is not None:
        _labels("expr", expr, expr_mask)
    if expr is not None and expr_mask is None:
        expr_mask = expr != -1  # -1: no expression label (an ignore index)
    # Sizes for the default (unlabelled) tasks only: the op's contract checks every shape below.
    b = z_e.shape[0] if z_e.ndim else 0
    k = z_a.shape[-1] if z_a.ndim else 0
    ft = compute_dtype(z_e)
    expr = torch.zeros(b, dtype=torch.long, device=dev) if expr is None else expr
    expr_mask = torch.zeros(b, dtype=torch.bool, device=dev) if expr_mask is None else expr_mask
    au = torch.zeros(b, k, dtype=ft, device=dev) if au is None else au
    au_mask = torch.zeros(b, k, dtype=torch.bool, device=dev) if au_mask is None else au_mask
    va = torch.zeros(b, 2, dtype=ft, device=dev) if va is None else va
    va_mask = torch.zeros(b, dtype=torch.bool, device=dev) if va_mask is None else va_mask
    w = weights if torch.is_tensor(weights) else _weight_tensor(LossWeights.coerce(weights), dev)

    name = resolve_backend(backend, dev)
    args = (z_e, z_a, v, expr, expr_mask, au, au_mask, va, va_mask, relatedness, va_means, au_pos_weight, w,
            float(temperature), float(eps))
    if name == "torch" or validate or process_group is not None:
        # The op's contract here too where something reads the labels before the op (which checks every
        # fused call itself): the reference (no op), the label validation, a DDP reduction. No host sync.
        _, c, k = check_inputs(name, *args)
        if validate:
            validate_relatedness(relatedness, c, k)
            if au_pos_weight is not None:
                validate_pos_weight(au_pos_weight, k)
            validate_labels(expr, expr_mask, au, au_mask, va, va_mask, num_classes=c, num_aus=k, batch=b)
        if name == "torch" and not torch.compiler.is_compiling():  # data-dependent; compiled, a bad class is NaN
            check_classes(expr, expr_mask, c)

    def run(weights: Tensor) -> tuple[Tensor, Tensor]:
        """The total and the vector ``[total, *TERMS]`` of this batch with the per-term weight tensor
        ``weights``."""
        call = (*args[:12], weights, *args[13:])
        if name == "torch":
            values = reference_terms(*call)
            return values[0], values
        return objective(*call, name, differentiable_terms)[:2]

    if process_group is not None:
        local = term_counts(expr_mask, au_mask, va_mask, va_means is not None)
        total, terms, global_counts = global_objective(_terms_only(run), v, va, va_mask, local, w, process_group,
                                                       differentiable_terms)
        values = torch.cat([(total if differentiable_terms else total.detach()).reshape(1), terms])
        return LossOutput(total, dict(zip(TERMS, terms.unbind(0))), dict(zip(TERMS, global_counts.unbind(0))),
                          values)
    total, values = run(w)
    if not differentiable_terms:
        values = values.detach()
    # After the op, which checked the masks; only when asked (the trainer does not read them).
    n = dict(zip(TERMS, term_counts(expr_mask, au_mask, va_mask, va_means is not None).unbind(0))) if counts else None
    return LossOutput(total, dict(zip(TERMS, values[1:].unbind(0))), n, values)


def _terms_only(run: Callable[[Tensor], tuple[Tensor, Tensor]]) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """``run`` returning the eight terms instead of ``[total, *TERMS]`` (what :func:`global_objective` takes)."""
    def local(weights: Tensor) -> tuple[Tensor, Tensor]:
        total, values = run(weights)
        return total, values[1:]
    return local


def _float32(table) -> Tensor:
    """A table given as an array, a sequence or a tensor, as a float32 tensor."""
    return torch.as_tensor(table if torch.is_tensor(table) else np.asarray(table), dtype=torch.float32)


class FaceBehaviorLoss(TableModule):
    """The FaceBehaviorNet co-training objective as a module (docs/method.md §3).

    Args:
        relatedness: C×K table ``P(AU k | class c)`` — a :class:`~fbn_fast.relatedness.Relatedness`
            (its label order is checked against ``classes``/``aus`` when given), an array or a tensor.
        va_means: C×2 mean VA per class for the expression→VA matching term (taken from a
            ``Relatedness`` that carries them when omitted); without it that term is 0.
        weights: :class:`LossWeights` or a dict of its fields (``expr, au, va, ca, dm, ev`` and the per-term
            ``ca_ea, ca_ae, dm_ea, dm_ae, dm_ev``), or a floating tensor of one weight per term
            (:data:`TERM_WEIGHTS`; an ``nn.Parameter`` is learned with the module). ``forward(weights=...)``
            overrides them for one call (weights that change every step: a tensor, no recompilation). Float
            weights live in a non-persistent float64 buffer (the dtype the kernels read; it moves with
            ``.to()`` and stays float64 under dtype casts), so a call copies and casts nothing, and the module
            can be captured in a CUDA graph.
        differentiable_terms: make ``out.terms`` differentiable (one call for GradNorm, PCGrad, MGDA).
        temperature: T of the AU→expression softmaxes.
        backend: ``auto`` (fastest available for the tensors' device), ``torch``, ``triton``, ``cpu``, ``cuda``.
        validate: check labels on every call (a host sync; off in training).
        persistent: save the relatedness table and VA means in the module's ``state_dict`` (default: not
            saved, and a state dict that has them loads with them ignored, so a checkpoint never overwrites
            the table given here; see :mod:`fbn_fast.losses.tables`). Either way they stay float32 under
            ``module.to(dtype)``/``.half()``/``.bfloat16()``.
        process_group: normalise over the global batch of this group's ranks under DDP (e.g.
            ``torch.distributed.group.WORLD``; opt-in, see :mod:`fbn_fast.losses.distributed`): the loss and,
            after DDP's mean, the gradient of the global batch. ``None``: each rank normalises its own batch.
        counts: also return ``out.counts``, the labelled entries per term (a few small kernels more per call;
            always there with ``process_group``).
        au_pos_weight: K weights of the AUs' positive labels in ``L_au`` (``pos_weight`` of
            ``torch.nn.BCEWithLogitsLoss``: > 1 counts a rare AU's positives more; ``None``: 1), a table like
            ``relatedness`` (float32, saved only with ``persistent``).
    """

    def __init__(
        self,
        relatedness,
        va_means=None,
        weights: LossWeights | dict | Sequence[float] | Tensor | None = None,
        temperature: float = 1.0,
        eps: float = DEFAULT_EPS,
        backend: str = "auto",
        validate: bool = False,
        classes: tuple[str, ...] | None = None,
        aus: tuple[str, ...] | None = None,
        persistent: bool = False,
        differentiable_terms: bool = False,
        process_group: dist.ProcessGroup | None = None,
        counts: bool = False,
        au_pos_weight=None,
    ) -> None:
        super().__init__(persistent)
        from ..relatedness import Relatedness

        if isinstance(relatedness, Relatedness):
            if classes is not None or aus is not None:
                relatedness.check_labels(classes or relatedness.classes, aus or relatedness.aus)
            if va_means is None:
                va_means = relatedness.va_means
            relatedness = relatedness.matrix
        matrix = _float32(relatedness)
        # A plain table is checked against the label names given with it (a Relatedness was checked above).
        validate_relatedness(matrix, None if classes is None else len(classes), None if aus is None else len(aus))
        self.register_table("relatedness", matrix)
        self.register_table("va_means", None if va_means is None else _float32(va_means))
        if au_pos_weight is not None:
            au_pos_weight = _float32(au_pos_weight)
            validate_pos_weight(au_pos_weight, matrix.shape[1])
        self.register_table("au_pos_weight", au_pos_weight)
        self.weights = weights if torch.is_tensor(weights) else LossWeights.coerce(weights)
        # The float weights the buffer holds: a later assignment of other floats to ``weights`` bypasses it.
        self._buffered_weights = None if torch.is_tensor(weights) else self.weights
        fixed = None if self._buffered_weights is None else torch.tensor(self._buffered_weights.vector(),
                                                                           dtype=KERNEL_WEIGHT_DTYPE)
        self.register_buffer("term_weights", fixed, persistent=False)
        self.differentiable_terms = bool(differentiable_terms)
        self.counts = bool(counts)
        self.process_group = process_group
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"backend must be one of {('auto', *BACKENDS)}, got {backend!r}")
        self.temperature, self.eps, self.backend, self.validate = float(temperature), float(eps), backend, validate

    def forward(self, z_e: Tensor, z_a: Tensor, v: Tensor, expr=None, expr_mask=None, au=None, au_mask=None,
                va=None, va_mask=None, weights: Tensor | LossWeights | None = None) -> LossOutput:
        if weights is None:
            weights = self.term_weights if self.weights is self._buffered_weights else self.weights
        return face_behavior_loss(z_e, z_a, v, self.relatedness, expr, expr_mask, au, au_mask, va, va_mask,
                                  va_means=self.va_means, weights=weights, temperature=self.temperature,
                                  eps=self.eps, backend=self.backend, validate=self.validate,
                                  differentiable_terms=self.differentiable_terms, process_group=self.process_group,
                                  counts=self.counts, au_pos_weight=self.au_pos_weight)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> FaceBehaviorLoss:
        old = self.term_weights
        out = super()._apply(fn, recurse)
        new = self.term_weights
        if new is not None and new.dtype != KERNEL_WEIGHT_DTYPE:  # ``.half()`` etc.: keep the exact float64 weights
            self._buffers["term_weights"] = old.to(device=new.device)
        return out

    def extra_repr(self) -> str:
        c, k = self.relatedness.shape
        return f"classes={c}, aus={k}, backend={self.backend!r}, T={self.temperature}, weights={self.weights}"
