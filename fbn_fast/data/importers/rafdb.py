"""RAF-DB importers: the basic set (7 expressions) and the compound set (11 compound expressions).

Follows the layout of the RAF-DB distribution (Li, Deng & Du, "Reliable Crowdsourcing and Deep
Locality-Preserving Learning for Expression Recognition in the Wild", CVPR 2017; whdeng.cn/RAF/model1.html)
as read by public loaders of its files:

* ``basic/EmoLabel/list_patition_label.txt`` (the file name is spelled so), one ``<image> <label>`` line per
  image, e.g. ``train_00001.jpg 5``; the name's prefix ``train``/``test`` is the official partition. Basic
  labels are 1-based in RAF order: 1 Surprise, 2 Fear, 3 Disgust, 4 Happiness, 5 Sadness, 6 Anger, 7 Neutral
  (remapped with :func:`fbn_fast.labels.from_rafdb`).
* ``compound/EmoLabel/list_patition_label.txt`` alike (``train_0001.jpg 3``), with 1-based compound labels
  1 Happily Surprised, 2 Happily Disgusted, 3 Sadly Fearful, 4 Sadly Angry, 5 Sadly Surprised, 6 Sadly
  Disgusted, 7 Fearfully Angry, 8 Fearfully Surprised, 9 Angrily Surprised, 10 Angrily Disgusted,
  11 Disgustedly Surprised, mapped by name onto :data:`fbn_fast.labels.COMPOUNDS` (Du, Tao & Martinez
  2014), whose first eleven are in this order. Compound rows fill the ``compound`` column and
  leave the basic expression missing.
* images ``Image/aligned/<stem>_aligned.jpg`` (100×100 aligned faces, the default) or
  ``Image/original/<image>`` (whole images; their face box is read from
  ``Annotation/boundingbox/<stem>_boundingbox.txt``, ``x0 y0 x1 y1``, when that file is there).

The root may be the RAF-DB folder holding ``basic/`` and ``compound/``, or the ``basic`` (``compound``)
folder itself. A line whose label is outside the range, or whose name has no ``train``/``test`` prefix, is
dropped and counted; a listed image that is not on disk likewise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ...labels import COMPOUNDS, from_rafdb
from ..manifest import Manifest
from ._common import (
    FileIndex,
    Importer,
    ImportRecord,
    RowBuilder,
    add_common_arguments,
    common_options,
    find_image,
    quote,
    read_lines,
    read_text,
)

LIST_FILE = "EmoLabel/list_patition_label.txt"
#: RAF-DB's compound labels 1..11, in its order.
RAF_COMPOUND_ORDER: tuple[str, ...] = (
    "Happily Surprised", "Happily Disgusted", "Sadly Fearful", "Sadly Angry", "Sadly Surprised", "Sadly Disgusted",
    "Fearfully Angry", "Fearfully Surprised", "Angrily Surprised", "Angrily Disgusted", "Disgustedly Surprised",
)
NUM_RAF_COMPOUNDS = len(RAF_COMPOUND_ORDER)
#: RAF compound label (1-based) - 1 -> our compound id, matched by name.
COMPOUND_TABLE = np.array([[c.lower() for c in COMPOUNDS].index(n.lower()) for n in RAF_COMPOUND_ORDER], np.int64)
IMAGES = ("aligned", "original")


def _base(root: Path, sub: str) -> str:
    """The folder (relative to root) holding EmoLabel/ for the ``basic`` or ``compound`` set."""
    for rel in (sub, ""):
        if (root / rel / LIST_FILE).is_file():
            return rel
    raise ValueError(f"{root}: no {sub}/{LIST_FILE} (nor {LIST_FILE})")


def _box(path: Path) -> tuple[float, float, float, float] | None:
    values = read_text(path).split()
    try:
        x0, y0, x1, y1 = (float(v) for v in values[:4])
    except ValueError:
        raise ValueError(f"{path}: expected four numbers x0 y0 x1 y1, got {quote(' '.join(values[:4]))}") from None
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def _import(root: str | Path, compound: bool, images: str, dataset: str, prefix: str,
            check_files: bool) -> Manifest:
    root = Path(root)
    if images not in IMAGES:
        raise ValueError(f"images {images!r} is not one of {IMAGES}")
    name = "rafdb-compound" if compound else "rafdb"
    base = _base(root, "compound" if compound else "basic")
    rec = ImportRecord(name, dataset, root)
    builder = RowBuilder(rec, prefix)
    list_file = root / base / LIST_FILE
    rec.source(list_file)
    rec.notes["images"] = images
    index = FileIndex(root) if check_files else None
    pre = f"{base}/" if base else ""
    top = NUM_RAF_COMPOUNDS if compound else 7
    rows: dict[str, list] = {"paths": [], "split": [], "label": [], "box": []}
    for j, line in enumerate(read_lines(list_file), start=1):
        if not line.strip():
            continue
        cells = line.split()
        if len(cells) != 2:
            raise ValueError(f"{list_file}: line {j}: expected '<image> <label>', got {quote(line)}")
        image, label_text = cells
        try:
            label = int(label_text)
        except ValueError:
            raise ValueError(f"{list_file}: line {j}: label {quote(label_text)} is not an integer") from None
        split = "train" if image.startswith("train") else "test" if image.startswith("test") else None
        if split is None:
            rec.drop("image name without train/test prefix")
            continue
        if not 1 <= label <= top:
            rec.drop(f"label outside 1..{top}")
            continue
        stem = image.rsplit(".", 1)[0]
        rel = f"{pre}Image/aligned/{stem}_aligned.jpg" if images == "aligned" else f"{pre}Image/original/{image}"
        rel = find_image(index, rel, rec)
        if rel is None:
            continue
        box = None
        if images == "original":
            box_file = root / base / "Annotation" / "boundingbox" / f"{stem}_boundingbox.txt"
            if box_file.is_file():
                box = _box(box_file)
                if box is None:
                    rec.mask("bounding box with a non-positive side left out")
            else:
                rec.mask("no bounding box file")
        rows["paths"].append(rel)
        rows["split"].append(split)
        rows["label"].append(label)
        rows["box"].append(box or (np.nan,) * 4)
    labels = np.array(rows["label"], np.int64)
    box = np.array(rows["box"], np.float32).reshape(-1, 4)
    split = np.array(rows["split"], dtype=object)
    if compound:
        builder.add(rows["paths"], split, compound=COMPOUND_TABLE[labels - 1], box=box)
    else:
        builder.add(rows["paths"], split, expr=from_rafdb(labels), box=box)
    return builder.build(dedupe=True)


def import_rafdb(root: str | Path, *, images: str = "aligned", check_files: bool = True, dataset: str = "rafdb",
                 prefix: str = "") -> Manifest:
    """Import RAF-DB's basic set (7 expressions) from ``root``; see the module doc."""
    return _import(root, False, images, dataset, prefix, check_files)


def import_rafdb_compound(root: str | Path, *, images: str = "aligned", check_files: bool = True,
                          dataset: str = "rafdb_compound", prefix: str = "") -> Manifest:
    """Import RAF-DB's compound set (11 compounds, into the ``compound`` column) from ``root``."""
    return _import(root, True, images, dataset, prefix, check_files)


def _arguments(dataset: str):
    def add(p: argparse.ArgumentParser) -> None:
        add_common_arguments(p, dataset)
        p.add_argument("--images", default="aligned", choices=IMAGES,
                       help="Image/aligned (default) or Image/original with face boxes")
        p.add_argument("--no-check-files", action="store_true", help="do not drop rows whose image is missing")
    return add


def _options(a: argparse.Namespace) -> dict:
    return {"images": a.images, "check_files": not a.no_check_files, **common_options(a)}


IMPORTERS = (
    Importer("rafdb", "RAF-DB basic: EmoLabel/list_patition_label.txt, 7 expressions (1-based RAF order)",
             import_rafdb, _arguments("rafdb"), _options),
    Importer("rafdb-compound", "RAF-DB compound: 11 compound expressions (1-based RAF order)",
             import_rafdb_compound, _arguments("rafdb_compound"), _options),
)
