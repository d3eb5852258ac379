"""PNG plots of a run: loss curves, per-AU F1 bars, the expression confusion matrix.

matplotlib draws them when it is installed; otherwise a small Pillow renderer draws the same three charts
(lines, bars, a heat map with counts), so a CPU-only install with no plotting library still gets its plots.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["plot_confusion", "plot_curves", "plot_per_au_f1"]

_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _mpl():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        return None


def _atomic_save_image(img, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------- Pillow
class _Canvas:
    """A chart area on a white Pillow image with a title and data → pixel mapping."""

    def __init__(self, width: int, height: int, title: str, margins=(70, 40, 30, 60)) -> None:
        from PIL import Image, ImageDraw, ImageFont

        self.img = Image.new("RGB", (width, height), "white")
        self.draw = ImageDraw.Draw(self.img)
        self.font = ImageFont.load_default()
        self.left, self.top, self.right, self.bottom = margins
        self.w, self.h = width, height
        self.text((width // 2, 8), title, anchor="mt")

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.left, self.top, self.w - self.right, self.h - self.bottom

    def text(self, xy, s: str, fill=(0, 0, 0), anchor: str = "la") -> None:
        self.draw.text(xy, s, fill=fill, font=self.font, anchor=anchor)

    def axes(self, x0: float, x1: float, y0: float, y1: float, xlabel: str, ylabel: str, log_y: bool = False,
             xticks: bool = True) -> None:
        self.xr, self.yr, self.log_y = (x0, x1 if x1 > x0 else x0 + 1), (y0, y1 if y1 > y0 else y0 + 1), log_y
        lft, t, r, b = self.box
        self.draw.rectangle((lft, t, r, b), outline=(0, 0, 0))
        for i in range(5):
            fy = i / 4
            y = b - fy * (b - t)
            v = self.yr[0] + fy * (self.yr[1] - self.yr[0])
            label = f"{10 ** v:.3g}" if log_y else f"{v:.3g}"
            self.draw.line((lft - 4, y, lft, y), fill=(0, 0, 0))
            self.draw.line((lft, y, r, y), fill=(235, 235, 235))
            self.text((lft - 6, y), label, anchor="rm")
            if xticks:
                x = lft + fy * (r - lft)
                xv = self.xr[0] + fy * (self.xr[1] - self.xr[0])
                self.draw.line((x, b, x, b + 4), fill=(0, 0, 0))
                self.text((x, b + 6), f"{xv:.4g}", anchor="mt")
        self.text(((lft + r) // 2, self.h - 18), xlabel, anchor="mm")
        self.text((6, t - 14), ylabel, anchor="la")

    def px(self, x: float, y: float) -> tuple[float, float]:
        lft, t, r, b = self.box
        if self.log_y:
            y = math.log10(max(y, 1e-12))
        fx = (x - self.xr[0]) / (self.xr[1] - self.xr[0])
        fy = (y - self.yr[0]) / (self.yr[1] - self.yr[0])
        return lft + fx * (r - lft), b - min(max(fy, -0.02), 1.02) * (b - t)


def _pil_curves(series: dict[str, tuple[np.ndarray, np.ndarray]], title: str, xlabel: str, path: Path,
                log_y: bool) -> None:
    c = _Canvas(900, 520, title, margins=(70, 40, 190, 50))
    xs = np.concatenate([s[0] for s in series.values()])
    ys = np.concatenate([s[1] for s in series.values()])
    ys = ys[np.isfinite(ys)]
    if log_y:
        ys = np.log10(np.clip(ys[ys > 0], 1e-12, None)) if (ys > 0).any() else np.zeros(1)
    c.axes(float(xs.min()), float(xs.max()), float(ys.min()), float(ys.max()), xlabel, "log10 scale" if log_y
           else "", log_y=log_y)
    lft, t, r, _ = c.box
    for i, (name, (x, y)) in enumerate(series.items()):
        color = _PALETTE[i % len(_PALETTE)]
        keep = np.isfinite(y) & ((y > 0) if log_y else True)
        pts = [c.px(a, b) for a, b in zip(x[keep], y[keep])]
        if len(pts) > 1:
            c.draw.line(pts, fill=color, width=2)
        elif pts:
            c.draw.ellipse((pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2), fill=color)
        ly = t + 14 * i
        c.draw.line((r + 10, ly + 6, r + 30, ly + 6), fill=color, width=3)
        c.text((r + 36, ly), name)
    _atomic_save_image(c.img, path)


def _pil_bars(groups: dict[str, Sequence[float | None]], labels: Sequence[str], title: str, path: Path) -> None:
    c = _Canvas(max(700, 60 + 38 * len(labels)), 460, title, margins=(60, 40, 170, 60))
    c.axes(0, len(labels), 0.0, 1.0, "", "F1", xticks=False)
    lft, t, r, b = c.box
    slot = (r - lft) / len(labels)
    width = slot * 0.8 / max(1, len(groups))
    for gi, (name, values) in enumerate(groups.items()):
        color = _PALETTE[gi % len(_PALETTE)]
        for k, v in enumerate(values):
            if v is None:
                continue
            x0 = lft + k * slot + slot * 0.1 + gi * width
            _, y = c.px(0, float(v))
            c.draw.rectangle((x0, y, x0 + width - 1, b), fill=color)
        ly = t + 14 * gi
        c.draw.rectangle((r + 10, ly + 2, r + 22, ly + 12), fill=color)
        c.text((r + 28, ly), name)
    for k, lab in enumerate(labels):
        c.text((lft + (k + 0.5) * slot, b + 6), str(lab), anchor="mt")
    _atomic_save_image(c.img, path)


def _pil_confusion(cm: np.ndarray, labels: Sequence[str], title: str, path: Path) -> None:
    n = len(labels)
    cell = 64
    left, top = 110, 50
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (left + n * cell + 30, top + n * cell + 80), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    d.text((img.width // 2, 10), title, fill=(0, 0, 0), font=font, anchor="mt")
    rows = cm.sum(1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros_like(cm, dtype=np.float64), where=rows > 0)
    for i in range(n):
        for j in range(n):
            v = float(frac[i, j])
            shade = int(255 - 200 * v)
            x0, y0 = left + j * cell, top + i * cell
            d.rectangle((x0, y0, x0 + cell - 1, y0 + cell - 1), fill=(shade, shade, 255), outline=(200, 200, 200))
            d.text((x0 + cell // 2, y0 + cell // 2 - 6), f"{v:.2f}", fill=(0, 0, 0) if v < 0.6 else (255, 255, 255),
                   font=font, anchor="mm")
            d.text((x0 + cell // 2, y0 + cell // 2 + 8), f"{int(cm[i, j])}", fill=(80, 80, 80) if v < 0.6
                   else (230, 230, 230), font=font, anchor="mm")
        d.text((left - 6, top + i * cell + cell // 2), labels[i][:12], fill=(0, 0, 0), font=font, anchor="rm")
        d.text((left + i * cell + cell // 2, top + n * cell + 6), labels[i][:9], fill=(0, 0, 0), font=font,
               anchor="mt")
    d.text((left + n * cell // 2, top + n * cell + 30), "predicted", fill=(0, 0, 0), font=font, anchor="mt")
    d.text((8, top - 16), "true (row-normalised)", fill=(0, 0, 0), font=font)
    _atomic_save_image(img, path)


# ---------------------------------------------------------------------------------------------------- public
def plot_curves(series: dict[str, tuple[Sequence[float], Sequence[float]]], path: str | os.PathLike,
                title: str = "training loss", xlabel: str = "step", log_y: bool = True) -> Path:
    """Line chart of named ``(x, y)`` series (e.g. each loss term against the step)."""
    path = Path(path)
    series = {k: (np.asarray(x, np.float64), np.asarray(y, np.float64)) for k, (x, y) in series.items() if len(x)}
    if not series:
        raise ValueError(f"plot_curves: no data for {path}")
    plt = _mpl()
    if plt is None:
        _pil_curves(series, title, xlabel, path, log_y)
        return path
    fig, ax = plt.subplots(figsize=(9, 5))
    for name, (x, y) in series.items():
        ax.plot(x, y, label=name)
    if log_y:
        ax.set_yscale("log")
    ax.set(title=title, xlabel=xlabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_per_au_f1(groups: dict[str, Sequence[float | None]], au_names: Sequence[str], path: str | os.PathLike,
                   title: str = "per-AU F1") -> Path:
    """Grouped bar chart: for each named group (e.g. a dataset), the F1 of each AU (``None``: not annotated)."""
    path = Path(path)
    if not groups:
        raise ValueError(f"plot_per_au_f1: no data for {path}")
    for name, values in groups.items():
        if len(values) != len(au_names):
            raise ValueError(f"plot_per_au_f1: group {name!r} has {len(values)} values for {len(au_names)} AUs")
    plt = _mpl()
    if plt is None:
        _pil_bars(groups, au_names, title, path)
        return path
    fig, ax = plt.subplots(figsize=(max(7, 0.55 * len(au_names)), 4.5))
    width = 0.8 / len(groups)
    for gi, (name, values) in enumerate(groups.items()):
        x = np.arange(len(au_names)) + gi * width
        ax.bar(x, [np.nan if v is None else v for v in values], width, label=name)
    ax.set_xticks(np.arange(len(au_names)) + 0.4 - width / 2, au_names, rotation=45)
    ax.set(ylim=(0, 1), ylabel="F1", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_confusion(cm: np.ndarray | Sequence[Sequence[int]], labels: Sequence[str], path: str | os.PathLike,
                   title: str = "expression confusion") -> Path:
    """Heat map of a confusion matrix (rows: true class, columns: predicted), row-normalised, with counts."""
    path = Path(path)
    cm = np.asarray(cm, dtype=np.int64)
    if cm.shape != (len(labels), len(labels)):
        raise ValueError(f"plot_confusion: matrix of shape {cm.shape} for {len(labels)} labels")
    plt = _mpl()
    if plt is None:
        _pil_confusion(cm, labels, title, path)
        return path
    rows = cm.sum(1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros_like(cm, dtype=np.float64), where=rows > 0)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, f"{frac[i, j]:.2f}\n{cm[i, j]}", ha="center", va="center", fontsize=7,
                    color="white" if frac[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
