"""Remedies around the co-training objective (docs/method.md §7): they change the table it reads or the weights
it applies (per term, or per AU's positive labels), never its formula, so every backend keeps computing the
function of the reference.

* :func:`background_rates` / :func:`with_background`: every AU also fires without the expressions that use
  it (spontaneously, or for reasons the table does not model). The table becomes the noisy-OR
  ``1 − (1 − R[c,k])(1 − b_k)`` with per-AU background rates ``b_k`` estimated from the training labels,
  instead of relying on the objective's fixed clip ``ε`` alone.
* :func:`scarcity_scales`: a coupling is a prior worth ``N`` labelled images. The weight of the couplings
  into a task (expression→AU into the AUs, AU→expression into the expressions) is scaled by the mean over its
  labels of ``N / (N + n)``, ``n`` the training images carrying that label: full where a label has none,
  fading where labels are plentiful. Each task has its own ``N`` (0: that task's couplings unscaled).
* :func:`balanced_pos_weight`: a rare AU is a weak signal in ``L_au``: with 5 % positives, predicting "absent"
  everywhere is nearly optimal and its F1 stays 0. Its positive labels are weighted by negatives/positives among
  its training labels (``pos_weight`` of ``torch.nn.BCEWithLogitsLoss``), so both classes weigh the same.
* :class:`RelatednessRefresh`: the table re-estimated during training from the model's own confident
  predictions (and the labels where a sample has them), regularised towards the starting table by a
  pseudo-count; it replaces the objective's table buffer every few steps (no gradient through the table).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from .losses.reference import WEIGHT_GROUPS
from .relatedness import Relatedness, class_au_counts, class_onehot

log = logging.getLogger(__name__)

__all__ = ["RelatednessRefresh", "background_rates", "balanced_pos_weight", "label_counts", "scaled_weights",
           "scarcity_scales", "with_background"]

#: Fewest annotated samples of an AU that an estimate of its background rate needs.
MIN_BACKGROUND_SAMPLES = 50
#: Largest background rate accepted (a higher estimate says the table misses a relation, not a background).
MAX_BACKGROUND = 0.5
#: Bounds of a balanced positive weight: an AU seen positive once in 10^6 labels must not dominate the loss.
POS_WEIGHT_RANGE = (0.01, 100.0)


def background_rates(expr: np.ndarray, au: np.ndarray, au_mask: np.ndarray, table: Relatedness,
                     min_samples: int = MIN_BACKGROUND_SAMPLES) -> tuple[np.ndarray, list[str]]:
    """Per-AU background rates ``b_k`` from training labels, and how each was estimated.

    With co-annotated samples (an expression label and AU ``k`` annotated) in classes whose table entry for
    ``k`` is 0, ``b_k`` is the rate of ``k`` among them ("co-annotated"). Otherwise, from every sample that
    annotates ``k``: the noisy-OR model gives ``P(k) = 1 − (1 − m_k)(1 − b_k)`` with ``m_k = Σ_c π_c R[c,k]``
    and ``π`` the class frequencies of the expression labels (uniform without any), so
    ``b_k = 1 − (1 − P(k)) / (1 − m_k)`` ("marginal": it assumes the AU-labelled faces show the expressions
    in those frequencies). Fewer than ``min_samples`` annotated samples: ``b_k = 0`` ("none"; the objective's
    clip still applies). Estimates are clipped to [0, :data:`MAX_BACKGROUND`].
    """
    expr = np.asarray(expr, np.int64)
    au = np.asarray(au, np.float64)
    au_mask = np.asarray(au_mask, bool)
    r = table.matrix
    num_classes, num_aus = r.shape
    if au.shape != (len(expr), num_aus) or au_mask.shape != au.shape:
        raise ValueError(f"au/au_mask have shapes {au.shape}/{au_mask.shape}, expected ({len(expr)}, {num_aus})")
    onehot = class_onehot(expr, num_classes)
    annotated, active = class_au_counts(onehot, au, au_mask)
    zero = r == 0
    n_zero, active_zero = (annotated * zero).sum(0), (active * zero).sum(0)  # co-annotated, table entry 0
    n_all, active_all = au_mask.sum(0), (au_mask & (au >= 0.5)).sum(0)      # every sample annotating k
    freq = onehot.sum(0)
    pi = freq / freq.sum() if freq.sum() > 0 else np.full(num_classes, 1.0 / num_classes)
    m = pi @ r
    rates = np.zeros(num_aus)
    how: list[str] = []
    for k in range(num_aus):
        if n_zero[k] >= min_samples:
            rates[k] = active_zero[k] / n_zero[k]
            how.append("co-annotated")
        elif n_all[k] >= min_samples:
            rates[k] = 1.0 - (1.0 - active_all[k] / n_all[k]) / (1.0 - m[k]) if m[k] < 1.0 else 0.0
            how.append("marginal")
        else:
            how.append("none")
    return np.clip(rates, 0.0, MAX_BACKGROUND), how


def with_background(table: Relatedness, rates: np.ndarray) -> Relatedness:
    """The noisy-OR table ``1 − (1 − R[c,k])(1 − b_k)``, its rates recorded in ``meta["background"]``."""
    rates = np.asarray(rates, np.float64)
    if "background" in table.meta:
        raise ValueError("the table already has background rates (its meta says so): they would apply twice")
    if rates.shape != (table.matrix.shape[1],) or not np.all((rates >= 0) & (rates < 1)):
        raise ValueError(f"background rates must be {table.matrix.shape[1]} values in [0, 1), got {rates.tolist()}")
    matrix = 1.0 - (1.0 - table.matrix) * (1.0 - rates[None, :])
    meta = {**table.meta, "background": dict(zip(table.aus, map(float, rates)))}
    return Relatedness(matrix, table.classes, table.aus, table.va_means, source=f"{table.source}+background",
                       meta=meta)


def label_counts(expr: np.ndarray, expr_mask: np.ndarray, au_mask: np.ndarray, num_classes: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Training images per expression class and per AU column that carry that label."""
    expr = np.asarray(expr, np.int64)
    expr_mask = np.asarray(expr_mask, bool)
    return (np.bincount(expr[expr_mask], minlength=num_classes)[:num_classes],
            np.asarray(au_mask, bool).sum(0))


