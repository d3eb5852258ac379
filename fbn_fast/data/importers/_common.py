"""Shared machinery of the corpus importers.

Every importer reads a corpus in its published layout and hands rows to a :class:`RowBuilder`, which
turns them into a :class:`~fbn_fast.data.manifest.Manifest`. Nothing is skipped silently: a row that is
not imported is counted under a reason with :meth:`ImportRecord.drop`, a label removed from a row that is
kept is counted with :meth:`ImportRecord.mask`; both tallies end up in ``manifest.meta["imports"]`` and in
the import's log lines. Structural damage (a missing header, a line that does not parse, a file that is not
UTF-8 text, a class code that is not an integer) is a ``ValueError`` naming the file and the line instead;
messages quote at most the first :data:`QUOTE_CHARS` characters of a cell or line.
"""

from __future__ import annotations

import argparse
import logging
import os
import posixpath
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...labels import AU_NUMBERS, MISSING, NUM_AUS
from ..manifest import SPLITS, Manifest, label_problems

log = logging.getLogger("fbn_fast.data.importers")
QUOTE_CHARS = 80  # longest piece of a file quoted in a message (an AffectNet landmark cell is ~700 characters)


def quote(text: object, limit: int = QUOTE_CHARS) -> str:
    """``repr`` of ``text`` cut to its first ``limit`` characters (``…`` and the full length when cut)."""
    text = str(text)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text)} characters)"


@dataclass(frozen=True)
class Importer:
    """One ``python -m fbn_fast.data import <name>`` command."""

    name: str
    help: str
    run: Callable[..., Manifest]  # run(root, **options) -> Manifest
    add_arguments: Callable[[argparse.ArgumentParser], None]
    options: Callable[[argparse.Namespace], dict]  # parsed CLI arguments -> keyword arguments of run


# ---------------------------------------------------------------------------------------------- the record
@dataclass
class ImportRecord:
    """What one import read, and every row or label it left out, by reason."""

    corpus: str
    dataset: str
    root: Path
    dropped: Counter = field(default_factory=Counter)
    masked: Counter = field(default_factory=Counter)
    notes: dict = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)

    def drop(self, reason: str, n: int = 1) -> None:
        """``n`` rows (images, frames or lines) are not imported because of ``reason``."""
        if n:
            self.dropped[reason] += int(n)

    def mask(self, reason: str, n: int = 1) -> None:
        """``n`` labels are removed from rows that are kept, because of ``reason``."""
        if n:
            self.masked[reason] += int(n)

    def note_names(self, key: str, names: Iterable[str]) -> None:
        """Add ``names`` to the sorted list ``notes[key]`` (what was passed over, gathered over every file)."""
        names = set(names)
        if names:
            self.notes[key] = sorted(set(self.notes.get(key, [])) | names)

    def source(self, path: Path) -> None:
        self.sources.append(relative_to(path, self.root))

    def as_meta(self, rows: int, per_split: dict[str, int]) -> dict:
        return {
            "corpus": self.corpus,
            "dataset": self.dataset,
            "root": os.path.abspath(self.root),
            "sources": self.sources,
            "rows": rows,
            "rows_per_split": per_split,
            "dropped": dict(sorted(self.dropped.items())),
            "masked": dict(sorted(self.masked.items())),
            **({"notes": self.notes} if self.notes else {}),
        }


