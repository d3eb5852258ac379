"""Aff-Wild2 importer: valence/arousal, 7 expressions and 12 AUs per video frame, from the ABAW files.

Follows the annotation layout of the ABAW competitions on Aff-Wild2 (Kollias & Zafeiriou, "Aff-Wild2:
Extending the Aff-Wild Database for Affect Recognition", arXiv 1811.07770; the ABAW challenge pages at
ibug.doc.ic.ac.uk/resources/) as read by public loaders of those files:

* one folder per challenge — ``VA_Estimation_Challenge``, ``EXPR_Classification_Challenge`` (also accepted:
  ``EXPR_Recognition_Challenge``) and ``AU_Detection_Challenge``; the first ABAW's ``VA_Set``, ``EXPR_Set``,
  ``AU_Set`` are accepted too — each with ``Train_Set/`` (or ``Training_Set/``) and ``Validation_Set/``
  holding one ``<video>.txt`` per video (``<video>`` may end in ``_left``/``_right`` for two-person videos);
* each file starts with a header line: ``valence,arousal``; the expression class names
  ``Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other`` (``Other`` from the third ABAW on); or the AU
  names ``AU1,AU2,AU4,AU6,AU7,AU10,AU12,AU15,AU23,AU24,AU25,AU26``;
* data line ``i`` (1-based, after the header) annotates frame ``i`` of the video, whose face crop is
  ``cropped_aligned/<video>/<i:05d>.jpg``; invalid markers: VA -5, expression -1, AU -1.

Our handling: expression codes are mapped by the header's class names (so any edition's order works); a
class outside the 7 (``Other``) is masked; AU columns outside our 17 are dropped (listed in the notes); a
frame in several challenges' files becomes one row holding every label it has; a line whose frame has no
face crop on disk (the face was not detected) is dropped and counted, as is a line with only invalid
markers. The split comes from the ``Train_Set``/``Validation_Set`` folder; should a video sit in different
splits in different challenges, all its frames go to ``val`` **(our choice: held-out wins, so that no
validation frame is trained on)** and the video is listed in the notes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ...labels import EXPRESSIONS, MISSING, NUM_AUS
from ..manifest import Manifest
from ._common import (
    FileIndex,
    FramePattern,
    Importer,
    ImportRecord,
    RowBuilder,
    add_common_arguments,
    au_columns_in_space,
    au_number,
    binary_aus,
    common_options,
    header_error,
    parse_numbers,
    read_lines,
)

NAME = "affwild2"
CHALLENGES: dict[str, tuple[str, ...]] = {
    "va": ("VA_Estimation_Challenge", "VA_Set"),
    "expr": ("EXPR_Classification_Challenge", "EXPR_Recognition_Challenge", "EXPR_Set"),
    "au": ("AU_Detection_Challenge", "AU_Set"),
}
SPLIT_DIRS = {"Train_Set": "train", "Training_Set": "train", "Validation_Set": "val"}
DEFAULT_FRAMES = "cropped_aligned/{video}/{frame:05d}.jpg"
VA_INVALID, EXPR_INVALID, AU_INVALID = -5, -1, -1
# Other spellings of the class names seen in expression headers.
_ALIASES = {"happy": "Happiness", "sad": "Sadness", "angry": "Anger", "surprised": "Surprise", "fearful": "Fear",
            "disgusted": "Disgust", "neutral": "Neutral"}
_CANONICAL = {e.lower(): e for e in EXPRESSIONS} | _ALIASES


def find_annotations(root: Path) -> Path:
    """The folder (the root or up to two levels below) that holds the challenge folders."""
    names = {n for aliases in CHALLENGES.values() for n in aliases}
    candidates = [root] + sorted(p for p in root.glob("*") if p.is_dir() and p.name != "cropped_aligned")
    candidates += sorted(p for c in candidates[1:] for p in c.glob("*") if p.is_dir())
    for c in candidates:
        if any((c / n).is_dir() for n in names):
            return c
    raise ValueError(f"{root}: no annotation folder with any of {sorted(names)} (within two levels)")


def _read_va(path: Path, rec: ImportRecord) -> tuple[np.ndarray, np.ndarray]:
    lines = read_lines(path)
    if not lines or [c.strip().lower() for c in lines[0].split(",")] != ["valence", "arousal"]:
        raise header_error(path, "the header 'valence,arousal'", lines)
    va = parse_numbers(path, lines[1:], 2, 2)
    invalid = (va == VA_INVALID).any(1)
    out_of_range = ~invalid & ~(np.abs(va) <= 1).all(1)
    rec.mask("VA -5 (invalid) lines", int(invalid.sum()))
    rec.mask("VA outside [-1, 1] lines", int(out_of_range.sum()))
    return va.astype(np.float32), ~(invalid | out_of_range)


def _read_expr(path: Path, rec: ImportRecord) -> np.ndarray:
    lines = read_lines(path)
    names = [c.strip() for c in lines[0].split(",")] if lines else []
    table = np.array([EXPRESSIONS.index(_CANONICAL[n.lower()]) if n.lower() in _CANONICAL else MISSING
                      for n in names], np.int64)
    if not len(table) or (table == MISSING).all():
        raise header_error(path, f"the header of expression names (e.g. {','.join(EXPRESSIONS)},Other)", lines)
    codes = parse_numbers(path, lines[1:], 2, 1)[:, 0]
    if (codes != np.round(codes)).any():
        j = int(np.flatnonzero(codes != np.round(codes))[0])
        raise ValueError(f"{path}: line {j + 2}: expression code {codes[j]} is not an integer")
    codes = codes.astype(np.int64)
    invalid = codes == EXPR_INVALID
    known = (codes >= 0) & (codes < len(table))
    expr = np.full(len(codes), MISSING, np.int64)
    expr[known] = table[codes[known]]
    rec.mask("expression -1 (invalid) lines", int(invalid.sum()))
    rec.mask("expression outside the 7 (e.g. Other) masked", int((known & (expr == MISSING)).sum()))
    rec.mask("expression code outside the header's classes", int((~known & ~invalid).sum()))
    return expr


def _read_au(path: Path, rec: ImportRecord) -> tuple[np.ndarray, np.ndarray]:
    lines = read_lines(path)
    header = [c.strip() for c in lines[0].split(",")] if lines else []
    numbers = [au_number(c) for c in header]
    if not header or None in numbers:
        raise header_error(path, "the header of AU names (e.g. AU1,AU2,AU4,...)", lines)
    src, dst, dropped = au_columns_in_space(numbers)
    rec.note_names("au_columns_dropped", (f"AU{n}" for n in dropped))
    values = parse_numbers(path, lines[1:], 2, len(header))[:, src]
    au, mask, ok = binary_aus(values, dst)
    rec.mask("AU -1 (invalid) entries", int((values == AU_INVALID).sum()))
    rec.mask("AU value other than 0/1/-1 entries", int((~ok & (values != AU_INVALID)).sum()))
    return au, mask


def import_affwild2(root: str | Path, *, annotations: str | Path | None = None, frames_pattern: str = DEFAULT_FRAMES,
                    dataset: str = NAME, prefix: str = "") -> Manifest:
    """Import Aff-Wild2 (ABAW annotation files + ``cropped_aligned`` frames) from ``root``; see the module doc.

    ``annotations``: the folder holding the challenge folders (relative to ``root`` or absolute; default:
    found under ``root``); ``frames_pattern``: frame path relative to ``root`` with ``{video}`` and ``{frame}``.
    """
    root = Path(root)
    ann = find_annotations(root) if annotations is None else (root / annotations)
    if not ann.is_dir():
        raise ValueError(f"{ann}: annotation folder does not exist")
    pattern = FramePattern(frames_pattern, ["video"])
    rec = ImportRecord(NAME, dataset, root)
    builder = RowBuilder(rec, prefix)
    videos: dict[str, dict] = {}
    readers = {"va": _read_va, "expr": _read_expr, "au": _read_au}
    found_any = False
    for task, aliases in CHALLENGES.items():
        for alias in aliases:
            for split_dir, split in SPLIT_DIRS.items():
                folder = ann / alias / split_dir
                if not folder.is_dir():
                    continue
                found_any = True
                for path in sorted(folder.glob("*.txt")):
                    rec.source(path)
                    track = videos.setdefault(path.stem, {"splits": set()})
                    if task in track:
                        raise ValueError(f"{path}: video {path.stem!r} has a second {task} annotation file")
                    track["splits"].add(split)
                    track[task] = readers[task](path, rec)
    if not found_any:
        raise ValueError(f"{ann}: no Train_Set/Validation_Set folders under any challenge folder")
    index = FileIndex(root)
    conflicts = []
    for video in sorted(videos):
        track = videos[video]
        lengths = [len(track["expr"]) if "expr" in track else 0,
                   len(track["va"][0]) if "va" in track else 0,
                   len(track["au"][0]) if "au" in track else 0]
        n = max(lengths)
        expr = np.full(n, MISSING, np.int64)
        va = np.zeros((n, 2), np.float32)
        va_mask = np.zeros(n, bool)
        au = np.zeros((n, NUM_AUS), np.uint8)
        au_mask = np.zeros((n, NUM_AUS), bool)
        if "expr" in track:
            expr[: lengths[0]] = track["expr"]
        if "va" in track:
            va[: lengths[1]], va_mask[: lengths[1]] = track["va"]
        if "au" in track:
            au[: lengths[2]], au_mask[: lengths[2]] = track["au"]
        split = "val" if len(track["splits"]) > 1 else next(iter(track["splits"]))
        if len(track["splits"]) > 1:
            conflicts.append(video)
        valid = (expr != MISSING) | va_mask | au_mask.any(1)
        rec.drop("line with only invalid markers", int((~valid).sum()))
        rows = np.flatnonzero(valid)
        # line i (1-based) <-> frame i
        found, paths = pattern.locate(index, rows + 1, rec, "frame image missing (no face crop)", video=video)
        rows = rows[found]
        builder.add(paths, split, expr=expr[rows], va=va[rows], va_mask=va_mask[rows], au=au[rows],
                    au_mask=au_mask[rows])
    if conflicts:
        rec.notes["videos_in_two_splits_moved_to_val"] = conflicts
    rec.notes["videos"] = len(videos)
    return builder.build()


def _add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p, NAME)
    p.add_argument("--annotations", default=None,
                   help="folder holding VA_Estimation_Challenge/ etc. (relative to ROOT; default: found)")
    p.add_argument("--frames-pattern", default=DEFAULT_FRAMES,
                   help=f"frame path relative to ROOT with {{video}} and {{frame}} (default {DEFAULT_FRAMES})")


IMPORTER = Importer(
    name=NAME,
    help="Aff-Wild2 (ABAW): per-video VA / EXPR / AU annotation files and cropped_aligned frames",
    run=import_affwild2,
    add_arguments=_add_arguments,
    options=lambda a: {"annotations": a.annotations, "frames_pattern": a.frames_pattern, **common_options(a)},
)
