"""TensorBoard events from the records a run writes to ``metrics.jsonl`` (which stays the source of truth).

With the ``tensorboard`` extra installed (``pip install "fbn_fast[tensorboard]"``) the trainer also writes
TensorBoard event files into ``<run>/tensorboard``; ``tensorboard --logdir runs`` shows every run. Each
``metrics.jsonl`` record becomes scalars at its ``step``:

- a training record (``kind: train``): ``loss/<term>`` for the total and every term of the objective,
  ``train/lr``, ``train/images_per_s``, ``train/data_wait_fraction``, ``train/nonfinite_total``;
- an evaluation record (``kind: eval``): ``val/<path>`` for every number of the result, its keys joined by
  ``/`` (``val/datasets/synth_expr/expression/accuracy``, ``val/datasets/synth_au_a/au/mean_f1``,
  ``val/truth/(all)/va/ccc_mean`` …); counts and per-class / per-AU lists are left to ``eval.json``.

The run's configuration is written once as text (``config``, the TOML recipe that reproduces the run).
``python -m fbn_fast.tensorboard RUN_DIR`` rebuilds the events of a finished run from its ``metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["TensorBoardWriter", "main", "scalars", "tensorboard_available"]

#: The training record's fields written as ``train/<field>`` scalars.
TRAIN_FIELDS: tuple[str, ...] = ("lr", "images_per_s", "data_wait_fraction", "nonfinite_total")
#: Evaluation-result keys that are bookkeeping, not scores.
_NOT_SCORES = frozenset({"step", "seconds", "split", "n", "count", "support"})


def tensorboard_available() -> bool:
    """Whether the ``tensorboard`` package (the ``tensorboard`` extra) is installed."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def _numbers(prefix: str, obj: Any) -> Iterator[tuple[str, float]]:
    """``(tag, value)`` for every finite number in nested dicts (lists are skipped: per-class detail)."""
    if isinstance(obj, bool) or obj is None:
        return
    if isinstance(obj, (int, float)):
        if math.isfinite(obj):
            yield prefix, float(obj)
        return
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            if str(key) in _NOT_SCORES:
                continue
            yield from _numbers(f"{prefix}/{key}" if prefix else str(key), value)


def scalars(record: Mapping[str, Any]) -> list[tuple[str, float]]:
    """The ``(tag, value)`` scalars of one ``metrics.jsonl`` record (see the module docstring)."""
    kind = record.get("kind")
    out: list[tuple[str, float]] = []
    if kind == "train":
        out += list(_numbers("loss", record.get("loss") or {}))
        out += [(f"train/{k}", float(record[k])) for k in TRAIN_FIELDS
                if isinstance(record.get(k), (int, float)) and math.isfinite(record[k])]
    elif kind == "eval":
        out += list(_numbers("val", record.get("results") or {}))
    return out


class TensorBoardWriter:
    """Writes ``metrics.jsonl`` records and the run's config as TensorBoard events into ``log_dir``.

    ``purge_step``: for a resumed run, the first step after its checkpoint. ``ValueError`` with the install
    command when the ``tensorboard`` package is missing.
    """

    def __init__(self, log_dir: str | os.PathLike, purge_step: int | None = None) -> None:
        if not tensorboard_available():
            raise ValueError('TensorBoard events need the tensorboard package: pip install "fbn_fast[tensorboard]"')
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        # purge_step: TensorBoard hides the events at and after it from earlier files (a resumed run's lost tail).
        self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)

    def write(self, record: Mapping[str, Any]) -> None:
        """Add one record's scalars at its step (wall time: the record's ``time`` when it has one)."""
        step = int(record.get("step", 0))
        wall = record.get("time")
        for tag, value in scalars(record):
            self._writer.add_scalar(tag, value, step, walltime=wall)

    def write_config(self, config_text: str, step: int = 0) -> None:
        """The run's configuration as text (shown as preformatted text in TensorBoard's Text tab)."""
        body = "\n".join("    " + line for line in config_text.splitlines())  # Markdown code block
        self._writer.add_text("config", body, step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (a line cut short by a kill is skipped)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fbn_fast.tensorboard",
                                description="Write TensorBoard events of a run from its metrics.jsonl and "
                                            "config.toml.")
    p.add_argument("run_dir", help="a run folder written by python -m fbn_fast.train")
    p.add_argument("--out", default=None, help="event folder (default: RUN_DIR/tensorboard)")
    args = p.parse_args(argv)
    run = Path(args.run_dir)
    metrics = run / "metrics.jsonl"
    try:
        if not metrics.is_file():
            raise ValueError(f"{str(run)!r} has no metrics.jsonl")
        with TensorBoardWriter(args.out or run / "tensorboard") as tb:
            if (run / "config.toml").is_file():
                tb.write_config((run / "config.toml").read_text())
            records = read_records(metrics)
            for rec in records:
                tb.write(rec)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(records)} records to {tb.log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
