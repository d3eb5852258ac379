"""Faces in photos: detectors behind one small interface, boxes from a file, and the crop each face is scored on.

A *detector* is anything callable on an RGB image (H×W×3 uint8) that returns face boxes ``(x0, y0, x1, y1)``
in pixels (:class:`FaceDetector`). Detectors are chosen by name (:func:`get_detector`):

- ``opencv`` (the default): OpenCV's frontal-face Haar cascade, the file shipped inside
  ``opencv-python-headless`` 4.x; offline. Install: ``pip install "fbn_fast[faces]"`` (OpenCV 5 no longer
  ships the cascades, hence the ``<5`` pin of that extra).
- ``retinaface``: RetinaFace from the ``retina-face`` package (TensorFlow); it downloads its weights on first
  use, so it needs network access once. Install: ``pip install retina-face``.
- ``module:attr``: any factory importable as ``module:attr`` that returns a detector.

:func:`register_detector` adds a name. Boxes can also come from a JSON file (:func:`read_boxes_file`: per image,
a list of boxes) or be skipped altogether (pre-cropped faces: the whole image is the face).

Each face is scored on a *crop box* (:func:`crop_box`): the face box grown by a margin on every side, made
square about its centre, and moved (not cut) to lie inside the image where it fits. Detector boxes hug the face
(brows to chin), while the faces the model learnt from fill about three quarters of the frame with hair, ears
and chin around them (SynthFace draws the face 0.66-0.78 of the image wide): a margin of 0.2 of the box side
on each side gives that framing. The crop box then goes through the evaluation transform of the input pipeline
(the base region resized to the trunk's input, :mod:`fbn_fast.data.decode`), exactly as a manifest's face box
does in training and evaluation.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "DEFAULT_MARGIN",
    "Box",
    "FaceDetector",
    "OpenCVHaarDetector",
    "RetinaFaceDetector",
    "available_detectors",
    "boxes_for",
    "check_box",
    "crop_box",
    "get_detector",
    "read_boxes_file",
    "register_detector",
]

#: A face box in pixels: left, top, right, bottom (right/bottom exclusive, as PIL and the manifest use them).
Box = tuple[float, float, float, float]

#: Margin added on each side of a detected face box, as a fraction of the box's longer side.
DEFAULT_MARGIN = 0.2


@runtime_checkable
class FaceDetector(Protocol):
    """Finds faces: ``detector(image)`` on an RGB uint8 image (H, W, 3) returns boxes ``(x0, y0, x1, y1)``."""

    def __call__(self, image: np.ndarray) -> list[Box]: ...


def _as_rgb(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"face detection: expected an RGB uint8 image (H, W, 3), got {img.dtype} {img.shape}")
    return img


def _ordered(boxes: Sequence[Sequence[float]], height: int, width: int) -> list[Box]:
    """Boxes clipped to the image (detectors may overshoot by a pixel), largest first, then left to right."""
    out = []
    for b in boxes:
        x0, y0 = max(0.0, float(b[0])), max(0.0, float(b[1]))
        x1, y1 = min(float(width), float(b[2])), min(float(height), float(b[3]))
        if x1 - x0 >= 1.0 and y1 - y0 >= 1.0:
            out.append((x0, y0, x1, y1))
    return sorted(out, key=lambda b: (-round((b[2] - b[0]) * (b[3] - b[1])), b[0], b[1]))


# ------------------------------------------------------------------------------------------------ detectors
class OpenCVHaarDetector:
    """OpenCV's frontal-face Haar cascade (``haarcascade_frontalface_default.xml`` shipped with OpenCV 4.x).

    Offline and fast (about 0.2 s for a 512² photo on one core); it finds upright, roughly frontal faces.
    ``min_size``: the smallest face searched for, as a fraction of the image's shorter side (at least 24 px).
    """

    def __init__(self, scale_factor: float = 1.1, min_neighbors: int = 5, min_size: float = 0.05,
                 cascade: str | os.PathLike | None = None) -> None:
        try:
            import cv2
        except ImportError:
            raise ValueError('face detector "opencv" needs OpenCV 4.x: pip install "fbn_fast[faces]" '
                             '(opencv-python-headless<5), or give boxes with --boxes FILE, or --no-detect for '
                             "images that are already face crops") from None
        self._cv2 = cv2
        if cascade is None:
            folder = getattr(getattr(cv2, "data", None), "haarcascades", None)
            if not folder:
                raise ValueError(f'face detector "opencv": OpenCV {cv2.__version__} ships no Haar cascades (OpenCV '
                                 '5 dropped them): pip install "opencv-python-headless>=4.8,<5" (the "faces" '
                                 "extra), or pass cascade=PATH to a haarcascade_frontalface_default.xml")
            cascade = Path(folder) / "haarcascade_frontalface_default.xml"
        self.cascade_path = Path(cascade)
        if not self.cascade_path.is_file():
            raise ValueError(f'face detector "opencv": cascade file {str(self.cascade_path)!r} does not exist')
        self._cascade = cv2.CascadeClassifier(str(self.cascade_path))
        if self._cascade.empty():
            raise ValueError(f'face detector "opencv": {str(self.cascade_path)!r} is not a readable cascade')
        if not scale_factor > 1.0 or min_neighbors < 0 or not 0 <= min_size < 1:
            raise ValueError(f'face detector "opencv": needs scale_factor > 1, min_neighbors >= 0 and '
                             f"0 <= min_size < 1, got {scale_factor}, {min_neighbors}, {min_size}")
        self.scale_factor, self.min_neighbors, self.min_size = float(scale_factor), int(min_neighbors), min_size

    def __call__(self, image: np.ndarray) -> list[Box]:
        img = _as_rgb(image)
        h, w = img.shape[:2]
        side = max(24, int(self.min_size * min(h, w)))
        gray = self._cv2.equalizeHist(self._cv2.cvtColor(img, self._cv2.COLOR_RGB2GRAY))
        found = self._cascade.detectMultiScale(gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors,
                                               minSize=(side, side))
        return _ordered([(x, y, x + bw, y + bh) for x, y, bw, bh in np.asarray(found).reshape(-1, 4)], h, w)


class RetinaFaceDetector:
    """RetinaFace through the ``retina-face`` package (``pip install retina-face``; TensorFlow). Its weights are
    downloaded on first use. ``threshold``: the smallest detection score kept."""

    def __init__(self, threshold: float = 0.9) -> None:
        try:
            from retinaface import RetinaFace
        except ImportError as exc:
            raise ValueError(f'face detector "retinaface" needs the retina-face package ({exc}): pip install '
                             "retina-face (it brings TensorFlow and downloads its weights on first use); the "
                             'offline default is --detector opencv (pip install "fbn_fast[faces]")') from None
        self._rf = RetinaFace
        self.threshold = float(threshold)

    def __call__(self, image: np.ndarray) -> list[Box]:
        img = _as_rgb(image)
        found = self._rf.detect_faces(np.ascontiguousarray(img[:, :, ::-1]), threshold=self.threshold)  # it reads BGR
        faces = found.values() if isinstance(found, Mapping) else []  # no face: the package returns a tuple
        return _ordered([f["facial_area"] for f in faces], *img.shape[:2])


_DETECTORS: dict[str, Callable[..., FaceDetector]] = {
    "opencv": OpenCVHaarDetector,
    "retinaface": RetinaFaceDetector,
}


def register_detector(name: str, factory: Callable[..., FaceDetector]) -> None:
    """Make ``get_detector(name, **options)`` call ``factory(**options)``; the name must be new."""
    if not name or ":" in name:
        raise ValueError(f"detector name {name!r}: must be non-empty and contain no ':'")
    if name in _DETECTORS:
        raise ValueError(f"detector {name!r} is already registered")
    _DETECTORS[name] = factory


def available_detectors() -> list[str]:
    """Registered detector names (each may still need its package: :func:`get_detector` says which)."""
    return list(_DETECTORS)


def get_detector(name: str, **options: Any) -> FaceDetector:
    """A detector by registered name, or a ``module:attr`` factory; ``options`` go to its constructor.

    ``ValueError`` naming the detector when it is unknown or its package is missing (with the install command).
    """
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"--detector {name!r}: cannot import {attr!r} from {module!r} ({exc})") from None
    elif name in _DETECTORS:
        factory = _DETECTORS[name]
    else:
        raise ValueError(f"--detector {name!r}: unknown; choose one of {available_detectors()} or module:factory")
    detector = factory(**options)
    if not callable(detector):
        raise ValueError(f"--detector {name!r}: {factory!r} returned {type(detector).__name__}, not a detector")
    return detector


# ------------------------------------------------------------------------------------------------ boxes
def check_box(box: Sequence[float], height: int, width: int, image: str) -> Box:
    """A box as four floats, or ``ValueError`` naming ``image`` when it is malformed or leaves the image."""
    try:
        b = tuple(float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"{image}: face box {box!r} is not four numbers x0, y0, x1, y1") from None
    if len(b) != 4 or not all(np.isfinite(b)):
        raise ValueError(f"{image}: face box {list(box)} is not four finite numbers x0, y0, x1, y1")
    if not (b[2] > b[0] and b[3] > b[1]):
        raise ValueError(f"{image}: face box {list(b)} needs x1 > x0 and y1 > y0")
    if b[0] < 0 or b[1] < 0 or b[2] > width or b[3] > height:
        raise ValueError(f"{image}: face box {list(b)} lies outside the {width}x{height} image")
    return b  # type: ignore[return-value]


def crop_box(box: Sequence[float], height: int, width: int, margin: float = DEFAULT_MARGIN) -> Box:
    """The crop a face is scored on: ``box`` grown by ``margin`` × its longer side on each side, square about its
    centre, shifted to lie inside the image where it fits (clipped only where it is larger than the image)."""
    if margin < 0:
        raise ValueError(f"--margin must be >= 0, got {margin}")
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(x1 - x0, y1 - y0) * (1.0 + 2.0 * margin)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2

    def place(centre: float, extent: int) -> tuple[float, float]:
        if side >= extent:
            return 0.0, float(extent)
        lo = min(max(centre - side / 2, 0.0), extent - side)
        return lo, lo + side

    (a0, a1), (b0, b1) = place(cx, width), place(cy, height)
    return a0, b0, a1, b1


def read_boxes_file(path: str | os.PathLike) -> dict[str, list[list[float]]]:
    """A ``--boxes`` file: a JSON object mapping each image (its path as given on the command line, or its file
    name) to a list of face boxes ``[x0, y0, x1, y1]`` in pixels (an empty list: the image has no face)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ValueError(f"--boxes {str(p)!r} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--boxes {str(p)!r} is not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--boxes {str(p)!r}: expected an object {{image: [[x0, y0, x1, y1], ...]}}, "
                         f"got {type(data).__name__}")
    for image, boxes in data.items():
        if not isinstance(boxes, list) or not all(isinstance(b, list) and len(b) == 4 for b in boxes):
            raise ValueError(f"--boxes {str(p)!r}: entry {image!r} must be a list of [x0, y0, x1, y1] boxes")
    return data


def boxes_for(table: Mapping[str, list[list[float]]], image: str) -> list[list[float]] | None:
    """The boxes a ``--boxes`` table gives ``image``: by the path as given, then the resolved path, then the file
    name when only one entry has it; ``None`` when it has none."""
    if image in table:
        return table[image]
    resolved = str(Path(image).resolve())
    for key, boxes in table.items():
        if str(Path(key).resolve()) == resolved:
            return boxes
    name = Path(image).name
    hits = [boxes for key, boxes in table.items() if Path(key).name == name]
    return hits[0] if len(hits) == 1 else None
