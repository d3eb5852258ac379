"""BP4D importer: AU occurrence per video frame from the AU-coding CSV files.

Follows the layout of BP4D-Spontaneous (Zhang et al., "BP4D-Spontaneous: a high-resolution spontaneous 3D
dynamic facial expression database", Image and Vision Computing 2014) as released for FERA 2015 and read by
public loaders of its files (e.g. the FERA 2015 baseline, TadasBaltrusaitis/FERA-2015):

* ``AUCoding/AU_OCC/<subject>_<task>.csv`` for subjects ``F001``…``F023``, ``M001``…``M018`` and tasks
  ``T1``…``T8``; the first row is a header whose cells after the first are AU numbers; each further row is
  a frame number (first column) and one occurrence code per AU: 1 present, 0 absent, 9 not coded;
* the 2-D frames as ``BP4D-training/<subject>/<task>/<frame>.jpg``.

Every column that is one of our 17 AUs is read (the usual 12 are 1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24;
columns outside our 17 are listed in the notes); 9 leaves that AU unannotated on that frame, as does any code
other than 0/1 (counted). ``frames_pattern`` (fields ``{subject}``, ``{task}``, ``{frame}``) places the frames;
zero padding need not match. Labelled frames with no image on disk are dropped and counted.

Splits: every subject is ``train`` unless listed in ``val_subjects``/``test_subjects``; ``split_preset="fera2015"``
uses the FERA 2015 partition of BP4D's subjects instead (its training subjects -> ``train``, its development
subjects -> ``val``), as listed in the FERA 2015 baseline code.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

from ..manifest import Manifest
from ._common import (
    FileIndex,
    FramePattern,
    Importer,
    ImportRecord,
    RowBuilder,
    add_common_arguments,
    add_subject_arguments,
    au_columns_in_space,
    au_number,
    binary_aus,
    common_options,
    frame_numbers,
    header_error,
    parse_numbers,
    read_lines,
    subject_options,
    subject_splits,
)

NAME = "bp4d"
DEFAULT_FRAMES = "BP4D-training/{subject}/{task}/{frame}.jpg"
UNKNOWN = 9
_FILE = re.compile(r"^(?P<subject>[^_]+)_(?P<task>[^_.]+)\.csv$", re.IGNORECASE)
FERA2015_TRAIN = ("F001", "F003", "F005", "F007", "F009", "F011", "F013", "F015", "F017", "F019", "F021", "F023",
                  "M001", "M003", "M005", "M007", "M009", "M011", "M013", "M015", "M017")
FERA2015_DEVEL = ("F002", "F004", "F006", "F008", "F010", "F012", "F014", "F016", "F018", "F020", "F022",
                  "M002", "M004", "M006", "M008", "M010", "M012", "M014", "M016", "M018")
PRESETS = ("none", "fera2015")


def _read_csv(path: Path, rec: ImportRecord) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lines = read_lines(path)
    header = [c.strip() for c in lines[0].split(",")] if lines else []
    numbers = [au_number(c) for c in header[1:]]
    if len(header) < 2 or None in numbers:
        raise header_error(path, "a header of AU numbers after the frame column", lines)
    src, dst, dropped = au_columns_in_space(numbers)
    rec.note_names("au_columns_dropped", (f"AU{n}" for n in dropped))
    table = parse_numbers(path, lines[1:], 2, len(header))
    frames = frame_numbers(path, table[:, 0], 2)
    values = table[:, 1:][:, src]
    au, mask, ok = binary_aus(values, dst)
    rec.mask("AU 9 (not coded) entries", int((values == UNKNOWN).sum()))
    rec.mask("AU code other than 0/1/9 entries", int((~ok & (values != UNKNOWN)).sum()))
    return frames, au, mask


def import_bp4d(root: str | Path, *, labels: str = "AUCoding/AU_OCC", frames_pattern: str = DEFAULT_FRAMES,
                split_preset: str = "none", val_subjects: list[str] | tuple[str, ...] = (),
                test_subjects: list[str] | tuple[str, ...] = (), dataset: str = NAME, prefix: str = "") -> Manifest:
    """Import BP4D from ``root``: occurrence CSVs in ``labels``, frames by ``frames_pattern``; see the module doc."""
    root = Path(root)
    label_dir = root / labels
    if not label_dir.is_dir():
        raise ValueError(f"{label_dir}: no BP4D AU occurrence folder (expected {labels}/<subject>_<task>.csv)")
    if split_preset not in PRESETS:
        raise ValueError(f"split_preset {split_preset!r} is not one of {PRESETS}")
    pattern = FramePattern(frames_pattern, ["subject", "task"])
    files = []
    for path in sorted(label_dir.glob("*.csv")):
        m = _FILE.match(path.name)
        if m:
            files.append((m.group("subject"), m.group("task"), path))
    if not files:
        raise ValueError(f"{label_dir}: no <subject>_<task>.csv files")
    subjects = sorted({s for s, _, _ in files})
    if split_preset == "fera2015":
        if val_subjects or test_subjects:
            raise ValueError("give either split_preset or val_subjects/test_subjects, not both")
        val_subjects = [s for s in subjects if s in FERA2015_DEVEL]
        test_subjects = []
    splits = subject_splits(subjects, val_subjects, test_subjects, "val_subjects/test_subjects")
    rec = ImportRecord(NAME, dataset, root)
    rec.notes.update({"frames_pattern": frames_pattern, "split_preset": split_preset})
    if split_preset == "fera2015":
        rec.notes["subjects_outside_fera2015"] = [s for s in subjects if s not in FERA2015_TRAIN + FERA2015_DEVEL]
    builder = RowBuilder(rec, prefix)
    index = FileIndex(root)
    for subject, task, path in files:
        rec.source(path)
        frames, au, mask = _read_csv(path, rec)
        labelled = mask.any(1)
        rec.drop("frame with every AU not coded", int((~labelled).sum()))
        frames, au, mask = frames[labelled], au[labelled], mask[labelled]
        found, paths = pattern.locate(index, frames, rec, subject=subject, task=task)
        builder.add(paths, splits[subject], au=au[found], au_mask=mask[found])
    return builder.build(dedupe=True)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p, NAME)
    p.add_argument("--labels", default="AUCoding/AU_OCC", help="occurrence CSV folder relative to ROOT")
    p.add_argument("--frames-pattern", default=DEFAULT_FRAMES,
                   help=f"frame path relative to ROOT with {{subject}}, {{task}}, {{frame}} (default {DEFAULT_FRAMES})")
    p.add_argument("--split-preset", default="none", choices=PRESETS,
                   help="fera2015: FERA 2015 training subjects -> train, development subjects -> val")
    add_subject_arguments(p)


IMPORTER = Importer(
    name=NAME,
    help="BP4D: AUCoding/AU_OCC/<subject>_<task>.csv occurrence codes (9 = not coded) + frames",
    run=import_bp4d,
    add_arguments=_add_arguments,
    options=lambda a: {"labels": a.labels, "frames_pattern": a.frames_pattern, "split_preset": a.split_preset,
                       **subject_options(a), **common_options(a)},
)
