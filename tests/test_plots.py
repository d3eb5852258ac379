"""Run plots: each chart is written as a PNG of the figure's size, and its layout keeps legends off the data."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox
from PIL import Image

from fbn_fast.labels import AUS, EXPRESSIONS
from fbn_fast.losses import TERMS
from fbn_fast.plots import (
    DPI,
    confusion_figure,
    curves_figure,
    per_au_f1_figure,
    plot_confusion,
    plot_curves,
    plot_per_au_f1,
)

SERIES = ("total", *TERMS)  # what the trainer plots


def loss_series(n: int = 60) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    steps = np.arange(n) * 10
    series = {t: (steps, (i + 1) * np.exp(-steps / (200.0 * (i + 1)))) for i, t in enumerate(SERIES)}
    series[SERIES[-1]] = (steps, np.where(steps < 100, 0.0, 0.01))  # a term that starts at 0: no point on a log axis
    return series


def au_groups() -> dict[str, list[float | None]]:
    # High F1 on every AU, AU10 and AU12 included: bars up to the top of the axes, where a legend inside would sit.
    synth = [0.9] * len(AUS)
    synth[AUS.index("AU10")] = synth[AUS.index("AU12")] = 1.0
    disfa = [0.95 if i % 3 == 0 else None for i in range(len(AUS))]  # None: AU not annotated in that set
    return {"SynthFace": synth, "DISFA": disfa}


def confusion() -> np.ndarray:
    n = len(EXPRESSIONS)
    cm = np.random.default_rng(0).integers(0, 40, (n, n)) + 200 * np.eye(n, dtype=np.int64)
    cm[3] = 0  # a class without test images: its row stays at zero instead of dividing by zero
    return cm


def extent(artist) -> Bbox:
    return artist.get_window_extent(artist.figure.canvas.get_renderer())


def assert_apart(a: Bbox, b: Bbox, what: str) -> None:
    overlap = Bbox.intersection(a, b)
    assert overlap is None or overlap.width <= 0 or overlap.height <= 0, f"{what} overlap: {a} and {b}"


def drawn_tick_labels(ax) -> list:
    """Tick labels inside the view limits (matplotlib keeps a label object for ticks just outside, undrawn)."""
    out = []
    for axis, limits in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
        lo, hi = sorted(limits)
        for tick in axis.get_major_ticks() + axis.get_minor_ticks():
            if lo <= tick.get_loc() <= hi and tick.label1.get_visible() and tick.label1.get_text():
                out.append(tick.label1)
    return out


def assert_readable(fig: Figure) -> None:
    """Legends stay out of the axes' data area; title, axis labels, tick labels and legends do not collide."""
    fig.canvas.draw()  # the constrained layout runs at draw time
    ax = fig.axes[0]  # the chart (a colorbar comes after it)
    data_area = extent(ax.patch)
    boxes = {name: extent(t) for name, t in (("title", ax.title), ("x label", ax.xaxis.label),
                                              ("y label", ax.yaxis.label)) if t.get_text()}
    legends = fig.legends + ([ax.get_legend()] if ax.get_legend() else [])
    for i, legend in enumerate(legends):
        assert_apart(extent(legend), data_area, "legend and data area")
        boxes[f"legend {i}"] = extent(legend)
    names = sorted(boxes)
    for i, p in enumerate(names):
        for q in names[i + 1:]:
            assert_apart(boxes[p], boxes[q], f"{p} and {q}")
    ticks = drawn_tick_labels(ax)
    assert ticks
    for t in ticks:
        for name, box in boxes.items():
            assert_apart(extent(t), box, f"tick label {t.get_text()!r} and {name}")


def test_curves_legend_beside_the_data_and_labels_clear_of_ticks():
    fig = curves_figure(loss_series(), title="training loss terms")
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == list(SERIES)
    assert_readable(fig)


def test_curves_without_positive_values_use_a_linear_axis():
    fig = curves_figure({"va": ([0, 1, 2], [0.0, -0.5, -0.2])})
    assert fig.axes[0].get_yscale() == "linear"
    assert_readable(fig)


