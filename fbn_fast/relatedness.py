"""Task relatedness (docs/method.md §2): expression→AU tables, their estimation from data, VA means, JSON I/O.

A :class:`Relatedness` carries its label names, so a table saved for one label order can never be applied
to another silently: :meth:`Relatedness.check_labels` and :func:`load` raise with both orders named.
:meth:`Relatedness.select` subsets or reorders a table by label names, :meth:`Relatedness.rename` renames them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .labels import AU_NUMBERS, AUS, COMPOUNDS, EXPRESSIONS, MISSING

# Du, Tao & Martinez (PNAS 2014), Table 1: AUs used by > 70% of subjects (weight 1) and by some (their
# proportion), restricted to the 17 AUs of the label space. Keys are FACS numbers.
_PRIOR_SPEC: dict[str, tuple[tuple[int, ...], dict[int, float]]] = {
    "Neutral": ((), {}),
    "Anger": ((4, 7, 24), {10: 0.26, 17: 0.52, 23: 0.29}),
    "Disgust": ((9, 10, 17), {4: 0.31, 24: 0.26}),
    "Fear": ((1, 4, 20, 25), {2: 0.57, 5: 0.63, 26: 0.33}),
    "Happiness": ((12, 25), {6: 0.51}),
    "Sadness": ((4, 15), {1: 0.60, 6: 0.50, 17: 0.67}),
    "Surprise": ((1, 2, 25, 26), {5: 0.66}),
}

_COMPOUND_SPEC: dict[str, tuple[tuple[int, ...], dict[int, float]]] = {
    "Happily surprised": ((1, 2, 12, 25), {5: 0.64, 26: 0.67}),
    "Happily disgusted": ((10, 12, 25), {4: 0.32, 6: 0.61, 9: 0.59}),
    "Sadly fearful": ((1, 4, 20, 25), {2: 0.46, 5: 0.24, 6: 0.34, 15: 0.30}),
    "Sadly angry": ((4, 15), {6: 0.26, 7: 0.48, 17: 0.50}),
    "Sadly surprised": ((1, 4, 25, 26), {2: 0.27, 6: 0.31}),
    "Sadly disgusted": ((4, 10), {1: 0.49, 6: 0.61, 9: 0.20, 15: 0.54, 17: 0.47, 25: 0.43}),
    "Fearfully angry": ((4, 20, 25), {5: 0.40, 7: 0.39, 10: 0.30}),
    "Fearfully surprised": ((1, 2, 5, 20, 25), {4: 0.47, 10: 0.35, 26: 0.51}),
    "Angrily surprised": ((4, 25, 26), {5: 0.35, 7: 0.50, 10: 0.34}),
    "Angrily disgusted": ((4, 10, 17), {7: 0.60, 9: 0.57, 24: 0.36}),
    "Disgustedly surprised": ((1, 2, 5, 10), {4: 0.45, 9: 0.37, 17: 0.66, 24: 0.33}),
    "Fearfully disgusted": ((1, 4, 10, 20, 25), {2: 0.64, 5: 0.50, 6: 0.26, 9: 0.28, 15: 0.33}),
    "Appalled": ((4, 10), {6: 0.25, 9: 0.56, 17: 0.67, 24: 0.36}),
    "Hatred": ((4, 10), {7: 0.57, 9: 0.27, 17: 0.63, 24: 0.37}),
    "Awed": ((1, 2, 5, 25), {4: 0.21, 20: 0.62, 26: 0.56}),
}


def _table(spec: dict[str, tuple[tuple[int, ...], dict[int, float]]], rows: tuple[str, ...]) -> np.ndarray:
    table = np.zeros((len(rows), len(AU_NUMBERS)), dtype=np.float64)
    for r, name in enumerate(rows):
        full, partial = spec[name]
        for au in full:
            table[r, AU_NUMBERS.index(au)] = 1.0
        for au, w in partial.items():
            table[r, AU_NUMBERS.index(au)] = w
    return table


@dataclass(frozen=True)
class Relatedness:
    """A relatedness table ``matrix[c, k] = P(AU k active | class c)`` with its label names.

    ``va_means`` (C×2) is the mean valence/arousal per class, when known.
    """

    matrix: np.ndarray
    classes: tuple[str, ...]
    aus: tuple[str, ...]
    va_means: np.ndarray | None = None
    source: str = "prior"
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        from .validation import validate_relatedness

        m = np.asarray(self.matrix, dtype=np.float64)
        validate_relatedness(m, num_classes=len(self.classes), num_aus=len(self.aus))
        object.__setattr__(self, "matrix", m)
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "aus", tuple(self.aus))
        if self.va_means is not None:
            mu = np.asarray(self.va_means, dtype=np.float64)
            if mu.shape != (len(self.classes), 2):
                raise ValueError(f"va_means has shape {mu.shape}, expected ({len(self.classes)}, 2)")
            if not np.all(np.isfinite(mu)) or np.abs(mu).max(initial=0.0) > 1.0:
                row = int(np.argwhere(~np.isfinite(mu) | (np.abs(mu) > 1.0))[0, 0])
                raise ValueError(f"va_means row {row} ({self.classes[row]}) is {mu[row].tolist()}, outside [-1, 1]")
            object.__setattr__(self, "va_means", mu)

    def check_labels(self, classes: tuple[str, ...] | list[str], aus: tuple[str, ...] | list[str]) -> None:
        """Raise unless this table is laid out in exactly these class and AU orders."""
        if tuple(classes) != self.classes:
            raise ValueError(f"relatedness rows are {list(self.classes)} but the model's classes are {list(classes)}")
        if tuple(aus) != self.aus:
            raise ValueError(f"relatedness columns are {list(self.aus)} but the model's AUs are {list(aus)}")

    def select(self, classes: Sequence[str] | None = None, aus: Sequence[str] | None = None) -> Relatedness:
        """The table restricted to, and reordered as, these class and AU names (``None`` keeps that axis).

        Rows of ``va_means`` and of the per-cell ``meta["annotated_counts"]`` follow. Raises ``ValueError``
        naming every unknown or repeated name, with the names this table has.
        """
        rows = _indices("class", self.classes, classes)
        cols = _indices("AU", self.aus, aus)
        meta = dict(self.meta)
        counts = np.asarray(meta.get("annotated_counts", []))
        if counts.shape == self.matrix.shape:  # per-cell counts follow the cells; anything else is kept as is
            meta["annotated_counts"] = counts[np.ix_(rows, cols)].tolist()
        return Relatedness(
            self.matrix[np.ix_(rows, cols)],
            tuple(self.classes[i] for i in rows),
            tuple(self.aus[i] for i in cols),
            va_means=None if self.va_means is None else self.va_means[rows],
            source=self.source,
            meta=meta,
        )

    def rename(self, classes: Mapping[str, str] | None = None, aus: Mapping[str, str] | None = None) -> Relatedness:
        """The same table under other label names: ``classes``/``aus`` map old names to new ones (names not
        in a mapping are kept). Raises ``ValueError`` naming a key this table lacks or a name used twice."""
        new_classes = _renamed("class", self.classes, classes or {})
        new_aus = _renamed("AU", self.aus, aus or {})
        return Relatedness(self.matrix, new_classes, new_aus, self.va_means, self.source, dict(self.meta))

    def tensor(self, device=None, dtype=None):
        """The matrix as a torch tensor (float32 by default)."""
        import torch

        return torch.as_tensor(self.matrix, dtype=dtype or torch.float32, device=device)

    def va_tensor(self, device=None, dtype=None):
        import torch

        if self.va_means is None:
            return None
        return torch.as_tensor(self.va_means, dtype=dtype or torch.float32, device=device)

    def to_json(self) -> dict:
        return {
            "format": "fbn_fast.relatedness/1",
            "source": self.source,
            "classes": list(self.classes),
            "aus": list(self.aus),
            "matrix": self.matrix.tolist(),
            "va_means": None if self.va_means is None else self.va_means.tolist(),
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, obj: dict) -> Relatedness:
        missing = {"classes", "aus", "matrix"} - obj.keys()
        if missing:
            raise ValueError(f"relatedness JSON lacks {sorted(missing)}")
        return cls(
            matrix=np.asarray(obj["matrix"], dtype=np.float64),
            classes=tuple(obj["classes"]),
            aus=tuple(obj["aus"]),
            va_means=None if obj.get("va_means") is None else np.asarray(obj["va_means"], dtype=np.float64),
            source=obj.get("source", "file"),
            meta=obj.get("meta", {}),
        )


def _indices(axis: str, names: tuple[str, ...], wanted: Sequence[str] | None) -> list[int]:
    """Positions of ``wanted`` in ``names`` (all of them, in order, for ``None``)."""
    if wanted is None:
        return list(range(len(names)))
    if isinstance(wanted, str):
        raise TypeError(f"{axis} names must be a sequence of names, got the string {wanted!r}")
    wanted = list(wanted)
    unknown = [n for n in wanted if n not in names]
    if unknown:
        raise ValueError(f"unknown {axis} name(s) {unknown}; this table has {list(names)}")
    repeated = sorted({n for n in wanted if wanted.count(n) > 1})
    if repeated:
        raise ValueError(f"{axis} name(s) {repeated} given more than once")
    if not wanted:
        raise ValueError(f"select needs at least one {axis} name")
    return [names.index(n) for n in wanted]


def _renamed(axis: str, names: tuple[str, ...], mapping: Mapping[str, str]) -> tuple[str, ...]:
    unknown = [n for n in mapping if n not in names]
    if unknown:
        raise ValueError(f"cannot rename unknown {axis} name(s) {unknown}; this table has {list(names)}")
    out = tuple(mapping.get(n, n) for n in names)
    repeated = sorted({n for n in out if out.count(n) > 1})
    if repeated:
        raise ValueError(f"renaming gives the {axis} name(s) {repeated} to more than one label")
    return out


def prior() -> Relatedness:
    """The 7×17 expert table of docs/method.md §2 (Neutral a row of zeros)."""
    return Relatedness(_table(_PRIOR_SPEC, EXPRESSIONS), EXPRESSIONS, AUS, source="prior")


def compound_prior() -> Relatedness:
    """The 15×17 compound table of docs/method.md §2."""
    return Relatedness(_table(_COMPOUND_SPEC, COMPOUNDS), COMPOUNDS, AUS, source="compound-prior")


def estimate(
    expr: np.ndarray,
    au: np.ndarray,
    au_mask: np.ndarray,
    va: np.ndarray | None = None,
    va_mask: np.ndarray | None = None,
    alpha: float = 0.0,
    base: Relatedness | None = None,
) -> Relatedness:
    """Data-driven relatedness from co-annotated samples (docs/method.md §2).

    ``R[c,k] = (n_ck_active + alpha·R_prior[c,k]) / (n_ck_annotated + alpha)`` over samples with an
    expression label (``expr != MISSING``) and AU ``k`` annotated. Cells with no data and ``alpha = 0``
    fall back to the prior (our choice: an empty cell has no empirical value). With ``va``, the per-class
    VA mean over samples labelled with both; classes without such samples get the prior's means if it has
    them, else 0. Streams over nothing: the inputs are the manifest's arrays.
    """
    base = base or prior()
    num_classes, num_aus = base.matrix.shape
    expr = np.asarray(expr, dtype=np.int64)
    au = np.asarray(au, dtype=np.float64)
    au_mask = np.asarray(au_mask, dtype=bool)
    if au.shape != (len(expr), num_aus) or au_mask.shape != au.shape:
        raise ValueError(f"au/au_mask have shapes {au.shape}/{au_mask.shape}, expected ({len(expr)}, {num_aus})")
    labelled = (expr != MISSING)
    onehot = class_onehot(expr, num_classes)
    annotated, active = class_au_counts(onehot, au, au_mask)
    denom = annotated + alpha
    with np.errstate(invalid="ignore", divide="ignore"):
        matrix = np.where(denom > 0, (active + alpha * base.matrix) / np.where(denom > 0, denom, 1.0), base.matrix)

    va_means = None
    if va is not None:
        va = np.asarray(va, dtype=np.float64)
        vm = np.asarray(va_mask, dtype=bool) & labelled
        counts = onehot[vm].sum(0)
        sums = onehot[vm].T @ va[vm]
        fallback = base.va_means if base.va_means is not None else np.zeros((num_classes, 2))
        va_means = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], fallback)
    meta = {
        "alpha": alpha,
        "samples_with_expr_and_au": int((labelled & au_mask.any(1)).sum()),
        "annotated_counts": annotated.astype(int).tolist(),
    }
    return Relatedness(matrix, base.classes, base.aus, va_means=va_means, source="data", meta=meta)


def class_onehot(expr: np.ndarray, num_classes: int) -> np.ndarray:
    """N×C one-hot rows of the expression labels (rows without one, ``MISSING``, all zero)."""
    expr = np.asarray(expr, dtype=np.int64)
    labelled = expr != MISSING
    onehot = np.zeros((len(expr), num_classes))
    onehot[np.flatnonzero(labelled), expr[labelled]] = 1.0
    return onehot


def class_au_counts(onehot: np.ndarray, au: np.ndarray, au_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """C×K counts of co-annotated samples: AU ``k`` annotated, and annotated and active (>= 0.5), per class."""
    au_mask = np.asarray(au_mask, dtype=bool)
    annotated = onehot.T @ au_mask.astype(np.float64)
    active = onehot.T @ (au_mask & (np.asarray(au) >= 0.5)).astype(np.float64)
    return annotated, active


def save(rel: Relatedness, path: str | os.PathLike) -> None:
    """Write ``rel`` as JSON atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(rel.to_json(), indent=1))
    os.replace(tmp, path)


def load(
    path: str | os.PathLike,
    classes: tuple[str, ...] | list[str] | None = None,
    aus: tuple[str, ...] | list[str] | None = None,
) -> Relatedness:
    """Read a table written by :func:`save`; with ``classes``/``aus`` given, check its label orders."""
    try:
        obj = json.loads(Path(path).read_text())
        rel = Relatedness.from_json(obj)
    except (json.JSONDecodeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from exc
    if classes is not None or aus is not None:
        try:
            rel.check_labels(classes if classes is not None else rel.classes, aus if aus is not None else rel.aus)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
    return rel
