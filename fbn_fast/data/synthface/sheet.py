"""The SynthFace contact sheet: sampled faces per expression, and each AU at increasing intensity."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ...labels import AU_NUMBERS, EXPRESSIONS, NUM_AUS
from .renderer import AU_DESCRIPTIONS, VERSION, Look, render, sample_look
from .sampling import sample_expressions

INTENSITIES = (0.0, 0.25, 0.5, 0.75, 1.0)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def reference_look(seed: int = 0, image_size: int = 112) -> Look:
    """A frontal, evenly lit, noise-free face: the fixed identity of the AU rows."""
    rng = np.random.default_rng([seed, 3])
    look = sample_look(rng, image_size)
    return dataclasses.replace(look, cx=0.5, cy=0.45, roll=0.0, yaw=0.0, gaze=0.0, bright=1.0, grad_x=0.0,
                               grad_y=0.0, noise=0.0, bald=False, bg_style=0, eye_tilt=0.0, mouth_curve=0.0)


def contact_sheet(path: str | os.PathLike, image_size: int = 112, seed: int = 0, per_expression: int = 9) -> Path:
    """Write a PNG with a row per expression (sampled faces, captioned with their active AUs) and a row per AU
    rendered at intensities 0, 0.25, 0.5, 0.75 and 1 on one identity. Returns the path."""
    s = int(image_size)
    cap = 13  # caption strip under a sampled face
    label_w = 150
    gap = 16
    font, small, title = _font(13), _font(11), _font(16)
    half = (NUM_AUS + 1) // 2
    au_w = label_w + len(INTENSITIES) * s
    width = max(2 * au_w + gap, label_w + per_expression * s)
    head = 30
    expr_h = len(EXPRESSIONS) * (s + cap)
    au_top = head + expr_h + 2 * head
    height = au_top + half * s + 6
    sheet = Image.new("RGB", (width, height), (250, 250, 248))
    draw = ImageDraw.Draw(sheet)
    draw.text((8, 6), f"SynthFace v{VERSION} ({s} px): sampled faces per expression; "
                      "captions list the active AUs (noise off here)", fill=(0, 0, 0), font=title)

    rng = np.random.default_rng([seed, 4])
    for c, name in enumerate(EXPRESSIONS):
        y = head + c * (s + cap)
        draw.text((8, y + s // 2 - 8), name, fill=(0, 0, 0), font=font)
        onehot = np.eye(len(EXPRESSIONS))[c]
        labels = sample_expressions(rng, per_expression, onehot)
        for j in range(per_expression):
            look = dataclasses.replace(sample_look(rng, s), noise=0.0)
            sheet.paste(Image.fromarray(render(look, labels.au_intensity[j])), (label_w + j * s, y))
            active = [str(AU_NUMBERS[k]) for k in np.flatnonzero(labels.au[j])]
            draw.text((label_w + j * s + 2, y + s), " ".join(active) or "-", fill=(60, 60, 60), font=small)

    y0 = head + expr_h + 8
    draw.text((8, y0), "Each action unit alone on one identity, at intensity " +
              ", ".join(f"{a:g}" for a in INTENSITIES) + " (left to right)", fill=(0, 0, 0), font=title)
    ref = reference_look(seed, s)
    for k, number in enumerate(AU_NUMBERS):
        col, row = divmod(k, half)
        x, y = col * (au_w + gap), au_top + row * s
        draw.text((x + 8, y + s // 2 - 16), f"AU{number}", fill=(0, 0, 0), font=font)
        draw.text((x + 8, y + s // 2 + 2), AU_DESCRIPTIONS[number], fill=(60, 60, 60), font=small)
        for j, a in enumerate(INTENSITIES):
            au = np.zeros(NUM_AUS)
            au[k] = a
            sheet.paste(Image.fromarray(render(ref, au)), (x + label_w + j * s, y))
    for col in range(2):
        for j, a in enumerate(INTENSITIES):
            draw.text((col * (au_w + gap) + label_w + j * s + s // 2 - 10, au_top - 16), f"{a:g}", fill=(0, 0, 0),
                      font=small)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A dithered 256-colour palette keeps the PNG small enough to live in the repository without banding.
    palette = sheet.quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    sheet.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG).save(path, optimize=True)
    return path
