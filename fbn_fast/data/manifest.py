"""The manifest: one record per face image across heterogeneous corpora, stored column by column.

A manifest file is an uncompressed ``.npz`` of flat numpy columns plus a JSON header (format version,
label names, dataset and split names), so millions of rows load in seconds without parsing text. Paths
are kept as one UTF-8 blob with offsets (compact, fast to load) and decoded on access.

Columns (N rows): ``dataset`` (int16 code into ``datasets``), ``split`` (int8 code into ``splits``),
``box`` (float32 N×4 face box x0, y0, x1, y1 in pixels; NaN where none), ``expr`` (int8, -1 missing),
``au`` (uint8 N×K, 0/1), ``au_mask`` (bool N×K), ``va`` (float32 N×2), ``va_mask`` (bool N),
``compound`` (int8, -1 missing: compound-expression id into :data:`fbn_fast.labels.COMPOUNDS`).

``root`` (optional, in the header) is the absolute folder the paths are relative to, as the importer saw it;
manifests written before it was recorded load with ``root=None``. :meth:`Manifest.concat` uses it to join
corpora imported from different folders, :meth:`Manifest.check_files` to look for the images.

Rows are numbered from 0 in the order they are stored; every message about a bad row uses that number.
"""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from ..labels import AUS, COMPOUNDS, EXPRESSIONS, MISSING

FORMAT = "fbn_fast.manifest/1"
SPLITS: tuple[str, ...] = ("train", "val", "test")
_COLUMNS = ("dataset", "split", "box", "expr", "au", "au_mask", "va", "va_mask", "compound")

log = logging.getLogger(__name__)
_SCAN_BLOCK = 1 << 22  # bytes of path blob scanned at once by the root check


def _encode_paths(paths) -> tuple[np.ndarray, np.ndarray]:
    paths = [p if isinstance(p, str) else os.fspath(p) for p in paths]
    offsets = np.zeros(len(paths) + 1, dtype=np.int64)
    joined = "".join(paths)
    blob = joined.encode("utf-8")
    if len(blob) == len(joined):  # all ASCII: byte lengths are character lengths, no per-path encode needed
        np.cumsum(np.fromiter(map(len, paths), np.int64, len(paths)), out=offsets[1:])
    else:
        np.cumsum(np.fromiter((len(p.encode("utf-8")) for p in paths), np.int64, len(paths)), out=offsets[1:])
    return np.frombuffer(blob, dtype=np.uint8).copy(), offsets


def _codes(values: str | np.ndarray, n: int, known: tuple[str, ...], label: str, dtype) -> np.ndarray:
    """Integer codes of ``values`` (one name for all rows or one per row) into ``known``."""
    if isinstance(values, str):
        if values not in known:
            raise ValueError(f"{label} names {[values]} are not among {list(known)}")
        return np.full(n, known.index(values), dtype=dtype)
    arr = np.asarray(values, dtype=object)
    if arr.shape != (n,):
        raise ValueError(f"{label}: {arr.shape[0] if arr.ndim else 0} names for {n} paths")
    names, inverse = np.unique(arr.astype(str), return_inverse=True)
    unknown = set(names.tolist()) - set(known)
    if unknown:
        raise ValueError(f"{label} names {sorted(unknown)} are not among {list(known)}")
    lookup = np.array([known.index(s) for s in names.tolist()], dtype=dtype)
    return lookup[inverse.reshape(-1)] if n else np.zeros(0, dtype)


