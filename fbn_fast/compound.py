"""Zero- and few-shot compound expressions (docs/method.md §4).

Zero-shot: with the compound relatedness table ``R_comp`` (J×K, :func:`fbn_fast.relatedness.compound_prior`),
``P(j | image) = softmax_j(ℓ_comp(s)/T + β·(log p[c1(j)] + log p[c2(j)]))`` from the AU probabilities ``s``
and, optionally (β ≠ 0), the log-posteriors of the two basic expressions that compound ``j`` names.
``ℓ_comp`` is the AU log-likelihood of the objective (same smoothing ``Rs = clip(R, ε, 1−ε)``), linear in ``s``:
weights ``log Rs − log(1−Rs)``, bias ``Σ_k log(1−Rs)``.

Few-shot: :class:`FewShotCompoundHead` is a linear layer on ``s`` (optionally concatenated with the
expression log-posteriors) initialised to exactly those zero-shot weights, so before fine-tuning it gives the
zero-shot scores; :func:`fit_few_shot` fine-tunes it on k labelled images per class (precomputed features).

Everything is generic in K (AUs), C (expressions) and J (compounds).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .labels import COMPOUND_PARENTS, COMPOUNDS, EXPRESSIONS, MISSING
from .losses.reference import DEFAULT_EPS, au_log_likelihood, relatedness_log_terms
from .relatedness import Relatedness, compound_prior
from .validation import validate_relatedness

__all__ = [
    "CompoundScorer",
    "FewShotCompoundHead",
    "fit_few_shot",
    "parent_matrix",
    "zero_shot_logits",
    "zero_shot_posteriors",
    "zero_shot_weights",
]

TableLike = Relatedness | Tensor | np.ndarray


def parent_matrix(
    compounds: Sequence[str] = COMPOUNDS,
    parents: Sequence[tuple[str, str]] | None = None,
    classes: Sequence[str] = EXPRESSIONS,
) -> np.ndarray:
    """J×C matrix with 1 on the two basic expressions each compound names (``COMPOUND_PARENTS`` by default).

    ``parents[j]`` names the parents of ``compounds[j]``; by default they are looked up by compound name in
    :data:`fbn_fast.labels.COMPOUND_PARENTS`, so a subset or reordering of the compounds works too.
    """
    classes = list(classes)
    if parents is None:
        known = dict(zip(COMPOUNDS, COMPOUND_PARENTS))
        unknown = [c for c in compounds if c not in known]
        if unknown:
            raise ValueError(f"compounds {unknown} have no known parents; pass parents explicitly")
        parents = [known[c] for c in compounds]
    if len(parents) != len(compounds):
        raise ValueError(f"parents has {len(parents)} entries for {len(compounds)} compounds")
    out = np.zeros((len(compounds), len(classes)), dtype=np.float64)
    for j, pair in enumerate(parents):
        for name in pair:
            if name not in classes:
                raise ValueError(f"parent {name!r} of compound {compounds[j]!r} is not among the classes {classes}")
            out[j, classes.index(name)] += 1.0
    return out


def _table(relatedness: TableLike | None, dtype: torch.dtype, device: Any) -> Tensor:
    if relatedness is None:
        relatedness = compound_prior()
    if isinstance(relatedness, Relatedness):
        return relatedness.tensor(device=device, dtype=dtype)
    validate_relatedness(relatedness, name="compound relatedness")
    return torch.as_tensor(relatedness, dtype=dtype, device=device)


def _parents(
    parents: TableLike | None, relatedness: TableLike | None, num_classes: int, dtype: torch.dtype, device: Any
) -> Tensor:
    """The J×C parent matrix: given, or looked up from the compound names of the table."""
    if parents is None:
        names = relatedness.classes if isinstance(relatedness, Relatedness) else None
        if names is None:
            if relatedness is not None:
                raise ValueError("a plain-tensor compound table has no compound names: pass parents (J×C)")
            names = COMPOUNDS
        parents = parent_matrix(names)
    p = torch.as_tensor(parents, dtype=dtype, device=device)
    if p.ndim != 2 or p.shape[1] != num_classes:
        raise ValueError(f"parents: shape {tuple(p.shape)}, expected (J, {num_classes}) matching the expressions")
    return p


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not t > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return t


def zero_shot_weights(
    relatedness: TableLike | None = None,
    temperature: float = 1.0,
    eps: float = DEFAULT_EPS,
    dtype: torch.dtype = torch.float32,
    device: Any = None,
) -> tuple[Tensor, Tensor]:
    """The linear form of ``ℓ_comp(s)/T``: weight ``(log Rs − log(1−Rs))/T`` (J×K) and bias ``Σ_k log(1−Rs)/T``."""
    t = _check_temperature(temperature)
    log_r, log_1mr = relatedness_log_terms(_table(relatedness, dtype, device), eps)
    return (log_r - log_1mr) / t, log_1mr.sum(1) / t


def zero_shot_logits(
    au_probs: Tensor,
    relatedness: TableLike | None = None,
    temperature: float = 1.0,
    eps: float = DEFAULT_EPS,
    expr_log_probs: Tensor | None = None,
    beta: float = 0.0,
    parents: TableLike | None = None,
) -> Tensor:
    """Unnormalised compound log-scores (B, J): ``ℓ_comp(s)/T + β·(log p[c1(j)] + log p[c2(j)])``.

    ``au_probs`` (B, K) are AU probabilities ``s`` (not logits); ``expr_log_probs`` (B, C) are the
    log-softmax of the expression logits, needed when ``beta != 0``. ``relatedness`` defaults to the 15-compound
    table; ``parents`` (J×C) defaults to :data:`fbn_fast.labels.COMPOUND_PARENTS` looked up by compound name.
    """
    t = _check_temperature(temperature)
    if au_probs.ndim != 2:
        raise ValueError(f"au_probs: shape {tuple(au_probs.shape)}, expected (B, K)")
    dt = torch.float64 if au_probs.dtype == torch.float64 else torch.float32
    s = au_probs.to(dt)
    table = _table(relatedness, dt, s.device)
    if table.shape[1] != s.shape[1]:
        raise ValueError(f"au_probs has {s.shape[1]} AUs but the compound table has {table.shape[1]}")
    log_r, log_1mr = relatedness_log_terms(table, eps)
    scores = au_log_likelihood(s, log_r, log_1mr) / t
    if beta != 0.0:
        if expr_log_probs is None:
            raise ValueError("beta != 0 needs expr_log_probs (the log-softmax of the expression logits)")
        if expr_log_probs.shape[0] != s.shape[0] or expr_log_probs.ndim != 2:
            raise ValueError(f"expr_log_probs: shape {tuple(expr_log_probs.shape)}, expected ({s.shape[0]}, C)")
        lp = expr_log_probs.to(dt)
        par = _parents(parents, relatedness, lp.shape[1], dt, s.device)
        if par.shape[0] != table.shape[0]:
            raise ValueError(f"parents has {par.shape[0]} rows but the compound table has {table.shape[0]}")
        scores = scores + beta * (lp @ par.T)
    return scores


def zero_shot_posteriors(au_probs: Tensor, **kwargs: Any) -> Tensor:
    """``P(compound j | image)`` (B, J): softmax of :func:`zero_shot_logits` (same keyword arguments)."""
    return torch.softmax(zero_shot_logits(au_probs, **kwargs), dim=1)


class CompoundScorer:
    """Zero-shot compound scores from model outputs over a subset of the compound table's classes.

    The one way the tools score zero-shot compounds: :func:`zero_shot_logits` on ``sigmoid(au_logits)`` with
    ``β`` and ``T``, over the rows ``classes`` (compound ids into :data:`~fbn_fast.labels.COMPOUNDS`, in order;
    default: all). Labels map to positions in that subset with :meth:`targets` (ids outside it are masked).
    """

    def __init__(self, classes: Sequence[int] | None = None, beta: float = 0.0, temperature: float = 1.0,
                 table: Relatedness | None = None) -> None:
        table = table or compound_prior()
        classes = list(range(len(table.classes))) if classes is None else [int(c) for c in classes]
        if not classes:
            raise ValueError("compound classes: empty list")
        bad = [c for c in classes if not 0 <= c < len(table.classes)]
        if bad:
            raise ValueError(f"compound classes {bad} are outside [0, {len(table.classes)})")
        self.classes = classes
        self.names = [table.classes[c] for c in classes]
        self.table = Relatedness(table.matrix[classes], tuple(self.names), table.aus, source=table.source)
        self.beta, self.temperature = float(beta), _check_temperature(temperature)
        lookup = np.full(len(table.classes), MISSING, np.int64)
        lookup[classes] = np.arange(len(classes))
        self._lookup = torch.as_tensor(lookup)

    def __len__(self) -> int:
        return len(self.classes)

    def logits(self, expr_logits: Tensor, au_logits: Tensor) -> Tensor:
        """Compound log-scores (B, J) from the model's expression and AU logits."""
        s = torch.sigmoid(au_logits.float())
        lp = torch.log_softmax(expr_logits.float(), dim=1) if self.beta else None
        return zero_shot_logits(s, relatedness=self.table, temperature=self.temperature, expr_log_probs=lp,
                                beta=self.beta)

    def targets(self, compound: Tensor) -> tuple[Tensor, Tensor]:
        """``(positions, mask)`` of compound ids (B,) (``MISSING`` or a class outside the subset → masked)."""
        c = compound.long()
        lookup = self._lookup.to(c.device)
        valid = (c >= 0) & (c < len(lookup))
        pos = torch.where(valid, lookup[c.clamp(0, len(lookup) - 1)], torch.full_like(c, MISSING))
        return pos.clamp(min=0), pos >= 0


