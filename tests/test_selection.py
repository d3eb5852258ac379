"""Model selection: the validation score, best.pt beside the last checkpoints, run folders as checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_preflight import corpus  # noqa: F401 - the fixture
from tiny_corpus import train_argv
from tiny_model import tiny_model

from fbn_fast.checkpoint import checkpoint_path, find_checkpoints, load_checkpoint, save_checkpoint
from fbn_fast.evaluate import main as evaluate_main
from fbn_fast.metrics import MultiDatasetMetrics
from fbn_fast.selection import BestCheckpoint, resolve_checkpoint, validation_score
from fbn_fast.train import main as train_main


def test_validation_score_is_the_fields_scores_per_task_over_the_datasets_that_label_it():
    g = torch.Generator().manual_seed(0)
    n = 40
    metrics = MultiDatasetMetrics(["e", "a", "ev"])
    ds = torch.tensor([0] * 10 + [1] * 10 + [2] * 20)
    expr_mask = ds != 1
    au_mask = torch.zeros(n, 17, dtype=torch.bool)
    au_mask[ds == 1, :5] = True
    metrics.update(ds, expr_logits=torch.randn(n, 7, generator=g), expr=torch.randint(0, 7, (n,), generator=g),
                   expr_mask=expr_mask, au_logits=torch.randn(n, 17, generator=g),
                   au=torch.randint(0, 2, (n, 17), generator=g).float(), au_mask=au_mask,
                   va_pred=torch.rand(n, 2, generator=g) * 2 - 1, va=torch.rand(n, 2, generator=g) * 2 - 1,
                   va_mask=ds == 2)
    res = {"datasets": metrics.compute()}
    sel = validation_score(res)
    d = res["datasets"]
    expr = [0.67 * d[k]["expression"]["macro_f1"] + 0.33 * d[k]["expression"]["accuracy"] for k in ("e", "ev")]
    au = 0.5 * d["a"]["au"]["mean_f1"] + 0.5 * d["a"]["au"]["mean_accuracy"]
    va = 0.5 * (d["ev"]["va"]["ccc_valence"] + d["ev"]["va"]["ccc_arousal"])
    # float32 statistics summed in different orders: 1e-6 absolute
    assert sel["tasks"] == pytest.approx({"expression": np.mean(expr), "au": au, "va": va}, abs=1e-6)
    assert sel["score"] == pytest.approx(np.mean(expr) + au + va, abs=1e-6)
    assert set(sel["datasets"]) == {"e", "a", "ev"} and set(sel["datasets"]["ev"]) == {"expression", "va"}
    assert validation_score({"datasets": {}}) is None


def _checkpoint(run: Path, step: int) -> Path:
    return save_checkpoint(checkpoint_path(run, step), model=tiny_model(), step=step)


def test_best_is_kept_only_when_beaten_and_forgotten_after_an_earlier_resume(tmp_path):
    best = BestCheckpoint(tmp_path)
    assert best.record() is None
    assert best.offer(_checkpoint(tmp_path, 2), 2, {"score": 0.5, "tasks": {"au": 0.5}})
    assert not best.offer(_checkpoint(tmp_path, 4), 4, {"score": 0.5, "tasks": {"au": 0.5}})  # a tie keeps step 2
    assert not best.offer(_checkpoint(tmp_path, 6), 6, {"score": 0.4, "tasks": {"au": 0.4}})
    assert load_checkpoint(best.path)["step"] == 2 and best.record()["step"] == 2
    assert best.offer(_checkpoint(tmp_path, 8), 8, {"score": 0.9, "tasks": {"au": 0.9}})
    assert load_checkpoint(best.path)["step"] == 8  # read back through its checksum file
    assert not best.forget_after(8) and best.forget_after(7)
    assert best.record() is None and not best.path.exists()


def test_run_folder_resolves_to_best_else_latest(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="has no checkpoints"):
        resolve_checkpoint(run.parent)
    with pytest.raises(ValueError, match="does not exist"):
        resolve_checkpoint(run)
    _checkpoint(run, 3)
    latest = _checkpoint(run, 5)
    assert resolve_checkpoint(run) == latest == resolve_checkpoint(run / "checkpoints")
    BestCheckpoint(run).offer(run / "checkpoints" / "step_00000003.pt", 3, {"score": 1.0, "tasks": {"au": 1.0}})
    assert resolve_checkpoint(run) == run / "checkpoints" / "best.pt"
    assert resolve_checkpoint(latest) == latest


def test_training_keeps_the_best_on_val_besides_the_last_checkpoints(corpus, tmp_path, capsys):  # noqa: F811
    assert train_main(train_argv(corpus, tmp_path / "runs", "sel", steps=6, eval_every=1, keep_checkpoints=1,
                                 lr=0.05)) == 0
    run = tmp_path / "runs" / "sel"
    records = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]
    val = [(r["step"], r["results"]["selection"]["score"]) for r in records[:-1]]
    final = records[-1]["results"]["validation"]
    val.append((records[-1]["step"], final["selection"]["score"]))
    assert [s for s, _ in val] == [1, 2, 3, 4, 5, 6]
    assert len({score for _, score in val}) == 6  # VA CCC moves with every step: the choice is a real one
    top = max(score for _, score in val)
    first_best = next(s for s, score in val if score == top)  # the earliest of equal scores
    best = json.loads((run / "best.json").read_text())
    assert best["step"] == first_best and best["score"] == pytest.approx(top, abs=1e-12)
    assert load_checkpoint(run / "checkpoints" / "best.pt")["step"] == first_best
    assert [s for s, _ in find_checkpoints(run)] == [6]  # --keep-checkpoints 1: best.pt is kept besides
    assert json.loads((run / "eval.json").read_text())["step"] == first_best  # the chosen model is scored
    # evaluate RUN_DIR scores best.pt
    out = tmp_path / "ev.json"
    assert evaluate_main([str(run), str(corpus), "--split", "val", "--json", str(out), "--loader-backend", "cpu",
                          "--num-workers", "0"]) == 0
    ev = json.loads(out.read_text())
    assert ev["checkpoint"] == str(run / "checkpoints" / "best.pt")
    assert validation_score(ev)["score"] == pytest.approx(top, abs=1e-6)  # same model, same val images
