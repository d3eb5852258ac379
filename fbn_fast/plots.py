"""PNG plots of a run: loss curves, per-AU F1 bars, the expression confusion matrix.

Drawn with matplotlib's object API on the Agg canvas: no display is needed and pyplot's global state (and the
backend a user chose for their own session) is left alone. Each chart has a ``*_figure`` builder that returns the
:class:`~matplotlib.figure.Figure` (for notebooks, and for checking the layout) and a ``plot_*`` function that
writes it as a PNG. Legends sit outside the axes, and the constrained layout keeps labels, ticks and legends
apart, so no legend covers data.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "confusion_figure",
    "curves_figure",
    "per_au_f1_figure",
    "plot_confusion",
    "plot_curves",
    "plot_per_au_f1",
]

#: Pixels per inch of the written PNGs (a 9 × 5 in figure is 900 × 500 px).
DPI = 100


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas: text extents and PNG output without pyplot
    return fig


def _save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG through a temporary file, so a crash never leaves a half-written plot at ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        fig.savefig(tmp, format="png", dpi=DPI)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def curves_figure(series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str = "training loss",
                  xlabel: str = "step", log_y: bool = True) -> Figure:
    """Line chart of named ``(x, y)`` series (e.g. each loss term against the step); legend right of the axes.

    ``log_y`` falls back to a linear axis when no series has a positive finite value to place on a log scale.
    """
    data = {k: (np.asarray(x, np.float64), np.asarray(y, np.float64)) for k, (x, y) in series.items() if len(x)}
    if not data:
        raise ValueError("curves_figure: no series has any data")
    for name, (x, y) in data.items():
        if x.shape != y.shape:
            raise ValueError(f"curves_figure: series {name!r} has {x.size} x values and {y.size} y values")
    fig = _figure(9, 5)
    ax = fig.add_subplot()
    for name, (x, y) in data.items():
        ax.plot(x, y, label=name, marker="." if x.size == 1 else None)
    if log_y and any(((y > 0) & np.isfinite(y)).any() for _, y in data.values()):
        ax.set_yscale("log", nonpositive="mask")  # a term that is 0 at some steps leaves a gap, not a spike
    ax.set(title=title, xlabel=xlabel, ylabel="loss")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=8)
    return fig


def per_au_f1_figure(groups: dict[str, Sequence[float | None]], au_names: Sequence[str],
                     title: str = "per-AU F1") -> Figure:
    """Grouped bar chart: for each named group (e.g. a dataset), the F1 of each AU (``None``: not annotated).

    The legend sits above the axes, where it cannot hide a bar however high the F1.
    """
    if not groups:
        raise ValueError("per_au_f1_figure: no groups")
    for name, values in groups.items():
        if len(values) != len(au_names):
            raise ValueError(f"per_au_f1_figure: group {name!r} has {len(values)} values for {len(au_names)} AUs")
    fig = _figure(max(7.0, 0.55 * len(au_names)), 4.8)
    ax = fig.add_subplot()
    slots = np.arange(len(au_names))
    width = 0.8 / len(groups)
    for gi, (name, values) in enumerate(groups.items()):
        heights = [np.nan if v is None else float(v) for v in values]
        ax.bar(slots - 0.4 + (gi + 0.5) * width, heights, width, label=name)
    ax.set_xticks(slots, au_names, rotation=45, ha="right", rotation_mode="anchor")
    ax.set(xlim=(-0.6, len(au_names) - 0.4), ylim=(0, 1), ylabel="F1", title=title)
    ax.grid(axis="y", alpha=0.3)
    fig.legend(loc="outside upper center", ncols=min(len(groups), 4), fontsize=8)
    return fig


def confusion_figure(cm: np.ndarray | Sequence[Sequence[int]], labels: Sequence[str],
                     title: str = "expression confusion") -> Figure:
    """Heat map of a confusion matrix (rows: true class, columns: predicted), row-normalised, with counts."""
    cm = np.asarray(cm, dtype=np.int64)
    if cm.shape != (len(labels), len(labels)):
        raise ValueError(f"confusion_figure: matrix of shape {cm.shape} for {len(labels)} labels")
    rows = cm.sum(1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros_like(cm, dtype=np.float64), where=rows > 0)
    fig = _figure(6.5, 5.5)
    ax = fig.add_subplot()
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, f"{frac[i, j]:.2f}\n{cm[i, j]}", ha="center", va="center", fontsize=7,
                    color="white" if frac[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="predicted", ylabel="true (row-normalised)", title=title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return fig


def _write(path: str | os.PathLike, build: Callable[..., Figure], *args: object) -> Path:
    """Build a figure and write it to ``path``; a bad input is reported with the plot it was meant for."""
    path = Path(path)
    try:
        fig = build(*args)
    except ValueError as exc:
        raise ValueError(f"{exc} (plot {path})") from None
    return _save(fig, path)


def plot_curves(series: dict[str, tuple[Sequence[float], Sequence[float]]], path: str | os.PathLike,
                title: str = "training loss", xlabel: str = "step", log_y: bool = True) -> Path:
    """Write :func:`curves_figure` to ``path`` (PNG); returns the path."""
    return _write(path, curves_figure, series, title, xlabel, log_y)


def plot_per_au_f1(groups: dict[str, Sequence[float | None]], au_names: Sequence[str], path: str | os.PathLike,
                   title: str = "per-AU F1") -> Path:
    """Write :func:`per_au_f1_figure` to ``path`` (PNG); returns the path."""
    return _write(path, per_au_f1_figure, groups, au_names, title)


def plot_confusion(cm: np.ndarray | Sequence[Sequence[int]], labels: Sequence[str], path: str | os.PathLike,
                   title: str = "expression confusion") -> Path:
    """Write :func:`confusion_figure` to ``path`` (PNG); returns the path."""
    return _write(path, confusion_figure, cm, labels, title)