def relative_to(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(path).as_posix()


def _tally(counts: Counter) -> str:
    return ", ".join(f"{why}: {n}" for why, n in sorted(counts.items())) or "none"


# ---------------------------------------------------------------------------------------------- the builder
def manifest_root(corpus_root: Path, prefix: str) -> str | None:
    """The folder a manifest's paths are relative to: the corpus folder, or with ``prefix`` the folder that
    holds it under that name (``/data/faces`` for ``/data/faces/AffectNet`` and prefix ``AffectNet``);
    None when ``prefix`` is not the end of the corpus folder's path."""
    root = Path(os.path.abspath(corpus_root))
    parts = Path(prefix).parts if prefix else ()
    if not parts:
        return str(root)
    if root.parts[-len(parts):] == parts and len(root.parts) > len(parts):
        return str(Path(*root.parts[:-len(parts)]))
    return None


class RowBuilder:
    """Accumulates rows in chunks (one chunk per file, video or subject) and builds the manifest."""

    def __init__(self, record: ImportRecord, prefix: str = "") -> None:
        self.record = record
        self.prefix = prefix.strip("/")
        self._chunks: list[dict] = []

    def add(self, paths: list[str], split: str | np.ndarray, *, expr=None, au=None, au_mask=None, va=None,
            va_mask=None, box=None, compound=None) -> None:
        """Add ``len(paths)`` rows; label arrays follow :meth:`Manifest.from_columns` (absent = missing).

        A value that would not survive storage (see :func:`~fbn_fast.data.manifest.label_problems`: a NaN AU
        or VA whose annotated flag is set, a class code such as 3.7 or 255) is a ``ValueError`` naming the row's
        image: the corpus parsers mask invalid markers before they get here, so this is never silent.
        """
        n = len(paths)
        if not n:
            return
        if va_mask is None:
            va_mask = np.zeros(n, bool) if va is None else np.isfinite(np.asarray(va, np.float64)).all(1)
        problems = label_problems(paths, expr=expr, au=au, au_mask=au_mask, va=va, va_mask=va_mask,
                                  compound=compound)
        if problems:
            r, why, value = problems[0]
            raise ValueError(f"{self.record.corpus}: {len(problems)} label values cannot be stored, first: "
                             f"{paths[r]!r}: {why}: {value}")
        chunk = {
            "paths": list(paths),
            "split": np.full(n, split, dtype=object) if isinstance(split, str) else np.asarray(split, object),
            "expr": np.full(n, MISSING, np.int8) if expr is None else np.asarray(expr).astype(np.int8),
            "au": np.zeros((n, NUM_AUS), np.uint8) if au is None else np.nan_to_num(np.asarray(au)).astype(np.uint8),
            "au_mask": np.zeros((n, NUM_AUS), bool) if au_mask is None else np.asarray(au_mask, bool),
            "va": np.zeros((n, 2), np.float32) if va is None else np.nan_to_num(np.asarray(va, np.float32)),
            "box": np.full((n, 4), np.nan, np.float32) if box is None else np.asarray(box, np.float32),
            "compound": np.full(n, MISSING, np.int8) if compound is None else np.asarray(compound).astype(np.int8),
            "va_mask": np.asarray(va_mask, bool),
        }
        self._chunks.append(chunk)

    def build(self, dedupe: bool = False) -> Manifest:
        """The manifest of every row added; rows with no label at all are dropped (and counted).

        ``dedupe``: keep only the first row of each path (counted as "duplicate image").
        """
        rec = self.record
        keys = ("split", "expr", "au", "au_mask", "va", "va_mask", "box", "compound")
        paths = [p for c in self._chunks for p in c["paths"]]
        if self._chunks:
            cols = {k: np.concatenate([c[k] for c in self._chunks]) for k in keys}
        else:
            cols = {"split": np.zeros(0, object), "expr": np.zeros(0, np.int8),
                    "au": np.zeros((0, NUM_AUS), np.uint8), "au_mask": np.zeros((0, NUM_AUS), bool),
                    "va": np.zeros((0, 2), np.float32), "va_mask": np.zeros(0, bool),
                    "box": np.zeros((0, 4), np.float32), "compound": np.zeros(0, np.int8)}
        keep = (cols["expr"] != MISSING) | cols["au_mask"].any(1) | cols["va_mask"] | (cols["compound"] != MISSING)
        rec.drop("no label left", int((~keep).sum()))
        if dedupe:
            seen: set[str] = set()
            for i, p in enumerate(paths):
                if not keep[i]:
                    continue
                if p in seen:
                    keep[i] = False
                    rec.drop("duplicate image")
                seen.add(p)
        idx = np.flatnonzero(keep)
        cols = {k: v[idx] for k, v in cols.items()}
        paths = [paths[i] for i in idx.tolist()]
        if self.prefix:
            paths = [f"{self.prefix}/{p}" for p in paths]
        # Annotated AUs only carry 0/1; unannotated entries are stored as 0 so that no stray value survives.
        cols["au"] = np.where(cols["au_mask"], cols["au"], 0).astype(np.uint8)
        split = cols.pop("split")
        per_split = {s: int((split == s).sum()) for s in SPLITS if (split == s).any()}
        meta = {"imports": [rec.as_meta(len(paths), per_split)]}
        root = manifest_root(rec.root, self.prefix)
        if root is None:
            log.warning("%s: --prefix %r is not the end of the corpus folder %s, so the manifest records no image "
                        "root; training then needs --data-root (the folder that holds %s/)", rec.corpus,
                        self.prefix, os.path.abspath(rec.root), self.prefix)
        m = Manifest.from_columns(paths, rec.dataset, split=split.astype(str) if len(split) else "train",
                                  meta=meta, root=root, **cols)
        log.info("%s: %d rows into dataset %r from %s (%s)", rec.corpus, len(m), rec.dataset, rec.root,
                 ", ".join(f"{s} {n}" for s, n in per_split.items()) or "no rows")
        log.info("%s: rows left out: %s", rec.corpus, _tally(rec.dropped))
        log.info("%s: labels masked: %s", rec.corpus, _tally(rec.masked))
        if rec.notes:
            log.info("%s: notes: %s", rec.corpus, rec.notes)
        if not len(m):
            log.warning("%s: no rows were imported from %s; check the layout and the options", rec.corpus, rec.root)
        return m


# ---------------------------------------------------------------------------------------------- files
class FileIndex:
    """Finds files under a root with one directory listing per directory (no stat per frame).

    A name whose stem is a number also matches a file with the same number written with other zero
    padding (``{frame}`` finds ``00042.jpg``), since frame-extraction tools differ in padding.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._names: dict[str, frozenset[str]] = {}
        self._numbered: dict[str, dict[tuple[int, str], str]] = {}

    def _listing(self, reldir: str) -> frozenset[str]:
        names = self._names.get(reldir)
        if names is None:
            try:
                names = frozenset(e.name for e in os.scandir(self.root / reldir) if not e.is_dir())
            except (FileNotFoundError, NotADirectoryError):
                names = frozenset()
            self._names[reldir] = names
        return names

    def _by_number(self, reldir: str) -> dict[tuple[int, str], str]:
        """(number, suffix) -> file name, built on the first miss in a directory."""
        numbered = self._numbered.get(reldir)
        if numbered is None:
            numbered = {}
            for name in self._listing(reldir):
                stem, dot, ext = name.rpartition(".")
                stem, ext = (stem, "." + ext.lower()) if dot else (name, "")
                if stem.isdigit():
                    numbered.setdefault((int(stem), ext), name)
            self._numbered[reldir] = numbered
        return numbered

    def find(self, rel: str) -> str | None:
        """``rel`` itself if it exists, the same frame number with other padding if that exists, else None."""
        reldir, _, name = rel.rpartition("/")
        if name in self._listing(reldir):
            return rel
        stem, dot, ext = name.rpartition(".")
        stem, ext = (stem, "." + ext.lower()) if dot else (name, "")
        if stem.isdigit():
            hit = self._by_number(reldir).get((int(stem), ext))
            if hit is not None:
                return f"{reldir}/{hit}" if reldir else hit
        return None


def find_image(index: FileIndex | None, rel: str, rec: ImportRecord, reason: str = "image missing") -> str | None:
    """Image ``rel`` as found on disk (see :meth:`FileIndex.find`), ``rel`` itself when files are not checked (no
    ``index``), or None when it is missing: its row is then dropped, counted under ``reason``."""
    if index is None:
        return rel
    found = index.find(rel)
    if found is None:
        rec.drop(reason)
    return found


class FramePattern:
    """A frame path pattern such as ``frames/{subject}/{frame:05d}.jpg`` (relative to the corpus root)."""

    def __init__(self, pattern: str, fields: Iterable[str], option: str = "--frames-pattern") -> None:
        allowed = set(fields) | {"frame"}
        used = {f for _, f, _, _ in string.Formatter().parse(pattern) if f is not None}
        if "frame" not in used or "{frame" not in posixpath.basename(pattern):
            raise ValueError(f"{option} {pattern!r} must hold {{frame}} in its file name")
        unknown = used - allowed
        if unknown or "" in used:
            raise ValueError(f"{option} {pattern!r}: unknown fields {sorted(unknown | ({''} & used))}; "
                             f"it may use {sorted(allowed)}")
        if Path(pattern).is_absolute() or ".." in Path(pattern).parts:
            raise ValueError(f"{option} {pattern!r} must be relative to the corpus root")
        self.pattern = pattern

    def locate(self, index: FileIndex, frames: np.ndarray, rec: ImportRecord, reason: str = "frame image missing",
               **values: str) -> tuple[np.ndarray, list[str]]:
        """For each frame number: found on disk?, and the relative paths of those found; the frames not found are
        dropped, counted under ``reason``."""
        found = np.zeros(len(frames), bool)
        paths: list[str] = []
        fmt = self.pattern.format
        for i, frame in enumerate(frames.tolist()):
            hit = index.find(fmt(frame=frame, **values))
            if hit is not None:
                found[i] = True
                paths.append(hit)
        rec.drop(reason, int((~found).sum()))
        return found, paths


# ---------------------------------------------------------------------------------------------- text
def read_text(path: Path) -> str:
    """The text of an annotation file (UTF-8, a BOM tolerated); a binary or otherwise undecodable file is a
    ``ValueError`` naming it (e.g. an ``.xlsx`` that was renamed instead of saved as CSV)."""
    data = Path(path).read_bytes()
    if b"\x00" in data[:65536]:
        raise ValueError(f"{path}: binary content (NUL bytes), not a text annotation file; a spreadsheet must be "
                         "saved as CSV")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ValueError(f"{path}: line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                         "save the file as UTF-8") from None


def read_lines(path: Path) -> list[str]:
    """Lines of a text file (see :func:`read_text`) without line ends; trailing blank lines removed."""
    lines = read_text(path).splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def parse_numbers(path: Path, lines: list[str], first_line: int, columns: int, sep: str | None = ",",
                  dtype=np.float64) -> np.ndarray:
    """``lines`` as a (len, columns) array; a line that does not parse raises naming file and line number.

    ``first_line`` is the 1-based line number of ``lines[0]`` in the file (for messages).
    """
    if not lines:
        return np.zeros((0, columns), dtype)
    if sep:
        shape_ok = all(line.count(sep) == columns - 1 for line in lines)
        text = " ".join(lines).replace(sep, " ")
    else:
        shape_ok = all(len(line.split()) == columns for line in lines)
        text = " ".join(lines)
    if shape_ok:  # fast path: one split and one conversion for the whole file
        try:
            flat = np.array(text.split(), dtype=dtype)
            if flat.size == len(lines) * columns:
                return flat.reshape(len(lines), columns)
        except ValueError:
            pass
    # Slow path, only to name the first bad line.
    for j, line in enumerate(lines):
        cells = line.split(sep) if sep else line.split()
        try:
            if len(cells) != columns:
                raise ValueError
            np.array([c.strip() for c in cells], dtype=dtype)
        except ValueError:
            raise ValueError(f"{path}: line {first_line + j}: expected {columns} numbers separated by "
                             f"{sep or 'spaces'!r}, got {quote(line)}") from None
    raise ValueError(f"{path}: could not parse the numbers")  # unreachable: some line must have failed


def au_number(name: str) -> int | None:
    """FACS number of an AU column name (``AU12``, ``'AU 12'``, ``au_12``, ``12``), or None if it is not one."""
    m = re.fullmatch(r"(?:AU)?[\s_]*0*(\d+)", name.strip().strip("'\"").strip(), flags=re.IGNORECASE)
    return int(m.group(1)) if m else None


def frame_numbers(path: Path, frames: np.ndarray, first_line: int) -> np.ndarray:
    """``frames`` as integers; one that is not a non-negative integer is a ``ValueError`` naming its line
    (``first_line``: the 1-based line number of ``frames[0]`` in ``path``)."""
    bad = (frames != np.round(frames)) | (frames < 0)
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{path}: line {j + first_line}: frame number {frames[j]} is not a non-negative integer")
    return frames.astype(np.int64)


def binary_aus(values: np.ndarray, dst: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(au N×17, au_mask N×17, ok) of occurrence codes ``values`` (N × len(dst)) whose columns are the canonical AU
    positions ``dst``: a 0 or 1 is a label (``ok``), any other code leaves that AU unannotated."""
    ok = (values == 0) | (values == 1)
    au = np.zeros((len(values), NUM_AUS), np.uint8)
    mask = np.zeros((len(values), NUM_AUS), bool)
    au[:, dst] = np.where(ok, values, 0).astype(np.uint8)
    mask[:, dst] = ok
    return au, mask, ok


def au_columns_in_space(numbers: list[int]) -> tuple[list[int], list[int], list[int]]:
    """(positions in the file, canonical AU positions, AU numbers outside the label space) for AU numbers."""
    src, dst, dropped = [], [], []
    for j, n in enumerate(numbers):
        if n in AU_NUMBERS:
            src.append(j)
            dst.append(AU_NUMBERS.index(n))
        else:
            dropped.append(n)
    return src, dst, dropped


def subject_splits(subjects: Iterable[str], val: Iterable[str] = (), test: Iterable[str] = (),
                   option: str = "subjects") -> dict[str, str]:
    """Split of each subject: ``val``/``test`` lists (subject-exclusive), the rest ``train``."""
    subjects = list(subjects)
    val, test = set(val), set(test)
    both = val & test
    if both:
        raise ValueError(f"subjects {sorted(both)} are given for both val and test")
    unknown = (val | test) - set(subjects)
    if unknown:
        raise ValueError(f"{option}: {sorted(unknown)} are not among the corpus's subjects {subjects}")
    return {s: "val" if s in val else "test" if s in test else "train" for s in subjects}


def comma_list(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def add_common_arguments(p: argparse.ArgumentParser, dataset: str) -> None:
    """The options of every importer: ``--dataset``, ``--prefix`` (read back by :func:`common_options`)."""
    p.add_argument("--dataset", default=dataset, help=f"dataset name in the manifest (default {dataset})")
    p.add_argument("--prefix", default="",
                   help="folder prepended to every path, so that manifests of several corpora share one root")


def common_options(a: argparse.Namespace) -> dict:
    """The keyword arguments of :func:`add_common_arguments`' options."""
    return {"dataset": a.dataset, "prefix": a.prefix}


def add_subject_arguments(p: argparse.ArgumentParser) -> None:
    """``--val-subjects``, ``--test-subjects`` of the corpora split by subject (read back by
    :func:`subject_options`)."""
    p.add_argument("--val-subjects", default="", help="comma-separated subjects for the val split")
    p.add_argument("--test-subjects", default="", help="comma-separated subjects for the test split")


def subject_options(a: argparse.Namespace) -> dict:
    """The keyword arguments of :func:`add_subject_arguments`' options (lists of subjects)."""
    return {"val_subjects": comma_list(a.val_subjects), "test_subjects": comma_list(a.test_subjects)}


def header_error(path: Path, expected: str, lines: list[str]) -> ValueError:
    """The error for a first line that is not the header a file needs (the line quoted, cut short)."""
    got = quote(lines[0]) if lines else "an empty file"
    return ValueError(f"{path}: line 1: expected {expected}, got {got}")


__all__ = ["QUOTE_CHARS", "FileIndex", "FramePattern", "ImportRecord", "Importer", "RowBuilder",
           "add_common_arguments", "add_subject_arguments", "au_columns_in_space", "au_number", "binary_aus",
           "comma_list", "common_options", "find_image", "frame_numbers", "header_error", "manifest_root",
           "parse_numbers", "quote", "read_lines", "read_text", "relative_to", "subject_options", "subject_splits"]
