"""AffectNet importer: expression (8 codes + 3 non-expression codes), valence/arousal, face boxes.

Follows the layout and label conventions of the AffectNet distribution (Mollahosseini, Hasani & Mahoor,
"AffectNet: A Database for Facial Expression, Valence, and Arousal Computing in the Wild", IEEE TAC 2017,
arXiv 1708.03985) as read by public loaders of its files:

* ``Manually_Annotated_file_lists/training.csv`` and ``validation.csv`` with the header
  ``subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal``
  (some copies of ``validation.csv`` have no header line: a first row that parses as data is read as data,
  with these columns in this order, as public loaders name them);
  images under ``Manually_Annotated_Images/<subDirectory_filePath>`` (also accepted one level deeper, as
  ``Manually_Annotated/Manually_Annotated_Images``). The face box is ``face_x, face_y, face_width,
  face_height`` in pixels of the full image; landmarks are ``;``-separated and not imported.
* expression codes 0 Neutral, 1 Happiness, 2 Sadness, 3 Surprise, 4 Fear, 5 Disgust, 6 Anger, 7 Contempt,
  8 None, 9 Uncertain, 10 No-Face. Remapped with :func:`fbn_fast.labels.from_affectnet`.
* valence and arousal in [-1, 1]; the value -2 marks "no VA" (given for Uncertain and No-Face images).

Our handling **(our choices)**: code 10 (No-Face) drops the row, as the image holds no face; codes 8 (None)
and 9 (Uncertain) keep the image with the expression missing; 7 (Contempt), which has no place among the 7
expressions, is masked (expression missing) while its VA is kept; VA -2 (or outside [-1, 1]) makes VA missing;
a box with a non-positive side is left out (NaN) and the row kept. A row left with no label is dropped. An
expression code that is not an integer (``3.7``) is an error naming the file and line, never truncated.
``validation.csv`` is the split ``val`` by default (``validation_split="test"`` for papers that report on it,
as the official test set is not public).

The later distribution with per-image NumPy annotations (``train_set/images/<id>.jpg`` and
``train_set/annotations/<id>_exp.npy``, ``_val.npy``, ``_aro.npy``, ``_lnd.npy``; ``val_set/`` alike; images are
already face crops, so no box) is read too, with the same codes and markers; it is picked when
``train_set/annotations`` or ``val_set/annotations`` exists under the root.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import math
from pathlib import Path

import numpy as np

from ...labels import MISSING, from_affectnet
from ..manifest import SPLITS, Manifest
from ._common import (
    FileIndex,
    Importer,
    ImportRecord,
    RowBuilder,
    add_common_arguments,
    common_options,
    find_image,
    quote,
    read_text,
    relative_to,
)

NAME = "affectnet"
CSV_FILES = (("training.csv", "train"), ("validation.csv", None))
#: The columns of the list files, in their order; the header-less copies of validation.csv are read with them.
COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "facial_landmarks", "expression",
           "valence", "arousal")
REQUIRED = tuple(c for c in COLUMNS if c != "facial_landmarks")
IMAGE_DIRS = ("Manually_Annotated_Images", "Manually_Annotated/Manually_Annotated_Images")
VA_MISSING = -2.0
CONTEMPT, NONE, UNCERTAIN, NO_FACE = 7, 8, 9, 10
_MASKED = {CONTEMPT: "Contempt", NONE: "None", UNCERTAIN: "Uncertain"}  # codes kept with the expression missing
_TABLE = from_affectnet(np.arange(8))  # codes 0..7 -> canonical ids (Contempt -> MISSING)


def _expression(code: int, rec: ImportRecord) -> int | None:
    """Canonical id, MISSING (masked and counted), or None when the row is to be dropped."""
    if code == NO_FACE:
        rec.drop("expression 10 (No-Face)")
        return None
    if code in _MASKED:
        rec.mask(f"expression {code} ({_MASKED[code]}) masked")
        return MISSING
    if 0 <= code < CONTEMPT:
        return int(_TABLE[code])
    rec.drop("expression code outside 0..10")
    return None


def _va(valence: float, arousal: float, rec: ImportRecord) -> tuple[float, float] | None:
    if valence == VA_MISSING or arousal == VA_MISSING:
        rec.mask("VA -2 (missing) masked")
        return None
    if not (math.isfinite(valence) and math.isfinite(arousal) and abs(valence) <= 1 and abs(arousal) <= 1):
        rec.mask("VA outside [-1, 1] masked")
        return None
    return valence, arousal


def _number(text: str, what: str) -> float:
    """A number cell; an empty cell is NaN; anything else is a ValueError quoting (the start of) the cell."""
    text = text.strip()
    if not text:
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{what} {quote(text)} is not a number") from None


def _code(text: str) -> int:
    """An expression code: an integer (``3`` or ``3.0``); ``3.7``, NaN or text is a ValueError, never truncated."""
    value = _number(text, "expression")
    if not (math.isfinite(value) and value == int(value)):
        raise ValueError(f"expression {quote(text.strip())} is not an integer code")
    return int(value)


def _is_data_row(row: list[str]) -> bool:
    """Whether the first row of a list file is data (the header-less variant) rather than a header."""
    if len(row) < len(COLUMNS):
        return False
    try:
        for j in (1, 2, 3, 4, 6, 7, 8):
            float(row[j])
    except ValueError:
        return False
    return True


def _read_csv(path: Path, split: str, images: str, index: FileIndex | None, builder: RowBuilder) -> None:
    rec = builder.record
    rec.source(path)
    paths, expr, va, va_mask, box = [], [], [], [], []
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    first = next(reader, None)
    while first is not None and not any(cell.strip() for cell in first):
        first = next(reader, None)
    if first is None:
        raise ValueError(f"{path}: empty file, expected rows of {','.join(COLUMNS)} (with or without that header)")
    if _is_data_row(first):
        # The header-less copies of validation.csv: the columns are the official ones, in the official order.
        col = {name: j for j, name in enumerate(COLUMNS)}
        rows = itertools.chain([first], reader)
        rec.notes.setdefault("files_without_header", []).append(path.name)
    else:
        col = {name.strip(): j for j, name in enumerate(first)}
        missing = [c for c in REQUIRED if c not in col]
        if missing:
            raise ValueError(f"{path}: line {reader.line_num}: header lacks columns {missing}; its first cells are "
                             f"{', '.join(quote(c, 40) for c in first[:9])}")
        rows = reader
    width = max(col[c] for c in REQUIRED) + 1
    for row in rows:
        if not row or not any(cell.strip() for cell in row):
            continue
        line = reader.line_num
        if len(row) < width:
            raise ValueError(f"{path}: line {line}: {len(row)} fields, expected at least {width}")
        try:
            code = _code(row[col["expression"]])
            v, a = _number(row[col["valence"]], "valence"), _number(row[col["arousal"]], "arousal")
            x, y, w, h = (_number(row[col[c]], c) for c in ("face_x", "face_y", "face_width", "face_height"))
        except ValueError as exc:
            raise ValueError(f"{path}: line {line}: {exc}") from None
        rel = row[col["subDirectory_filePath"]].strip().replace("\\", "/")
        if not rel:
            raise ValueError(f"{path}: line {line}: empty subDirectory_filePath")
        image = find_image(index, f"{images}/{rel}" if images else rel, rec)
        if image is None:
            continue
        e = _expression(code, rec)
        if e is None:
            continue
        pair = _va(v, a, rec)
        if all(math.isfinite(t) for t in (x, y, w, h)) and w > 0 and h > 0:
            box.append((x, y, x + w, y + h))
        else:
            rec.mask("face box with a non-positive side left out")
            box.append((math.nan,) * 4)
        paths.append(image)
        expr.append(e)
        va.append(pair or (0.0, 0.0))
        va_mask.append(pair is not None)
    builder.add(paths, split, expr=np.array(expr, np.int8), va=np.array(va, np.float32).reshape(-1, 2),
                va_mask=np.array(va_mask, bool), box=np.array(box, np.float32).reshape(-1, 4))


def _scalar(path: Path) -> float:
    """The single value of an AffectNet ``.npy`` annotation (stored as a number or as a numeric string)."""
    try:
        value = np.load(path, allow_pickle=False)
        return float(np.asarray(value).reshape(-1)[0])
    except (ValueError, OSError, IndexError) as exc:
        raise ValueError(f"{path}: not a readable single-value annotation ({exc})") from None


def _read_npy_split(root: Path, split_dir: Path, split: str, builder: RowBuilder) -> None:
    rec = builder.record
    images, annotations = split_dir / "images", split_dir / "annotations"
    if not images.is_dir() or not annotations.is_dir():
        raise ValueError(f"{split_dir}: expected the folders images/ and annotations/")
    rec.source(annotations)
    ann = {p.name for p in annotations.iterdir()}
    paths, expr, va, va_mask = [], [], [], []
    for image in sorted(p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")):
        stem = image.stem
        names = [f"{stem}_exp.npy", f"{stem}_val.npy", f"{stem}_aro.npy"]
        if not all(n in ann for n in names):
            rec.drop("annotation .npy files missing")
            continue
        code, v, a = (_scalar(annotations / n) for n in names)
        if not (math.isfinite(code) and code == int(code)):
            raise ValueError(f"{annotations / names[0]}: expression {code} is not an integer code")
        e = _expression(int(code), rec)
        if e is None:
            continue
        pair = _va(v, a, rec)
        paths.append(relative_to(image, root))
        expr.append(e)
        va.append(pair or (0.0, 0.0))
        va_mask.append(pair is not None)
    builder.add(paths, split, expr=np.array(expr, np.int8), va=np.array(va, np.float32).reshape(-1, 2),
                va_mask=np.array(va_mask, bool))


def import_affectnet(root: str | Path, *, images: str | None = None, validation_split: str = "val",
                     check_files: bool = True, dataset: str = NAME, prefix: str = "") -> Manifest:
    """Import AffectNet from ``root`` (its CSV layout, or the per-image ``.npy`` layout); see the module doc.

    ``images``: image folder relative to ``root`` for the CSV layout (default: the first of
    ``Manually_Annotated_Images``, ``Manually_Annotated/Manually_Annotated_Images`` that exists);
    ``check_files``: drop rows whose image is not on disk (counted) — off, rows are trusted as listed.
    """
    root = Path(root)
    if validation_split not in SPLITS:
        raise ValueError(f"validation_split {validation_split!r} is not among {list(SPLITS)}")
    rec = ImportRecord(NAME, dataset, root)
    builder = RowBuilder(rec, prefix)
    npy_dirs = [(root / d, s) for d, s in (("train_set", "train"), ("val_set", validation_split))
                if (root / d / "annotations").is_dir()]
    if npy_dirs:
        rec.notes["layout"] = "per-image .npy annotations"
        for split_dir, split in npy_dirs:
            _read_npy_split(root, split_dir, split, builder)
        return builder.build()
    lists = [d for d in (root / "Manually_Annotated_file_lists", root) if any((d / f).is_file() for f, _ in CSV_FILES)]
    if not lists:
        raise ValueError(f"{root}: found neither training.csv / validation.csv (in Manually_Annotated_file_lists/ "
                         "or the root) nor train_set/annotations, val_set/annotations")
    if images is None:
        images = next((d for d in IMAGE_DIRS if (root / d).is_dir()), None)
        if images is None and check_files:
            raise ValueError(f"{root}: no image folder {' or '.join(IMAGE_DIRS)}; name it with images=...")
        images = images or IMAGE_DIRS[0]
    elif check_files and not (root / images).is_dir():
        raise ValueError(f"{root / images}: image folder does not exist")
    rec.notes["layout"] = "csv"
    index = FileIndex(root) if check_files else None
    for name, split in CSV_FILES:
        path = lists[0] / name
        if path.is_file():
            _read_csv(path, split or validation_split, images.strip("/"), index, builder)
    return builder.build(dedupe=True)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p, NAME)
    p.add_argument("--images", default=None, help="image folder relative to ROOT (CSV layout; default: found)")
    p.add_argument("--validation-split", default="val", choices=SPLITS, help="split of validation.csv / val_set")
    p.add_argument("--no-check-files", action="store_true", help="do not drop rows whose image is missing")


IMPORTER = Importer(
    name=NAME,
    help="AffectNet: training.csv/validation.csv (or train_set/val_set .npy annotations)",
    run=import_affectnet,
    add_arguments=_add_arguments,
    options=lambda a: {"images": a.images, "validation_split": a.validation_split,
                       "check_files": not a.no_check_files, **common_options(a)},
)
