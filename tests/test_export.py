"""``python -m fbn_fast.export``: ONNX (run by onnxruntime) and ExportedProgram files match the PyTorch model."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from tiny_model import tiny_model

from fbn_fast.checkpoint import save_checkpoint, training_record
from fbn_fast.compound import CompoundScorer
from fbn_fast.config import TrainConfig
from fbn_fast.export import OUTPUTS, FaceBehaviorProbabilities, main
from fbn_fast.labels import AUS, COMPOUNDS, EXPRESSIONS

SIZE = 32
#: Largest |exported - PyTorch| accepted: float32 on both sides, different kernels and summation orders
#: (differences seen: below 1e-6).
TOL = 1e-5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = tiny_model(0, bias_std=0.5)
    path = tmp_path_factory.mktemp("ckpt") / "step_00000007.pt"
    record = training_record(model, datasets=["synth_expr"], image_size=SIZE, expressions=EXPRESSIONS, aus=AUS,
                             synthface=True)
    save_checkpoint(path, model=model, step=7, config=TrainConfig(image_size=SIZE).to_dict(), trained_on=record)
    return path, model


def _reference(model, x, scorer):
    with torch.no_grad():
        out = model(x)
    return (torch.softmax(out.expr, 1), torch.sigmoid(out.au), out.va,
            torch.softmax(scorer.logits(out.expr, out.au), 1))


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_wrapper_outputs_are_the_models_probabilities_and_the_compound_scorers(beta):
    model = tiny_model(1, bias_std=0.5)
    scorer = CompoundScorer([0, 3, 7, 12], beta=beta, temperature=0.7)
    x = torch.randn(5, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = FaceBehaviorProbabilities(model, scorer)(x)
    for name, a, b in zip(OUTPUTS, got, _reference(model, x, scorer)):
        # The compound head is the scorer's linear form (weights folded ahead): same value up to rounding.
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    assert got[3].shape == (5, 4)


def test_onnx_export_matches_pytorch_under_onnxruntime(checkpoint, tmp_path, capsys):
    path, model = checkpoint
    out = tmp_path / "model.onnx"
    assert main([str(path), "--format", "onnx", "--out", str(out), "--tolerance", str(TOL)]) == 0
    assert "largest |exported - PyTorch|" in capsys.readouterr().out
    side = json.loads((tmp_path / "model.onnx.json").read_text())
    assert side["expressions"] == list(EXPRESSIONS) and side["aus"] == list(AUS)
    assert side["compounds"] == list(COMPOUNDS)
    assert side["input"]["image_size"] == SIZE and side["input"]["shape"] == ["N", 3, SIZE, SIZE]
    assert side["input"]["normalization"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert side["trained_on"]["datasets"] == ["synth_expr"] and side["trained_on"]["synthface_only"] is True
    assert max(side["verification"]["max_abs_diff"].values()) <= TOL

    # Independently of the command's own check: a batch size it never saw, against the PyTorch model.
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == list(OUTPUTS)
    x = torch.randn(7, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    got = session.run(None, {"images": x.numpy()})
    ref = _reference(model, x, CompoundScorer())
    for name, a, b in zip(OUTPUTS, got, ref):
        assert a.shape == tuple(b.shape), name
        np.testing.assert_allclose(a, b.numpy(), atol=TOL, rtol=0, err_msg=name)


def test_exported_program_matches_pytorch(checkpoint, tmp_path):
    path, model = checkpoint
    out = tmp_path / "model.pt2"
    assert main([str(path), "--format", "exported-program", "--out", str(out), "--compound-classes", "0,1,2"]) == 0
    side = json.loads((tmp_path / "model.pt2.json").read_text())
    assert side["compounds"] == list(COMPOUNDS[:3]) and side["file_format"] == "exported-program"
    loaded = torch.export.load(str(out)).module()
    x = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    for name, a, b in zip(OUTPUTS, loaded(x), _reference(model, x, CompoundScorer([0, 1, 2]))):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0, msg=name)  # same kernels, traced graph: tiny rounding


def test_export_errors_name_the_option(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    assert main([str(path), "--compound-classes", "present", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "--compound-classes present" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.pt"), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
