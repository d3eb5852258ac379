"""DISFA importer: 12 AUs per video frame from the per-subject, per-AU intensity files.

Follows the layout of the DISFA distribution (Mavadati, Mahoor, Bartlett, Trinh & Cohn, "DISFA: A
Spontaneous Facial Action Intensity Database", IEEE TAC 2013; mohammadmahoor.com/disfa/) as read by public
loaders of its files:

* ``ActionUnit_Labels/<subject>/<subject>_au<k>.txt`` for subjects ``SN001``…``SN032`` and the 12 AUs
  1, 2, 4, 5, 6, 9, 12, 15, 17, 20, 25, 26; one ``<frame>,<intensity>`` line per video frame (frames
  numbered from 1, 4,845 per video), intensity 0–5 on the FACS A–E scale;
* videos ``Videos_LeftCamera/LeftVideo<subject>_comp.avi`` (and the right camera), not frames.

An AU is active at intensity ≥ 2 (the convention of the AU-detection literature and of docs/method.md §6);
``threshold`` changes it. An intensity outside 0–5 leaves that AU unannotated on that frame (counted).
An AU file outside our 17 AUs is ignored and listed in the notes.

Frames: DISFA ships videos, so frames are extracted by the user. **Our convention**: the left camera's
frames as ``frames/LeftCamera/<subject>/<frame:05d>.jpg``, numbered from 1 like the label files — which is
what ``ffmpeg -i Videos_LeftCamera/LeftVideoSN001_comp.avi frames/LeftCamera/SN001/%05d.jpg`` writes
(ffmpeg's image numbering starts at 1). ``frames_pattern`` (fields ``{subject}``, ``{frame}``) and
``frame_offset`` (added to the label's frame number, e.g. -1 for frames extracted from 0) adapt it; zero
padding need not match. Labelled frames with no image on disk are dropped and counted. DISFA has no official
split: every subject is ``train`` unless listed in ``val_subjects``/``test_subjects`` (subject-exclusive).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

from ...labels import NUM_AUS, au_index
from ..manifest import Manifest
from ._common import (
    FileIndex,
    FramePattern,
    Importer,
    ImportRecord,
    RowBuilder,
    add_common_arguments,
    add_subject_arguments,
    common_options,
    frame_numbers,
    parse_numbers,
    read_lines,
    subject_options,
    subject_splits,
)

NAME = "disfa"
DEFAULT_FRAMES = "frames/LeftCamera/{subject}/{frame:05d}.jpg"
ACTIVE_AT = 2
MAX_INTENSITY = 5
_AU_FILE = re.compile(r"^(?P<subject>.+)_au(?P<au>\d+)\.txt$", re.IGNORECASE)


def _read_subject(folder: Path, rec: ImportRecord, threshold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(frame numbers, au N×17, au_mask N×17) of one subject, merged over its AU files by frame number."""
    per_au: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for path in sorted(folder.iterdir()):
        m = _AU_FILE.match(path.name)
        if not m:
            continue
        number = int(m.group("au"))
        try:
            k = au_index(number)
        except ValueError:
            rec.note_names("au_files_ignored", [f"AU{number}"])
            continue
        lines = read_lines(path)
        sep = "," if lines and "," in lines[0] else None
        table = parse_numbers(path, lines, 1, 2, sep=sep)
        frames, intensity = frame_numbers(path, table[:, 0], 1), table[:, 1]
        if len(np.unique(frames)) != len(frames):
            raise ValueError(f"{path}: a frame number appears on two lines")
        rec.source(path)
        per_au[k] = (frames, intensity)
    if not per_au:
        return np.zeros(0, np.int64), np.zeros((0, NUM_AUS), np.uint8), np.zeros((0, NUM_AUS), bool)
    frames = np.unique(np.concatenate([f for f, _ in per_au.values()]))
    au = np.zeros((len(frames), NUM_AUS), np.uint8)
    mask = np.zeros((len(frames), NUM_AUS), bool)
    for k, (f, intensity) in per_au.items():
        rows = np.searchsorted(frames, f)
        ok = (intensity >= 0) & (intensity <= MAX_INTENSITY) & (intensity == np.round(intensity))
        rec.mask("AU intensity outside 0..5 entries", int((~ok).sum()))
        au[rows[ok], k] = intensity[ok] >= threshold
        mask[rows[ok], k] = True
    return frames, au, mask


def import_disfa(root: str | Path, *, labels: str = "ActionUnit_Labels", frames_pattern: str = DEFAULT_FRAMES,
                 frame_offset: int = 0, threshold: int = ACTIVE_AT, val_subjects: list[str] | tuple[str, ...] = (),
                 test_subjects: list[str] | tuple[str, ...] = (), dataset: str = NAME, prefix: str = "") -> Manifest:
    """Import DISFA from ``root``: ``labels`` folder of per-subject AU files, frames by ``frames_pattern``."""
    root = Path(root)
    label_dir = root / labels
    if not label_dir.is_dir():
        raise ValueError(f"{label_dir}: no DISFA label folder (expected {labels}/<subject>/<subject>_au<k>.txt)")
    if not 1 <= threshold <= MAX_INTENSITY:
        raise ValueError(f"threshold {threshold} is outside 1..{MAX_INTENSITY}")
    pattern = FramePattern(frames_pattern, ["subject"])
    subjects = sorted(p.name for p in label_dir.iterdir() if p.is_dir())
    if not subjects:
        raise ValueError(f"{label_dir}: no subject folders")
    splits = subject_splits(subjects, val_subjects, test_subjects, "val_subjects/test_subjects")
    rec = ImportRecord(NAME, dataset, root)
    rec.notes.update({"active_at_intensity": threshold, "frames_pattern": frames_pattern, "frame_offset": frame_offset})
    builder = RowBuilder(rec, prefix)
    index = FileIndex(root)
    for subject in subjects:
        frames, au, mask = _read_subject(label_dir / subject, rec, threshold)
        if not len(frames):
            rec.notes.setdefault("subjects_without_au_files", []).append(subject)
            continue
        found, paths = pattern.locate(index, frames + frame_offset, rec, subject=subject)
        builder.add(paths, splits[subject], au=au[found], au_mask=mask[found])
    return builder.build()


def _add_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p, NAME)
    p.add_argument("--labels", default="ActionUnit_Labels", help="label folder relative to ROOT")
    p.add_argument("--frames-pattern", default=DEFAULT_FRAMES,
                   help=f"frame path relative to ROOT with {{subject}} and {{frame}} (default {DEFAULT_FRAMES})")
    p.add_argument("--frame-offset", type=int, default=0,
                   help="added to the label frame number to get the image's number (e.g. -1 for 0-based frames)")
    p.add_argument("--threshold", type=int, default=ACTIVE_AT, help="intensity at which an AU is active (default 2)")
    add_subject_arguments(p)


IMPORTER = Importer(
    name=NAME,
    help="DISFA: ActionUnit_Labels/<subject>/<subject>_au<k>.txt intensities (active at >= 2) + extracted frames",
    run=import_disfa,
    add_arguments=_add_arguments,
    options=lambda a: {"labels": a.labels, "frames_pattern": a.frames_pattern, "frame_offset": a.frame_offset,
                       "threshold": a.threshold, **subject_options(a), **common_options(a)},
)
