"""The co-training objective of method.md §3: :class:`FaceBehaviorLoss` and its functional twin.

>>> loss_fn = FaceBehaviorLoss(relatedness.prior())
>>> out = loss_fn(z_e, z_a, v, expr=..., expr_mask=..., au=..., au_mask=..., va=..., va_mask=...)
>>> out.total.backward(); log(out.terms)   # terms: dict of 0-d tensors, detached, no host sync
"""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from ..validation import validate_labels, validate_relatedness
from .backends import BACKENDS, available_backends, resolve_backend
from .op import check_inputs, compute_dtype, objective
from .reference import DEFAULT_EPS, TERMS, WEIGHTS, reference_terms

__all__ = [
    "BACKENDS",
    "TERMS",
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
    """Weights of method.md §3: supervised terms (1 in the paper), λ_ca, λ_dm, λ_ev. 0 switches a term off."""

    expr: float = 1.0
    au: float = 1.0
    va: float = 1.0
    ca: float = 1.0
    dm: float = 1.0
    ev: float = 1.0

    def __post_init__(self) -> None:
        for name, w in zip(WEIGHTS, astuple(self)):
            if not (math.isfinite(w) and w >= 0):
                raise ValueError(f"loss weight {name!r} must be finite and >= 0, got {w!r}")

    @classmethod
    def coerce(cls, weights: LossWeights | dict | None) -> LossWeights:
        if weights is None:
            return cls()
        if isinstance(weights, cls):
            return weights
        unknown = set(weights) - set(WEIGHTS)
        if unknown:
            raise ValueError(f"unknown loss weight(s) {sorted(unknown)}; known: {list(WEIGHTS)}")
        return cls(**weights)


class LossOutput(NamedTuple):
    """``total`` is differentiable; ``terms`` holds each term of method.md §3 (detached, for logging)."""

    total: Tensor
    terms: dict[str, Tensor]


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
    weights: LossWeights | dict | None = None,
    temperature: float = 1.0,
    eps: float = DEFAULT_EPS,
    backend: str = "auto",
    validate: bool = False,
) -> LossOutput:
    """The objective of method.md §3 for one batch; see :class:`FaceBehaviorLoss`.

    A task whose labels are ``None`` counts as unlabelled on every sample. ``validate=True`` checks labels
    and masks first (a host sync: for debugging and data loading, not for the hot loop).
    """
    weights = LossWeights.coerce(weights)
    dev = z_e.device
    # Sizes for the default (unlabelled) tasks only: the op's contract checks every shape below.
    b = z_e.shape[0] if z_e.ndim else 0
    k = z_a.shape[-1] if z_a.ndim else 0
    expr = torch.zeros(b, dtype=torch.long, device=dev) if expr is None else expr
    expr_mask = torch.zeros(b, dtype=torch.bool, device=dev) if expr_mask is None else expr_mask
    au = torch.zeros(b, k, dtype=torch.float32, device=dev) if au is None else au
    au_mask = torch.zeros(b, k, dtype=torch.bool, device=dev) if au_mask is None else au_mask
    va = torch.zeros(b, 2, dtype=torch.float32, device=dev) if va is None else va
    va_mask = torch.zeros(b, dtype=torch.bool, device=dev) if va_mask is None else va_mask

    name = resolve_backend(backend, dev)
    # Labels and tables in the compute dtype of every backend: float64 stays float64 (no lossy round trip).
    ft = compute_dtype(z_e)
    labels = (expr.long(), expr_mask.bool(), au.to(ft), au_mask.bool(), va.to(ft), va_mask.bool())
    rel = relatedness.to(ft)
    mu = None if va_means is None else va_means.to(ft)
    w = astuple(weights)
    args = (z_e, z_a, v, *labels, rel, mu, w, float(temperature), float(eps))
    if validate or name == "torch":  # the fused op checks its inputs itself
        _, c, k = check_inputs(name, *args)
    if validate:
        validate_relatedness(relatedness, c, k)
        validate_labels(expr, expr_mask, au, au_mask, va, va_mask, num_classes=c, num_aus=k, batch=b)
    if name == "torch":
        terms = reference_terms(*args)
        total = terms[0]
    else:
        total, terms, *_ = objective(*args[:-3], list(w), float(temperature), float(eps), name)
    return LossOutput(total, dict(zip(TERMS, terms.detach()[1:].unbind(0))))


class FaceBehaviorLoss(nn.Module):
    """The FaceBehaviorNet co-training objective as a module (method.md §3).

    Args:
        relatedness: C×K table ``P(AU k | class c)`` — a :class:`~fbn_fast.relatedness.Relatedness`
            (its label order is checked against ``classes``/``aus`` when given), an array or a tensor.
        va_means: C×2 mean VA per class for the expression→VA matching term (taken from a
            ``Relatedness`` that carries them when omitted); without it that term is 0.
        weights: :class:`LossWeights` or a dict of them (``expr, au, va, ca, dm, ev``).
        temperature: T of the AU→expression softmaxes.
        backend: ``auto`` (fastest available for the tensors' device), ``torch``, ``triton``, ``cpu``, ``cuda``.
        validate: check labels on every call (a host sync; off in training).
    """

    def __init__(
        self,
        relatedness,
        va_means=None,
        weights: LossWeights | dict | None = None,
        temperature: float = 1.0,
        eps: float = DEFAULT_EPS,
        backend: str = "auto",
        validate: bool = False,
        classes: tuple[str, ...] | None = None,
        aus: tuple[str, ...] | None = None,
    ) -> None:
        super().__init__()
        from ..relatedness import Relatedness

        if isinstance(relatedness, Relatedness):
            if classes is not None or aus is not None:
                relatedness.check_labels(classes or relatedness.classes, aus or relatedness.aus)
            if va_means is None:
                va_means = relatedness.va_means
            relatedness = relatedness.matrix
        matrix = torch.as_tensor(np.asarray(relatedness) if not torch.is_tensor(relatedness) else relatedness,
                                 dtype=torch.float32)
        validate_relatedness(matrix)
        self.register_buffer("relatedness", matrix.clone())
        if va_means is not None:
            va_means = torch.as_tensor(np.asarray(va_means) if not torch.is_tensor(va_means) else va_means,
                                       dtype=torch.float32).clone()
        self.register_buffer("va_means", va_means)
        self.weights = LossWeights.coerce(weights)
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"backend must be one of {('auto', *BACKENDS)}, got {backend!r}")
        self.temperature, self.eps, self.backend, self.validate = float(temperature), float(eps), backend, validate

    def forward(self, z_e: Tensor, z_a: Tensor, v: Tensor, expr=None, expr_mask=None, au=None, au_mask=None,
                va=None, va_mask=None) -> LossOutput:
        return face_behavior_loss(z_e, z_a, v, self.relatedness, expr, expr_mask, au, au_mask, va, va_mask,
                                  va_means=self.va_means, weights=self.weights, temperature=self.temperature,
                                  eps=self.eps, backend=self.backend, validate=self.validate)

    def extra_repr(self) -> str:
        c, k = self.relatedness.shape
        return f"classes={c}, aus={k}, backend={self.backend!r}, T={self.temperature}, weights={self.weights}"