class FewShotCompoundHead(nn.Module):
    """Linear compound head on AU probabilities (and optionally expression log-posteriors), zero-shot initialised.

    At construction ``forward`` equals :func:`zero_shot_logits` with the same table, temperature, ε, β and
    parents, to floating-point rounding: weight ``(log Rs − log(1−Rs))/T``, bias ``Σ_k log(1−Rs)/T`` (computed
    in ``dtype``), and β on the parent columns of the expression part. Fine-tune it with :func:`fit_few_shot`
    or together with the trunk.
    """

    def __init__(
        self,
        relatedness: TableLike | None = None,
        temperature: float = 1.0,
        eps: float = DEFAULT_EPS,
        use_expressions: bool = False,
        beta: float = 0.0,
        parents: TableLike | None = None,
        num_expressions: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        w_au, bias = zero_shot_weights(relatedness, temperature, eps, dtype=dtype)
        num_compounds, num_aus = w_au.shape
        self.num_aus, self.num_compounds = num_aus, num_compounds
        self.use_expressions = bool(use_expressions)
        weight = w_au
        if self.use_expressions:
            if parents is None and num_expressions is not None and num_expressions != len(EXPRESSIONS):
                raise ValueError(f"num_expressions={num_expressions} needs an explicit parents matrix")
            c = num_expressions if num_expressions is not None else (
                len(EXPRESSIONS) if parents is None else int(torch.as_tensor(parents).shape[1])
            )
            par = _parents(parents, relatedness, c, dtype, None)
            if par.shape[0] != num_compounds:
                raise ValueError(f"parents has {par.shape[0]} rows but the compound table has {num_compounds}")
            self.num_expressions = c
            weight = torch.cat([w_au, float(beta) * par], dim=1)
        else:
            if beta != 0.0:
                raise ValueError("beta != 0 needs use_expressions=True")
            self.num_expressions = 0
        self.linear = nn.Linear(weight.shape[1], num_compounds, dtype=dtype)
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias)

    def features(self, au_probs: Tensor, expr_log_probs: Tensor | None = None) -> Tensor:
        """The head's input: ``s`` or ``[s, log p]`` (B, K [+ C])."""
        if au_probs.ndim != 2 or au_probs.shape[1] != self.num_aus:
            raise ValueError(f"au_probs: shape {tuple(au_probs.shape)}, expected (B, {self.num_aus})")
        if not self.use_expressions:
            return au_probs
        if expr_log_probs is None:
            raise ValueError("this head uses expressions: pass expr_log_probs (log-softmax of the expression logits)")
        if tuple(expr_log_probs.shape) != (au_probs.shape[0], self.num_expressions):
            raise ValueError(
                f"expr_log_probs: shape {tuple(expr_log_probs.shape)}, expected ({au_probs.shape[0]}, "
                f"{self.num_expressions})"
            )
        return torch.cat([au_probs, expr_log_probs.to(au_probs.dtype)], dim=1)

    def forward(self, au_probs: Tensor, expr_log_probs: Tensor | None = None) -> Tensor:
        """Compound logits (B, J); ``softmax`` of them is the compound posterior."""
        x = self.features(au_probs, expr_log_probs)
        return F.linear(x.to(self.linear.weight.dtype), self.linear.weight, self.linear.bias)


