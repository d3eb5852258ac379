"""Predict face behaviour for image files: expression, AUs, valence/arousal and zero-shot compound expressions.

    python -m fbn_fast.predict CHECKPOINT IMAGE_OR_DIR... [--json] [--face-box x0,y0,x1,y1] [--top-k 3]

Each image goes through the evaluation transform of the data pipeline (face box, or the whole image, resized
to the checkpoint's input size; ImageNet normalisation; channels-last), so predictions match
``python -m fbn_fast.evaluate``. JPEGs are decoded exactly as the pipeline decodes them; other formats Pillow
reads (PNG, BMP, WebP …) go through Pillow. A directory contributes its image files (recursively, sorted).

A file that cannot be read (missing, empty, truncated, not an image) gets an ``error`` entry naming the
problem; the other files are still predicted and the exit status is 1 when any file failed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from .evaluate import CompoundScorer, autocast, checkpoint_image_size, load_checkpoint, resolve_device, resolve_dtype
from .labels import AUS, EXPRESSIONS

__all__ = ["IMAGE_SUFFIXES", "expand_inputs", "load_image", "main", "parse_box", "predict"]

#: File suffixes taken from a directory (files named explicitly are tried whatever their suffix).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")


def parse_box(text: str | None) -> np.ndarray | None:
    """``"x0,y0,x1,y1"`` (pixels) → float32 (4,), or ``None``; ValueError naming ``--face-box`` otherwise."""
    if text is None:
        return None
    try:
        vals = [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--face-box {text!r}: expected four numbers x0,y0,x1,y1") from None
    if len(vals) != 4 or not all(np.isfinite(vals)):
        raise ValueError(f"--face-box {text!r}: expected four finite numbers x0,y0,x1,y1")
    if not (vals[2] > vals[0] and vals[3] > vals[1]):
        raise ValueError(f"--face-box {text!r}: needs x1 > x0 and y1 > y0")
    if vals[0] < 0 or vals[1] < 0:
        raise ValueError(f"--face-box {text!r}: x0 and y0 must be >= 0")
    return np.asarray(vals, np.float32)


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[str]:
    """Files in the order given; a directory expands to its image files (recursively, sorted)."""
    out: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            out.extend(found if found else [str(p)])  # an empty directory is reported as an error entry
        else:
            out.append(str(p))
    return out


def load_image(path: str | os.PathLike, image_size: int, box: np.ndarray | None = None) -> np.ndarray:
    """One image as uint8 HWC (``image_size``²×3) through the pipeline's evaluation geometry.

    Raises ValueError with the reason when the file cannot be used.
    """
    from .data.decode import BadImage, check_jpeg, decode_window, pixel_window, warp_pil

    p = Path(path)
    if p.is_dir():
        raise ValueError("directory holds no image files")
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise ValueError("no such file") from None
    except OSError as exc:
        raise ValueError(f"unreadable ({exc.strerror or exc})") from None
    if not data:
        raise ValueError("empty file")
    out = np.empty((image_size, image_size, 3), np.uint8)
    full = np.array([0.0, 0.0, 1.0, 1.0])
    no_box = np.full(4, np.nan, np.float32) if box is None else box
    if data[:3] == b"\xff\xd8\xff":
        try:
            check_jpeg(data)
            decode_window(data, no_box, full, 0.0, False, image_size, out)
        except BadImage as exc:
            raise ValueError(exc.reason) from None
        return out
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            img = np.asarray(im.convert("RGB"))
    except Image.UnidentifiedImageError:
        raise ValueError("not an image file Pillow can read") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for a bad file; all mean the same here
        raise ValueError(f"not a readable image ({type(exc).__name__}: {exc})") from None
    h, w = img.shape[:2]
    warp_pil(img, pixel_window(no_box, h, w, full), 0.0, False, image_size, out)
    return out


def _names(prefix: str, n: int, known: Sequence[str]) -> list[str]:
    return list(known) if n == len(known) else [f"{prefix}{i}" for i in range(n)]


@torch.no_grad()
def predict(
    model: nn.Module,
    paths: Sequence[str | os.PathLike],
    *,
    image_size: int = 64,
    box: np.ndarray | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    au_threshold: float = 0.5,
    top_k: int = 3,
    compound_classes: Sequence[int] | None = None,
    beta: float = 0.0,
    temperature: float = 1.0,
) -> list[dict[str, Any]]:
    """One entry per path (files as given, directories expanded), in order: predictions or ``error``.

    A prediction: ``expression`` (``label``, ``probabilities``), ``aus`` (``probabilities``, ``active``:
    AUs at or above ``au_threshold``), ``va`` (``valence``, ``arousal``), ``compound`` (the ``top_k`` zero-shot
    compound classes with probabilities; β and T as in method.md §4).
    """
    from .data.decode import normalize_nhwc

    if not 0 < au_threshold < 1:
        raise ValueError(f"--threshold must lie in (0, 1), got {au_threshold}")
    if top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {top_k}")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    model = model.to(dev).eval()
    scorer = CompoundScorer(compound_classes, beta=beta, temperature=temperature)
    files = expand_inputs(paths)
    results: list[dict[str, Any]] = [{"path": f} for f in files]
    ok: list[int] = []
    images: list[np.ndarray] = []
    for i, f in enumerate(files):
        try:
            images.append(load_image(f, image_size, box))
            ok.append(i)
        except ValueError as exc:
            results[i]["error"] = str(exc)

    expr_names: list[str] | None = None
    for start in range(0, len(ok), batch_size):
        chunk = ok[start:start + batch_size]
        u8 = torch.from_numpy(np.stack(images[start:start + batch_size]))
        x = normalize_nhwc(u8, None, None, torch.float32 if dt == torch.float32 else dt, dev)
        with autocast(dev, dt):
            out = model(x)
        z_e, z_a, v = out[0].float(), out[1].float(), out[2].float()
        p_e = torch.softmax(z_e, 1).cpu().numpy()
        s = torch.sigmoid(z_a).cpu().numpy()
        va = v.cpu().numpy()
        expr_names = expr_names or _names("class", p_e.shape[1], EXPRESSIONS)
        au_names = _names("AU#", s.shape[1], AUS)
        comp = None
        if s.shape[1] == len(AUS) and (beta == 0 or p_e.shape[1] == len(EXPRESSIONS)):
            comp = torch.softmax(scorer.logits(z_e, z_a), 1).cpu().numpy()
        for j, i in enumerate(chunk):
            e = int(p_e[j].argmax())
            entry: dict[str, Any] = {
                "expression": {"label": expr_names[e],
                               "probabilities": {n: float(p) for n, p in zip(expr_names, p_e[j])}},
                "aus": {"probabilities": {n: float(p) for n, p in zip(au_names, s[j])},
                        "active": [n for n, p in zip(au_names, s[j]) if p >= au_threshold]},
                "va": {"valence": float(va[j, 0]), "arousal": float(va[j, 1])},
            }
            if comp is not None:
                order = np.argsort(-comp[j], kind="stable")[:top_k]
                entry["compound"] = {"top": [{"label": scorer.names[c], "probability": float(comp[j, c])}
                                             for c in order]}
            results[i].update(entry)
    return results


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """One line per image: expression, active AUs, valence/arousal, top compound."""
    width = max([len("image")] + [len(r["path"]) for r in results])
    head = f"{'image':<{width}}  {'expression':<18} {'valence':>7} {'arousal':>7}  {'compound':<28} active AUs"
    lines = [head, "-" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['path']:<{width}}  error: {r['error']}")
            continue
        e = r["expression"]
        expr = f"{e['label']} {e['probabilities'][e['label']]:.2f}"
        comp = "-"
        if "compound" in r:
            top = r["compound"]["top"][0]
            comp = f"{top['label']} {top['probability']:.2f}"
        aus = ",".join(a.removeprefix("AU") for a in r["aus"]["active"]) or "-"
        lines.append(f"{r['path']:<{width}}  {expr:<18} {r['va']['valence']:>7.2f} {r['va']['arousal']:>7.2f}  "
                     f"{comp:<28} {aus}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fbn_fast.predict",
        description="Expression, action units, valence/arousal and zero-shot compound expressions for images.",
    )
    p.add_argument("checkpoint", help="a checkpoint written by python -m fbn_fast.train")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or directories of images")
    p.add_argument("--json", action="store_true", help="print JSON (one list of entries) instead of a table")
    p.add_argument("--face-box", default=None, metavar="x0,y0,x1,y1",
                   help="face box in pixels, applied to every image (default: the whole image)")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    p.add_argument("--top-k", type=int, default=3, help="compound classes listed per image (default: 3)")
    p.add_argument("--threshold", type=float, default=0.5, help="AU activation threshold (default: 0.5)")
    p.add_argument("--beta", type=float, default=0.0, help="β of the zero-shot compound scores (method.md §4)")
    p.add_argument("--temperature", type=float, default=1.0, help="temperature T of the compound softmax")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default="auto", help="autocast dtype: float32, bfloat16, float16 or auto (default)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.image_size is not None and args.image_size < 8:
            raise ValueError(f"--image-size must be >= 8, got {args.image_size}")
        box = parse_box(args.face_box)
        model, config, _ = load_checkpoint(args.checkpoint, args.device)
        results = predict(model, args.inputs, image_size=args.image_size or checkpoint_image_size(config), box=box,
                          batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                          au_threshold=args.threshold, top_k=args.top_k, beta=args.beta,
                          temperature=args.temperature)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(results, indent=1) if args.json else format_table(results))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
