"""Predict face behaviour in photos: each face's expression, AUs, valence/arousal and zero-shot compound expressions.

    python -m fbn_fast.predict CHECKPOINT IMAGE_OR_DIR... [--json] [--annotate OUT_DIR] [--top-k 3]
        [--detector opencv|retinaface|module:factory] [--margin 0.2] | [--boxes boxes.json] | [--no-detect]

Faces first (:mod:`fbn_fast.faces`): by default a face detector finds every face (OpenCV's frontal-face cascade,
``pip install "fbn_fast[faces]"``); ``--boxes FILE`` gives the boxes instead (a JSON object: per image, a list
of ``[x0, y0, x1, y1]``), ``--face-box`` one box for every image, and ``--no-detect`` takes each image as one
face crop. A detected face is cropped with ``--margin`` of its box on each side (square); given boxes are the
crops as they are, like a manifest's face boxes. Each crop goes through the evaluation transform of the data
pipeline (the crop resized to the checkpoint's input size; the trunk's normalisation; channels-last), so a face
gets what ``python -m fbn_fast.evaluate`` would give it with that box. JPEGs are decoded as the pipeline decodes
them; other formats Pillow reads (PNG, BMP, WebP …) go through Pillow. A directory contributes its image files
(recursively, sorted).

Every image gets an entry with one answer per face (and its box), or ``"faces": []`` and a ``note`` when it
has none. ``--annotate OUT_DIR`` writes each image with its boxes and answers drawn on it
(:mod:`fbn_fast.annotate`). A file that cannot be used (missing, empty, truncated, not an image, a given box
outside it) gets an ``error`` entry naming the problem; the other files are still predicted and the exit status
is 1 when any file failed. A model trained only on SynthFace's synthetic faces says so once (a warning) when it
is applied to other images.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from .compound import CompoundScorer
from .config import check_options, renamed_keywords
from .faces import DEFAULT_MARGIN, FaceDetector, boxes_for, check_box, crop_box, get_detector, read_boxes_file
from .inference import (
    add_compound_options,
    add_inference_options,
    autocast,
    command_parser,
    image_dtype,
    load_trained,
    model_normalization,
    resolve_amp_dtype,
    resolve_device,
)
from .labels import AUS, EXPRESSIONS, label_names

__all__ = ["IMAGE_SUFFIXES", "Photo", "SyntheticModelWarning", "build_parser", "expand_inputs", "face_crop",
           "format_table", "load_image", "main", "parse_box", "predict", "read_photo"]

#: File suffixes taken from a directory (files named explicitly are tried whatever their suffix).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")


class SyntheticModelWarning(UserWarning):
    """A model trained only on SynthFace's synthetic faces is applied to other images."""


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


