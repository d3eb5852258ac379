"""The manifest: one record per face image across heterogeneous corpora, stored column by column.

A manifest file is an uncompressed ``.npz`` of flat numpy columns plus a JSON header (format version,
label names, dataset and split names), so millions of rows load in seconds without parsing text. Paths
are kept as one UTF-8 blob with offsets (compact, fast to load) and decoded on access.

Columns (N rows): ``dataset`` (int16 code into ``datasets``), ``split`` (int8 code into ``splits``),
``box`` (float32 N×4 face box x0, y0, x1, y1 in pixels; NaN where none), ``expr`` (int8, -1 missing),
``au`` (uint8 N×K, 0/1), ``au_mask`` (bool N×K), ``va`` (float32 N×2), ``va_mask`` (bool N),
``compound`` (int8, -1 missing: compound-expression id into :data:`fbn_fast.labels.COMPOUNDS`).
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from ..labels import AUS, EXPRESSIONS, MISSING

FORMAT = "fbn_fast.manifest/1"
SPLITS: tuple[str, ...] = ("train", "val", "test")
_COLUMNS = ("dataset", "split", "box", "expr", "au", "au_mask", "va", "va_mask", "compound")


def _encode_paths(paths) -> tuple[np.ndarray, np.ndarray]:
    encoded = [str(p).encode("utf-8") for p in paths]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets


@dataclass
class Manifest:
    """Columns of a manifest; build one with :meth:`from_columns`, persist with :meth:`save` / :func:`load_manifest`."""

    path_blob: np.ndarray
    path_offsets: np.ndarray
    dataset: np.ndarray
    split: np.ndarray
    box: np.ndarray
    expr: np.ndarray
    au: np.ndarray
    au_mask: np.ndarray
    va: np.ndarray
    va_mask: np.ndarray
    compound: np.ndarray
    datasets: tuple[str, ...]
    splits: tuple[str, ...] = SPLITS
    expressions: tuple[str, ...] = EXPRESSIONS
    aus: tuple[str, ...] = AUS
    meta: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_columns(
        cls,
        paths,
        dataset: str | np.ndarray,
        *,
        datasets: tuple[str, ...] | None = None,
        split: str | np.ndarray = "train",
        box: np.ndarray | None = None,
        expr: np.ndarray | None = None,
        au: np.ndarray | None = None,
        au_mask: np.ndarray | None = None,
        va: np.ndarray | None = None,
        va_mask: np.ndarray | None = None,
        compound: np.ndarray | None = None,
        meta: dict | None = None,
    ) -> Manifest:
        """Build a manifest from per-row arrays; absent tasks are all-missing.

        ``dataset``/``split`` are a single name for every row or an array of names; ``expr`` uses
        :data:`~fbn_fast.labels.MISSING` (-1) for unlabelled rows; ``va_mask`` defaults to "VA is finite".
        """
        n = len(paths)
        k = len(AUS)
        names = np.full(n, dataset, dtype=object) if isinstance(dataset, str) else np.asarray(dataset, dtype=object)
        datasets = tuple(datasets) if datasets is not None else tuple(dict.fromkeys(names.tolist()))
        index = {d: i for i, d in enumerate(datasets)}
        split_names = np.full(n, split, dtype=object) if isinstance(split, str) else np.asarray(split, dtype=object)
        for label, values, known in (("dataset", names, index), ("split", split_names, SPLITS)):
            unknown = set(values.tolist()) - set(known)
            if unknown:
                raise ValueError(f"{label} names {sorted(unknown)} are not among {list(known)}")
        blob, offsets = _encode_paths(paths)
        va_arr = np.zeros((n, 2), np.float32) if va is None else np.asarray(va, np.float32).reshape(n, 2)
        if va_mask is None:
            va_mask = np.zeros(n, bool) if va is None else np.isfinite(va_arr).all(1)
        return cls(
            path_blob=blob,
            path_offsets=offsets,
            dataset=np.array([index[d] for d in names.tolist()], dtype=np.int16),
            split=np.array([SPLITS.index(s) for s in split_names.tolist()], dtype=np.int8),
            box=np.full((n, 4), np.nan, np.float32) if box is None else np.asarray(box, np.float32).reshape(n, 4),
            expr=np.full(n, MISSING, np.int8) if expr is None else np.asarray(expr).astype(np.int8),
            au=np.zeros((n, k), np.uint8) if au is None else np.nan_to_num(np.asarray(au, np.float32)).astype(np.uint8),
            au_mask=np.zeros((n, k), bool) if au_mask is None else np.asarray(au_mask, bool).reshape(n, k),
            va=np.nan_to_num(va_arr),
            va_mask=np.asarray(va_mask, bool),
            compound=np.full(n, MISSING, np.int8) if compound is None else np.asarray(compound).astype(np.int8),
            datasets=datasets,
            meta=dict(meta or {}),
        )

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.dataset)

    def path(self, i: int) -> str:
        """Relative path of row ``i``."""
        a, b = self.path_offsets[i], self.path_offsets[i + 1]
        return self.path_blob[a:b].tobytes().decode("utf-8")

    @property
    def paths(self) -> np.ndarray:
        """All paths as a numpy array of ``str`` (decoded on each call: O(N))."""
        return np.array([self.path(i) for i in range(len(self))], dtype=object)

    @property
    def expr_mask(self) -> np.ndarray:
        return self.expr != MISSING

    def dataset_index(self, name: str) -> int:
        try:
            return self.datasets.index(name)
        except ValueError:
            raise ValueError(f"dataset {name!r} is not in this manifest; it has {list(self.datasets)}") from None

    def tasks(self, dataset: str | int) -> dict[str, object]:
        """Which tasks a dataset labels: ``{"expr": bool, "au": [AU names annotated], "va": bool}``."""
        d = self.dataset_index(dataset) if isinstance(dataset, str) else dataset
        rows = self.dataset == d
        annotated = self.au_mask[rows].any(0)
        return {
            "expr": bool(self.expr_mask[rows].any()),
            "au": [a for a, on in zip(self.aus, annotated) if on],
            "va": bool(self.va_mask[rows].any()),
            "compound": bool((self.compound[rows] != MISSING).any()),
        }

    def select(self, rows: np.ndarray) -> Manifest:
        """A new manifest holding ``rows`` (a boolean mask or indices), in that order."""
        idx = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows, dtype=np.int64)
        starts, ends = self.path_offsets[idx], self.path_offsets[idx + 1]
        lengths = ends - starts
        offsets = np.zeros(len(idx) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # Gather every selected byte at once: position j of the new blob reads old byte starts[r] + (j - offsets[r]).
        owner = np.repeat(np.arange(len(idx)), lengths)
        blob = self.path_blob[starts[owner] + (np.arange(offsets[-1]) - offsets[owner])] if len(owner) else \
            np.zeros(0, np.uint8)
        cols = {c: getattr(self, c)[idx] for c in _COLUMNS}
        return Manifest(blob, offsets, **cols, datasets=self.datasets, splits=self.splits,
                        expressions=self.expressions, aus=self.aus, meta=dict(self.meta))

    def split_rows(self, split: str) -> np.ndarray:
        if split not in self.splits:
            raise ValueError(f"split {split!r} is not among {list(self.splits)}")
        return self.split == self.splits.index(split)

    @staticmethod
    def concat(parts: list[Manifest]) -> Manifest:
        """Rows of ``parts`` one after another; dataset codes are merged by name."""
        if not parts:
            raise ValueError("concat needs at least one manifest")
        datasets = tuple(dict.fromkeys(d for p in parts for d in p.datasets))
        for p in parts[1:]:
            if p.aus != parts[0].aus or p.expressions != parts[0].expressions:
                raise ValueError("cannot concatenate manifests with different label spaces")
        blobs, offsets, base = [], [np.zeros(1, np.int64)], 0
        for p in parts:
            blobs.append(p.path_blob)
            offsets.append(p.path_offsets[1:] + base)
            base += len(p.path_blob)
        cols = {c: np.concatenate([getattr(p, c) for p in parts]) for c in _COLUMNS}
        cols["dataset"] = np.concatenate(
            [np.array([datasets.index(n) for n in p.datasets], np.int16)[p.dataset] for p in parts]
        ).astype(np.int16)
        return Manifest(np.concatenate(blobs), np.concatenate(offsets), **cols, datasets=datasets,
                        expressions=parts[0].expressions, aus=parts[0].aus, meta=dict(parts[0].meta))

    # ------------------------------------------------------------------ validation and I/O
    def bad_rows(self) -> list[tuple[int, str]]:
        """Every row that breaks the label rules or points outside the root, with the reason (vectorised)."""
        problems: list[tuple[np.ndarray, str]] = []
        c = len(self.expressions)
        problems.append((self.expr_mask & ((self.expr < 0) | (self.expr >= c)), f"expr outside [0, {c})"))
        problems.append(((self.au_mask & (self.au > 1)).any(1), "au label other than 0/1 where annotated"))
        va_bad = ~np.isfinite(self.va).all(1) | (np.abs(self.va) > 1).any(1)
        problems.append((self.va_mask & va_bad, "va outside [-1, 1] or not finite"))
        problems.append(((self.dataset < 0) | (self.dataset >= len(self.datasets)), "unknown dataset code"))
        problems.append(((self.split < 0) | (self.split >= len(self.splits)), "unknown split code"))
        problems.append((self._outside_root(), "path is absolute or leaves the root"))
        problems.append((self.path_offsets[1:] == self.path_offsets[:-1], "empty path"))
        out: list[tuple[int, str]] = []
        for mask, why in problems:
            out.extend((int(i), why) for i in np.flatnonzero(mask))
        return sorted(out)

    def _outside_root(self) -> np.ndarray:
        bad = np.zeros(len(self), bool)
        blob = self.path_blob
        # Only rows whose bytes contain '..' or start with '/' or a drive letter can leave the root.
        suspects = set()
        if len(blob):
            dots = np.flatnonzero((blob[:-1] == ord(".")) & (blob[1:] == ord(".")))
            suspects.update(np.searchsorted(self.path_offsets, dots, side="right") - 1)
        first = blob[self.path_offsets[:-1][self.path_offsets[:-1] < len(blob)]] if len(blob) else np.zeros(0)
        starts_abs = np.zeros(len(self), bool)
        starts_abs[: len(first)] = first == ord("/")
        suspects.update(np.flatnonzero(starts_abs))
        for i in suspects:
            p = PurePosixPath(self.path(int(i)))
            if p.is_absolute() or ".." in p.parts:
                bad[int(i)] = True
        return bad

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically to ``path`` (``.npz``)."""
        path = Path(path)
        header = {
            "format": FORMAT,
            "datasets": list(self.datasets),
            "splits": list(self.splits),
            "expressions": list(self.expressions),
            "aus": list(self.aus),
            "meta": self.meta,
        }
        cols = {c: getattr(self, c) for c in _COLUMNS}
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, header=np.frombuffer(json.dumps(header).encode(), np.uint8),
                     path_blob=self.path_blob, path_offsets=self.path_offsets, **cols)
        os.replace(tmp, path)