def fit_few_shot(
    head: FewShotCompoundHead,
    features: Tensor | tuple[Tensor, Tensor],
    labels: Tensor,
    steps: int = 200,
    lr: float = 1e-2,
    weight_decay: float = 0.0,
) -> list[float]:
    """Fine-tune ``head`` in place with full-batch Adam on cross-entropy; returns the loss of every step.

    ``features``: AU probabilities (N, K), or ``(au_probs, expr_log_probs)`` for a head that uses expressions,
    precomputed on the k-shot images (on any device, the head's). ``labels``: compound ids (N,).
    """
    if isinstance(features, tuple):
        au_probs, expr_log_probs = features
    else:
        au_probs, expr_log_probs = features, None
    labels = torch.as_tensor(labels, device=au_probs.device)
    if labels.ndim != 1 or labels.shape[0] != au_probs.shape[0] or labels.is_floating_point():
        raise ValueError(
            f"labels: shape {tuple(labels.shape)} dtype {labels.dtype}, expected ({au_probs.shape[0]},) integer ids"
        )
    bad = (labels < 0) | (labels >= head.num_compounds)
    if bool(bad.any()):
        row = int(torch.nonzero(bad)[0, 0])
        raise ValueError(f"labels: row {row} has value {int(labels[row])}, outside [0, {head.num_compounds})")
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    x = head.features(au_probs, expr_log_probs).detach()  # fixed inputs: only the head learns
    labels = labels.long()
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    losses = []
    head.train()
    for _ in range(int(steps)):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(head.linear(x.to(head.linear.weight.dtype)), labels)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    head.eval()
    return torch.stack(losses).tolist()  # one host sync, at the end
