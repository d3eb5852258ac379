"""``python -m fbn_fast.predict``: JSON structure, agreement with a direct forward pass, per-file errors, faces
found in a real photo (scikit-image's astronaut), boxes from a file, the annotated picture, the SynthFace warning."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_model import tiny_model

from fbn_fast.checkpoint import save_checkpoint
from fbn_fast.config import TrainConfig
from fbn_fast.data.decode import IMAGENET_MEAN, IMAGENET_STD
from fbn_fast.labels import AUS, COMPOUNDS, EXPRESSIONS
from fbn_fast.predict import SyntheticModelWarning, expand_inputs, load_image, main, parse_box, predict

SIZE = 32


@pytest.fixture(scope="module")
def model():
    return tiny_model(0)


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


def _forward(model, img: np.ndarray, box=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear resize of the whole image (or of ``box``) + ImageNet normalisation, then the model (an independent
    path)."""
    pil = Image.fromarray(img).resize((SIZE, SIZE), Image.BILINEAR, box=box)
    x = torch.from_numpy(np.asarray(pil, np.float32) / 255.0)
    x = ((x - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).permute(2, 0, 1)[None]
    with torch.no_grad():
        out = model(x)
    return torch.softmax(out.expr, 1)[0].numpy(), torch.sigmoid(out.au)[0].numpy(), out.va[0].numpy()


def test_predict_structure_and_values(model, files):
    d, good = files
    res = predict(model, [d / "sub" / "b.png", d / "missing.jpg"], image_size=SIZE, detector=None, device="cpu",
                  top_k=4)
    assert [r["path"] for r in res] == [str(d / "sub" / "b.png"), str(d / "missing.jpg")]
    assert set(res[0]) == {"path", "size", "faces"} and res[0]["size"] == [40, 48]
    (r,) = res[0]["faces"]
    assert set(r) == {"box", "crop", "expression", "aus", "va", "compound"}
    assert r["box"] == r["crop"] == [0, 0, 40, 48]  # no detection: the whole image is the face
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
    r = predict(model, [d / "sub" / "b.png"], image_size=SIZE, box=box, device="cpu")[0]["faces"][0]
    assert r["box"] == r["crop"] == [4, 8, 36, 40]  # a given box is the crop, as a manifest's box is
    crop = good["sub/b.png"][8:40, 4:36]  # exactly SIZE × SIZE: the crop is used as is
    np.testing.assert_array_equal(load_image(d / "sub" / "b.png", SIZE, box), crop)
    p_e, _, _ = _forward(model, crop)
    np.testing.assert_allclose(list(r["expression"]["probabilities"].values()), p_e, atol=1e-4)


def test_directory_expansion_and_corrupt_files_through_the_cli(files, checkpoint, capsys):
    d, _ = files
    assert [p.removeprefix(str(d) + "/") for p in expand_inputs([d])] == [
        "a.jpg", "empty.jpg", "sub/b.png", "text.png", "truncated.jpg"]
    rc = main([str(checkpoint), str(d), "--json", "--device", "cpu", "--no-detect"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 1  # some files failed, the others were predicted
    by_name = {r["path"].removeprefix(str(d) + "/"): r for r in out}
    assert set(by_name) == {"a.jpg", "empty.jpg", "sub/b.png", "text.png", "truncated.jpg"}
    assert by_name["empty.jpg"]["error"] == "empty file"
    assert "truncated" in by_name["truncated.jpg"]["error"]
    assert "not an image" in by_name["text.png"]["error"]
    for name in ("a.jpg", "sub/b.png"):
        assert "error" not in by_name[name] and by_name[name]["faces"][0]["expression"]["label"] in EXPRESSIONS
    # the table names every file and its error
    assert main([str(checkpoint), str(d / "a.jpg"), str(d / "empty.jpg"), "--device", "cpu", "--no-detect"]) == 1
    table = capsys.readouterr().out
    assert "a.jpg" in table and "error: empty file" in table
    assert main([str(checkpoint), str(d / "a.jpg"), "--device", "cpu", "--no-detect"]) == 0


def test_cli_errors_name_the_option(files, checkpoint, capsys):
    d, _ = files
    for bad in ("1,2,3", "1,2,a,4", "5,5,4,9"):
        assert main([str(checkpoint), str(d / "a.jpg"), "--face-box", bad]) == 2
        assert "--face-box" in capsys.readouterr().err
    assert main([str(checkpoint), str(d / "a.jpg"), "--top-k", "0"]) == 2
    assert "--top-k" in capsys.readouterr().err
    assert main([str(d / "nope.pt"), str(d / "a.jpg")]) == 2
    assert "nope.pt" in capsys.readouterr().err
    assert main([str(checkpoint), str(d / "a.jpg"), "--detector", "nope"]) == 2
    assert "--detector 'nope'" in capsys.readouterr().err
    assert main([str(checkpoint), str(d / "a.jpg"), "--boxes", str(d / "none.json")]) == 2
    assert "--boxes" in capsys.readouterr().err
    assert main([str(checkpoint), str(d / "a.jpg"), "--margin", "-1"]) == 2
    assert "--margin" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ real photos
@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """scikit-image's astronaut (one face), a group picture built from it (three faces), a plain picture."""
    from skimage import data

    d = tmp_path_factory.mktemp("photos")
    astro = data.astronaut()
    Image.fromarray(astro).save(d / "astronaut.png")
    Image.fromarray(astro).save(d / "astronaut.jpg", quality=92)
    group = np.full((512 + 307, 1024, 3), 90, np.uint8)
    group[:512, :512], group[:512, 512:] = astro, astro[:, ::-1]
    group[512:, 300:607] = np.asarray(Image.fromarray(astro).resize((307, 307)))
    Image.fromarray(group).save(d / "group.png")
    Image.fromarray(np.full((120, 160, 3), 200, np.uint8)).save(d / "wall.png")
    return d


def _inside(box, size) -> bool:
    return 0 <= box[0] < box[2] <= size[0] and 0 <= box[1] < box[3] <= size[1]


def test_cli_detects_the_astronauts_face_and_draws_the_answer(photos, checkpoint, tmp_path, capsys):
    out_dir = tmp_path / "annotated"
    rc = main([str(checkpoint), str(photos / "astronaut.png"), str(photos / "wall.png"), "--json", "--device", "cpu",
               "--annotate", str(out_dir)])
    assert rc == 0
    astro, wall = json.loads(capsys.readouterr().out)
    assert astro["size"] == [512, 512] and len(astro["faces"]) == 1
    face = astro["faces"][0]
    assert _inside(face["box"], astro["size"]) and _inside(face["crop"], astro["size"])
    assert 60 <= face["box"][2] - face["box"][0] <= 160  # her face (about 95 px), not the picture
    # The crop is the box with the default margin (0.2 of its side on each side), square, about the same centre.
    side = face["crop"][2] - face["crop"][0]
    assert side == pytest.approx(1.4 * (face["box"][2] - face["box"][0]), abs=0.02)
    assert face["crop"][3] - face["crop"][1] == pytest.approx(side, abs=0.02)
    # Named outputs: every class, AU and compound by name.
    assert list(face["expression"]["probabilities"]) == list(EXPRESSIONS)
    assert list(face["aus"]["probabilities"]) == list(AUS)
    assert all(c["label"] in COMPOUNDS for c in face["compound"]["top"])
    assert wall["faces"] == [] and wall["note"] == "no face found"
    for entry, name in ((astro, "astronaut.png"), (wall, "wall.png")):
        assert entry["annotated"] == str(out_dir / name)
        with Image.open(entry["annotated"]) as pic, Image.open(photos / name) as src:
            assert pic.size == src.size  # the input's size
            assert not np.array_equal(np.asarray(pic.convert("RGB")), np.asarray(src.convert("RGB")))


def test_every_face_of_a_group_picture_gets_its_own_answer(model, photos):
    (r,) = predict(model, [photos / "group.png"], image_size=SIZE, device="cpu")
    assert len(r["faces"]) == 3
    assert all(_inside(f["box"], r["size"]) for f in r["faces"])
    assert len({f["expression"]["probabilities"]["Neutral"] for f in r["faces"]}) == 3  # three different crops
    # Each face's answer is the one its crop gets when given as a box: detection only chooses the crops.
    crops = [f["crop"] for f in r["faces"]]
    (given,) = predict(model, [photos / "group.png"], image_size=SIZE, device="cpu",
                       boxes={"group.png": crops})
    for a, b in zip(r["faces"], given["faces"]):
        assert a["expression"] == b["expression"] and a["aus"] == b["aus"] and a["va"] == b["va"]


def test_boxes_file_and_no_detect_score_the_same_crop(model, photos, checkpoint, tmp_path, capsys):
    box = [170, 60, 280, 170]
    crop = tmp_path / "face.png"
    Image.fromarray(np.asarray(Image.open(photos / "astronaut.png"))[60:170, 170:280]).save(crop)
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({str(photos / "astronaut.png"): [box], "wall.png": []}))
    assert main([str(checkpoint), str(photos / "astronaut.png"), str(photos / "wall.png"), "--boxes", str(boxes),
                 "--json", "--device", "cpu"]) == 0
    astro, wall = json.loads(capsys.readouterr().out)
    assert [f["box"] for f in astro["faces"]] == [box] and astro["faces"][0]["crop"] == box  # used as given
    assert wall["faces"] == [] and wall["note"] == "no face found"
    assert main([str(checkpoint), str(crop), "--no-detect", "--json", "--device", "cpu"]) == 0
    (whole,) = json.loads(capsys.readouterr().out)
    assert whole["faces"][0]["box"] == [0, 0, 110, 110]
    # Each against an independent forward pass of the same region (the two differ from each other slightly: a
    # region resized inside its image filters across its edges, a region saved alone cannot).
    astro_px = np.asarray(Image.open(photos / "astronaut.png"))
    for entry, ref in ((astro["faces"][0], _forward(model, astro_px, box)),
                       (whole["faces"][0], _forward(model, astro_px[60:170, 170:280]))):
        np.testing.assert_allclose(list(entry["expression"]["probabilities"].values()), ref[0], atol=1e-4)
        np.testing.assert_allclose(list(entry["aus"]["probabilities"].values()), ref[1], atol=1e-4)


def test_given_boxes_outside_the_image_or_missing_are_errors_naming_the_image(photos, checkpoint, tmp_path, capsys):
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"astronaut.png": [[400, 400, 600, 500]]}))
    rc = main([str(checkpoint), str(photos / "astronaut.png"), str(photos / "wall.png"), "--boxes", str(boxes),
               "--json", "--device", "cpu"])
    astro, wall = json.loads(capsys.readouterr().out)
    assert rc == 1
    assert astro["error"] == f"{photos / 'astronaut.png'}: face box [400.0, 400.0, 600.0, 500.0] lies outside the " \
                             "512x512 image"
    assert wall["error"] == f"{photos / 'wall.png'}: no entry in the --boxes file"
    assert main([str(checkpoint), str(photos / "wall.png"), "--face-box", "10,10,170,100", "--json"]) == 1
    assert "lies outside the 160x120 image" in json.loads(capsys.readouterr().out)[0]["error"]


