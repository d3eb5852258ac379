"""From the official downloads to best.pt, on tiny fixtures in each corpus's layout.

The multi-corpus recipe as a user types it: import AffectNet, RAF-DB and DISFA from their own folders under
one data folder, ``concat``, ``info --check-files``, train with ``--data-root`` that folder, then evaluate and
predict with the run folder. And an AffectNet-only manifest (train and val; AffectNet publishes no test
labels): it trains, selects on val and finishes with exit status 0 and an eval.json that says "no test split".
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_corpus import corpora, disfa_tree, real_jpegs, train_argv
from tiny_model import tiny_model

from fbn_fast import distributed as fdist
from fbn_fast import train as train_module
from fbn_fast.checkpoint import load_checkpoint
from fbn_fast.config import TrainConfig, load_recipe
from fbn_fast.data import load_manifest
from fbn_fast.data.__main__ import main as data_main
from fbn_fast.data.pipeline import build_loader, renormalization
from fbn_fast.evaluate import evaluate
from fbn_fast.evaluate import main as evaluate_main
from fbn_fast.model import build_model
from fbn_fast.predict import main as predict_main
from fbn_fast.predict import predict
from fbn_fast.train import Trainer
from fbn_fast.train import main as train_main


def _records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.fixture
def faces(tmp_path: Path) -> Path:
    """``faces/AffectNet`` (train + headerless val list), ``faces/RAF-DB`` (train + test), ``faces/DISFA``
    (subjects for train, val and test), every image a decodable JPEG."""
    root = tmp_path / "faces"
    corpora(root)
    disfa_tree(root / "DISFA")
    assert real_jpegs(root) == 4 + 12
    return root


def test_affectnet_train_val_only_trains_selects_on_val_and_reports_no_test_split(faces, tmp_path, capsys):
    manifest = tmp_path / "manifests" / "affectnet.npz"
    manifest.parent.mkdir()
    assert data_main(["import", "affectnet", str(faces / "AffectNet"), "--out", str(manifest)]) == 0
    # No --data-root: the images are under the root the manifest records, not beside the manifest.
    assert train_main(train_argv(manifest, tmp_path / "runs", "an", steps=4, eval_every=2)) == 0
    run = tmp_path / "runs" / "an"
    ev = json.loads((run / "eval.json").read_text())
    assert ev["split"] == "test" and ev["rows"] == 0 and ev["datasets"] == {}
    assert ev["no_split"] == {"affectnet": "no test split"}
    assert ev["validation"]["split"] == "val" and set(ev["validation"]["datasets"]) == {"affectnet"}
    # selection on val: evaluated at step 2 (with a checkpoint at that step) and at the end
    evals = _records(run, "eval")
    assert [(r["step"], r["split"]) for r in evals] == [(2, "val"), (4, "test")]
    assert (run / "checkpoints" / "best.pt").is_file()
    best = json.loads((run / "best.json").read_text())
    scores = [(2, evals[0]["results"]["selection"]["score"]), (4, ev["validation"]["selection"]["score"])]
    top = max(score for _, score in scores)
    assert best["step"] == next(s for s, score in scores if score == top)  # the best, the earlier of equals
    assert load_checkpoint(run / "checkpoints" / "best.pt")["step"] == best["step"]
    assert "no test split" in capsys.readouterr().err  # the final table says so too


def test_multi_corpus_recipe_from_download_to_best_pt(faces, tmp_path, capsys):
    m = {name: tmp_path / f"{name}.npz" for name in ("affectnet", "rafdb", "disfa", "all")}
    # 1. import each corpus from its own folder (each manifest records its folder)
    assert data_main(["import", "affectnet", str(faces / "AffectNet"), "--out", str(m["affectnet"])]) == 0
    assert data_main(["import", "rafdb", str(faces / "RAF-DB"), "--out", str(m["rafdb"])]) == 0
    assert data_main(["import", "disfa", str(faces / "DISFA"), "--val-subjects", "SN002", "--test-subjects", "SN003",
                      "--out", str(m["disfa"])]) == 0
    # 2. join them: the paths are rebased onto the common folder
    assert data_main(["concat", str(m["affectnet"]), str(m["rafdb"]), str(m["disfa"]), "--out", str(m["all"])]) == 0
    assert load_manifest(m["all"]).root == str(faces)
    # 3. every image is found under that folder
    capsys.readouterr()
    assert data_main(["info", str(m["all"]), "--check-files"]) == 0
    assert f"all 16 images found under {faces}" in capsys.readouterr().out
    # 4. train with --data-root the common folder: val scored every 2 steps, best.pt chosen on it
    assert train_main(train_argv(m["all"], tmp_path / "runs", "faces", data_root=faces, steps=4, eval_every=2)) == 0
    run = tmp_path / "runs" / "faces"
    best = json.loads((run / "best.json").read_text())
    assert set(best["tasks"]) == {"expression", "au"}  # AffectNet's val labels expressions, DISFA's AUs
    ev = json.loads((run / "eval.json").read_text())
    assert set(ev["datasets"]) == {"rafdb", "disfa"} and ev["no_split"] == {"affectnet": "no test split"}
    assert ev["model"] == "best.pt" and ev["step"] == best["step"]
    assert set(ev["validation"]["datasets"]) == {"affectnet", "disfa"}
    # 5. the run folder stands for its best checkpoint in evaluate and predict
    out = tmp_path / "val.json"
    capsys.readouterr()
    assert evaluate_main([str(run), str(m["all"]), "--split", "val", "--json", str(out), "--loader-backend", "cpu",
                          "--num-workers", "0"]) == 0
    scored = json.loads(out.read_text())
    assert scored["checkpoint"] == str(run / "checkpoints" / "best.pt")
    assert scored["no_split"] == {"rafdb": "no val split"}
    photo = faces / "RAF-DB" / "basic" / "Image" / "aligned" / "test_0001_aligned.jpg"
    capsys.readouterr()
    assert predict_main([str(run), str(photo), "--no-detect", "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert len(entry["faces"]) == 1 and "expression" in entry["faces"][0]


def _inputs(model: torch.nn.Module, run) -> torch.Tensor:
    """The images ``model`` is given while ``run()`` runs."""
    seen: list[torch.Tensor] = []
    handle = model.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().float().clone()))
    try:
        run()
    finally:
        handle.remove()
    return torch.cat(seen)


def test_every_pipeline_normalises_images_as_the_trunk_expects(faces, tmp_path, monkeypatch):
    manifest = tmp_path / "affectnet.npz"
    assert data_main(["import", "affectnet", str(faces / "AffectNet"), "--out", str(manifest)]) == 0
    photo = str(faces / "AffectNet" / "Manually_Annotated_Images" / "1" / "a.jpg")
    other = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))  # e.g. a timm trunk's pretrained statistics
    scale, shift = renormalization(other, torch.device("cpu"))
    model = tiny_model()
    runs = {"evaluate": lambda: evaluate(model, manifest, split="val", image_size=24, loader_backend="cpu",
                                         num_workers=0),
            "predict": lambda: predict(model, [photo], image_size=24, detector=None)}
    for name, run in runs.items():
        imagenet = _inputs(model, run)
        model.trunk.normalization = other
        renormed = _inputs(model, run)
        del model.trunk.normalization
        # one float32 multiply-add apart: 1e-5 absolute
        torch.testing.assert_close(renormed, imagenet * scale + shift, atol=1e-5, rtol=0, msg=name)

    def build_with(*args, **kwargs):
        built = build_model(*args, **kwargs)
        built.trunk.normalization = other
        return built

    monkeypatch.setattr(train_module, "build_model", build_with)
    cfg = TrainConfig().replace(manifest=str(manifest), out_dir=str(tmp_path / "runs"), name="n", image_size=24,
                                batch_size=2, eval_batch_size=2, trunk_kwargs={"width": 4}, num_workers=0, steps=1,
                                loader_backend="cpu")
    trainer = Trainer(cfg, fdist.init_distributed("cpu"))
    try:
        trainer.setup()
        plain = dict(batch_size=2, image_size=24, seed=cfg.seed, backend="cpu", num_workers=0)
        pairs = [(trainer.loader, dict(train=True, split="train")),
                 (trainer._build_eval_loader("val", ["affectnet"]), dict(train=False, split="val"))]
        for loader, opts in pairs:
            reference = build_loader(trainer.manifest, trainer.data_root, **plain, **opts)
            try:
                got, want = next(iter(loader))["image"], next(iter(reference))["image"]
            finally:
                reference.close()
                loader.close()
            torch.testing.assert_close(got, want * scale + shift, atol=1e-5, rtol=0)  # as above
    finally:
        trainer.close()


def test_recipes_take_pretrained_true_and_the_measured_lambda_ca(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    paper = TrainConfig.from_dict(load_recipe(repo / "training" / "paper.toml"))
    assert "pretrained = true" in (repo / "training" / "paper.toml").read_text()
    assert paper.pretrained_value() is True
    for name in ("default", "paper", "ablation"):  # training/results/ablation_cpu_lambda_ca1.md: 0.5
        assert TrainConfig.from_dict(load_recipe(repo / "training" / f"{name}.toml")).lambda_ca == 0.5, name
    off = tmp_path / "off.toml"
    off.write_text("[model]\npretrained = false\n")
    assert TrainConfig.from_dict(load_recipe(off)).pretrained_value() is False
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\npretrained = 1\n")
    with pytest.raises(ValueError, match="pretrained must be a string"):
        load_recipe(bad)


def test_recipes_use_the_coupling_the_grid_chose():
    """The recipes and the trainer's defaults follow the chosen variant of training/coupling_grid.toml (§7)."""
    import tomllib

    repo = Path(__file__).resolve().parents[1]
    grid = tomllib.loads((repo / "training" / "coupling_grid.toml").read_text())
    chosen = grid["variants"][grid["chosen"]]["options"]
    assert chosen, "the chosen variant must say what it changes"
    for name in ("default", "paper", "ablation"):
        cfg = TrainConfig.from_dict(load_recipe(repo / "training" / f"{name}.toml"))
        for key, value in chosen.items():
            assert getattr(cfg, key) == value, (name, key)
    for key, value in chosen.items():
        assert getattr(TrainConfig(), key) == value, key
