"""Everything that can be checked before the first step fails there, with one message naming the option."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tiny_corpus import real_jpegs, train_argv

from fbn_fast.config import TrainConfig
from fbn_fast.data import Manifest, load_manifest
from fbn_fast.preflight import PreflightError, datasets_with_split, preflight, split_summary
from fbn_fast.train import main


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """``images/`` with a manifest recording that root: dataset ``a`` (train 6, val 2; expressions and VA) and
    ``b`` (test 2 only); the manifest file lives elsewhere."""
    root = tmp_path / "images"
    paths = [f"a/{i}.jpg" for i in range(8)] + ["b/0.jpg", "b/1.jpg"]
    for p in paths:
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        (root / p).write_bytes(b"")
    real_jpegs(root)
    m = Manifest.from_columns(paths, np.array(["a"] * 8 + ["b"] * 2, dtype=object),
                              split=np.array(["train"] * 6 + ["val"] * 2 + ["test"] * 2, dtype=object),
                              expr=np.arange(10) % 7, va=np.linspace(-0.9, 0.9, 20).reshape(10, 2)[::-1],
                              root=root)
    out = tmp_path / "manifests" / "m.npz"
    out.parent.mkdir()
    m.save(out)
    return out


def _fails(capsys, argv: list[str], *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, (n, err)
    return err


def _nothing_trained(run: Path) -> None:
    """Stopped before the first step: no training record, no checkpoint."""
    assert not (run / "metrics.jsonl").exists()
    assert not list((run / "checkpoints").glob("*.pt"))


def test_splits_per_dataset(corpus):
    m = load_manifest(corpus)
    assert datasets_with_split(m, "test") == (["b"], ["a"])
    assert datasets_with_split(m, "val", ["b"]) == ([], ["b"])
    assert split_summary(m) == "a: train, val; b: test"


@pytest.mark.parametrize("opts, needles", [
    ({"datasets": "nope"}, ["--datasets: ['nope'] are not in"]),
    ({"datasets": "b"}, ["--datasets: ['b'] have no 'train' split", "a: train, val; b: test", "name datasets that "
                         "do: ['a']"]),
    ({"datasets": "a b", "ratios": "1 1"}, ["--datasets/--ratios: ['b'] have no 'train' split"]),
    ({"relatedness": "/nonexistent/table.json"}, ["--relatedness"]),
])
def test_dataset_split_and_relatedness_errors_name_the_option(corpus, tmp_path, capsys, opts, needles):
    argv = train_argv(corpus, tmp_path / "runs", "bad", **opts)
    if "datasets" in opts:  # lists are separate words on a command line
        i = argv.index("--datasets")
        argv[i + 1:i + 2] = opts["datasets"].split()
    if "ratios" in opts:
        i = argv.index("--ratios")
        argv[i + 1:i + 2] = opts["ratios"].split()
    _fails(capsys, argv, *needles)
    _nothing_trained(tmp_path / "runs" / "bad")


def test_relatedness_file_that_does_not_fit_names_the_option(corpus, tmp_path, capsys):
    bad = tmp_path / "rel.json"
    bad.write_text(json.dumps({"classes": ["x"], "aus": ["AU1"], "matrix": [[0.5]]}))
    _fails(capsys, train_argv(corpus, tmp_path / "runs", "rel", relatedness=bad), f"--relatedness {bad}")


def test_no_train_split_names_the_manifest(corpus, tmp_path, capsys):
    m = load_manifest(corpus)
    only_eval = m.select(m.split != m.splits.index("train"))
    path = tmp_path / "eval_only.npz"
    only_eval.save(path)
    _fails(capsys, train_argv(path, tmp_path / "runs", "x"), f"--manifest {path}: no dataset has a 'train' split")


def test_other_label_spaces_name_the_manifest(corpus, tmp_path, capsys):
    m = load_manifest(corpus)
    renamed = dataclasses.replace(m, expressions=tuple(e.upper() for e in m.expressions))
    path = tmp_path / "renamed.npz"
    renamed.save(path)
    _fails(capsys, train_argv(path, tmp_path / "runs", "x"), f"--manifest {path}: its label spaces")


def test_images_not_under_the_root_in_use_name_data_root_and_the_root(corpus, tmp_path, capsys):
    wrong = tmp_path / "elsewhere"
    wrong.mkdir()
    err = _fails(capsys, train_argv(corpus, tmp_path / "runs", "root", data_root=wrong), "--data-root:",
                 f"missing under {wrong}", f"the manifest records the root {tmp_path / 'images'}")
    assert "Traceback" not in err
    _nothing_trained(tmp_path / "runs" / "root")
    _fails(capsys, train_argv(corpus, tmp_path / "runs", "gone", data_root=tmp_path / "nope"),
           f"--data-root: the image root {str(tmp_path / 'nope')!r} (--data-root) does not exist")
    # the recorded root moved away: the default root is named as such
    shutil.move(tmp_path / "images", tmp_path / "moved")
    _fails(capsys, train_argv(corpus, tmp_path / "runs", "moved"), "(the root the manifest records)")


def test_a_few_missing_images_are_a_note_more_are_an_error(corpus, tmp_path):
    m = load_manifest(corpus)
    root = Path(m.root)
    cfg = TrainConfig(manifest=str(corpus))
    assert not any("missing" in n for n in preflight(cfg, m, corpus, root))
    (root / "a/0.jpg").unlink()  # 1 of 10 images: the loader replaces it
    notes = preflight(cfg, m, corpus, root)
    assert any("1 of all 10 images are missing" in n for n in notes)
    (root / "a/1.jpg").unlink()  # 2 of 10: more than the tolerance
    with pytest.raises(PreflightError, match="--data-root: 2 of all 10 images are missing"):
        preflight(cfg, m, corpus, root)


def test_missing_splits_are_notes_not_errors(corpus):
    m = load_manifest(corpus)
    notes = preflight(TrainConfig(manifest=str(corpus), eval_every=5), m, corpus, m.root)
    assert "no test split in ['a']: eval.json reports them as such" in notes
    no_val = m.select(m.split != m.splits.index("val"))
    notes = preflight(TrainConfig(manifest=str(corpus), eval_every=5), no_val, corpus, m.root)
    assert any("no dataset has a val split: --eval-every 5 evaluations and the choice of best.pt are skipped" in n
               for n in notes)