# ------------------------------------------------------------------------------------------------ images
@dataclass
class Photo:
    """An image file: its bytes (JPEGs are cropped from them as the pipeline does) and its RGB pixels."""

    path: str
    data: bytes
    rgb: np.ndarray  # (H, W, 3) uint8, full resolution

    @property
    def is_jpeg(self) -> bool:
        return self.data[:3] == b"\xff\xd8\xff"

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)"""
        return int(self.rgb.shape[1]), int(self.rgb.shape[0])


def read_photo(path: str | os.PathLike) -> Photo:
    """Read and decode one image file; ValueError with the reason when it cannot be used."""
    from .data.decode import BadImage, check_jpeg, decode_rgb

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
    if data[:3] == b"\xff\xd8\xff":
        try:
            check_jpeg(data)
            return Photo(str(path), data, decode_rgb(data))
        except BadImage as exc:
            raise ValueError(exc.reason) from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            rgb = np.asarray(im.convert("RGB"))
    except Image.UnidentifiedImageError:
        raise ValueError("not an image file Pillow can read") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for a bad file; all mean the same here
        raise ValueError(f"not a readable image ({type(exc).__name__}: {exc})") from None
    return Photo(str(path), data, rgb)


def face_crop(photo: Photo, box: Sequence[float] | None, image_size: int) -> np.ndarray:
    """The ``box`` region (``None``: the whole image) as uint8 HWC ``image_size``²×3, through the pipeline's
    evaluation geometry (a manifest row with that face box; JPEGs decoded at the scale the pipeline picks)."""
    from .data.decode import BadImage, decode_window, pixel_window, warp_pil

    out = np.empty((image_size, image_size, 3), np.uint8)
    full = np.array([0.0, 0.0, 1.0, 1.0])
    b = np.full(4, np.nan, np.float32) if box is None else np.asarray(box, np.float32)
    if photo.is_jpeg:
        try:
            decode_window(photo.data, b, full, 0.0, False, image_size, out)
        except BadImage as exc:
            raise ValueError(exc.reason) from None
        return out
    h, w = photo.rgb.shape[:2]
    warp_pil(photo.rgb, pixel_window(b, h, w, full), 0.0, False, image_size, out)
    return out


def load_image(path: str | os.PathLike, image_size: int, box: np.ndarray | None = None) -> np.ndarray:
    """One image's ``box`` region (``None``: the whole image) as uint8 HWC ``image_size``²×3 (:func:`face_crop`).

    Raises ValueError with the reason when the file cannot be used.
    """
    return face_crop(read_photo(path), box, image_size)


def _faces(photo: Photo, detector: FaceDetector | None, boxes: Mapping[str, Any] | None,
           box: Sequence[float] | None, margin: float) -> list[tuple[list[float], list[float]]]:
    """``(face box, crop box)`` of every face of ``photo``; ValueError naming the image for a bad given box."""
    w, h = photo.size
    if box is not None:
        given = [box]
    elif boxes is not None:
        found = boxes_for(boxes, photo.path)
        if found is None:
            raise ValueError(f"{photo.path}: no entry in the --boxes file")
        given = found
    elif detector is None:
        return [([0.0, 0.0, float(w), float(h)], [0.0, 0.0, float(w), float(h)])]
    else:
        return [(list(map(float, b)), list(crop_box(b, h, w, margin))) for b in detector(photo.rgb)]
    checked = [list(check_box(b, h, w, photo.path)) for b in given]
    return [(b, b) for b in checked]  # given boxes are the crops, as a manifest's face boxes are


def _outside(files: Sequence[str], trained_on: Mapping[str, Any] | None) -> list[str]:
    """The files a SynthFace-only model meets outside its SynthFace folder (every file when that is unknown)."""
    if not trained_on or not trained_on.get("synthface_only"):
        return []
    root = trained_on.get("data_root")
    root_path = Path(root).resolve() if root else None
    return [f for f in files if root_path is None or not Path(f).resolve().is_relative_to(root_path)]


# ------------------------------------------------------------------------------------------------ prediction
@torch.no_grad()
@renamed_keywords(dtype="amp_dtype")
def predict(
    model: nn.Module,
    paths: Sequence[str | os.PathLike],
    *,
    image_size: int = 64,
    detector: FaceDetector | str | None = "opencv",
    boxes: Mapping[str, Sequence[Sequence[float]]] | None = None,
    box: Sequence[float] | None = None,
    margin: float = DEFAULT_MARGIN,
    annotate_dir: str | os.PathLike | None = None,
    trained_on: Mapping[str, Any] | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = "auto",
    amp_dtype: str | torch.dtype | None = "auto",
    au_threshold: float = 0.5,
    top_k: int = 3,
    compound_classes: Sequence[int] | None = None,
    beta: float = 0.0,
    temperature: float = 1.0,
) -> list[dict[str, Any]]:
    """One entry per path (files as given, directories expanded), in order: its faces, or ``error``.

    Faces come from ``box`` (one box for every image), else ``boxes`` (per image path or file name, as
    :func:`fbn_fast.faces.read_boxes_file` reads them), else ``detector`` (a name or a detector; its boxes grown
    by ``margin``), else (``detector=None``) the whole image is the face. An entry: ``path``, ``size``
    ``[width, height]``, ``faces`` (a list; with none, a ``note``), ``annotated`` (the picture written into
    ``annotate_dir``, when given). A face: ``box`` (the face), ``crop`` (the region scored), ``expression``
    (``label``, ``probabilities`` by class name), ``aus`` (``probabilities`` by AU name, ``active``: AUs at or
    above ``au_threshold``), ``va`` (``valence``, ``arousal``), ``compound`` (the ``top_k`` zero-shot compound
    classes; β and T as in docs/method.md §4). ``device`` and ``amp_dtype`` take the values of train's ``--device``
    and ``--amp-dtype``. ``trained_on`` (:func:`fbn_fast.checkpoint.read_trained_on`): a SynthFace-only model
    warns once (:class:`SyntheticModelWarning`) when a file lies outside its SynthFace folder.
    """
    from .annotate import annotate, save_annotated
    from .data.decode import normalize_nhwc
    from .data.pipeline import renormalization, renormalize
    from .export import FaceBehaviorProbabilities

    if not 0 < au_threshold < 1:
        raise ValueError(f"--threshold must lie in (0, 1), got {au_threshold}")
    if top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {top_k}")
    if margin < 0:
        raise ValueError(f"--margin must be >= 0, got {margin}")
    if isinstance(detector, str) and box is None and boxes is None:
        detector = get_detector(detector)
    dev = resolve_device(device)
    amp = resolve_amp_dtype(amp_dtype, dev)
    model = model.to(dev).eval()
    heads = FaceBehaviorProbabilities(model, CompoundScorer(compound_classes, beta=beta, temperature=temperature))
    heads = heads.to(dev)
    renorm = renormalization(model_normalization(model), dev)  # the trunk's input statistics, as in training
    files = expand_inputs(paths)
    outside = _outside(files, trained_on)
    if outside:
        warnings.warn(
            f"this model was trained only on SynthFace's synthetic faces (datasets: "
            f"{', '.join(trained_on.get('datasets') or []) or 'SynthFace'}); its answers on other images such as "
            f"{outside[0]!r} are not meaningful: train it on real faces (python -m fbn_fast.data import ...)",
            SyntheticModelWarning, stacklevel=3)
    results: list[dict[str, Any]] = [{"path": f} for f in files]
    taken: set[str] = set()
    pending: list[tuple[int, Photo, list[tuple[list[float], list[float]]]]] = []

    def flush() -> None:
        crops = [face_crop(photo, crop, image_size) for _, photo, faces in pending for _, crop in faces]
        answers: list[dict[str, Any]] = []
        for start in range(0, len(crops), batch_size):
            u8 = torch.from_numpy(np.stack(crops[start:start + batch_size]))
            x = renormalize(normalize_nhwc(u8, None, None, image_dtype(dev, amp), dev), renorm)
            with autocast(dev, amp):
                out = model(x)
            answers += _answers(heads, *heads.probabilities(*out), au_threshold=au_threshold, top_k=top_k)
        k = 0
        for i, photo, faces in pending:
            entry = results[i]
            entry["size"] = list(photo.size)
            entry["faces"] = [{"box": _rounded(b), "crop": _rounded(c), **answers[k + j]}
                              for j, (b, c) in enumerate(faces)]
            k += len(faces)
            if not faces:
                entry["note"] = "no face found"
            if annotate_dir is not None:
                picture = annotate(photo.rgb, entry["faces"], message=entry.get("note"))
                entry["annotated"] = str(save_annotated(picture, photo.path, annotate_dir, taken))
        pending.clear()

    queued = 0
    for i, f in enumerate(files):
        try:
            photo = read_photo(f)
            faces = _faces(photo, detector, boxes, box, margin)
        except ValueError as exc:
            results[i]["error"] = str(exc)
            continue
        pending.append((i, photo, faces))
        queued += len(faces)
        if queued >= batch_size:
            flush()
            queued = 0
    flush()
    return results


def _rounded(box: Sequence[float]) -> list[float]:
    return [round(float(v), 2) for v in box]


def _answers(heads: nn.Module, p_e: torch.Tensor, s: torch.Tensor, va: torch.Tensor, comp: torch.Tensor, *,
             au_threshold: float, top_k: int) -> list[dict[str, Any]]:
    """Per-face answers, every value named (class names, AU names, compound names)."""
    p_e, s, va, comp = (t.cpu().numpy() for t in (p_e, s, va, comp))
    expr_names = label_names(p_e.shape[1], EXPRESSIONS, "class")
    au_names = label_names(s.shape[1], AUS, "AU#")
    out = []
    for j in range(len(p_e)):
        e = int(p_e[j].argmax())
        entry: dict[str, Any] = {
            "expression": {"label": expr_names[e], "probabilities": {n: float(p) for n, p in zip(expr_names, p_e[j])}},
            "aus": {"probabilities": {n: float(p) for n, p in zip(au_names, s[j])},
                    "active": [n for n, p in zip(au_names, s[j]) if p >= au_threshold]},
            "va": {"valence": float(va[j, 0]), "arousal": float(va[j, 1])},
        }
        if heads.has_compounds:
            order = np.argsort(-comp[j], kind="stable")[:top_k]
            entry["compound"] = {"top": [{"label": heads.scorer.names[c], "probability": float(comp[j, c])}
                                         for c in order]}
        out.append(entry)
    return out


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """One line per face: image, face box, expression, valence/arousal, top compound, active AUs."""
    width = max([len("image")] + [len(r["path"]) for r in results])
    head = (f"{'image':<{width}}  {'face box':<19} {'expression':<18} {'valence':>7} {'arousal':>7}  "
            f"{'compound':<28} active AUs")
    lines = [head, "-" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['path']:<{width}}  error: {r['error']}")
            continue
        if not r["faces"]:
            lines.append(f"{r['path']:<{width}}  {r.get('note', 'no face found')}")
        for face in r["faces"]:
            e = face["expression"]
            expr = f"{e['label']} {e['probabilities'][e['label']]:.2f}"
            comp = "-"
            if "compound" in face:
                top = face["compound"]["top"][0]
                comp = f"{top['label']} {top['probability']:.2f}"
            aus = ",".join(a.removeprefix("AU") for a in face["aus"]["active"]) or "-"
            box = ",".join(str(round(v)) for v in face["box"])
            lines.append(f"{r['path']:<{width}}  {box:<19} {expr:<18} {face['va']['valence']:>7.2f} "
                         f"{face['va']['arousal']:>7.2f}  {comp:<28} {aus}")
    return "\n".join(lines)


#: The options this command shares with ``python -m fbn_fast.train`` (same names, values and help).
SHARED_OPTIONS = ("batch_size", "image_size", "device", "amp_dtype")


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python -m fbn_fast.predict``."""
    p = command_parser("predict", "Expression, action units, valence/arousal and zero-shot compound expressions of "
                       "every face in images.")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or directories of images")
    p.add_argument("--json", action="store_true", help="print JSON (one list of entries) instead of a table")
    p.add_argument("--annotate", default=None, metavar="OUT_DIR",
                   help="write each image with its face boxes, top expressions, active AUs and VA drawn on it")
    faces = p.add_argument_group("faces (default: detect them with --detector)")
    how = faces.add_mutually_exclusive_group()
    how.add_argument("--detector", default=None,
                     help="face detector: opencv (default; pip install 'fbn_fast[faces]'), retinaface (pip install "
                          "retina-face; downloads its weights on first use) or module:factory")
    how.add_argument("--boxes", default=None, metavar="FILE",
                     help="JSON object: per image (its path or file name) a list of face boxes [x0, y0, x1, y1] in "
                          "pixels, used as the crops")
    how.add_argument("--no-detect", action="store_true", help="each image is one face crop (no detection)")
    how.add_argument("--face-box", default=None, metavar="x0,y0,x1,y1",
                     help="one face box in pixels for every image, used as the crop")
    faces.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                       help=f"margin around a detected face on each side, as a fraction of its box's longer side "
                            f"(default: {DEFAULT_MARGIN})")
    p.add_argument("--top-k", type=int, default=3, help="compound classes listed per face (default: 3)")
    p.add_argument("--threshold", type=float, default=0.5, help="AU activation threshold (default: 0.5)")
    add_compound_options(p, classes=False)
    add_inference_options(p, SHARED_OPTIONS, batch_size=64)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from .checkpoint import read_trained_on

    args = build_parser().parse_args(argv)
    try:
        check_options({n: getattr(args, n) for n in SHARED_OPTIONS})
        if args.image_size is not None and args.image_size < 8:
            raise ValueError(f"--image-size must be >= 8, got {args.image_size}")
        box = parse_box(args.face_box)
        boxes = read_boxes_file(args.boxes) if args.boxes else None
        detector = None if args.no_detect or box is not None or boxes is not None else get_detector(
            args.detector or "opencv")
        trained = load_trained(args.checkpoint, args.device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SyntheticModelWarning)
            results = predict(trained.model, args.inputs, image_size=args.image_size or trained.image_size,
                              detector=detector, boxes=boxes, box=box, margin=args.margin,
                              annotate_dir=args.annotate, trained_on=read_trained_on(trained.path),
                              batch_size=args.batch_size, device=trained.device, amp_dtype=args.amp_dtype,
                              au_threshold=args.threshold, top_k=args.top_k, beta=args.beta,
                              temperature=args.temperature)
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(results, indent=1) if args.json else format_table(results))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
