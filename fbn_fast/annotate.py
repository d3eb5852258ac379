"""A picture of the answer: each face's box, its top expressions, active AUs and valence/arousal drawn on the image.

:func:`annotate` draws :func:`fbn_fast.predict.predict`'s per-face entries (each with its ``box``) on the image it
came from, with Pillow, and returns an RGB image of the input's size; :func:`save_annotated` writes it as PNG.
Text is sized from the image (about 1/32 of its shorter side) and set on a translucent panel below each box, or
above it (or inside it) where the image ends.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["annotate", "face_lines", "save_annotated"]

#: Box colours, one per face in turn (chosen to stay distinguishable on skin tones and on each other).
PALETTE: tuple[tuple[int, int, int], ...] = ((0, 200, 255), (255, 170, 0), (120, 255, 80), (255, 80, 200),
                                             (255, 255, 90), (160, 120, 255))


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled scalable font (needs FreeType)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def face_lines(entry: Mapping[str, Any], top_k: int = 2) -> list[str]:
    """The text drawn for one face: ``top_k`` expressions with probabilities, active AUs, valence and arousal."""
    probs = entry["expression"]["probabilities"]
    lines = [f"{name} {p:.2f}" for name, p in sorted(probs.items(), key=lambda kv: -kv[1])[:top_k]]
    active = [a.removeprefix("AU") for a in entry["aus"]["active"]]
    lines.append("AU " + (" ".join(active) if active else "-"))
    lines.append(f"V {entry['va']['valence']:+.2f}  A {entry['va']['arousal']:+.2f}")
    return lines


def annotate(image: np.ndarray | Image.Image, faces: Sequence[Mapping[str, Any]], *, top_k: int = 2,
             message: str | None = None) -> Image.Image:
    """``image`` (RGB array or PIL image) with every face of ``faces`` drawn on it; same size, RGB.

    Each face entry needs ``box`` ``[x0, y0, x1, y1]`` (pixels) and predict's ``expression``, ``aus`` and ``va``.
    ``message`` (e.g. "no face found") is written in the top-left corner.
    """
    base = image.convert("RGB") if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image)).convert("RGB")
    w, h = base.size
    short = min(w, h)
    font = _font(max(10, short // 32))
    line_w = max(2, short // 200)
    pad = max(2, short // 160)
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (11, 2)
    line_h = ascent + descent + 1

    def panel(x: float, y: float, lines: Sequence[str], colour: tuple[int, int, int]) -> None:
        width = max(draw.textlength(t, font=font) for t in lines) + 2 * pad
        height = line_h * len(lines) + 2 * pad
        x = min(max(0.0, x), max(0.0, w - width))
        draw.rectangle((x, y, x + width, y + height), fill=(0, 0, 0, 170))
        for i, t in enumerate(lines):
            draw.text((x + pad, y + pad + i * line_h), t, font=font, fill=(*colour, 255))

    for i, face in enumerate(faces):
        colour = PALETTE[i % len(PALETTE)]
        x0, y0, x1, y1 = (float(v) for v in face["box"])
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(*colour, 255), width=line_w)
        lines = face_lines(face, top_k)
        height = line_h * len(lines) + 2 * pad
        if y1 + height <= h:
            y = y1
        elif y0 - height >= 0:
            y = y0 - height
        else:
            y = y0 + line_w
        panel(x0, y, lines, colour)
    if message:
        panel(0.0, 0.0, [message], (255, 255, 255))
    return Image.alpha_composite(base.convert("RGBA"), overlay).convert("RGB")


def save_annotated(picture: Image.Image, source: str | os.PathLike, out_dir: str | os.PathLike,
                   taken: set[str] | None = None) -> Path:
    """Write ``picture`` as ``OUT_DIR/<source stem>.png`` (``_2``, ``_3`` … when that name is ``taken``)."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    taken = set() if taken is None else taken
    stem, n = Path(source).stem or "image", 1
    name = f"{stem}.png"
    while name in taken:
        n += 1
        name = f"{stem}_{n}.png"
    taken.add(name)
    path = folder / name
    picture.save(path)
    return path
