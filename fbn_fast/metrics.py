"""Streaming evaluation metrics of docs/method.md §5, per dataset, from sufficient statistics only.

Every meter keeps a few small tensors that simply add up over batches (and over processes), so millions of
samples are scored without holding them:

- expressions and compounds: a C×C confusion matrix (rows: target, columns: prediction), int64;
- action units: per-AU TN / FN / FP / TP counts, int64;
- valence / arousal: per dimension ``n, Σx, Σy, Σx², Σy², Σxy`` in float64 (x: prediction, y: target), from
  which the CCC follows through population moments.

Each meter has a leading *group* axis (one group per dataset), and ``update`` routes rows to groups with a
single ``index_add_`` on combined indices: no Python loop over rows, no boolean indexing, no ``.item()``, so
an update on CUDA tensors never waits for the device. Only ``compute()`` copies the statistics to the host.

Distributed evaluation: the statistics are plain sums, so ``meter.reduce_(dist.all_reduce)`` (or
``merge`` of a meter from another process, or adding ``state_dict()`` tensors) gives the global result.

Choices where the papers are silent (ours, documented in docs/method.md):

- AU predictions are active when the probability is ``>= threshold`` (0.5); meters take probabilities unless
  built (or called) with ``from_logits=True``.
- An AU annotated in a dataset whose F1 has a zero denominator (never active, never predicted) scores F1 = 0,
  as scikit-learn's ``zero_division`` default does; an AU never annotated reports ``None`` and is left out of
  the means.
- Macro-F1 averages over the classes that occur among the targets or the predictions (scikit-learn's default
  label set); UAR averages the recall of the classes that occur among the targets.
- A task a dataset never labels (no labelled entry seen) has no entry in that dataset's results; a value that
  is undefined (CCC with fewer than two samples or zero denominator) is ``None``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .labels import AUS, COMPOUNDS, EXPRESSIONS, label_names

__all__ = [
    "AUMeter",
    "CompoundMeter",
    "ExpressionMeter",
    "MultiDatasetMetrics",
    "VAMeter",
    "ccc_from_moments",
]

#: ABAW score weights (docs/method.md §5).
EXPR_F1_WEIGHT, EXPR_ACC_WEIGHT = 0.67, 0.33
AU_F1_WEIGHT, AU_ACC_WEIGHT = 0.5, 0.5


def _opt(x: float) -> float | None:
    """A Python float, or ``None`` where the value is undefined (NaN)."""
    x = float(x)
    return None if np.isnan(x) else x


def _opt_list(xs: np.ndarray) -> list[float | None]:
    return [_opt(x) for x in xs]


def _names(names: Sequence[str] | None, n: int, known: tuple[str, ...], prefix: str) -> list[str]:
    """The given names (one per output), else the canonical ones when there are ``n``, else ``<prefix>i``."""
    if names is None:
        return label_names(n, known, prefix)
    if len(names) != n:
        raise ValueError(f"names: {len(names)} given for {n} outputs")
    return [str(x) for x in names]


def _as_tensor(x: Any, name: str, device: torch.device | None) -> Tensor:
    if isinstance(x, Tensor):
        return x if device is None or x.device == device else x.to(device, non_blocking=True)
    try:
        return torch.as_tensor(np.asarray(x), device=device)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: cannot be read as a tensor ({exc})") from None


def _check_shape(name: str, t: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: shape {tuple(t.shape)}, expected {shape}")


def _first_bad_row(name: str, bad: Tensor, values: Tensor, what: str) -> None:
    """Raise naming the first offending row (CPU tensors only: reading values is free there)."""
    if bool(bad.any()):
        idx = tuple(int(i) for i in torch.nonzero(bad)[0])
        col = f", column {idx[1]}" if len(idx) > 1 else ""
        raise ValueError(f"{name}: row {idx[0]}{col} has value {values[idx].item()!r}, {what}")


class _Meter:
    """Sufficient statistics held as named tensors with a leading group axis; subclasses add update/compute."""

    def __init__(self, num_groups: int, device: torch.device | str | None) -> None:
        if int(num_groups) < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        self.num_groups = int(num_groups)
        # None: adopt the device of the first update (so CUDA outputs never travel to the host per batch).
        self._device = None if device is None else torch.device(device)
        self._state: dict[str, Tensor] = {}

    # -- state management -------------------------------------------------------------------------------
    def _zeros(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self._state[name] = torch.zeros(shape, dtype=dtype, device=self._device or "cpu")

    @property
    def device(self) -> torch.device:
        return next(iter(self._state.values())).device

    def to(self, device: torch.device | str) -> _Meter:
        """Move the statistics (and all later updates) to ``device``."""
        self._device = torch.device(device)
        self._state = {k: v.to(self._device) for k, v in self._state.items()}
        return self

    def _prepare(self, x: Tensor | None) -> torch.device:
        """The device updates run on: adopt the first input's device unless one was fixed."""
        if self._device is None:
            self.to(x.device if isinstance(x, Tensor) else "cpu")
        return self._device

    def reset(self) -> None:
        """Zero every statistic (start a new evaluation)."""
        for t in self._state.values():
            t.zero_()

    def state_tensors(self) -> list[Tensor]:
        """The statistic tensors themselves (not copies), e.g. for a caller's own all-reduce."""
        return list(self._state.values())

    def reduce_(self, fn: Callable[[Tensor], Any]) -> None:
        """Apply a sum-reduction to every statistic in place, e.g. ``meter.reduce_(torch.distributed.all_reduce)``.

        ``fn`` may work in place (as ``all_reduce`` does) or return the reduced tensor.
        """
        for t in self._state.values():
            out = fn(t)
            if isinstance(out, Tensor) and out is not t:
                t.copy_(out)

    def state_dict(self) -> dict[str, Tensor]:
        """Copies of the statistics (they add up across shards)."""
        return {k: v.detach().clone() for k, v in self._state.items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        if set(state) != set(self._state):
            raise ValueError(f"state has keys {sorted(state)}, expected {sorted(self._state)}")
        for k, v in state.items():
            v = torch.as_tensor(v)
            if v.shape != self._state[k].shape:
                raise ValueError(f"state[{k!r}] has shape {tuple(v.shape)}, expected {tuple(self._state[k].shape)}")
            self._state[k].copy_(v)

    def merge(self, other: _Meter) -> _Meter:
        """Add another meter's statistics (same kind and sizes) into this one; returns ``self``."""
        if type(other) is not type(self):
            raise ValueError(f"cannot merge a {type(other).__name__} into a {type(self).__name__}")
        for k, v in self._state.items():
            o = other._state[k]
            if o.shape != v.shape:
                raise ValueError(f"cannot merge: {k!r} has shape {tuple(o.shape)}, expected {tuple(v.shape)}")
            v.add_(o.to(v.device))
        return self

    def _groups(self, group: Tensor | int | None, batch: int, device: torch.device, name: str = "group") -> Tensor:
        if group is None:
            if self.num_groups != 1:
                raise ValueError(f"{name} is required: this meter has {self.num_groups} groups")
            return torch.zeros(batch, dtype=torch.long, device=device)
        if isinstance(group, (int, np.integer)):
            group = int(group)
            if not 0 <= group < self.num_groups:
                raise ValueError(f"{name} {group} is outside [0, {self.num_groups})")
            return torch.full((batch,), group, dtype=torch.long, device=device)
        g = _as_tensor(group, name, device)
        _check_shape(name, g, (batch,))
        if g.is_floating_point():
            raise ValueError(f"{name}: integer ids expected, got dtype {g.dtype}")
        g = g.long()
        if g.device.type == "cpu":
            _first_bad_row(name, (g < 0) | (g >= self.num_groups), g, f"outside [0, {self.num_groups})")
        return g

    def _check_group(self, group: int) -> None:
        if not 0 <= group < self.num_groups:
            raise ValueError(f"group {group} is outside [0, {self.num_groups})")


def _mask(mask: Any, shape: tuple[int, ...], name: str, device: torch.device) -> Tensor:
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    m = _as_tensor(mask, name, device)
    _check_shape(name, m, shape)
    if m.dtype != torch.bool:
        if m.device.type == "cpu":
            _first_bad_row(name, (m != 0) & (m != 1), m, "not 0/1")
        m = m != 0
    return m


class _ConfusionMeter(_Meter):
    """Streaming confusion matrices ``confusion[g, target, prediction]`` of a single-label task."""

    KNOWN_NAMES: tuple[str, ...] = ()  # the class names when there are that many classes and none are given

    def __init__(self, num_classes: int, num_groups: int = 1, device: torch.device | str | None = None,
                 names: Sequence[str] | None = None) -> None:
        super().__init__(num_groups, device)
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = int(num_classes)
        #: Class names, reported as ``classes`` beside the per-class lists and the confusion matrix.
        self.names = _names(names, self.num_classes, self.KNOWN_NAMES, "class")
        self._zeros("confusion", (self.num_groups, self.num_classes, self.num_classes), torch.long)

    def update(
        self, pred: Tensor, target: Tensor, mask: Tensor | None = None, group: Tensor | int | None = None
    ) -> None:
        """Add a batch.

        ``pred``: logits or probabilities (B, C) — the arg-max is the prediction — or predicted ids (B,).
        ``target``: class ids (B,), read only where ``mask`` (B,) is true (``None``: every row labelled).
        ``group``: the group (dataset) of each row (B,), or one int for the whole batch.
        """
        device = self._prepare(pred)
        pred = _as_tensor(pred, "pred", device)
        target = _as_tensor(target, "target", device)
        if target.ndim != 1:
            raise ValueError(f"target: shape {tuple(target.shape)}, expected (B,)")
        b, c = target.shape[0], self.num_classes
        if pred.ndim == 2:
            _check_shape("pred", pred, (b, c))
            pred = pred.argmax(1)
        else:
            _check_shape("pred", pred, (b,))
            if pred.is_floating_point():
                raise ValueError("pred: 1-D predictions must be integer class ids; pass (B, C) scores otherwise")
        if target.is_floating_point():
            raise ValueError(f"target: integer class ids expected, got dtype {target.dtype}")
        m = _mask(mask, (b,), "mask", device)
        g = self._groups(group, b, device)
        pred, target = pred.long(), target.long()
        if device.type == "cpu":
            _first_bad_row("target", m & ((target < 0) | (target >= c)), target, f"outside [0, {c})")
            _first_bad_row("pred", m & ((pred < 0) | (pred >= c)), pred, f"outside [0, {c})")
        zero = torch.zeros((), dtype=torch.long, device=device)
        # Unlabelled rows are sent to cell (0, 0) with weight 0, so no boolean indexing (a host sync) is needed.
        target = torch.where(m, target, zero)
        pred = torch.where(m, pred, zero)
        index = (g * c + target) * c + pred
        self._state["confusion"].view(-1).index_add_(0, index, m.long())

    def confusion(self, group: int = 0) -> np.ndarray:
        """The C×C confusion matrix of one group (rows: target, columns: prediction)."""
        self._check_group(group)
        return self._state["confusion"][group].cpu().numpy()

    def _scores(self, cm: np.ndarray) -> dict[str, Any]:
        cm = cm.astype(np.float64)
        n = cm.sum()
        tp = np.diag(cm)
        support, predicted = cm.sum(1), cm.sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.where(support + predicted > 0, 2 * tp / (support + predicted), np.nan)
            recall = np.where(support > 0, tp / support, np.nan)
        return {
            "n": int(n),
            "accuracy": float(tp.sum() / n),
            "macro_f1": float(np.nanmean(f1)),  # classes among targets or predictions
            "uar": float(np.nanmean(recall)),  # classes among targets
            "classes": list(self.names),  # per_class_*[i] and the confusion's row/column i name classes[i]
            "per_class_f1": _opt_list(f1),
            "per_class_recall": _opt_list(recall),
            "confusion": cm.astype(np.int64).tolist(),
        }


class ExpressionMeter(_ConfusionMeter):
    """Basic expressions (docs/method.md §5): accuracy, macro-F1 and the ABAW score ``0.67·F1 + 0.33·accuracy``.

    ``compute`` also reports UAR, per-class F1 / recall and the confusion matrix.
    """

    KNOWN_NAMES = EXPRESSIONS

    def compute(self, group: int = 0) -> dict[str, Any] | None:
        """Metrics of one group; ``None`` when it has no labelled sample."""
        cm = self.confusion(group)
        if cm.sum() == 0:
            return None
        s = self._scores(cm)
        s["abaw"] = EXPR_F1_WEIGHT * s["macro_f1"] + EXPR_ACC_WEIGHT * s["accuracy"]
        return s


class CompoundMeter(_ConfusionMeter):
    """Compound expressions (docs/method.md §5): accuracy, macro-F1 and unweighted average recall (UAR)."""

    KNOWN_NAMES = COMPOUNDS

    def compute(self, group: int = 0) -> dict[str, Any] | None:
        """Metrics of one group; ``None`` when it has no labelled sample."""
        cm = self.confusion(group)
        return None if cm.sum() == 0 else self._scores(cm)


class AUMeter(_Meter):
    """Action units (docs/method.md §5): per-AU F1 at ``threshold``, mean F1, mean accuracy, ABAW ``0.5·F1 + 0.5·acc``.

    Inputs are probabilities in [0, 1] unless ``from_logits=True`` (then ``sigmoid`` is applied first, so the
    same threshold means the same decision either way). An AU counts as predicted active when its probability
    is ``>= threshold``; a target counts as active when ``>= 0.5``. Only annotated entries (``mask``) count.
    """

    _CELLS = ("tn", "fn", "fp", "tp")  # index = 2·pred + target

    def __init__(
        self,
        num_aus: int,
        threshold: float = 0.5,
        from_logits: bool = False,
        num_groups: int = 1,
        device: torch.device | str | None = None,
        names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(num_groups, device)
        if int(num_aus) < 1:
            raise ValueError(f"num_aus must be >= 1, got {num_aus}")
        if not 0.0 < float(threshold) < 1.0:
            raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
        self.num_aus, self.threshold, self.from_logits = int(num_aus), float(threshold), bool(from_logits)
        #: AU names, reported as ``aus`` beside the per-AU lists.
        self.names = _names(names, self.num_aus, AUS, "AU#")
        self._zeros("counts", (self.num_groups, self.num_aus, 4), torch.long)

    def update(
        self,
        scores: Tensor,
        target: Tensor,
        mask: Tensor | None = None,
        group: Tensor | int | None = None,
        from_logits: bool | None = None,
    ) -> None:
        """Add a batch: ``scores`` (B, K) probabilities (logits with ``from_logits``), ``target``/``mask`` (B, K)."""
        device = self._prepare(scores)
        scores = _as_tensor(scores, "scores", device)
        target = _as_tensor(target, "target", device)
        k = self.num_aus
        if scores.ndim != 2:
            raise ValueError(f"scores: shape {tuple(scores.shape)}, expected (B, {k})")
        b = scores.shape[0]
        _check_shape("scores", scores, (b, k))
        _check_shape("target", target, (b, k))
        m = _mask(mask, (b, k), "mask", device)
        g = self._groups(group, b, device)
        logits = self.from_logits if from_logits is None else from_logits
        if logits:
            probs = torch.sigmoid(scores if scores.dtype == torch.float64 else scores.float())
        else:
            probs = scores
        if device.type == "cpu" and not logits:
            _first_bad_row("scores", ~((probs >= 0) & (probs <= 1)), probs, "not a probability (pass from_logits=True)")
        if device.type == "cpu":
            _first_bad_row("target", m & (target != 0) & (target != 1), target, "not 0/1 where annotated")
        pred = (probs >= self.threshold).long()
        tgt = m & (target.float() >= 0.5)
        kk = torch.arange(k, device=device)
        index = ((g[:, None] * k + kk) * 4) + 2 * pred + tgt.long()
        self._state["counts"].view(-1).index_add_(0, index.reshape(-1), m.reshape(-1).long())

    def counts(self, group: int = 0) -> dict[str, np.ndarray]:
        """Per-AU ``tn, fn, fp, tp`` counts of one group."""
        self._check_group(group)
        c = self._state["counts"][group].cpu().numpy()
        return {name: c[:, i] for i, name in enumerate(self._CELLS)}

    def compute(self, group: int = 0) -> dict[str, Any] | None:
        """Metrics of one group; ``None`` when no AU was annotated there."""
        c = {k: v.astype(np.float64) for k, v in self.counts(group).items()}
        n = c["tn"] + c["fn"] + c["fp"] + c["tp"]
        if n.sum() == 0:
            return None
        annotated = n > 0
        denom = 2 * c["tp"] + c["fp"] + c["fn"]
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.where(annotated, np.where(denom > 0, 2 * c["tp"] / denom, 0.0), np.nan)
            acc = np.where(annotated, (c["tp"] + c["tn"]) / n, np.nan)
        mean_f1, mean_acc = float(np.nanmean(f1)), float(np.nanmean(acc))
        return {
            "n": n.astype(np.int64).tolist(),
            "aus": list(self.names),  # per_au_*[k] and n[k] name aus[k]
            "per_au_f1": _opt_list(f1),
            "per_au_accuracy": _opt_list(acc),
            "mean_f1": mean_f1,
            "mean_accuracy": mean_acc,
            "abaw": AU_F1_WEIGHT * mean_f1 + AU_ACC_WEIGHT * mean_acc,
            "num_annotated_aus": int(annotated.sum()),
        }


def ccc_from_moments(n: Any, sx: Any, sy: Any, sxx: Any, syy: Any, sxy: Any) -> np.ndarray:
    """CCC ``2·cov / (var_x + var_y + (mean_x − mean_y)²)`` from sums, population moments; NaN where undefined."""
    n, sx, sy, sxx, syy, sxy = (np.asarray(a, dtype=np.float64) for a in (n, sx, sy, sxx, syy, sxy))
    with np.errstate(invalid="ignore", divide="ignore"):
        mx, my = sx / n, sy / n
        var_x, var_y = sxx / n - mx * mx, syy / n - my * my
        cov = sxy / n - mx * my
        denom = var_x + var_y + (mx - my) ** 2
        ccc = 2 * cov / denom
    return np.where((n >= 2) & (denom > 0), ccc, np.nan)


class VAMeter(_Meter):
    """Valence / arousal (docs/method.md §5): CCC of each dimension and their mean, from float64 moments."""

    _MOMENTS = ("n", "sum_x", "sum_y", "sum_xx", "sum_yy", "sum_xy")

    def __init__(self, num_groups: int = 1, device: torch.device | str | None = None) -> None:
        super().__init__(num_groups, device)
        self._zeros("moments", (self.num_groups, 2, 6), torch.float64)

    def update(
        self, pred: Tensor, target: Tensor, mask: Tensor | None = None, group: Tensor | int | None = None
    ) -> None:
        """Add a batch: ``pred``/``target`` (B, 2) as (valence, arousal), read where ``mask`` (B,) is true."""
        device = self._prepare(pred)
        pred = _as_tensor(pred, "pred", device)
        target = _as_tensor(target, "target", device)
        if pred.ndim != 2:
            raise ValueError(f"pred: shape {tuple(pred.shape)}, expected (B, 2)")
        b = pred.shape[0]
        _check_shape("pred", pred, (b, 2))
        _check_shape("target", target, (b, 2))
        m = _mask(mask, (b,), "mask", device)
        g = self._groups(group, b, device)
        w = m[:, None]
        zero = torch.zeros((), dtype=torch.float64, device=device)
        # where(), not a product: an unlabelled NaN target must not reach the sums.
        x = torch.where(w, pred.double(), zero)
        y = torch.where(w, target.double(), zero)
        stats = torch.stack([w.double().expand(b, 2), x, y, x * x, y * y, x * y], dim=-1)
        self._state["moments"].index_add_(0, g, stats)

    def moments(self, group: int = 0) -> dict[str, np.ndarray]:
        """``n, Σx, Σy, Σx², Σy², Σxy`` of one group, each of shape (2,) (valence, arousal)."""
        self._check_group(group)
        mo = self._state["moments"][group].cpu().numpy()
        return {name: mo[:, i] for i, name in enumerate(self._MOMENTS)}

    def compute(self, group: int = 0) -> dict[str, Any] | None:
        """Metrics of one group; ``None`` when it has no VA-labelled sample."""
        mo = self.moments(group)
        if mo["n"][0] == 0:
            return None
        ccc = ccc_from_moments(*(mo[name] for name in self._MOMENTS))
        return {
            "n": int(mo["n"][0]),
            "ccc_valence": _opt(ccc[0]),
            "ccc_arousal": _opt(ccc[1]),
            "ccc_mean": _opt(ccc.mean()),
        }


class MultiDatasetMetrics:
    """Per-dataset metrics of every task (docs/method.md §5); each dataset is scored only on the tasks it labels.

    >>> metrics = MultiDatasetMetrics(["affectnet", "rafdb", "disfa"])
    >>> metrics.update(batch_dataset_ids, expr_logits=z_e, expr=..., expr_mask=..., au_logits=z_a, au=...,
    ...                au_mask=..., va_pred=v, va=..., va_mask=...)
    >>> metrics.reduce_(torch.distributed.all_reduce)   # under DDP, once before compute
    >>> metrics.compute()   # {"affectnet": {"expression": {...}, "va": {...}}, "disfa": {"au": {...}}, ...}

    Compound expressions are scored when ``num_compounds`` is given (``compound_logits``/``compound``).
    Results name what their lists hold: ``classes`` beside per-class lists and confusion matrices, ``aus`` beside
    per-AU lists (``class_names``/``au_names``/``compound_names``; by default the canonical label spaces of
    :mod:`fbn_fast.labels` when the sizes match them, else ``class0`` …, ``AU#0`` …).
    ``device=None`` keeps the statistics on the device of the first update; under DDP pass the rank's device,
    so that a rank that saw no batch still holds its (zero) statistics where the all-reduce expects them.
    """

    def __init__(
        self,
        dataset_names: Sequence[str],
        num_classes: int = 7,
        num_aus: int = 17,
        num_compounds: int | None = None,
        au_threshold: float = 0.5,
        device: torch.device | str | None = None,
        class_names: Sequence[str] | None = None,
        au_names: Sequence[str] | None = None,
        compound_names: Sequence[str] | None = None,
    ) -> None:
        names = tuple(str(n) for n in dataset_names)
        if not names:
            raise ValueError("dataset_names is empty")
        if len(set(names)) != len(names):
            raise ValueError(f"dataset_names has duplicates: {list(names)}")
        self.dataset_names = names
        d = len(names)
        self.meters: dict[str, _Meter] = {
            "expression": ExpressionMeter(num_classes, num_groups=d, device=device, names=class_names),
            "au": AUMeter(num_aus, threshold=au_threshold, num_groups=d, device=device, names=au_names),
            "va": VAMeter(num_groups=d, device=device),
        }
        if num_compounds is not None:
            self.meters["compound"] = CompoundMeter(num_compounds, num_groups=d, device=device, names=compound_names)

    def update(
        self,
        dataset_ids: Tensor | int,
        *,
        expr_logits: Tensor | None = None,
        expr: Tensor | None = None,
        expr_mask: Tensor | None = None,
        au_probs: Tensor | None = None,
        au_logits: Tensor | None = None,
        au: Tensor | None = None,
        au_mask: Tensor | None = None,
        va_pred: Tensor | None = None,
        va: Tensor | None = None,
        va_mask: Tensor | None = None,
        compound_logits: Tensor | None = None,
        compound: Tensor | None = None,
        compound_mask: Tensor | None = None,
    ) -> None:
        """Add a batch. ``dataset_ids`` (B,) indexes ``dataset_names`` (or one int for the whole batch).

        A task is updated when both its outputs and its labels are given; masks default to "all labelled".
        AU outputs are given either as ``au_probs`` or as ``au_logits``.
        """
        if au_probs is not None and au_logits is not None:
            raise ValueError("give au_probs or au_logits, not both")
        au_out, au_from_logits = (au_logits, True) if au_logits is not None else (au_probs, False)
        tasks = [
            ("expression", "expr_logits", expr_logits, "expr", expr, expr_mask),
            ("au", "au_probs/au_logits", au_out, "au", au, au_mask),
            ("va", "va_pred", va_pred, "va", va, va_mask),
            ("compound", "compound_logits", compound_logits, "compound", compound, compound_mask),
        ]
        for task, out_name, out, label_name, label, mask in tasks:
            if out is None and label is None:
                continue
            if out is None or label is None:
                missing = out_name if out is None else label_name
                raise ValueError(f"{task}: {missing} is missing (outputs and labels must be given together)")
            if task not in self.meters:
                raise ValueError("compound outputs given, but this MultiDatasetMetrics has no num_compounds")
            meter = self.meters[task]
            batch = out.shape[0] if hasattr(out, "shape") else len(out)
            group = meter._groups(dataset_ids, batch, meter._prepare(out), name="dataset_ids")
            if task == "au":
                meter.update(out, label, mask, group, from_logits=au_from_logits)
            else:
                meter.update(out, label, mask, group)

    def compute(self) -> dict[str, dict[str, dict[str, Any]]]:
        """``{dataset: {task: metrics}}``; a task appears only for datasets that labelled it."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for gi, name in enumerate(self.dataset_names):
            res = {task: meter.compute(gi) for task, meter in self.meters.items()}
            out[name] = {task: r for task, r in res.items() if r is not None}
        return out

    # -- distributed / checkpoint helpers: all statistics are sums ----------------------------------------
    def reset(self) -> None:
        for m in self.meters.values():
            m.reset()

    def to(self, device: torch.device | str) -> MultiDatasetMetrics:
        for m in self.meters.values():
            m.to(device)
        return self

    def state_tensors(self) -> list[Tensor]:
        """Every statistic tensor (not copies), for a caller's own all-reduce."""
        return [t for m in self.meters.values() for t in m.state_tensors()]

    def reduce_(self, fn: Callable[[Tensor], Any]) -> None:
        """Sum-reduce every statistic in place, e.g. ``metrics.reduce_(torch.distributed.all_reduce)``."""
        for m in self.meters.values():
            m.reduce_(fn)

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        return {task: m.state_dict() for task, m in self.meters.items()}

    def load_state_dict(self, state: Mapping[str, Mapping[str, Tensor]]) -> None:
        if set(state) != set(self.meters):
            raise ValueError(f"state has tasks {sorted(state)}, expected {sorted(self.meters)}")
        for task, s in state.items():
            self.meters[task].load_state_dict(s)

    def merge(self, other: MultiDatasetMetrics) -> MultiDatasetMetrics:
        """Add another instance's statistics (same datasets and tasks) into this one; returns ``self``."""
        if other.dataset_names != self.dataset_names or set(other.meters) != set(self.meters):
            raise ValueError(
                f"cannot merge metrics over {list(other.dataset_names)} / {sorted(other.meters)} into "
                f"{list(self.dataset_names)} / {sorted(self.meters)}"
            )
        for task, m in self.meters.items():
            m.merge(other.meters[task])
        return self