def _int_codes(name: str, value, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(int8 codes, rows whose value is no integer code) of an expression/compound column given in any dtype.

    NaN, fractional values and integers outside int8 (e.g. 255, which a plain cast would turn into -1, i.e.
    "missing") are not codes; they are reported instead of being stored.
    """
    arr = _column(name, value, n, (), np.asarray(value).dtype)
    if arr.dtype == np.int8:
        return arr, np.zeros(n, bool)
    if arr.dtype.kind in "iub":
        bad = (arr < -128) | (arr > 127) if arr.dtype.kind != "b" else np.zeros(n, bool)
    else:
        wide = arr.astype(np.float64)
        bad = ~np.isfinite(wide) | (wide != np.round(wide)) | (wide < -128) | (wide > 127)
    return np.where(bad, MISSING, arr).astype(np.int8), bad


def label_problems(paths, *, expr=None, au=None, au_mask=None, va=None, va_mask=None,
                   compound=None) -> list[tuple[int, str, str]]:
    """Label values that cannot be stored as given: ``(row, reason, value)`` for each.

    An expression or compound code that is not an integer (NaN, ``3.7``) or does not fit the int8 column
    (``255``); an annotated AU (``au_mask`` set) that is not 0 or 1 (NaN, ``0.5``); a VA pair that is not
    finite where ``va_mask`` is set. Unannotated entries are not looked at. Codes that are integers but out of
    range are left to :meth:`Manifest.bad_rows`, which reads them from the stored column.
    """
    n = len(paths)
    out: list[tuple[int, str, str]] = []
    for name, value in (("expr", expr), ("compound", compound)):
        if value is not None:
            arr = np.asarray(value).reshape(-1)
            _, bad = _int_codes(name, value, n)
            out += [(int(i), f"{name} not an integer class code", repr(arr[i].item())) for i in np.flatnonzero(bad)]
    if au is not None and au_mask is not None:
        a = _column("au", au, n, (len(AUS),), np.float64)
        m = _column("au_mask", au_mask, n, (len(AUS),), bool)
        bad = m & (a != 0) & (a != 1)  # NaN compares unequal to both
        for i, k in zip(*np.nonzero(bad)):
            out.append((int(i), "au not 0/1 where annotated", f"{AUS[k]}={float(a[i, k])!r}"))
    if va is not None and va_mask is not None:
        v = _column("va", va, n, (2,), np.float64)
        m = _column("va_mask", va_mask, n, (), bool)
        out += [(int(i), "va not finite where annotated", repr(tuple(v[i].tolist())))
                for i in np.flatnonzero(m & ~np.isfinite(v).all(1))]
    return sorted(out)


def _prefixed(blob: np.ndarray, offsets: np.ndarray, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """Paths with ``prefix + "/"`` in front of each (vectorised over the blob)."""
    if not prefix:
        return blob, offsets
    pre = np.frombuffer((prefix.rstrip("/") + "/").encode("utf-8"), np.uint8)
    n, k = len(offsets) - 1, len(pre)
    new_offsets = offsets + k * np.arange(n + 1, dtype=np.int64)
    out = np.empty(len(blob) + n * k, np.uint8)
    is_prefix = np.zeros(len(out), bool)
    starts = new_offsets[:-1]
    for j in range(k):
        out[starts + j] = pre[j]
        is_prefix[starts + j] = True
    out[~is_prefix] = blob
    return out, new_offsets


def _rebase(roots: list[str | None], names: list[str], root: str | os.PathLike | None) -> tuple[str | None, list[str]]:
    """The joined manifest's root and the folder to put in front of each part's paths (see :meth:`Manifest.concat`)."""
    if root is not None:
        target = os.path.abspath(os.fspath(root))
    elif all(r is None for r in roots):
        return None, [""] * len(roots)
    elif any(r is None for r in roots):
        name = names[roots.index(None)]
        raise ValueError(
            f"{name} records no image root (written before manifests recorded one, or imported with a --prefix "
            f"that is not the end of its corpus folder) while {names[roots.index(next(r for r in roots if r))]} "
            "does; re-import it with a current version, or name the folder every path is relative to: "
            "python -m fbn_fast.data concat ... --data-root DIR")
    else:
        try:
            target = os.path.commonpath(roots)
        except ValueError:  # different drives
            raise ValueError(f"the manifests' image roots {sorted(set(roots))} share no folder; import the corpora "
                             "under one folder, or re-import each with --prefix NAME and give training "
                             "--data-root the folder that holds NAME/") from None
    prefixes = []
    for name, r in zip(names, roots):
        if r is None:
            prefixes.append("")  # no root recorded: its paths are taken as relative to the target already
            continue
        rel = os.path.relpath(r, target)
        if rel == os.pardir or rel.startswith(os.pardir + os.sep) or os.path.isabs(rel):
            raise ValueError(f"{name}: its image root {r} is not inside --data-root {target}; pick a --data-root "
                             f"that holds every corpus folder, e.g. --data-root {os.path.commonpath([r, target])}")
        prefixes.append("" if rel == os.curdir else PurePosixPath(*Path(rel).parts).as_posix())
    return target, prefixes


@dataclass(frozen=True)
class FileCheck:
    """What :meth:`Manifest.check_files` found: under ``root``, ``checked`` paths looked at, ``missing`` not
    there (``examples``: the first few, relative to the root)."""

    root: str
    rows: int
    checked: int
    missing: int
    examples: tuple[str, ...]

    def __str__(self) -> str:
        what = f"all {self.rows}" if self.checked == self.rows else f"a sample of {self.checked} of {self.rows}"
        if not self.missing:
            return f"{what} images found under {self.root}"
        shown = ", ".join(self.examples)
        return (f"{self.missing} of {what} images are missing under {self.root} (e.g. {shown}); check the image "
                "root (--data-root / --root) and the manifest's paths")


def _row_mask(n: int, rows: np.ndarray) -> np.ndarray:
    mask = np.zeros(n, bool)
    mask[rows] = True
    return mask


def _column(name: str, value, n: int, shape: tuple[int, ...], dtype) -> np.ndarray:
    arr = np.asarray(value)
    if arr.size != n * int(np.prod(shape, dtype=np.int64)):
        raise ValueError(f"{name}: {arr.shape} does not fit {n} rows of shape {shape}")
    return arr.reshape((n, *shape)).astype(dtype, copy=False) if shape else arr.reshape(n).astype(dtype, copy=False)


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
    root: str | None = None

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
        root: str | os.PathLike | None = None,
        drop_bad: bool = False,
    ) -> Manifest:
        """Build a manifest from per-row arrays; absent tasks are all-missing.

        ``dataset``/``split`` are a single name for every row or an array of names; ``expr`` uses
        :data:`~fbn_fast.labels.MISSING` (-1) for unlabelled rows; ``va_mask`` defaults to "VA is finite";
        ``root``: the folder the paths are relative to (stored absolute).

        A value that cannot be stored as given (see :func:`label_problems`: a NaN or fractional class code,
        255 in the int8 expression column, a NaN or fractional AU or a NaN VA whose annotated flag is set) is a
        ``ValueError`` naming the row, its path and the value; with ``drop_bad`` those rows are left out and
        counted in ``meta["dropped_rows"]`` / ``meta["dropped_by_reason"]``.
        """
        n = len(paths)
        k = len(AUS)
        if datasets is None:
            datasets = (dataset,) if isinstance(dataset, str) else \
                tuple(dict.fromkeys(np.asarray(dataset, dtype=object).tolist()))
        datasets = tuple(datasets)
        va_arr = np.zeros((n, 2), np.float32) if va is None else _column("va", va, n, (2,), np.float32)
        if va_mask is None:
            va_mask = np.zeros(n, bool) if va is None else np.isfinite(va_arr).all(1)
        va_mask = _column("va_mask", va_mask, n, (), bool)
        au_mask = np.zeros((n, k), bool) if au_mask is None else _column("au_mask", au_mask, n, (k,), bool)
        problems = label_problems(paths, expr=expr, au=au, au_mask=au_mask, va=va_arr, va_mask=va_mask,
                                  compound=compound)
        keep = None
        if problems:
            if not drop_bad:
                shown = "; ".join(f"row {r} ({os.fspath(paths[r])!r}): {why}: {value}"
                                  for r, why, value in problems[:10])
                more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
                raise ValueError(f"{len(problems)} label values cannot be stored: {shown}{more}; "
                                 "pass drop_bad=True (--drop-bad) to drop these rows")
            keep = np.ones(n, bool)
            keep[[r for r, _, _ in problems]] = False
        if au is None:
            au_arr = np.zeros((n, k), np.uint8)
        else:  # unannotated entries may hold anything (NaN included); annotated ones are 0/1 (checked above)
            au_arr = np.where(au_mask, np.nan_to_num(_column("au", au, n, (k,), np.float32)), 0).astype(np.uint8)
        expr_arr = np.full(n, MISSING, np.int8) if expr is None else _int_codes("expr", expr, n)[0]
        comp_arr = np.full(n, MISSING, np.int8) if compound is None else _int_codes("compound", compound, n)[0]
        # Only unlabelled VA is zeroed: a labelled value that is out of range stays for bad_rows to report.
        va_arr = np.where(va_mask[:, None], va_arr, np.nan_to_num(va_arr)).astype(np.float32)
        if keep is not None:
            va_arr[~keep] = 0.0  # the rows are dropped below; no NaN left behind for bad_rows to double count
        blob, offsets = _encode_paths(paths)
        m = cls(
            path_blob=blob,
            path_offsets=offsets,
            dataset=_codes(dataset, n, datasets, "dataset", np.int16),
            split=_codes(split, n, SPLITS, "split", np.int8),
            box=np.full((n, 4), np.nan, np.float32) if box is None else _column("box", box, n, (4,), np.float32),
            expr=expr_arr,
            au=au_arr,
            au_mask=au_mask,
            va=va_arr,
            va_mask=va_mask,
            compound=comp_arr,
            datasets=datasets,
            meta=dict(meta or {}),
            root=None if root is None else os.path.abspath(os.fspath(root)),
        )
        if keep is None:
            return m
        for r, why, value in problems:
            log.warning("dropped row %d (%r): %s: %s", r, os.fspath(paths[r]), why, value)
        out = m.select(keep)
        out.meta["dropped_rows"] = int((~keep).sum())
        out.meta["dropped_by_reason"] = dict(Counter(why for _, why, _ in problems))
        return out

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:
        return f"Manifest({len(self)} rows, datasets={list(self.datasets)})"

    def path(self, i: int) -> str:
        """Relative path of row ``i``."""
        a, b = self.path_offsets[i], self.path_offsets[i + 1]
        return self.path_blob[a:b].tobytes().decode("utf-8")

    @property
    def paths(self) -> np.ndarray:
        """All paths as a numpy array of ``str`` (decoded on each call: O(N))."""
        blob = self.path_blob
        if len(blob) and blob.max() >= 128:  # non-ASCII: byte offsets are not character offsets
            return np.array([self.path(i) for i in range(len(self))], dtype=object)
        text, o = blob.tobytes().decode("ascii"), self.path_offsets.tolist()
        out = np.empty(len(self), dtype=object)
        out[:] = [text[o[i]:o[i + 1]] for i in range(len(self))]
        return out

    @property
    def expr_mask(self) -> np.ndarray:
        return self.expr != MISSING

    def dataset_index(self, name: str) -> int:
        try:
            return self.datasets.index(name)
        except ValueError:
            raise ValueError(f"dataset {name!r} is not in this manifest; it has {list(self.datasets)}") from None

    def tasks(self, dataset: str | int) -> dict[str, object]:
        """Which tasks a dataset labels: ``{"expr": bool, "au": [AUs annotated], "va": bool, "compound": bool}``."""
        d = self.dataset_index(dataset) if isinstance(dataset, str) else dataset
        rows = self.dataset == d
        annotated = self.au_mask[rows].any(0)
        return {
            "expr": bool(self.expr_mask[rows].any()),
            "au": [a for a, on in zip(self.aus, annotated) if on],
            "va": bool(self.va_mask[rows].any()),
            "compound": bool((self.compound[rows] != MISSING).any()),
        }

    def counts(self) -> list[dict[str, object]]:
        """Per dataset and split: rows and labelled rows per task (what ``python -m fbn_fast.data info`` prints)."""
        out = []
        for d, name in enumerate(self.datasets):
            for s, split in enumerate(self.splits):
                rows = (self.dataset == d) & (self.split == s)
                n = int(rows.sum())
                if not n:
                    continue
                out.append({
                    "dataset": name,
                    "split": split,
                    "rows": n,
                    "expr": int(self.expr_mask[rows].sum()),
                    "au": int(self.au_mask[rows].any(1).sum()),
                    "va": int(self.va_mask[rows].sum()),
                    "compound": int((self.compound[rows] != MISSING).sum()),
                    "au_names": [a for a, on in zip(self.aus, self.au_mask[rows].any(0)) if on],
                })
        return out

    def summary(self) -> str:
        """A table of rows per dataset and split and how many carry each task's label."""
        lines = [f"{len(self)} rows, {len(self.datasets)} datasets"]
        head = f"{'dataset':<20} {'split':<6} {'rows':>10} {'expr':>10} {'au':>10} {'va':>10} {'compound':>9}  AUs"
        lines.append(head)
        for c in self.counts():
            aus = ",".join(a.removeprefix("AU") for a in c["au_names"]) or "-"
            lines.append(f"{c['dataset']:<20} {c['split']:<6} {c['rows']:>10} {c['expr']:>10} {c['au']:>10} "
                         f"{c['va']:>10} {c['compound']:>9}  {aus}")
        return "\n".join(lines)

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
                        expressions=self.expressions, aus=self.aus, meta=dict(self.meta), root=self.root)

    def split_rows(self, split: str) -> np.ndarray:
        if split not in self.splits:
            raise ValueError(f"split {split!r} is not among {list(self.splits)}")
        return self.split == self.splits.index(split)

    @staticmethod
    def concat(parts: list[Manifest], root: str | os.PathLike | None = None,
               names: list[str] | None = None) -> Manifest:
        """Rows of ``parts`` one after another; dataset codes are merged by name.

        Image roots: parts that record the same root (or none at all) are joined as they are. Parts with
        different roots are rebased onto their deepest common folder (``/data/faces/AffectNet`` and
        ``/data/faces/RAF-DB`` become ``/data/faces``, their paths gaining ``AffectNet/`` and ``RAF-DB/``);
        ``root`` names the joined root instead (parts without a recorded root are taken as relative to it).
        A mix of parts with and without a root, without ``root``, is a ``ValueError`` that says what to type.
        ``names`` (e.g. the files) label the parts in messages.

        ``meta`` is the first part's, except ``meta["imports"]`` (the importers' records), which lists every
        part's records in order.
        """
        if not parts:
            raise ValueError("concat needs at least one manifest")
        names = list(names) if names is not None else [f"manifest {i}" for i in range(len(parts))]
        datasets = tuple(dict.fromkeys(d for p in parts for d in p.datasets))
        for p in parts[1:]:
            if p.aus != parts[0].aus or p.expressions != parts[0].expressions or p.splits != parts[0].splits:
                raise ValueError("cannot concatenate manifests with different label spaces or split names")
        target, prefixes = _rebase([p.root for p in parts], names, root)
        blobs, offsets, base = [], [np.zeros(1, np.int64)], 0
        for name, p, prefix in zip(names, parts, prefixes):
            blob, offs = _prefixed(p.path_blob, p.path_offsets, prefix)
            if prefix:
                log.info("%s: paths rebased onto %s (prefix %s/)", name, target, prefix)
            blobs.append(blob)
            offsets.append(offs[1:] + base)
            base += len(blob)
        cols = {c: np.concatenate([getattr(p, c) for p in parts]) for c in _COLUMNS}
        cols["dataset"] = np.concatenate(
            [np.array([datasets.index(n) for n in p.datasets], np.int16)[p.dataset] for p in parts]
        ).astype(np.int16)
        meta = dict(parts[0].meta)
        imports = [rec for p in parts for rec in p.meta.get("imports", [])]
        if imports:
            meta["imports"] = imports
        return Manifest(np.concatenate(blobs), np.concatenate(offsets), **cols, datasets=datasets,
                        splits=parts[0].splits, expressions=parts[0].expressions, aus=parts[0].aus, meta=meta,
                        root=target)

    def check_files(self, root: str | os.PathLike | None = None, sample: int | None = None, seed: int = 0,
                    examples: int = 5) -> FileCheck:
        """Which image paths are not files under ``root`` (default: the recorded :attr:`root`).

        ``sample``: look at that many rows drawn at random (``seed``) instead of all of them — what a
        training preflight does before the first step. Raises ``ValueError`` when no root is known.
        """
        if root is None:
            root = self.root
        if root is None:
            raise ValueError("this manifest records no image root; name the folder its paths are relative to "
                             "(--root DIR, or --data-root for training)")
        root = os.path.abspath(os.fspath(root))
        n = len(self)
        if sample is not None and sample < n:
            rows = np.sort(np.random.default_rng(seed).choice(n, size=max(int(sample), 0), replace=False))
        else:
            rows = np.arange(n)
        missing: list[str] = []
        count = 0
        for i in rows.tolist():
            rel = self.path(i)
            if not os.path.isfile(os.path.join(root, rel)):
                count += 1
                if len(missing) < examples:
                    missing.append(rel)
        return FileCheck(root=root, rows=n, checked=len(rows), missing=count, examples=tuple(missing))

    # ------------------------------------------------------------------ validation and I/O
    def bad_rows(self) -> list[tuple[int, str]]:
        """Every row that breaks the label rules or points outside the root, with the reason (vectorised).

        Rules: ``expr`` in [0, C) where labelled; ``au`` 0/1 where annotated; ``va`` finite in [-1, 1] where
        labelled; ``compound`` in [0, number of compounds) or missing; a face box all NaN or finite with
        x1 > x0 and y1 > y0; known dataset and split codes; a non-empty relative path that stays in the root.
        """
        n = len(self)
        problems: list[tuple[np.ndarray, str]] = []
        c = len(self.expressions)
        problems.append((self.expr_mask & ((self.expr < 0) | (self.expr >= c)), f"expr outside [0, {c})"))
        # 2-D rules: find the (rare) offending entries in the flat array, then map them to rows; reducing
        # over a short trailing axis (any(1)) costs several times more on millions of rows.
        # A min/max pass (no temporaries) clears the common all-good case first.
        k = self.au.shape[1] if self.au.ndim == 2 else 1
        if self.au.size and self.au.max() > 1:
            hits = np.flatnonzero(self.au.reshape(-1) > 1)
            hits = hits[self.au_mask.reshape(-1)[hits]]
            problems.append((_row_mask(n, hits // k), "au label other than 0/1 where annotated"))
        if self.va.size and not (self.va.max() <= 1 and self.va.min() >= -1):  # NaN fails both as well
            hits = np.flatnonzero(~(np.abs(self.va.reshape(-1)) <= 1)) // 2
            problems.append((_row_mask(n, hits[self.va_mask[hits]]), "va outside [-1, 1] or not finite"))
        nc = len(COMPOUNDS)
        problems.append(((self.compound != MISSING) & ((self.compound < 0) | (self.compound >= nc)),
                         f"compound outside [0, {nc})"))
        # One uint32 per row over the four "is finite" bytes: 0 means no box, 0x01010101 a complete one.
        finite = np.ascontiguousarray(np.isfinite(self.box)).view(np.uint32).reshape(-1)
        box_ok = (finite == 0) | ((finite == 0x01010101) & (self.box[:, 2] > self.box[:, 0])
                                  & (self.box[:, 3] > self.box[:, 1]))
        problems.append((~box_ok, "face box neither all NaN nor finite with x1 > x0 and y1 > y0"))
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
        # Only rows whose bytes contain '..', start with '/' or '\\', or hold a drive colon can leave the root.
        suspects = set()
        step = _SCAN_BLOCK  # scan in blocks: a few MB of temporaries instead of several times the blob
        for a in range(0, len(blob), step):
            block = blob[a: a + step + 1]  # one byte of overlap catches a '..' across the boundary
            dot = block == ord(".")
            hits = np.flatnonzero((dot[:-1] & dot[1:]) | (block[:-1] == ord(":")))
            if len(block) <= step and len(block) and block[-1] == ord(":"):
                hits = np.append(hits, len(block) - 1)
            if len(hits):
                suspects.update((np.searchsorted(self.path_offsets, hits + a, side="right") - 1).tolist())
        starts = self.path_offsets[:-1]
        nonempty = starts < self.path_offsets[1:]
        first = np.zeros(len(self), np.uint8)
        first[nonempty] = blob[starts[nonempty]]
        suspects.update(np.flatnonzero((first == ord("/")) | (first == ord("\\"))).tolist())
        for i in suspects:
            text = self.path(int(i))
            p = PurePosixPath(text.replace("\\", "/"))
            drive = len(text) >= 2 and text[1] == ":" and text[0].isalpha()
            if p.is_absolute() or ".." in p.parts or drive:
                bad[int(i)] = True
        return bad

    def checked(self, drop_bad: bool = False, report: list | None = None, source: str = "manifest") -> Manifest:
        """This manifest if every row is good; else a ``ValueError`` naming ``source`` and the bad rows, or,
        with ``drop_bad``, a copy without them (each logged, appended to ``report`` as ``(row, reason)``,
        counted in ``meta["dropped_rows"]`` and per reason in ``meta["dropped_by_reason"]``)."""
        bad = self.bad_rows()
        if not bad:
            return self
        if not drop_bad:
            shown = "; ".join(f"row {r} ({self.path(r)!r}): {why}" for r, why in bad[:10])
            more = f" (and {len(bad) - 10} more problems)" if len(bad) > 10 else ""
            raise ValueError(f"{source}: {len(bad)} bad rows: {shown}{more}; write a manifest without them with "
                             f"python -m fbn_fast.data concat {source} --out CLEAN.npz --drop-bad (in Python: "
                             "drop_bad=True)")
        for r, why in bad:
            log.warning("%s: dropped row %d (%r): %s", source, r, self.path(r), why)
        if report is not None:
            report.extend(bad)
        keep = np.ones(len(self), bool)
        keep[[r for r, _ in bad]] = False
        out = self.select(keep)
        out.meta["dropped_rows"] = int((~keep).sum())
        out.meta["dropped_by_reason"] = dict(Counter(why for _, why in bad))
        log.warning("%s: dropped %d bad rows of %d", source, out.meta["dropped_rows"], len(self))
        return out

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
            **({"root": self.root} if self.root is not None else {}),
        }
        cols = {c: getattr(self, c) for c in _COLUMNS}
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, header=np.frombuffer(json.dumps(header).encode(), np.uint8),
                     path_blob=self.path_blob, path_offsets=self.path_offsets, **cols)
        os.replace(tmp, path)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz``; stored (uncompressed) members are read straight from the file.

    ``np.load`` streams each member through ``zipfile`` (CRC and several copies); reading the bytes at
    the member's offset with ``np.fromfile`` is about twice as fast on a multi-GB manifest.
    """
    out: dict[str, np.ndarray] = {}
    with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
        for info in zf.infolist():
            name = info.filename.removesuffix(".npy")
            if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
                with zf.open(info) as member:
                    out[name] = np.lib.format.read_array(member, allow_pickle=False)
                continue
            f.seek(info.header_offset)
            local = f.read(30)
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                raise ValueError(f"member {info.filename} has no local header")
            n_name, n_extra = struct.unpack("<HH", local[26:30])
            start = info.header_offset + 30 + n_name + n_extra
            f.seek(start)
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            if dtype.hasobject:
                raise ValueError(f"member {info.filename} holds Python objects")
            count = int(np.prod(shape, dtype=np.int64))
            if f.tell() - start + count * dtype.itemsize != info.file_size:
                raise ValueError(f"member {info.filename}: size does not match its header")
            arr = np.fromfile(f, dtype=dtype, count=count) if count else np.zeros(0, dtype)
            if arr.size != count:
                raise ValueError(f"member {info.filename} is truncated")
            out[name] = arr.reshape(shape, order="F" if fortran else "C")
    return out


def load_manifest(path: str | os.PathLike, drop_bad: bool = False,
                  report: list | None = None) -> Manifest:
    """Read a manifest written by :meth:`Manifest.save` and validate every row.

    A bad row (label outside its range, a path leaving the root, ...) raises ``ValueError`` naming the file,
    the row (0-based), its path and the reason, unless ``drop_bad``: then bad rows are removed, each one is
    logged (file, row, path, reason) and appended to ``report`` as ``(row, reason)`` when a list is given,
    and their number is kept in ``manifest.meta["dropped_rows"]`` (per reason in
    ``meta["dropped_by_reason"]``).
    """
    path = Path(path)
    try:
        data = _read_npz(path)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, struct.error) as exc:
        raise ValueError(f"{path}: not a readable manifest ({exc})") from exc
    try:
        header = json.load(io.BytesIO(data.pop("header").tobytes()))
    except (KeyError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: manifest header missing or corrupt") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        got = header.get("format") if isinstance(header, dict) else None
        raise ValueError(f"{path}: format {got!r}, expected {FORMAT!r}")
    missing = {"path_blob", "path_offsets", *_COLUMNS} - data.keys()
    if missing:
        raise ValueError(f"{path}: manifest lacks columns {sorted(missing)}")
    m = Manifest(**{k: data[k] for k in ("path_blob", "path_offsets", *_COLUMNS)},
                 datasets=tuple(header["datasets"]), splits=tuple(header["splits"]),
                 expressions=tuple(header["expressions"]), aus=tuple(header["aus"]), meta=header.get("meta", {}),
                 root=header.get("root"))
    n = len(m.dataset)
    shapes = {"box": (4,), "au": (len(m.aus),), "au_mask": (len(m.aus),), "va": (2,)}
    for c in _COLUMNS:
        col = getattr(m, c)
        want = (n, *shapes.get(c, ()))
        if col.shape != want:
            raise ValueError(f"{path}: column {c} has shape {col.shape}, expected {want}")
    if m.path_offsets.shape != (n + 1,):
        raise ValueError(f"{path}: path_offsets has {len(m.path_offsets)} entries, expected {n + 1}")
    offs = m.path_offsets
    if n and (offs[0] != 0 or offs[-1] != len(m.path_blob) or (offs[1:] < offs[:-1]).any()):
        raise ValueError(f"{path}: path_offsets are not increasing from 0 to the blob's length {len(m.path_blob)}")
    return m.checked(drop_bad=drop_bad, report=report, source=str(path))
