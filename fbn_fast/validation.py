"""Validation where labels enter (data pipeline, users, ``validate=True`` on the loss).

Each check raises ``ValueError`` naming the tensor, the row and the offending value. The checks read the
values, so they synchronise with the device: call them on CPU tensors at load time, not in the hot loop.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if x.dtype.is_floating_point and x.element_size() < 4:  # numpy has no bfloat16
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _first(bad: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(bad)[0])


def _where(name: str, idx: tuple[int, ...], value: Any) -> str:
    row = idx[0]
    col = f", column {idx[1]}" if len(idx) > 1 else ""
    return f"{name}: row {row}{col} has value {value!r}"


def check_shape(name: str, shape: tuple[int, ...], expected: tuple[int | None, ...], source: str = "") -> None:
    """Raise ``ValueError`` naming ``name`` unless ``shape`` matches ``expected`` (``None``: any size);
    ``source`` says where the expected sizes come from (e.g. ``"from z_e and z_a"``)."""
    shape = tuple(shape)
    if len(shape) != len(expected) or any(e is not None and e != s for e, s in zip(expected, shape)):
        want = str(tuple("*" if e is None else e for e in expected)).replace("'", "")
        raise ValueError(f"{name}: shape {shape}, expected {want}" + (f" {source}" if source else ""))


def _check_shape(name: str, arr: np.ndarray, shape: tuple[int | None, ...]) -> None:
    check_shape(name, arr.shape, shape)


def validate_relatedness(matrix: Any, num_classes: int | None = None, num_aus: int | None = None,
                         name: str = "relatedness") -> None:
    """A C×K matrix of finite probabilities in [0, 1]."""
    m = _np(matrix).astype(np.float64, copy=False)
    _check_shape(name, m, (num_classes, num_aus))
    bad = ~np.isfinite(m) | (m < 0) | (m > 1)
    if bad.any():
        idx = _first(bad)
        raise ValueError(_where(name, idx, float(m[idx])) + ", outside [0, 1]")


def validate_pos_weight(weights: Any, num_aus: int | None = None, name: str = "au_pos_weight") -> None:
    """K finite weights >= 0 (one per AU: the weight of its positive labels in ``L_au``)."""
    w = _np(weights).astype(np.float64, copy=False)
    _check_shape(name, w, (num_aus,))
    bad = ~np.isfinite(w) | (w < 0)
    if bad.any():
        idx = _first(bad)
        raise ValueError(_where(name, idx, float(w[idx])) + ", expected a finite weight >= 0")


def _label_sizes(num_classes: int | None, num_aus: int | None, relatedness: Any) -> tuple[int, int]:
    """``(C, K)`` for :func:`validate_labels`: given sizes must agree with the table's shape when both are given."""
    if relatedness is None:
        from .labels import AUS, EXPRESSIONS

        return (len(EXPRESSIONS) if num_classes is None else num_classes, len(AUS) if num_aus is None else num_aus)
    table = _np(getattr(relatedness, "matrix", relatedness))
    _check_shape("relatedness", table, (num_classes, num_aus))
    return int(table.shape[0]), int(table.shape[1])


def validate_labels(
    expr: Any = None,
    expr_mask: Any = None,
    au: Any = None,
    au_mask: Any = None,
    va: Any = None,
    va_mask: Any = None,
    num_classes: int | None = None,
    num_aus: int | None = None,
    batch: int | None = None,
    relatedness: Any = None,
) -> None:
    """Check labels and masks of one batch (or a whole manifest); ``None`` skips a task.

    Rules: ``expr`` in [0, C) where ``expr_mask``; ``au`` exactly 0 or 1 where ``au_mask``; ``va`` finite and
    in [-1, 1] where ``va_mask``; every tensor of the batch length with the right trailing size.
    ``C`` and ``K`` are ``num_classes``/``num_aus``, else the shape of ``relatedness`` (a
    :class:`~fbn_fast.relatedness.Relatedness`, an array or a tensor), else the package's label space (7, 17).
    """
    num_classes, num_aus = _label_sizes(num_classes, num_aus, relatedness)
    pairs = [("expr", expr, expr_mask, ()), ("au", au, au_mask, (num_aus,)), ("va", va, va_mask, (2,))]
    for name, lab, mask, trail in pairs:
        if lab is None and mask is None:
            continue
        if lab is None or mask is None:
            raise ValueError(f"{name} and {name}_mask must be given together")
        lab, mask = _np(lab), _np(mask)
        batch = lab.shape[0] if batch is None and lab.ndim > 0 else batch
        _check_shape(name, lab, (batch, *trail))
        mask_shape = (batch, num_aus) if name == "au" else (batch,)
        _check_shape(f"{name}_mask", mask, mask_shape)
        if mask.dtype != np.bool_:
            if not np.isin(mask, (0, 1)).all():
                idx = _first(~np.isin(mask, (0, 1)))
                raise ValueError(_where(f"{name}_mask", idx, mask[idx].item()) + ", expected 0/1 or bool")
            mask = mask.astype(bool)
        if name == "expr":
            if np.issubdtype(lab.dtype, np.floating):
                frac = mask & (lab != np.round(lab))
                if frac.any():
                    idx = _first(frac)
                    raise ValueError(_where("expr", idx, float(lab[idx])) + ", expected an integer class id")
            bad = mask & ((lab < 0) | (lab >= num_classes))
            if bad.any():
                idx = _first(bad)
                raise ValueError(_where("expr", idx, lab[idx].item()) + f", outside [0, {num_classes})")
        elif name == "au":
            bad = mask & ~((lab == 0) | (lab == 1))
            if bad.any():
                idx = _first(bad)
                raise ValueError(_where("au", idx, float(lab[idx])) + ", expected 0 or 1 where annotated")
        else:
            lab = lab.astype(np.float64)
            bad = mask[:, None] & ~(np.isfinite(lab) & (np.abs(lab) <= 1.0))
            if bad.any():
                idx = _first(bad)
                raise ValueError(_where("va", idx, float(lab[idx])) + ", outside [-1, 1] or not finite")
