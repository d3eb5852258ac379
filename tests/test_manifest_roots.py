"""Image roots: recorded by the importers, saved and loaded, joined by concat, used by info --check-files.

The multi-corpus recipe end to end on tiny fixtures: AffectNet and RAF-DB imported from their own folders
under one data folder, joined with concat, every image found under that folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from fbn_fast.data import Manifest, load_manifest
from fbn_fast.data.__main__ import main

HEADER = "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal\n"


def write(root: Path, rel: str, text: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def touch(root: Path, *rels: str) -> None:
    for rel in rels:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"\xff\xd8\xff")


def corpora(faces: Path) -> tuple[Path, Path]:
    """AffectNet and RAF-DB in their official layouts, each in its own folder under ``faces``."""
    an, raf = faces / "AffectNet", faces / "RAF-DB"
    write(an, "Manually_Annotated_file_lists/training.csv", HEADER + "1/a.jpg,0,0,9,9,1;2,1,0.5,0.5\n")
    write(an, "Manually_Annotated_file_lists/validation.csv", "2/b.jpg,0,0,9,9,1;2,3,0.1,0.2\n")  # no header
    touch(an, "Manually_Annotated_Images/1/a.jpg", "Manually_Annotated_Images/2/b.jpg")
    write(raf, "basic/EmoLabel/list_patition_label.txt", "train_00001.jpg 5\ntest_0001.jpg 4\n")
    touch(raf, "basic/Image/aligned/train_00001_aligned.jpg", "basic/Image/aligned/test_0001_aligned.jpg")
    return an, raf


def test_recipe_import_each_corpus_from_its_folder_concat_and_find_every_image(tmp_path, capsys):
    faces = tmp_path / "faces"
    an, raf = corpora(faces)
    assert main(["import", "affectnet", str(an), "--out", str(tmp_path / "affectnet.npz")]) == 0
    assert main(["import", "rafdb", str(raf), "--out", str(tmp_path / "rafdb.npz")]) == 0
    assert load_manifest(tmp_path / "affectnet.npz").root == str(an)
    assert load_manifest(tmp_path / "rafdb.npz").root == str(raf)
    assert main(["concat", str(tmp_path / "affectnet.npz"), str(tmp_path / "rafdb.npz"),
                 "--out", str(tmp_path / "all.npz")]) == 0
    m = load_manifest(tmp_path / "all.npz")
    assert m.root == str(faces) and m.datasets == ("affectnet", "rafdb")
    assert list(m.paths) == ["AffectNet/Manually_Annotated_Images/1/a.jpg",
                             "AffectNet/Manually_Annotated_Images/2/b.jpg",
                             "RAF-DB/basic/Image/aligned/train_00001_aligned.jpg",
                             "RAF-DB/basic/Image/aligned/test_0001_aligned.jpg"]
    assert all((faces / p).is_file() for p in m.paths)  # what --data-root /data/faces reads
    capsys.readouterr()
    assert main(["info", str(tmp_path / "all.npz"), "--check-files"]) == 0
    out = capsys.readouterr().out
    assert f"image root: {faces}" in out and f"all 4 images found under {faces}" in out

    # An image gone: counted, named, with the root used; exit status 1.
    os.remove(raf / "basic/Image/aligned/test_0001_aligned.jpg")
    assert main(["info", str(tmp_path / "all.npz"), "--check-files"]) == 1
    out = capsys.readouterr().out
    assert (f"1 of all 4 images are missing under {faces} (e.g. RAF-DB/basic/Image/aligned/test_0001_aligned.jpg)"
            in out)
    # The wrong root: every image missing, the root it used in the message; --json carries the same.
    assert main(["info", str(tmp_path / "all.npz"), "--check-files", "--data-root", str(an), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["root"] == str(faces)
    assert report["check_files"] == {"root": str(an), "rows": 4, "checked": 4, "missing": 4, "examples": [
        "AffectNet/Manually_Annotated_Images/1/a.jpg", "AffectNet/Manually_Annotated_Images/2/b.jpg",
        "RAF-DB/basic/Image/aligned/train_00001_aligned.jpg", "RAF-DB/basic/Image/aligned/test_0001_aligned.jpg"]}
    assert main(["info", str(tmp_path / "all.npz"), "--root", str(an)]) == 2  # the old spelling still parses
    assert "--data-root and --sample go with --check-files" in capsys.readouterr().err


def test_prefix_that_names_the_corpus_folder_records_the_folder_above(tmp_path, caplog):
    faces = tmp_path / "faces"
    an, raf = corpora(faces)
    assert main(["import", "affectnet", str(an), "--prefix", "AffectNet", "--out", str(tmp_path / "a.npz")]) == 0
    assert main(["import", "rafdb", str(raf), "--prefix", "RAF-DB", "--out", str(tmp_path / "r.npz")]) == 0
    parts = [load_manifest(tmp_path / n) for n in ("a.npz", "r.npz")]
    assert [p.root for p in parts] == [str(faces), str(faces)]
    joined = Manifest.concat(parts)  # same root: joined as they are
    assert joined.root == str(faces) and joined.path(0) == "AffectNet/Manually_Annotated_Images/1/a.jpg"
    assert joined.check_files().missing == 0
    # A prefix that is not the end of the corpus folder: no root is known, and the import says so.
    assert main(["import", "rafdb", str(raf), "--prefix", "raf", "--out", str(tmp_path / "x.npz")]) == 0
    assert load_manifest(tmp_path / "x.npz").root is None
    assert any("records no image root" in r.getMessage() for r in caplog.records)


def manifest(paths: list[str], root: str | None, name: str = "d") -> Manifest:
    return Manifest.from_columns(paths, name, expr=np.zeros(len(paths), np.int64), root=root)


def test_root_is_saved_loaded_and_absent_in_older_manifests(tmp_path):
    m = manifest(["a.jpg"], str(tmp_path / "corpus"))
    m.save(tmp_path / "m.npz")
    assert load_manifest(tmp_path / "m.npz").root == str(tmp_path / "corpus")
    assert load_manifest(tmp_path / "m.npz").select(np.array([0])).root == str(tmp_path / "corpus")
    old = manifest(["a.jpg"], None)
    old.save(tmp_path / "old.npz")  # no root key in the header: the layout manifests had before
    assert load_manifest(tmp_path / "old.npz").root is None
    with pytest.raises(ValueError, match="records no image root; name the folder"):
        old.check_files()


def test_concat_rebases_different_roots_or_refuses_with_the_fix(tmp_path):
    a = manifest(["x/1.jpg", "x/2.jpg"], "/data/faces/AffectNet", "a")
    b = manifest(["é/3.jpg"], "/data/faces/raf/RAF-DB", "b")
    joined = Manifest.concat([a, b])
    assert joined.root == "/data/faces"
    assert list(joined.paths) == ["AffectNet/x/1.jpg", "AffectNet/x/2.jpg", "raf/RAF-DB/é/3.jpg"]
    assert joined.bad_rows() == []
    # An explicit --root above both.
    assert list(Manifest.concat([a, b], root="/data").paths)[0] == "faces/AffectNet/x/1.jpg"
    with pytest.raises(ValueError, match=r"B.npz: its image root /data/faces/raf/RAF-DB is not inside --data-root "
                                         r"/data/faces/AffectNet; pick a --data-root that holds every corpus "
                                         r"folder, e.g. --data-root /data/faces"):
        Manifest.concat([a, b], root="/data/faces/AffectNet", names=["A.npz", "B.npz"])
    # A manifest without a root next to one with a root: refused, naming the file and what to type.
    legacy = manifest(["RAF-DB/3.jpg"], None, "b")
    with pytest.raises(ValueError, match=r"old.npz records no image root .* concat \.\.\. --data-root DIR"):
        Manifest.concat([a, legacy], names=["new.npz", "old.npz"])
    both = Manifest.concat([a, legacy], root="/data/faces")
    assert list(both.paths) == ["AffectNet/x/1.jpg", "AffectNet/x/2.jpg", "RAF-DB/3.jpg"]
    # Neither records a root: joined as before.
    assert Manifest.concat([legacy, legacy]).root is None


def test_concat_cli_refusal_names_the_option(tmp_path, capsys):
    manifest(["a.jpg"], str(tmp_path / "A")).save(tmp_path / "a.npz")
    manifest(["b.jpg"], None).save(tmp_path / "b.npz")
    assert main(["concat", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--out", str(tmp_path / "o.npz")]) == 2
    assert f"{tmp_path / 'b.npz'} records no image root" in capsys.readouterr().err
    assert main(["concat", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--out", str(tmp_path / "o.npz"),
                 "--root", str(tmp_path)]) == 0
    assert list(load_manifest(tmp_path / "o.npz").paths) == ["A/a.jpg", "b.jpg"]


def test_check_files_on_a_sample(tmp_path):
    paths = [f"img/{i}.jpg" for i in range(50)]
    touch(tmp_path, *paths[::2])  # every odd row is missing
    m = manifest(paths, str(tmp_path))
    full = m.check_files()
    assert (full.checked, full.missing, full.examples) == (50, 25, tuple(f"img/{i}.jpg" for i in (1, 3, 5, 7, 9)))
    part = m.check_files(sample=10, seed=3)
    assert part.checked == 10 and part.rows == 50
    drawn = np.sort(np.random.default_rng(3).choice(50, size=10, replace=False))
    assert part.missing == int((drawn % 2 == 1).sum())
    assert "a sample of 10 of 50" in str(part)