def test_au_f1_legend_does_not_hide_the_bars():
    fig = per_au_f1_figure(au_groups(), AUS)
    ax = fig.axes[0]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["SynthFace", "DISFA"]
    # Every AU has its tick under its own bars, and the None entries draw no bar.
    assert [t.get_text() for t in ax.get_xticklabels()] == list(AUS)
    heights = [p.get_height() for p in ax.patches]
    assert len(heights) == 2 * len(AUS) and sum(np.isnan(heights)) == sum(v is None for v in au_groups()["DISFA"])
    assert_readable(fig)
    # The tallest bars (AU10, AU12 at F1 = 1) reach the top of the data area, which the legend stays clear of.
    top = max(extent(p).y1 for p in ax.patches if p.get_height() == 1.0)
    assert top == pytest.approx(extent(ax.patch).y1, abs=1.0)  # abs: one pixel of rounding


def test_confusion_is_row_normalised_with_counts():
    cm = confusion()
    fig = confusion_figure(cm, EXPRESSIONS)
    ax = fig.axes[0]
    image = ax.get_images()[0].get_array()
    rows = cm.sum(1)
    # Row fractions are a ratio of integer counts: computed the same way, equal to the last bit.
    np.testing.assert_array_equal(image[rows > 0], (cm / np.where(rows > 0, rows, 1)[:, None])[rows > 0])
    assert (image[3] == 0).all()
    texts = [t.get_text() for t in ax.texts]
    assert len(texts) == cm.size and texts[0] == f"{image[0, 0]:.2f}\n{cm[0, 0]}"
    assert_readable(fig)


@pytest.mark.parametrize("kind", ["curves", "au_f1", "confusion"])
def test_plot_writes_a_png_of_the_figure_size(tmp_path, kind):
    path = tmp_path / f"{kind}.png"
    if kind == "curves":
        out, size = plot_curves(loss_series(), path), curves_figure(loss_series()).get_size_inches()
    elif kind == "au_f1":
        out, size = plot_per_au_f1(au_groups(), AUS, path), per_au_f1_figure(au_groups(), AUS).get_size_inches()
    else:
        out, size = plot_confusion(confusion(), EXPRESSIONS, path), confusion_figure(confusion(), EXPRESSIONS
                                                                                    ).get_size_inches()
    assert out == path
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # written through a temporary file, none left
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == tuple(round(s * DPI) for s in size)
        assert 600 <= im.size[0] <= 1600 and 400 <= im.size[1] <= 900
        assert len(im.convert("L").getcolors()) > 10  # not a blank canvas


def test_plot_overwrites_an_existing_file(tmp_path):
    path = tmp_path / "loss.png"
    path.write_bytes(b"old")
    plot_curves({"total": ([0, 1], [1.0, 0.5])}, path)
    with Image.open(path) as im:
        assert im.format == "PNG"


def test_bad_input_names_the_plot(tmp_path):
    with pytest.raises(ValueError, match=r"no series has any data \(plot .*loss.png\)"):
        plot_curves({"total": ([], [])}, tmp_path / "loss.png")
    with pytest.raises(ValueError, match="series 'au' has 3 x values and 2 y values"):
        curves_figure({"au": ([0, 1, 2], [1.0, 0.5])})
    with pytest.raises(ValueError, match=r"group 'DISFA' has 2 values for 17 AUs \(plot .*au_f1.png\)"):
        plot_per_au_f1({"DISFA": [0.5, 0.5]}, AUS, tmp_path / "au_f1.png")
    with pytest.raises(ValueError, match="no groups"):
        per_au_f1_figure({}, AUS)
    with pytest.raises(ValueError, match=r"matrix of shape \(2, 2\) for 7 labels \(plot .*confusion.png\)"):
        plot_confusion(np.eye(2), EXPRESSIONS, tmp_path / "confusion.png")
    assert list(tmp_path.iterdir()) == []
