"""Model selection on the validation split: the validation score and the best-checkpoint rule.

The score of one evaluation (:func:`validation_score`) is per task, over the tasks the validation data labels
(the field's scores, docs/method.md §5):

- expression: 0.67 · macro-F1 + 0.33 · accuracy,
- AU: 0.5 · mean F1 + 0.5 · mean accuracy (over the AUs each dataset annotates),
- VA: the mean of the valence and arousal CCC,

each averaged over the validation datasets that label the task, and their sum. A higher sum is better; the
first evaluation that reaches a score keeps it (a tie keeps the earlier step). :class:`BestCheckpoint` keeps
``checkpoints/best.pt`` (the best step's checkpoint) and ``best.json`` (its step and scores) in the run folder,
so a resumed run knows what it has to beat.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["BEST_NAME", "SELECTION_SPLIT", "BestCheckpoint", "resolve_checkpoint", "validation_score"]

log = logging.getLogger("fbn_fast.selection")

#: The split that selects the model (and is evaluated during training).
SELECTION_SPLIT = "val"
#: File name of the selected checkpoint inside ``<run>/checkpoints/``.
BEST_NAME = "best.pt"


def _task_values(tasks: Mapping[str, Any]) -> dict[str, float]:
    """The score of each task one dataset's result labels (tasks with an undefined metric are left out)."""
    out: dict[str, float] = {}
    e, a, v = tasks.get("expression"), tasks.get("au"), tasks.get("va")
    # The metrics' "abaw" entries are these scores (fbn_fast.metrics: EXPR_F1_WEIGHT, AU_F1_WEIGHT, ...).
    if e and e.get("abaw") is not None:
        out["expression"] = e["abaw"]
    if a and a.get("abaw") is not None:
        out["au"] = a["abaw"]
    if v and v.get("ccc_valence") is not None and v.get("ccc_arousal") is not None:
        out["va"] = 0.5 * (v["ccc_valence"] + v["ccc_arousal"])
    return {k: float(x) for k, x in out.items() if math.isfinite(x)}


def validation_score(result: Mapping[str, Any]) -> dict[str, Any] | None:
    """``{"score": sum, "tasks": {task: mean over datasets}, "datasets": {dataset: {task: score}}}`` of an
    :func:`fbn_fast.evaluate.evaluate` result; ``None`` when it scores no task."""
    per_dataset = {name: _task_values(tasks) for name, tasks in result.get("datasets", {}).items()}
    per_dataset = {k: v for k, v in per_dataset.items() if v}
    tasks: dict[str, float] = {}
    for task in ("expression", "au", "va"):
        values = [v[task] for v in per_dataset.values() if task in v]
        if values:
            tasks[task] = sum(values) / len(values)
    if not tasks:
        return None
    return {"score": sum(tasks.values()), "tasks": tasks, "datasets": per_dataset}


def _sidecar(path: Path) -> Path:
    """The SHA-256 file written beside a checkpoint."""
    return path.with_name(path.name + ".sha256")


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint a path names: a checkpoint file as it is; a run folder (or its ``checkpoints/``) gives its
    ``best.pt`` (the best on validation), else its latest ``step_<N>.pt``. ``ValueError`` naming the path when
    there is none. ``evaluate``, ``predict`` and ``fewshot`` read their CHECKPOINT argument through this."""
    from .checkpoint import latest_checkpoint

    p = Path(path)
    if p.is_dir():
        run_dir = p.parent if p.name == "checkpoints" and not (p / "checkpoints").is_dir() else p
        best = BestCheckpoint(run_dir).path
        if best.is_file():
            return best
        latest = latest_checkpoint(run_dir)
        if latest is None:
            raise ValueError(f"run folder {str(p)!r} has no checkpoints ({BEST_NAME} or step_<N>.pt) in "
                             f"{str(run_dir / 'checkpoints')!r}")
        return latest
    if not p.exists():
        raise ValueError(f"checkpoint {str(p)!r} does not exist (give a checkpoint file or a run folder)")
    return p


@dataclass
class BestCheckpoint:
    """The best-on-validation checkpoint of a run folder: ``checkpoints/best.pt`` and ``best.json``."""

    run_dir: Path

    @property
    def path(self) -> Path:
        return Path(self.run_dir) / "checkpoints" / BEST_NAME

    @property
    def record_path(self) -> Path:
        return Path(self.run_dir) / "best.json"

    def record(self) -> dict[str, Any] | None:
        """What ``best.json`` says (step, score, tasks), or ``None`` when no model was selected yet."""
        try:
            rec = json.loads(self.record_path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return rec if self.path.is_file() and isinstance(rec, dict) and "score" in rec else None

    def offer(self, checkpoint: str | os.PathLike, step: int, selection: Mapping[str, Any]) -> bool:
        """Keep ``checkpoint`` (written at ``step``) as best.pt when its validation score beats the best so far;
        returns whether it did. The copy is written beside best.pt and renamed over it (never half written)."""
        best = self.record()
        if best is not None and not selection["score"] > best["score"]:
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{BEST_NAME}.tmp")
        shutil.copyfile(checkpoint, tmp)
        # The checkpoint's SHA-256 file (fbn_fast.checkpoint), renamed for best.pt, goes first as it does there.
        digest = _sidecar(Path(checkpoint))
        if digest.is_file():
            tmp_sum = digest.with_name(f".{BEST_NAME}.sha256.tmp")
            tmp_sum.write_text(f"{digest.read_text().split()[0]}  {BEST_NAME}\n")
            os.replace(tmp_sum, _sidecar(self.path))
        else:
            _sidecar(self.path).unlink(missing_ok=True)
        os.replace(tmp, self.path)
        rec = {"step": int(step), "checkpoint": Path(checkpoint).name, **dict(selection)}
        tmp_rec = self.record_path.with_name(self.record_path.name + ".tmp")
        tmp_rec.write_text(json.dumps(rec, indent=1))
        os.replace(tmp_rec, self.record_path)
        log.info("best.pt: step %d, validation score %.4f (%s)", step, selection["score"],
                 ", ".join(f"{k} {v:.4f}" for k, v in selection["tasks"].items()))
        return True

    def forget_after(self, step: int) -> bool:
        """Drop a best.pt chosen after ``step`` (a run resumed from an earlier checkpoint retrains those steps);
        returns whether it did."""
        best = self.record()
        if best is None or int(best["step"]) <= step:
            return False
        self.path.unlink(missing_ok=True)
        _sidecar(self.path).unlink(missing_ok=True)
        self.record_path.unlink(missing_ok=True)
        log.info("best.pt of step %d dropped: the run continues from step %d", best["step"], step)
        return True
