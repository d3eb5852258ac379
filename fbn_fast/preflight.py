"""Checks a training run makes before its first step, each failing with one message that names the option.

:func:`preflight` looks at what the configuration asks of the manifest and the disk:

- label spaces: the manifest's expression classes and AUs are the model's (``--manifest``);
- datasets: every name in ``--datasets`` (and so ``--ratios``) is in the manifest and has a ``train`` split;
  with no ``--datasets``, some dataset has one;
- splits: which datasets have the ``val`` split (model selection, ``--eval-every``) and the ``--eval-split``
  scored at the end; a dataset without one is reported then ("no test split"), never an error;
- images: a random sample of the image paths of the splits in use is looked for under the image root in use
  (``--data-root``, else the root the manifest records, else its folder): a missing root, or a sample of
  which more than :data:`MISSING_TOLERANCE` is missing, stops the run here rather than as a worker's
  traceback after training started;
- relatedness: a ``--relatedness`` file exists and fits the label spaces.

It returns the notes worth logging (a split that is missing, a few missing images). The trainer runs it once
the manifest is loaded, before it builds the input pipeline or the model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .labels import AUS, EXPRESSIONS
from .selection import SELECTION_SPLIT

if TYPE_CHECKING:
    from .config import TrainConfig
    from .data import Manifest

__all__ = ["FILE_SAMPLE", "MISSING_TOLERANCE", "PreflightError", "datasets_with_split", "preflight",
           "split_summary"]

#: Image paths looked for before the first step (a random sample of the rows in use).
FILE_SAMPLE = 256
#: Largest fraction of that sample that may be missing (a few absent files are replaced by the loader; more
#: means a wrong root or an incomplete copy).
MISSING_TOLERANCE = 0.1


class PreflightError(ValueError):
    """A run that cannot start as configured; the message names the option to change."""


def datasets_with_split(manifest: Manifest, split: str, datasets: Sequence[str] | None = None
                        ) -> tuple[list[str], list[str]]:
    """``(present, absent)``: the datasets (``datasets``, default all of the manifest) with and without rows in
    ``split``, in the manifest's order."""
    names = list(datasets) if datasets else list(manifest.datasets)
    codes = np.unique(manifest.dataset[manifest.split_rows(split)]) if split in manifest.splits else []
    have = {manifest.datasets[int(c)] for c in codes}
    return [d for d in names if d in have], [d for d in names if d not in have]


def split_summary(manifest: Manifest) -> str:
    """Which splits each dataset has, e.g. ``AffectNet: train, val; RAF-DB: train, test``."""
    parts = []
    for d, name in enumerate(manifest.datasets):
        splits = [s for i, s in enumerate(manifest.splits) if ((manifest.dataset == d) & (manifest.split == i)).any()]
        parts.append(f"{name}: {', '.join(splits) or 'no rows'}")
    return "; ".join(parts)


def _check_label_spaces(manifest: Manifest, where: str) -> None:
    if tuple(manifest.expressions) != tuple(EXPRESSIONS) or tuple(manifest.aus) != tuple(AUS):
        raise PreflightError(
            f"--manifest {where}: its label spaces (expressions {list(manifest.expressions)}, AUs "
            f"{list(manifest.aus)}) are not the model's ({list(EXPRESSIONS)}, {list(AUS)}); re-import the corpus "
            "with this version (python -m fbn_fast.data import ...)")


def _check_training_datasets(cfg: TrainConfig, manifest: Manifest, where: str) -> list[str]:
    """The datasets that train; ``PreflightError`` naming ``--datasets`` or ``--manifest``."""
    unknown = [d for d in cfg.datasets if d not in manifest.datasets]
    if unknown:
        raise PreflightError(f"--datasets: {unknown} are not in {where}, which has {list(manifest.datasets)}")
    present, absent = datasets_with_split(manifest, "train", cfg.datasets or None)
    if cfg.datasets and absent:
        option = "--datasets/--ratios" if cfg.ratios else "--datasets"
        raise PreflightError(f"{option}: {absent} have no 'train' split in {where} ({split_summary(manifest)}); "
                             f"name datasets that do: {datasets_with_split(manifest, 'train')[0]}")
    if not present:
        raise PreflightError(f"--manifest {where}: no dataset has a 'train' split ({split_summary(manifest)}); "
                             "import the corpus's training list, or train on another manifest")
    return present


