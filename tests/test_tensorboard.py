"""TensorBoard events written from metrics.jsonl records, read back with TensorBoard's own EventAccumulator."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fbn_fast.losses import TERMS
from fbn_fast.tensorboard import TensorBoardWriter, main, scalars

TRAIN = {"kind": "train", "step": 10, "epoch": 0, "time": 1700000000.0, "lr": 0.01, "images_per_s": 812.5,
         "data_wait_fraction": 0.25, "steps": 10, "finite_steps": 10, "nonfinite_total": 0,
         "loss": {"total": 2.5, **{t: 0.1 * (i + 1) for i, t in enumerate(TERMS)}}}
EVAL = {"kind": "eval", "step": 20, "time": 1700000100.0,
        "results": {"step": 20, "split": "test", "seconds": 1.5,
                    "synth_expr": {"expr": {"accuracy": 0.75, "macro_f1": 0.5, "n": 40, "per_class_f1": [0.1, 0.2],
                                            "confusion": [[1, 0], [0, 1]]}},
                    "synth_au_a": {"au": {"mean_f1": 0.6, "mean_accuracy": None}}}}


def _load(folder) -> EventAccumulator:
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return acc


def test_scalars_of_a_training_and_an_evaluation_record():
    train = dict(scalars(TRAIN))
    assert train["loss/total"] == 2.5 and {f"loss/{t}" for t in TERMS} <= set(train)
    assert train["train/lr"] == 0.01 and train["train/images_per_s"] == 812.5
    assert train["train/data_wait_fraction"] == 0.25
    ev = dict(scalars(EVAL))
    # Scores only: no counts, no lists, no missing values, no bookkeeping (step, seconds).
    assert ev == {"val/synth_expr/expr/accuracy": 0.75, "val/synth_expr/expr/macro_f1": 0.5,
                  "val/synth_au_a/au/mean_f1": 0.6}


def test_writer_events_hold_every_loss_term_lr_throughput_and_validation_scores(tmp_path):
    with TensorBoardWriter(tmp_path / "tb") as tb:
        tb.write_config('[run]\nsteps = 20\n')
        tb.write(TRAIN)
        tb.write({**TRAIN, "step": 20, "lr": 0.005, "loss": {**TRAIN["loss"], "total": 2.0}})
        tb.write(EVAL)
    acc = _load(tmp_path / "tb")
    tags = set(acc.Tags()["scalars"])
    expected = {"loss/total", *(f"loss/{t}" for t in TERMS), "train/lr", "train/images_per_s",
                "train/data_wait_fraction", "val/synth_expr/expr/accuracy", "val/synth_au_a/au/mean_f1"}
    assert expected <= tags
    assert [(e.step, e.value) for e in acc.Scalars("train/lr")] == [(10, pytest.approx(0.01)),
                                                                    (20, pytest.approx(0.005))]
    assert [e.value for e in acc.Scalars("loss/total")] == [2.5, 2.0]
    assert acc.Scalars("val/synth_expr/expr/accuracy")[0].step == 20
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "steps = 20" in text


def test_cli_rebuilds_the_events_of_a_run_from_metrics_jsonl(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps(TRAIN) + "\n" + json.dumps(EVAL) + "\n{\"kind\": \"tr")
    (run / "config.toml").write_text("[run]\nseed = 3\n")
    assert main([str(run)]) == 0
    assert "wrote 2 records" in capsys.readouterr().out
    acc = _load(run / "tensorboard")
    assert {"loss/total", "train/lr", "val/synth_expr/expr/accuracy"} <= set(acc.Tags()["scalars"])
    assert main([str(tmp_path / "nothing")]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err
