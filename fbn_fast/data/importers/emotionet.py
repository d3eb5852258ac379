"""EmotioNet importer: AU occurrence per image from the EmotioNet AU tables.

Follows the AU tables of EmotioNet (Benitez-Quiroz, Srinivasan & Martinez, "EmotioNet: An accurate,
real-time algorithm for the automatic annotation of a million facial expressions in the wild", CVPR 2016;
the EmotioNet Challenge, arXiv 1703.01210, cbcsl.ece.ohio-state.edu/EmotionNetChallenge/) as read by public
loaders of its files. Two formats, told apart by their first line:

* the manually FACS-coded table (``EmotioNet_FACS_aws_2020_24600.xlsx``, saved as CSV): a header row whose
  first column is ``URL`` (then ``URL orig``) and whose AU columns are named like ``'AU 1'`` (quotes and a
  space included; ``AU1`` is accepted too); URLs may be wrapped in single quotes;
* the challenge's tab-separated files (``dataFile_<n>.txt``, no header): image URL, original URL, then one
  column per AU number 1, 2, 3, … (the AU with number ``k`` in column ``k + 1``, 0-based).

Codes: 1 present, 0 absent, 999 not coded (leaves that AU unannotated; so does an empty cell or any other
code, counted). AU columns outside our 17 are not read (listed in the notes). The images are downloaded by
the user from the URLs: a row's image is ``<images>/<file name of the URL>`` (``image_names="urlpath"``:
the URL's path below its host instead, for collections that keep the server's folders). Rows whose image
is not on disk are dropped and counted, as are repeated images. EmotioNet has no public test labels: every
row goes to ``split`` (default ``train``).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import posixpath
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np

from ...labels import AU_NUMBERS, NUM_AUS
from ..manifest import SPLITS, Manifest
from ._common import (
    FileIndex,
    Importer,
    ImportRecord,
    RowBuilder,
    add_common_arguments,
    au_number,
    common_options,
    find_image,
    quote,
    read_text,
)

NAME = "emotionet"
UNKNOWN = 999
NAMING = ("basename", "urlpath")


def _clean(cell: str) -> str:
    return cell.strip().strip("'\"").strip()


def _local_name(url: str, naming: str) -> str:
    parsed = urlparse(_clean(url))
    path = unquote(parsed.path if parsed.scheme else _clean(url)).replace("\\", "/")
    return posixpath.basename(path) if naming == "basename" else path.lstrip("/")


def _code(cell: str) -> float:
    cell = _clean(cell)
    try:
        return float(cell) if cell else math.nan
    except ValueError:
        return math.nan


def _rows_csv(path: Path, text: str, rec: ImportRecord):
    """(line, url, {AU number: code}) for each row of the header-ed CSV table."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [_clean(c) for c in next(reader)]
    aus = {j: au_number(c) for j, c in enumerate(header) if c.upper().startswith("AU")}
    aus = {j: n for j, n in aus.items() if n is not None}
    if not aus:
        raise ValueError(f"{path}: line 1: no AU columns in the header {quote(','.join(header))}")
    outside = sorted({n for n in aus.values() if n not in AU_NUMBERS})
    rec.note_names("au_columns_not_read", (f"AU{n}" for n in outside))
    width = max(aus) + 1
    for row in reader:
        if not row or not any(c.strip() for c in row):
            continue
        if len(row) < width:
            raise ValueError(f"{path}: line {reader.line_num}: {len(row)} fields, expected at least {width}")
        yield reader.line_num, row[0], {n: _code(row[j]) for j, n in aus.items() if n in AU_NUMBERS}


def _rows_txt(path: Path, text: str, rec: ImportRecord):
    """(line, url, {AU number: code}) for each line of a tab-separated challenge file."""
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        cells = line.split("\t")
        if len(cells) < 3:
            raise ValueError(f"{path}: line {line_no}: expected URL, original URL and AU codes separated by tabs, "
                             f"got {quote(line)}")
        yield line_no, cells[0], {n: _code(cells[n + 1]) for n in AU_NUMBERS if n + 1 < len(cells)}