def balanced_pos_weight(au: np.ndarray, au_mask: np.ndarray) -> np.ndarray:
    """Per-AU weights of the positive labels in ``L_au``: negatives / positives among the annotated training
    labels of each AU, clipped to :data:`POS_WEIGHT_RANGE`; 1 for an AU without both positive and negative
    labels (nothing to balance)."""
    au = np.asarray(au, np.float64)
    au_mask = np.asarray(au_mask, bool)
    if au.shape != au_mask.shape or au.ndim != 2:
        raise ValueError(f"au/au_mask have shapes {au.shape}/{au_mask.shape}, expected one (N, K) shape")
    pos = (au_mask & (au >= 0.5)).sum(0).astype(np.float64)
    neg = au_mask.sum(0) - pos
    both = (pos > 0) & (neg > 0)
    return np.where(both, np.clip(neg / np.maximum(pos, 1.0), *POS_WEIGHT_RANGE), 1.0)


def scarcity_scales(expr_counts: np.ndarray, au_counts: np.ndarray, *, au: float, expr: float
                    ) -> dict[str, float]:
    """``{"expression": s_e, "au": s_a}``: the mean over a task's labels of ``N / (N + n)`` with that task's
    half-point ``N`` (``au`` or ``expr``, in images); ``N = 0`` leaves the task's couplings unscaled (1)."""
    for name, half in (("au", au), ("expr", expr)):
        if not (np.isfinite(half) and half >= 0):
            raise ValueError(f"the scarcity half-point {name} must be >= 0 labelled images, got {half}")

    def scale(counts: np.ndarray, half: float) -> float:
        if half == 0:
            return 1.0
        return float(np.mean(half / (half + np.asarray(counts, np.float64))))

    return {"expression": scale(expr_counts, expr), "au": scale(au_counts, au)}


