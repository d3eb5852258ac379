"""Few-shot compound expressions (docs/method.md §4) end to end: support/query split, head and trunk fine-tuning."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_model import tiny_model

from fbn_fast.checkpoint import save_checkpoint
from fbn_fast.config import TrainConfig
from fbn_fast.data import Manifest
from fbn_fast.fewshot import few_shot, main, split_support_query
from fbn_fast.labels import COMPOUNDS, MISSING

SIZE = 32
CLASSES = (0, 2, 5)  # compound ids; each is drawn in its own colour
COLOURS = {0: (200, 40, 40), 2: (40, 190, 60), 5: (50, 60, 210)}
PER_CLASS = 12


def _tiny_model(seed: int = 0) -> torch.nn.Module:
    return tiny_model(seed, heads=("au_head", "expr_head"))  # AU probabilities that differ with the image content


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A compound test split whose class is the image's colour: learnable from the AU outputs, unknown to zero-shot."""
    root = tmp_path_factory.mktemp("fewshot")
    rng = np.random.default_rng(0)
    paths, compound, split = [], [], []
    for c in CLASSES:
        for i in range(PER_CLASS):
            img = np.clip(np.array(COLOURS[c]) + rng.normal(0, 12, (36, 36, 3)), 0, 255).astype(np.uint8)
            rel = f"c{c}_{i}.jpg"
            Image.fromarray(img).save(root / rel, quality=95)
            paths.append(rel)
            compound.append(c)
            split.append("test")
    # a few unlabelled rows and a train row, which must stay out of both sets
    for i in range(3):
        Image.fromarray(np.full((36, 36, 3), 128, np.uint8)).save(root / f"x{i}.jpg")
        paths.append(f"x{i}.jpg")
        compound.append(MISSING)
        split.append("test" if i < 2 else "train")
    m = Manifest.from_columns(paths, "synth_compound", split=np.array(split, dtype=object),
                              compound=np.array(compound))
    m.save(root / "manifest.npz")
    return root, m


def test_split_support_query_takes_k_per_class():
    compound = np.array([0, 0, 0, 2, 2, 2, 2, MISSING, 5, 5])
    sup, qry = split_support_query(compound, 2, [0, 2, 5], seed=3)
    assert len(sup) == 6 and all((compound[sup] == c).sum() == 2 for c in (0, 2, 5))
    assert set(sup).isdisjoint(qry) and 7 not in set(sup) | set(qry)
    assert sorted(set(sup) | set(qry)) == [0, 1, 2, 3, 4, 5, 6, 8, 9]
    again, _ = split_support_query(compound, 2, [0, 2, 5], seed=3)
    np.testing.assert_array_equal(sup, again)
    with pytest.raises(ValueError, match="class 5 has 2 labelled rows"):
        split_support_query(compound, 3, [0, 2, 5])
    with pytest.raises(ValueError, match="--shots"):
        split_support_query(compound, 0, [0])


def test_head_fine_tuning_beats_zero_shot_through_the_cli(toy, tmp_path, capsys):
    root, _ = toy
    ckpt = tmp_path / "step_00000001.pt"
    save_checkpoint(ckpt, model=_tiny_model(), step=1, config=TrainConfig(image_size=SIZE).to_dict())
    out = tmp_path / "fewshot.json"
    assert main([str(ckpt), str(root / "manifest.npz"), "--shots", "4", "--steps", "300", "--lr", "0.05",
                 "--json", str(out), "--device", "cpu", "--num-workers", "0", "--batch-size", "16"]) == 0
    assert "4-shot" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["classes"] == [COMPOUNDS[c] for c in CLASSES]
    assert res["support"] == 12 and res["query"] == 3 * PER_CLASS - 12
    z, f = res["zero_shot"], res["few_shot"]
    assert f["accuracy"] >= 0.9 and f["uar"] >= 0.9
    assert f["accuracy"] > z["accuracy"] + 0.3
    assert res["losses"]["last"] < res["losses"]["first"] and res["losses"]["steps"] == 300
    assert np.sum(f["confusion"]) == res["query"]
    assert z["classes"] == f["classes"] == res["classes"]  # the per-class recall and confusion name their classes
    # a class with too few images is named
    assert main([str(ckpt), str(root / "manifest.npz"), "--shots", "13", "--device", "cpu", "--num-workers", "0"]) == 2
    assert "fewer than --shots 13" in capsys.readouterr().err


def test_trunk_fine_tuning_improves_too(toy):
    root, _ = toy
    model = _tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = few_shot(model, root / "manifest.npz", root, 4, finetune_trunk=True, epochs=30, lr=0.05,
                   trunk_lr=0.005, image_size=SIZE, device="cpu", batch_size=12, num_workers=0)
    for k, v in model.state_dict().items():  # a copy was fine-tuned, not the model passed in
        torch.testing.assert_close(v, before[k])
    assert res["finetune_trunk"] and res["losses"]["steps"] == 30
    assert res["losses"]["last"] < res["losses"]["first"]
    assert res["few_shot"]["accuracy"] > res["zero_shot"]["accuracy"] + 0.3


def test_few_shot_errors_name_the_option(toy):
    root, _ = toy
    with pytest.raises(ValueError, match="split 'val'"):
        few_shot(_tiny_model(), root / "manifest.npz", root, 2, split="val", device="cpu")
    with pytest.raises(ValueError, match="fewer than --shots 20"):
        few_shot(_tiny_model(), root / "manifest.npz", root, 20, device="cpu", image_size=SIZE, num_workers=0)