def _is_table(text: str) -> bool:
    first = text.split("\n", 1)[0]
    return _clean(first.split(",")[0].split("\t")[0]).upper() == "URL"


def import_emotionet(root: str | Path, *, tables: list[str] | tuple[str, ...] | None = None, images: str = "images",
                     image_names: str = "basename", split: str = "train", check_files: bool = True,
                     dataset: str = NAME, prefix: str = "") -> Manifest:
    """Import EmotioNet AU tables from ``root``; see the module doc.

    ``tables``: table files relative to ``root`` (default: every ``*.csv`` in ``root``, else every ``*.txt``);
    ``images``: folder of the downloaded images relative to ``root``.
    """
    root = Path(root)
    if image_names not in NAMING:
        raise ValueError(f"image_names {image_names!r} is not one of {NAMING}")
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not among {list(SPLITS)}")
    if tables:
        paths = [root / t for t in tables]
        for p in paths:
            if not p.is_file():
                raise ValueError(f"{p}: table does not exist")
    else:
        paths = sorted(root.glob("*.csv")) or sorted(root.glob("*.txt"))
        if not paths:
            raise ValueError(f"{root}: no EmotioNet table (*.csv or *.txt); name it with tables=[...]")
    rec = ImportRecord(NAME, dataset, root)
    rec.notes["image_names"] = image_names
    builder = RowBuilder(rec, prefix)
    index = FileIndex(root) if check_files else None
    images = images.strip("/")
    for path in paths:
        rec.source(path)
        text = read_text(path)
        rows = _rows_csv(path, text, rec) if _is_table(text) else _rows_txt(path, text, rec)
        out_paths, au, mask = [], [], []
        for line_no, url, codes in rows:
            name = _local_name(url, image_names)
            if not name:
                raise ValueError(f"{path}: line {line_no}: no image name in {quote(url)}")
            rel = find_image(index, f"{images}/{name}" if images else name, rec, "image missing (not downloaded)")
            if rel is None:
                continue
            a = np.zeros(NUM_AUS, np.uint8)
            m = np.zeros(NUM_AUS, bool)
            for number, code in codes.items():
                k = AU_NUMBERS.index(number)
                if code in (0.0, 1.0):
                    a[k], m[k] = int(code), True
                elif code == UNKNOWN:
                    rec.mask("AU 999 (not coded) entries")
                else:
                    rec.mask("AU code other than 0/1/999 (or empty) entries")
            out_paths.append(rel)
            au.append(a)
            mask.append(m)
        builder.add(out_paths, split, au=np.array(au, np.uint8).reshape(-1, NUM_AUS),
                    au_mask=np.array(mask, bool).reshape(-1, NUM_AUS))
    return builder.build(dedupe=True)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p, NAME)
    p.add_argument("--tables", default=None,
                   help="comma-separated table files relative to ROOT (default: *.csv in ROOT, else *.txt)")
    p.add_argument("--images", default="images", help="folder of the downloaded images, relative to ROOT")
    p.add_argument("--image-names", default="basename", choices=NAMING,
                   help="local image name: the URL's file name (default) or its path below the host")
    p.add_argument("--split", default="train", choices=SPLITS, help="split of every row (default train)")
    p.add_argument("--no-check-files", action="store_true", help="do not drop rows whose image is missing")


IMPORTER = Importer(
    name=NAME,
    help="EmotioNet: AU table (URL + AU columns, 999 = not coded) and the downloaded images",
    run=import_emotionet,
    add_arguments=_add_arguments,
    options=lambda a: {"tables": [t for t in (a.tables or "").split(",") if t] or None, "images": a.images,
                       "image_names": a.image_names, "split": a.split, "check_files": not a.no_check_files,
                       **common_options(a)},
)
