"""SynthFace labels: expressions, their AUs through the relatedness table, valence/arousal, compounds.

Sampling is separate from rendering, so label statistics can be checked (and whole datasets planned) without
drawing a face. For ``n`` faces, vectorised:

* expression ``c`` ~ Categorical(``expr_probs``), uniform over the 7 by default;
* AU ``k`` active ~ Bernoulli(``R[c, k]``) with ``R`` = :func:`fbn_fast.relatedness.prior`, OR spontaneously
  active with probability :data:`SPONTANEOUS` (each AU independently, every expression, Neutral included), so
  ``P(active) = 1 - (1 - R[c, k]) (1 - SPONTANEOUS)`` (:func:`active_probability`);
* an expression strength ``g`` ~ U(0, 1) per face; an active AU has intensity
  ``0.5 + 0.5 · clip(g + N(0, 0.2²), 0, 1)`` (in [:data:`AU_THRESHOLD`, 1]); an inactive AU is 0, or with
  probability :data:`SUBTHRESHOLD` a faint trace ~ U(0, :data:`SUBTHRESHOLD_MAX`) — visible, but below the
  threshold. The binary label is ``intensity >= AU_THRESHOLD``;
* VA = ``clip(mu[c] · (0.6 + 0.4 g) + N(0, VA_NOISE²), -1, 1)`` with ``mu`` from :data:`VA_MEANS`, so the
  stronger the face, the further from the origin;
* compound ``j`` (test set only) ~ Categorical(``compound_probs``); AUs as above with row ``j`` of
  :func:`fbn_fast.relatedness.compound_prior`; no basic expression; VA around the mean of the two named
  basic expressions' means (:data:`fbn_fast.labels.COMPOUND_PARENTS`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...labels import COMPOUND_PARENTS, COMPOUNDS, EXPRESSIONS, MISSING, NUM_AUS
from ...relatedness import compound_prior, prior

#: An AU is labelled active when its intensity is at least this.
AU_THRESHOLD = 0.5
#: Probability that an AU fires spontaneously, whatever the expression.
SPONTANEOUS = 0.05
#: Probability that an inactive AU shows a faint, sub-threshold trace, and the largest such intensity.
SUBTHRESHOLD = 0.25
SUBTHRESHOLD_MAX = 0.2
#: Spread of active intensities around the face's strength.
STRENGTH_JITTER = 0.2

#: Mean (valence, arousal) per basic expression (circumplex placements; our choice).
VA_MEANS: dict[str, tuple[float, float]] = {
    "Neutral": (0.0, 0.0),
    "Anger": (-0.6, 0.7),
    "Disgust": (-0.65, 0.35),
    "Fear": (-0.55, 0.75),
    "Happiness": (0.75, 0.45),
    "Sadness": (-0.65, -0.35),
    "Surprise": (0.25, 0.8),
}
VA_NOISE = 0.12


def va_means() -> np.ndarray:
    """The 7×2 table of :data:`VA_MEANS` in canonical expression order."""
    return np.array([VA_MEANS[name] for name in EXPRESSIONS], dtype=np.float64)


def compound_va_means() -> np.ndarray:
    """15×2: each compound's VA mean is the average of its two basic expressions' means."""
    mu = va_means()
    return np.array([(mu[EXPRESSIONS.index(a)] + mu[EXPRESSIONS.index(b)]) / 2 for a, b in COMPOUND_PARENTS])


def active_probability(table: np.ndarray, spontaneous: float = SPONTANEOUS) -> np.ndarray:
    """``P(AU active | class)`` when AUs follow ``table`` and also fire spontaneously."""
    return 1.0 - (1.0 - np.asarray(table, dtype=np.float64)) * (1.0 - spontaneous)


@dataclass
class Labels:
    """Ground truth of ``n`` faces (aligned arrays)."""

    expr: np.ndarray  # int8 (n,), MISSING for compound faces
    compound: np.ndarray  # int8 (n,), MISSING for basic-expression faces
    au_intensity: np.ndarray  # float32 (n, 17) in [0, 1]
    va: np.ndarray  # float32 (n, 2) in [-1, 1]
    strength: np.ndarray  # float32 (n,)

    def __len__(self) -> int:
        return len(self.expr)

    @property
    def au(self) -> np.ndarray:
        """Binary AU labels (uint8 n×17)."""
        return (self.au_intensity >= AU_THRESHOLD).astype(np.uint8)


def normalise_probs(probs, n_classes: int, what: str) -> np.ndarray:
    """Class weights as probabilities (uniform when ``probs`` is None); bad weights raise naming ``what``."""
    if probs is None:
        return np.full(n_classes, 1.0 / n_classes)
    p = np.asarray(probs, dtype=np.float64)
    if p.shape != (n_classes,) or not np.all(np.isfinite(p)) or (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"{what} must be {n_classes} non-negative weights with a positive sum, got {probs!r}")
    return p / p.sum()


def _draw(rng: np.random.Generator, cls: np.ndarray, table: np.ndarray, means: np.ndarray,
          spontaneous: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = len(cls)
    active = rng.random((n, NUM_AUS)) < active_probability(table, spontaneous)[cls]
    strength = rng.random(n)
    level = 0.5 + 0.5 * np.clip(strength[:, None] + rng.normal(0.0, STRENGTH_JITTER, (n, NUM_AUS)), 0.0, 1.0)
    trace = (rng.random((n, NUM_AUS)) < SUBTHRESHOLD) * rng.uniform(0.0, SUBTHRESHOLD_MAX, (n, NUM_AUS))
    intensity = np.where(active, np.maximum(level, AU_THRESHOLD), trace)
    va = np.clip(means[cls] * (0.6 + 0.4 * strength[:, None]) + rng.normal(0.0, VA_NOISE, (n, 2)), -1.0, 1.0)
    return intensity.astype(np.float32), va.astype(np.float32), strength.astype(np.float32)


def sample_expressions(rng: np.random.Generator, n: int, expr_probs=None,
                       spontaneous: float = SPONTANEOUS) -> Labels:
    """Labels of ``n`` basic-expression faces (see the module doc for the model)."""
    p = normalise_probs(expr_probs, len(EXPRESSIONS), "expr_probs")
    expr = rng.choice(len(EXPRESSIONS), size=n, p=p)
    intensity, va, strength = _draw(rng, expr, prior().matrix, va_means(), spontaneous)
    return Labels(expr.astype(np.int8), np.full(n, MISSING, np.int8), intensity, va, strength)


def sample_compounds(rng: np.random.Generator, n: int, compound_probs=None,
                     spontaneous: float = SPONTANEOUS) -> Labels:
    """Labels of ``n`` compound-expression faces: AUs from the compound table, no basic expression."""
    p = normalise_probs(compound_probs, len(COMPOUNDS), "compound_probs")
    comp = rng.choice(len(COMPOUNDS), size=n, p=p)
    intensity, va, strength = _draw(rng, comp, compound_prior().matrix, compound_va_means(), spontaneous)
    return Labels(np.full(n, MISSING, np.int8), comp.astype(np.int8), intensity, va, strength)