def test_a_synthface_only_model_warns_once_outside_synthface(model, photos, tmp_path):
    synth = {"synthface_only": True, "datasets": ["synth_expr"], "data_root": str(tmp_path / "synthface")}
    files = [photos / "astronaut.png", photos / "wall.png"]
    with pytest.warns(SyntheticModelWarning, match="trained only on SynthFace") as caught:
        predict(model, files, image_size=SIZE, detector=None, device="cpu", trained_on=synth)
    assert len([w for w in caught if w.category is SyntheticModelWarning]) == 1  # once for the whole call
    inside = tmp_path / "synthface" / "images"
    inside.mkdir(parents=True)
    Image.open(photos / "wall.png").save(inside / "0.png")
    real = {**synth, "synthface_only": False}
    with warnings.catch_warnings():
        warnings.simplefilter("error", SyntheticModelWarning)
        predict(model, [inside / "0.png"], image_size=SIZE, detector=None, device="cpu", trained_on=synth)
        predict(model, files, image_size=SIZE, detector=None, device="cpu", trained_on=real)


def test_cli_prints_the_synthface_warning_once(photos, checkpoint, capsys):
    # The fixture checkpoint's config names no manifest: the default job, trained on SynthFace.
    assert main([str(checkpoint), str(photos / "astronaut.png"), str(photos / "wall.png"), "--device", "cpu"]) == 0
    assert capsys.readouterr().err.count("warning: this model was trained only on SynthFace") == 1