def _check_images(manifest: Manifest, root: Path, root_source: str, splits: Sequence[str], seed: int,
                  sample: int) -> str | None:
    """Look for a sample of the images of ``splits`` under ``root``; a note when a few are missing."""
    if not root.is_dir():
        raise PreflightError(f"--data-root: the image root {str(root)!r} ({root_source}) does not exist or is "
                             "not a folder; give --data-root the folder the manifest's paths are relative to")
    in_use = np.isin(manifest.split, [manifest.splits.index(s) for s in splits if s in manifest.splits])
    check = manifest.select(in_use).check_files(root, sample=sample, seed=seed)
    if not check.missing:
        return None
    if check.missing > MISSING_TOLERANCE * check.checked:
        hint = (f"; the manifest records the root {manifest.root}" if manifest.root and
                os.path.abspath(manifest.root) != str(root.resolve()) else "")
        raise PreflightError(
            f"--data-root: {check} ({root_source}){hint}. Give --data-root the folder that holds "
            f"{check.examples[0]!r}; list every missing file with: python -m fbn_fast.data info MANIFEST "
            "--check-files --root DIR")
    return f"images: {check} (the input pipeline replaces an unreadable image by another of its dataset)"


def _check_relatedness(cfg: TrainConfig) -> None:
    if cfg.relatedness in ("prior", "data"):
        return
    from . import relatedness as rel_mod

    path = Path(cfg.relatedness)
    if not path.is_file():
        raise PreflightError(f"--relatedness: {cfg.relatedness!r} is neither 'prior', 'data' nor a file")
    try:
        rel_mod.load(path, classes=EXPRESSIONS, aus=AUS)
    except ValueError as exc:
        raise PreflightError(f"--relatedness {cfg.relatedness}: {exc}") from None


def preflight(cfg: TrainConfig, manifest: Manifest, manifest_path: str | os.PathLike, data_root: str | os.PathLike,
              root_source: str = "--data-root", sample: int = FILE_SAMPLE, check_relatedness: bool = True
              ) -> list[str]:
    """Every check of the module docstring; returns notes to log, raises :class:`PreflightError` naming the
    option to change. ``root_source`` says where ``data_root`` came from (for the message);
    ``check_relatedness=False`` when the table comes from a checkpoint (resume)."""
    where = str(manifest_path)
    _check_label_spaces(manifest, where)
    trains = _check_training_datasets(cfg, manifest, where)
    notes = [f"training on {trains} (train split)"]
    splits = ["train"]
    val, no_val = datasets_with_split(manifest, SELECTION_SPLIT)
    if val:
        splits.append(SELECTION_SPLIT)
        if no_val:
            notes.append(f"no {SELECTION_SPLIT} split in {no_val}: model selection scores {val}")
    else:
        what = f"--eval-every {cfg.eval_every} evaluations and " if cfg.eval_every else ""
        notes.append(f"no dataset has a {SELECTION_SPLIT} split: {what}the choice of best.pt are skipped "
                     f"(evaluate, predict and fewshot then take a run folder's latest checkpoint)")
    if cfg.evaluate:
        scored, unscored = datasets_with_split(manifest, cfg.eval_split)
        if scored:
            splits.append(cfg.eval_split)
        if unscored:
            notes.append(f"no {cfg.eval_split} split in {unscored}: eval.json reports them as such"
                         + ("" if scored else f" and scores no {cfg.eval_split} set"))
    if check_relatedness:
        _check_relatedness(cfg)
    note = _check_images(manifest, Path(data_root), root_source, list(dict.fromkeys(splits)), cfg.seed, sample)
    if note:
        notes.append(note)
    return notes
