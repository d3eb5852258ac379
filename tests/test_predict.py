"""``python -m fbn_fast.predict``: JSON structure, agreement with a direct forward pass, per-file errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fbn_fast.checkpoint import save_checkpoint
from fbn_fast.config import TrainConfig
from fbn_fast.data.decode import IMAGENET_MEAN, IMAGENET_STD
from fbn_fast.labels import AUS, COMPOUNDS, EXPRESSIONS
from fbn_fast.model import build_model
from fbn_fast.predict import expand_inputs, load_image, main, parse_box, predict

SIZE = 32


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model("small", trunk_kwargs={"width": 4})
    with torch.no_grad():
        for head in (m.expr_head, m.au_head, m.va_head):
            head.weight.normal_(0.0, 2.0)
    return m.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    (d / "sub").mkdir()
    good = {}
    for name in ("a.jpg", "sub/b.png"):
        img = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
        Image.fromarray(img).save(d / name)
        good[name] = img
    jpeg = (d / "a.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.png").write_bytes(b"this is not an image")
    (d / "notes.txt").write_text("not picked up from a directory")
    return d, good


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "step_00000000.pt"
    save_checkpoint(path, model=model, step=0, config=TrainConfig(image_size=SIZE).to_dict())
    return path


def _forward(model, img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Whole-image bilinear resize + ImageNet normalisation, then the model (an independent path)."""
    pil = Image.fromarray(img).resize((SIZE, SIZE), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(pil, np.float32) / 255.0)
    x = ((x - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).permute(2, 0, 1)[None]
    with torch.no_grad():
        out = model(x)
    return torch.softmax(out.expr, 1)[0].numpy(), torch.sigmoid(out.au)[0].numpy(), out.va[0].numpy()


def test_predict_structure_and_values(model, files):
    d, good = files
    res = predict(model, [d / "sub" / "b.png", d / "missing.jpg"], image_size=SIZE, device="cpu", top_k=4)
    assert [r["path"] for r in res] == [str(d / "sub" / "b.png"), str(d / "missing.jpg")]
    r = res[0]
    assert set(r) == {"path", "expression", "aus", "va", "compound"}
    p_e, s, va = _forward(model, good["sub/b.png"])
    probs = r["expression"]["probabilities"]
    assert list(probs) == list(EXPRESSIONS) and sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(list(probs.values()), p_e, atol=1e-4)
    assert r["expression"]["label"] == EXPRESSIONS[int(np.argmax(p_e))]
    np.testing.assert_allclose(list(r["aus"]["probabilities"].values()), s, atol=1e-4)
    assert list(r["aus"]["probabilities"]) == list(AUS)
    assert r["aus"]["active"] == [a for a, p in r["aus"]["probabilities"].items() if p >= 0.5]
    np.testing.assert_allclose([r["va"]["valence"], r["va"]["arousal"]], va, atol=1e-4)
    top = r["compound"]["top"]
    assert len(top) == 4 and all(t["label"] in COMPOUNDS for t in top)
    assert [t["probability"] for t in top] == sorted((t["probability"] for t in top), reverse=True)
    assert res[1] == {"path": str(d / "missing.jpg"), "error": "no such file"}


def test_face_box_crops_before_resizing(model, files):
    d, good = files
    box = parse_box("4,8,36,40")
    r = predict(model, [d / "sub" / "b.png"], image_size=SIZE, box=box, device="cpu")[0]
    crop = good["sub/b.png"][8:40, 4:36]  # exactly SIZE × SIZE: the crop is used as is
    np.testing.assert_array_equal(load_image(d / "sub" / "b.png", SIZE, box), crop)
    p_e, _, _ = _forward(model, crop)
    np.testing.assert_allclose(list(r["expression"]["probabilities"].values()), p_e, atol=1e-4)


def test_directory_expansion_and_corrupt_files_through_the_cli(files, checkpoint, capsys):
    d, _ = files
    assert [p.removeprefix(str(d) + "/") for p in expand_inputs([d])] == [
        "a.jpg", "empty.jpg", "sub/b.png", "text.png", "truncated.jpg"]
    rc = main([str(checkpoint), str(d), "--json", "--device", "cpu"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 1  # some files failed, the others were predicted
    by_name = {r["path"].removeprefix(str(d) + "/"): r for r in out}
    assert set(by_name) == {"a.jpg", "empty.jpg", "sub/b.png", "text.png", "truncated.jpg"}
    assert by_name["empty.jpg"]["error"] == "empty file"
    assert "truncated" in by_name["truncated.jpg"]["error"]
    assert "not an image" in by_name["text.png"]["error"]
    for name in ("a.jpg", "sub/b.png"):
        assert "error" not in by_name[name] and by_name[name]["expression"]["label"] in EXPRESSIONS
    # the table names every file and its error
    assert main([str(checkpoint), str(d / "a.jpg"), str(d / "empty.jpg"), "--device", "cpu"]) == 1
    table = capsys.readouterr().out
    assert "a.jpg" in table and "error: empty file" in table
    assert main([str(checkpoint), str(d / "a.jpg"), "--device", "cpu"]) == 0


def test_cli_errors_name_the_option(files, checkpoint, capsys):
    d, _ = files
    for bad in ("1,2,3", "1,2,a,4", "5,5,4,9"):
        assert main([str(checkpoint), str(d / "a.jpg"), "--face-box", bad]) == 2
        assert "--face-box" in capsys.readouterr().err
    assert main([str(checkpoint), str(d / "a.jpg"), "--top-k", "0"]) == 2
    assert "--top-k" in capsys.readouterr().err
    assert main([str(d / "nope.pt"), str(d / "a.jpg")]) == 2
    assert "nope.pt" in capsys.readouterr().err
