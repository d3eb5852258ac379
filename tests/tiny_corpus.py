"""Tiny corpora for training tests: the importer fixtures' official layouts with decodable images.

The importer tests write three bytes per image (the importers never decode them); training reads them, so
:func:`real_jpegs` gives every ``.jpg`` under a folder a real 24-pixel JPEG.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image
from test_manifest_roots import corpora, touch, write

__all__ = ["corpora", "disfa_tree", "option_argv", "real_jpegs", "train_argv"]


def real_jpegs(folder: Path, size: int = 24) -> int:
    """Overwrite every ``.jpg`` under ``folder`` with a small decodable JPEG; returns how many."""
    files = sorted(folder.rglob("*.jpg"))
    for i, p in enumerate(files):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(p, quality=90)
    return len(files)


def disfa_tree(root: Path) -> None:
    """DISFA's layout (``ActionUnit_Labels/<subject>/<subject>_au<N>.txt``, frames under
    ``frames/LeftCamera/<subject>/``): three subjects of four frames, for a train, a val and a test subject."""
    for s, subject in enumerate(("SN001", "SN002", "SN003")):
        for au in (1, 4, 12):
            write(root, f"ActionUnit_Labels/{subject}/{subject}_au{au}.txt",
                  "".join(f"{f},{(f + au + s) % 6}\n" for f in range(1, 5)))
        touch(root, *(f"frames/LeftCamera/{subject}/{f:05d}.jpg" for f in range(1, 5)))


def train_argv(manifest: Path, out: Path, name: str, **opts: object) -> list[str]:
    """``python -m fbn_fast.train`` options for a few CPU steps of the small trunk at 24 px."""
    base: dict[str, object] = {
        "manifest": manifest, "out_dir": out, "name": name, "image_size": 24, "batch_size": 4,
        "eval_batch_size": 8, "trunk_kwargs": '{"width": 4}', "num_workers": 0, "steps": 4, "log_every": 1,
        "ckpt_every": 100, "warmup_steps": 1, "lr": 0.01, "progress": False, "plots": False,
        "loss_backend": "torch", "loader_backend": "cpu"}
    return option_argv({**base, **opts})


def option_argv(options: Mapping[str, object]) -> list[str]:
    """Command-line options of ``{field: value}``: ``--field-name VALUE``, a bool as ``--flag`` / ``--no-flag``."""
    argv: list[str] = []
    for k, v in options.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            argv.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            argv += [flag, str(v)]
    return argv