def scaled_weights(weights: Mapping[str, float | None], scales: Mapping[str, float]) -> dict[str, float | None]:
    """The :class:`~fbn_fast.losses.LossWeights` keywords with each coupling direction scaled by the scarcity of
    the task it feeds: ``ca_ea``/``dm_ea`` (into the AUs) by ``scales["au"]``, ``ca_ae``/``dm_ae`` by
    ``scales["expression"]``."""
    out = dict(weights)
    for group in ("ca", "dm"):
        for term in WEIGHT_GROUPS[group]:
            own = weights.get(term)
            base = weights[group] if own is None else own
            out[term] = float(base) * scales["au" if term.endswith("_ea") else "expression"]
    return out


class RelatednessRefresh:
    """Re-estimates the objective's table from the training batches every ``every`` steps.

    Each batch adds, per sample whose expression is known — its label, or a prediction with
    ``max softmax >= confidence`` — one count to its class and its AU vector (the labels where annotated, the
    predicted probabilities elsewhere) to that class's sums. At each update the table becomes
    ``(S[c] + α·R0[c]) / (n[c] + α)`` over the window since the previous update (``R0`` the starting table,
    ``α = strength``) and is copied into ``table`` in place; the sums restart. Everything stays on the device;
    under DDP the sums are all-reduced at the update.
    """

    def __init__(self, table: Tensor, *, every: int, confidence: float = 0.9, strength: float = 1000.0) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1 step, got {every}")
        if not 0.0 < confidence <= 1.0:
            raise ValueError(f"confidence must be in (0, 1], got {confidence}")
        if not strength > 0:
            raise ValueError(f"strength must be > 0 (a pseudo-count), got {strength}")
        self.table = table
        self.start = table.detach().clone()
        self.every, self.confidence, self.strength = int(every), float(confidence), float(strength)
        c, k = table.shape
        self.counts = torch.zeros(c, dtype=torch.float64, device=table.device)
        self.sums = torch.zeros(c, k, dtype=torch.float64, device=table.device)
        self.steps = 0

    @torch.no_grad()
    def observe(self, z_e: Tensor, z_a: Tensor, expr: Tensor, expr_mask: Tensor, au: Tensor, au_mask: Tensor,
                skipped: Tensor | None = None) -> None:
        """Add one batch (logits and labels as the objective takes them; ``skipped``: a 0-d bool tensor, true
        when the step is not applied, whose batch then counts for nothing); updates the table every ``every``."""
        p = torch.softmax(z_e.detach().double(), dim=1)
        conf, guess = p.max(1)
        known = expr_mask.bool()
        cls = torch.where(known, expr.long().clamp(0, p.shape[1] - 1), guess)
        keep = torch.isfinite(z_e).all(1) & torch.isfinite(z_a).all(1)
        if skipped is not None:
            keep = keep & ~skipped  # on the device: no host sync
        use = ((known | (conf >= self.confidence)) & keep).double()
        x = torch.where(au_mask.bool(), au.double(), torch.sigmoid(z_a.detach().double())).nan_to_num(0.0)
        onehot = torch.nn.functional.one_hot(cls, p.shape[1]).double() * use[:, None]
        self.counts += onehot.sum(0)
        self.sums += onehot.T @ x
        self.steps += 1
        if self.steps % self.every == 0:
            self.update()

    @torch.no_grad()
    def update(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.counts)
            dist.all_reduce(self.sums)
        new = (self.sums + self.strength * self.start.double()) / (self.counts + self.strength)[:, None]
        self.table.copy_(new.to(self.table.dtype))
        self.counts.zero_()
        self.sums.zero_()

    def state_dict(self) -> dict[str, Tensor | int]:
        return {"table": self.table.detach().cpu().clone(), "counts": self.counts.detach().cpu().clone(),
                "sums": self.sums.detach().cpu().clone(), "steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Tensor | int | None]) -> None:
        """Restore :meth:`state_dict`; ``counts``/``sums`` of ``None`` restart the window's sums at zero (another
        rank's state: its samples are not this rank's)."""
        self.table.copy_(torch.as_tensor(state["table"]).to(self.table))
        for name in ("counts", "sums"):
            value = state.get(name)
            getattr(self, name).copy_(torch.zeros(()) if value is None else torch.as_tensor(value))
        self.steps = int(state["steps"])