def load_manifest(path: str | os.PathLike, drop_bad: bool = False,
                  report: list | None = None) -> Manifest:
    """Read a manifest written by :meth:`Manifest.save` and validate every row.

    A bad row (label outside its range, a path leaving the root, ...) raises ``ValueError`` naming the file,
    the row and the reason, unless ``drop_bad``: then bad rows are removed, and each one is appended to
    ``report`` as ``(row, reason)`` when a list is given, and counted in ``manifest.meta["dropped_rows"]``.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {name: z[name] for name in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ValueError(f"{path}: not a readable manifest ({exc})") from exc
    try:
        header = json.load(io.BytesIO(data.pop("header").tobytes()))
    except (KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: manifest header missing or corrupt") from exc
    if header.get("format") != FORMAT:
        raise ValueError(f"{path}: format {header.get('format')!r}, expected {FORMAT!r}")
    missing = {"path_blob", "path_offsets", *_COLUMNS} - data.keys()
    if missing:
        raise ValueError(f"{path}: manifest lacks columns {sorted(missing)}")
    m = Manifest(**data, datasets=tuple(header["datasets"]), splits=tuple(header["splits"]),
                 expressions=tuple(header["expressions"]), aus=tuple(header["aus"]), meta=header.get("meta", {}))
    n = len(m.dataset)
    for c in _COLUMNS:
        if len(getattr(m, c)) != n:
            raise ValueError(f"{path}: column {c} has {len(getattr(m, c))} rows, expected {n}")
    if len(m.path_offsets) != n + 1:
        raise ValueError(f"{path}: path_offsets has {len(m.path_offsets)} entries, expected {n + 1}")
    bad = m.bad_rows()
    if bad:
        if not drop_bad:
            row, why = bad[0]
            more = f" (and {len(bad) - 1} more problems; pass drop_bad=True to drop them)" if len(bad) > 1 else ""
            raise ValueError(f"{path}: row {row} ({m.path(row)!r}): {why}{more}")
        if report is not None:
            report.extend(bad)
        keep = np.ones(n, bool)
        keep[[r for r, _ in bad]] = False
        m = m.select(keep)
        m.meta["dropped_rows"] = int((~keep).sum())
    return m
