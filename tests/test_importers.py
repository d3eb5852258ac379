"""Importers on small fixture trees in each corpus's real layout, odd cases included, checked row by row."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fbn_fast.data import load_manifest
from fbn_fast.data.__main__ import main
from fbn_fast.data.importers import (
    IMPORTERS,
    import_affectnet,
    import_affwild2,
    import_bp4d,
    import_corpus,
    import_disfa,
    import_emotionet,
    import_rafdb,
    import_rafdb_compound,
)
from fbn_fast.labels import AUS, COMPOUNDS, EXPRESSIONS, MISSING

E = {name: i for i, name in enumerate(EXPRESSIONS)}
A = {name: i for i, name in enumerate(AUS)}
NAN4 = (np.nan,) * 4


def touch(root: Path, *rels: str) -> None:
    for rel in rels:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"\xff\xd8\xff")  # the importers never decode images


def write(root: Path, rel: str, text: str) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def rows(m) -> list[dict]:
    """Each row as a dict of its labels, for row-by-row comparison."""
    out = []
    for i in range(len(m)):
        out.append({
            "path": m.path(i),
            "split": m.splits[m.split[i]],
            "expr": int(m.expr[i]),
            "va": tuple(np.round(m.va[i].astype(np.float64), 4).tolist()) if m.va_mask[i] else None,
            "au": {AUS[k]: int(m.au[i, k]) for k in np.flatnonzero(m.au_mask[i])},
            "compound": int(m.compound[i]),
            "box": None if np.isnan(m.box[i]).all() else tuple(m.box[i].tolist()),
        })
    return out


def record(m) -> dict:
    (rec,) = m.meta["imports"]
    return rec


def test_registry_names_every_corpus():
    assert set(IMPORTERS) == {"affectnet", "rafdb", "rafdb-compound", "affwild2", "disfa", "bp4d", "emotionet"}
    with pytest.raises(ValueError, match="no importer 'fer'"):
        import_corpus("fer", ".")


# ------------------------------------------------------------------------------------------------ AffectNet
AFFECTNET_HEADER = ("subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,"
                    "arousal\n")


def affectnet_tree(root: Path) -> None:
    write(root, "Manually_Annotated_file_lists/training.csv", AFFECTNET_HEADER + "\n".join([
        "1/a.jpg,10,20,100,120,11.5;12.5;13.5;14.5,1,0.5,-0.25",   # Happiness, box, VA
        "1/b.jpg,0,0,50,50,1;2,7,0.3,0.4",                        # Contempt: masked, VA kept
        "2/c.jpg,0,0,50,50,1;2,10,-2,-2",                         # No-Face: dropped
        "2/d.jpg,0,0,50,50,1;2,9,-2,-2",                          # Uncertain + VA -2: nothing left
        "2/e.jpg,0,0,50,50,1;2,8,0.1,0.2",                        # None: expression missing, VA kept
        "2/f.jpg,5,5,0,10,1;2,6,-2,-2",                           # Anger, no VA, zero-width box
        "3/missing.jpg,0,0,50,50,1;2,0,0,0",                      # image not on disk
        "1/a.jpg,10,20,100,120,1;2,1,0.5,-0.25",                  # listed twice
        "",
    ]))
    write(root, "Manually_Annotated_file_lists/validation.csv", AFFECTNET_HEADER + "4/g.jpg,1,1,9,9,1;2,3,0.9,1.0\n")
    touch(root, *[f"Manually_Annotated_Images/{p}" for p in ("1/a.jpg", "1/b.jpg", "2/c.jpg", "2/d.jpg", "2/e.jpg",
                                                            "2/f.jpg", "4/g.jpg")])


def test_affectnet_csv_layout(tmp_path):
    affectnet_tree(tmp_path)
    m = import_affectnet(tmp_path)
    img = "Manually_Annotated_Images/"
    assert rows(m) == [
        {"path": img + "1/a.jpg", "split": "train", "expr": E["Happiness"], "va": (0.5, -0.25), "au": {},
         "compound": -1, "box": (10.0, 20.0, 110.0, 140.0)},
        {"path": img + "1/b.jpg", "split": "train", "expr": MISSING, "va": (0.3, 0.4), "au": {}, "compound": -1,
         "box": (0.0, 0.0, 50.0, 50.0)},
        {"path": img + "2/e.jpg", "split": "train", "expr": MISSING, "va": (0.1, 0.2), "au": {}, "compound": -1,
         "box": (0.0, 0.0, 50.0, 50.0)},
        {"path": img + "2/f.jpg", "split": "train", "expr": E["Anger"], "va": None, "au": {}, "compound": -1,
         "box": None},
        {"path": img + "4/g.jpg", "split": "val", "expr": E["Surprise"], "va": (0.9, 1.0), "au": {}, "compound": -1,
         "box": (1.0, 1.0, 10.0, 10.0)},
    ]
    rec = record(m)
    assert rec["dropped"] == {"expression 10 (No-Face)": 1, "image missing": 1, "no label left": 1,
                              "duplicate image": 1}
    assert rec["masked"] == {"expression 7 (Contempt) masked": 1, "expression 8 (None) masked": 1,
                             "expression 9 (Uncertain) masked": 1, "VA -2 (missing) masked": 2,
                             "face box with a non-positive side left out": 1}
    assert rec["rows_per_split"] == {"train": 4, "val": 1}
    assert rec["sources"] == ["Manually_Annotated_file_lists/training.csv",
                              "Manually_Annotated_file_lists/validation.csv"]
    assert m.datasets == ("affectnet",)
    test = import_affectnet(tmp_path, validation_split="test", prefix="AffectNet", dataset="an")
    assert test.datasets == ("an",) and test.path(0) == "AffectNet/" + img + "1/a.jpg"
    assert test.splits[test.split[-1]] == "test"


def test_affectnet_bad_input_names_file_and_line(tmp_path):
    write(tmp_path, "training.csv", "subDirectory_filePath,expression\n1/a.jpg,1\n")
    touch(tmp_path, "Manually_Annotated_Images/1/a.jpg")
    with pytest.raises(ValueError, match=r"training.csv: line 1: header lacks columns \['face_x'"):
        import_affectnet(tmp_path)
    write(tmp_path, "training.csv", AFFECTNET_HEADER + "1/a.jpg,0,0,5,5,1;2,1,0.5,0.5\n1/a.jpg,0,0,5,5,1;2,happy,0,0\n")
    with pytest.raises(ValueError, match="training.csv: line 3"):
        import_affectnet(tmp_path)
    with pytest.raises(ValueError, match="found neither training.csv"):
        import_affectnet(tmp_path / "nowhere")


def test_affectnet_npy_layout(tmp_path):
    ann = tmp_path / "train_set" / "annotations"
    ann.mkdir(parents=True)
    touch(tmp_path, "train_set/images/0.jpg", "train_set/images/1.jpg", "train_set/images/2.jpg",
          "val_set/images/5.jpg")
    (tmp_path / "val_set" / "annotations").mkdir(parents=True)
    # The distribution stores the code as a string and VA as numbers or numeric strings.
    for stem, exp, val, aro, folder in (("0", "3", 0.25, -0.5, ann), ("1", "7", "0.1", "0.2", ann),
                                        ("5", "0", -2.0, -2.0, tmp_path / "val_set" / "annotations")):
        np.save(folder / f"{stem}_exp.npy", np.array(exp))
        np.save(folder / f"{stem}_val.npy", np.array(val))
        np.save(folder / f"{stem}_aro.npy", np.array(aro))
        np.save(folder / f"{stem}_lnd.npy", np.zeros(136))
    m = import_affectnet(tmp_path)
    assert rows(m) == [
        {"path": "train_set/images/0.jpg", "split": "train", "expr": E["Surprise"], "va": (0.25, -0.5), "au": {},
         "compound": -1, "box": None},
        {"path": "train_set/images/1.jpg", "split": "train", "expr": MISSING, "va": (0.1, 0.2), "au": {},
         "compound": -1, "box": None},
        {"path": "val_set/images/5.jpg", "split": "val", "expr": E["Neutral"], "va": None, "au": {},
         "compound": -1, "box": None},
    ]
    rec = record(m)
    assert rec["dropped"] == {"annotation .npy files missing": 1}
    assert rec["masked"] == {"expression 7 (Contempt) masked": 1, "VA -2 (missing) masked": 1}
    assert rec["notes"]["layout"] == "per-image .npy annotations"


# ------------------------------------------------------------------------------------------------ RAF-DB
def test_rafdb_basic_aligned_from_the_raf_folder(tmp_path):
    write(tmp_path, "basic/EmoLabel/list_patition_label.txt",
          "train_00001.jpg 5\ntrain_00002.jpg 7\ntest_0001.jpg 1\ntrain_00003.jpg 8\ntrain_00004.jpg 4\n"
          "val_0001.jpg 2\n\n")
    touch(tmp_path, *[f"basic/Image/aligned/{s}_aligned.jpg" for s in
                      ("train_00001", "train_00002", "test_0001", "train_00003", "val_0001")])
    m = import_rafdb(tmp_path)
    got = [(r["path"], r["split"], r["expr"], r["compound"]) for r in rows(m)]
    assert got == [("basic/Image/aligned/train_00001_aligned.jpg", "train", E["Sadness"], -1),
                   ("basic/Image/aligned/train_00002_aligned.jpg", "train", E["Neutral"], -1),
                   ("basic/Image/aligned/test_0001_aligned.jpg", "test", E["Surprise"], -1)]
    assert record(m)["dropped"] == {"label outside 1..7": 1, "image missing": 1,
                                    "image name without train/test prefix": 1}
    assert not m.au_mask.any() and not m.va_mask.any()


def test_rafdb_basic_original_images_with_boxes(tmp_path):
    write(tmp_path, "EmoLabel/list_patition_label.txt", "train_00001.jpg 4\ntest_0001.jpg 6\n")
    touch(tmp_path, "Image/original/train_00001.jpg", "Image/original/test_0001.jpg")
    write(tmp_path, "Annotation/boundingbox/train_00001_boundingbox.txt", "12.5 20.0 80.25 99.0\n")
    m = import_rafdb(tmp_path, images="original")
    assert [(r["path"], r["expr"], r["box"]) for r in rows(m)] == [
        ("Image/original/train_00001.jpg", E["Happiness"], (12.5, 20.0, 80.25, 99.0)),
        ("Image/original/test_0001.jpg", E["Anger"], None)]
    assert record(m)["masked"] == {"no bounding box file": 1}
    write(tmp_path, "EmoLabel/list_patition_label.txt", "train_00001.jpg four\n")
    with pytest.raises(ValueError, match=r"list_patition_label.txt: line 1: label 'four'"):
        import_rafdb(tmp_path)


def test_rafdb_compound_goes_to_the_compound_column(tmp_path):
    write(tmp_path, "compound/EmoLabel/list_patition_label.txt",
          "train_0001.jpg 1\ntrain_0002.jpg 7\ntest_0001.jpg 11\ntrain_0003.jpg 12\n")
    touch(tmp_path, *[f"compound/Image/aligned/{s}_aligned.jpg" for s in
                      ("train_0001", "train_0002", "test_0001", "train_0003")])
    m = import_rafdb_compound(tmp_path)
    c = {name.lower(): i for i, name in enumerate(COMPOUNDS)}
    assert [(r["path"], r["split"], r["expr"], r["compound"]) for r in rows(m)] == [
        ("compound/Image/aligned/train_0001_aligned.jpg", "train", MISSING, c["happily surprised"]),
        ("compound/Image/aligned/train_0002_aligned.jpg", "train", MISSING, c["fearfully angry"]),
        ("compound/Image/aligned/test_0001_aligned.jpg", "test", MISSING, c["disgustedly surprised"])]
    assert record(m)["dropped"] == {"label outside 1..11": 1}
    assert m.datasets == ("rafdb_compound",) and m.tasks("rafdb_compound")["compound"]


# ------------------------------------------------------------------------------------------------ Aff-Wild2
def affwild2_tree(root: Path) -> None:
    ann = "6th_ABAW_Annotations"
    write(root, f"{ann}/VA_Estimation_Challenge/Train_Set/vid1.txt",
          "valence,arousal\n0.1,0.2\n-5,-5\n0.3,-0.4\n0.5,0.5\n")
    write(root, f"{ann}/EXPR_Classification_Challenge/Train_Set/vid1.txt",
          "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other\n4\n-1\n7\n2\n0\n")
    write(root, f"{ann}/AU_Detection_Challenge/Train_Set/vid1.txt",
          "AU1,AU2,AU4,AU6,AU7,AU10,AU11,AU12,AU15,AU23,AU24,AU25,AU26\n"
          "1,0,0,1,0,0,1,1,0,0,0,1,0\n"
          "-1,-1,-1,-1,-1,-1,-1,-1,-1,-1,-1,-1,-1\n"
          "0,0,0,0,0,0,0,0,0,0,0,0,0\n"
          "0,1,0,0,0,0,0,0,0,0,0,0,1\n")
    # vid2: VA in Train_Set, expressions in Validation_Set -> the whole video goes to val.
    write(root, f"{ann}/VA_Estimation_Challenge/Train_Set/vid2_left.txt", "valence,arousal\n-0.5,0.25\n")
    write(root, f"{ann}/EXPR_Classification_Challenge/Validation_Set/vid2_left.txt",
          "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other\n1\n6\n")
    touch(root, "cropped_aligned/vid1/00001.jpg", "cropped_aligned/vid1/00002.jpg", "cropped_aligned/vid1/00004.jpg",
          "cropped_aligned/vid1/00005.jpg", "cropped_aligned/vid1/00009.jpg",
          "cropped_aligned/vid2_left/00001.jpg", "cropped_aligned/vid2_left/00002.jpg")


def test_affwild2_merges_challenges_per_frame(tmp_path):
    affwild2_tree(tmp_path)
    m = import_affwild2(tmp_path)
    au_off = {a: 0 for a in ("AU1", "AU2", "AU4", "AU6", "AU7", "AU10", "AU12", "AU15", "AU23", "AU24", "AU25",
                             "AU26")}
    assert rows(m) == [
        {"path": "cropped_aligned/vid1/00001.jpg", "split": "train", "expr": E["Happiness"], "va": (0.1, 0.2),
         "au": au_off | {"AU1": 1, "AU6": 1, "AU12": 1, "AU25": 1}, "compound": -1, "box": None},
        # frame 2: -5, -1, all AUs -1 -> only invalid markers -> dropped; frame 3 has labels but no face crop
        {"path": "cropped_aligned/vid1/00004.jpg", "split": "train", "expr": E["Disgust"], "va": (0.5, 0.5),
         "au": au_off | {"AU2": 1, "AU26": 1}, "compound": -1, "box": None},
        {"path": "cropped_aligned/vid1/00005.jpg", "split": "train", "expr": E["Neutral"], "va": None, "au": {},
         "compound": -1, "box": None},
        {"path": "cropped_aligned/vid2_left/00001.jpg", "split": "val", "expr": E["Anger"], "va": (-0.5, 0.25),
         "au": {}, "compound": -1, "box": None},
        {"path": "cropped_aligned/vid2_left/00002.jpg", "split": "val", "expr": E["Surprise"], "va": None, "au": {},
         "compound": -1, "box": None},
    ]
    rec = record(m)
    assert rec["dropped"] == {"line with only invalid markers": 1, "frame image missing (no face crop)": 1}
    assert rec["masked"] == {"VA -5 (invalid) lines": 1, "expression -1 (invalid) lines": 1,
                             "expression outside the 7 (e.g. Other) masked": 1, "AU -1 (invalid) entries": 12}
    assert rec["notes"]["au_columns_dropped"] == ["AU11"]
    assert rec["notes"]["videos_in_two_splits_moved_to_val"] == ["vid2_left"]
    assert len(rec["sources"]) == 5


def test_affwild2_headers_are_required(tmp_path):
    affwild2_tree(tmp_path)
    write(tmp_path, "6th_ABAW_Annotations/VA_Estimation_Challenge/Train_Set/vid1.txt", "0.1,0.2\n0.3,0.4\n")
    with pytest.raises(ValueError, match=r"vid1.txt: line 1: expected the header 'valence,arousal'"):
        import_affwild2(tmp_path)
    write(tmp_path, "6th_ABAW_Annotations/VA_Estimation_Challenge/Train_Set/vid1.txt", "valence,arousal\n0.1\n")
    with pytest.raises(ValueError, match=r"vid1.txt: line 2: expected 2 numbers"):
        import_affwild2(tmp_path)
    with pytest.raises(ValueError, match="no annotation folder"):
        import_affwild2(tmp_path / "cropped_aligned")


# ------------------------------------------------------------------------------------------------ DISFA
def test_disfa_intensities_threshold_and_frames(tmp_path):
    labels = "ActionUnit_Labels"
    write(tmp_path, f"{labels}/SN001/SN001_au1.txt", "1,0\n2,3\n3,5\n4,2\n")
    write(tmp_path, f"{labels}/SN001/SN001_au12.txt", "1,2\n2,1\n3,7\n4,0\n")
    write(tmp_path, f"{labels}/SN001/SN001_au27.txt", "1,4\n2,4\n3,4\n4,4\n")  # not among our AUs
    write(tmp_path, f"{labels}/SN002/SN002_au4.txt", "1,1\n2,4\n")
    # frame 2 written without padding, frame 4 missing (face extraction gap)
    touch(tmp_path, "frames/LeftCamera/SN001/00001.jpg", "frames/LeftCamera/SN001/2.jpg",
          "frames/LeftCamera/SN001/00003.jpg", "frames/LeftCamera/SN002/00001.jpg",
          "frames/LeftCamera/SN002/00002.jpg")
    m = import_disfa(tmp_path, test_subjects=["SN002"])
    assert [(r["path"], r["split"], r["au"]) for r in rows(m)] == [
        ("frames/LeftCamera/SN001/00001.jpg", "train", {"AU1": 0, "AU12": 1}),
        ("frames/LeftCamera/SN001/2.jpg", "train", {"AU1": 1, "AU12": 0}),
        ("frames/LeftCamera/SN001/00003.jpg", "train", {"AU1": 1}),  # AU12 intensity 7 is no intensity
        ("frames/LeftCamera/SN002/00001.jpg", "test", {"AU4": 0}),
        ("frames/LeftCamera/SN002/00002.jpg", "test", {"AU4": 1}),
    ]
    rec = record(m)
    assert rec["dropped"] == {"frame image missing": 1}
    assert rec["masked"] == {"AU intensity outside 0..5 entries": 1}
    assert rec["notes"]["au_files_ignored"] == ["AU27"]
    assert m.tasks("disfa")["au"] == ["AU1", "AU4", "AU12"] and m.tasks("disfa")["expr"] is False
    high = import_disfa(tmp_path, threshold=3)
    assert [r["au"].get("AU1") for r in rows(high)][:3] == [0, 1, 1]
    assert rows(high)[0]["au"]["AU12"] == 0
    shifted = import_disfa(tmp_path, frame_offset=-1, frames_pattern="frames/LeftCamera/{subject}/{frame:05d}.jpg")
    assert [r["path"] for r in rows(shifted)][:2] == ["frames/LeftCamera/SN001/00001.jpg",
                                                      "frames/LeftCamera/SN001/2.jpg"]  # label frames 2, 3
    with pytest.raises(ValueError, match=r"\['SN009'\] are not among"):
        import_disfa(tmp_path, val_subjects=["SN009"])
    with pytest.raises(ValueError, match="must hold \\{frame\\}"):
        import_disfa(tmp_path, frames_pattern="frames/{subject}.jpg")
    write(tmp_path, f"{labels}/SN002/SN002_au4.txt", "1,1\n2,x\n")
    with pytest.raises(ValueError, match=r"SN002_au4.txt: line 2"):
        import_disfa(tmp_path)


# ------------------------------------------------------------------------------------------------ BP4D
def test_bp4d_occurrence_codes_and_fera_split(tmp_path):
    occ = "AUCoding/AU_OCC"
    write(tmp_path, f"{occ}/F001_T1.csv", "0,1,2,4,11,12\n10,1,0,9,1,0\n11,9,9,9,9,9\n12,0,1,0,0,3\n13,1,1,1,1,1\n")
    write(tmp_path, f"{occ}/F002_T8.csv", "0,1,2,4,11,12\n100,0,0,0,0,1\n")
    touch(tmp_path, "BP4D-training/F001/T1/0010.jpg", "BP4D-training/F001/T1/0011.jpg",
          "BP4D-training/F001/T1/0012.jpg", "BP4D-training/F002/T8/0100.jpg")
    m = import_bp4d(tmp_path, split_preset="fera2015")
    assert [(r["path"], r["split"], r["au"]) for r in rows(m)] == [
        ("BP4D-training/F001/T1/0010.jpg", "train", {"AU1": 1, "AU2": 0, "AU12": 0}),
        ("BP4D-training/F001/T1/0012.jpg", "train", {"AU1": 0, "AU2": 1, "AU4": 0}),
        ("BP4D-training/F002/T8/0100.jpg", "val", {"AU1": 0, "AU2": 0, "AU4": 0, "AU12": 1}),
    ]
    rec = record(m)
    assert rec["dropped"] == {"frame with every AU not coded": 1, "frame image missing": 1}
    assert rec["masked"] == {"AU 9 (not coded) entries": 5, "AU code other than 0/1/9 entries": 1}
    assert rec["notes"]["au_columns_dropped"] == ["AU11"]
    assert import_bp4d(tmp_path).splits[import_bp4d(tmp_path).split[-1]] == "train"
    with pytest.raises(ValueError, match="either split_preset"):
        import_bp4d(tmp_path, split_preset="fera2015", test_subjects=["F001"])
    write(tmp_path, f"{occ}/F001_T1.csv", "frame,AU1,Smile\n10,1,0\n")
    with pytest.raises(ValueError, match=r"F001_T1.csv: line 1: expected a header of AU numbers"):
        import_bp4d(tmp_path)


# ------------------------------------------------------------------------------------------------ EmotioNet
def test_emotionet_facs_table(tmp_path):
    host = "http://s3.amazonaws.com/emotionet/Images/N_0000001"
    header = "URL,URL orig,'AU 1','AU 2','AU 4','AU 5','AU 6','AU 9','AU 12','AU 17','AU 20','AU 25','AU 26','AU 43'"
    write(tmp_path, "EmotioNet_FACS_aws_2020_24600.csv", "\n".join([
        header,
        f"'{host}/a1.jpg',http://orig/a1.jpg,1,0,999,0,1,0,1,0,0,1,0,1",
        f"'{host}/missing.jpg',http://orig/m.jpg,1,1,1,1,1,1,1,1,1,1,1,1",
        f"'{host}/b2.jpg',http://orig/b2.jpg,999,999,999,999,999,999,999,999,999,999,999,0",
        f"'{host}/c3.jpg',http://orig/c3.jpg,0,0,0,0,0,0,0,1,0,,2,0",
        f"'{host}/a1.jpg',http://orig/a1.jpg,1,0,0,0,1,0,1,0,0,1,0,1",
    ]) + "\n")
    touch(tmp_path, "images/a1.jpg", "images/b2.jpg", "images/c3.jpg")
    m = import_emotionet(tmp_path)
    off = {a: 0 for a in ("AU1", "AU2", "AU4", "AU5", "AU6", "AU9", "AU12", "AU17", "AU20", "AU25", "AU26")}
    got = rows(m)
    assert [(r["path"], r["split"]) for r in got] == [("images/a1.jpg", "train"), ("images/c3.jpg", "train")]
    a1 = dict(off)
    a1.pop("AU4")
    assert got[0]["au"] == a1 | {"AU1": 1, "AU6": 1, "AU12": 1, "AU25": 1}
    c3 = dict(off)
    del c3["AU25"], c3["AU26"]
    assert got[1]["au"] == c3 | {"AU17": 1}
    rec = record(m)
    assert rec["dropped"] == {"image missing (not downloaded)": 1, "no label left": 1, "duplicate image": 1}
    assert rec["masked"] == {"AU 999 (not coded) entries": 12, "AU code other than 0/1/999 (or empty) entries": 2}
    assert rec["notes"]["au_columns_not_read"] == ["AU43"]


def test_emotionet_challenge_text_files(tmp_path):
    codes = ["0"] * 60
    codes[0], codes[11], codes[24], codes[42] = "1", "1", "999", "1"  # AU1, AU12 present, AU25 unknown, AU43
    write(tmp_path, "dataFile_1001.txt",
          "\t".join(["http://host/Images/dir7/x1.jpg", "http://orig/x1.jpg", *codes]) + "\n")
    touch(tmp_path, "images/x1.jpg", "mirror/Images/dir7/x1.jpg")
    m = import_emotionet(tmp_path, split="test")
    (row,) = rows(m)
    expected = {a: 0 for a in AUS if a != "AU25"} | {"AU1": 1, "AU12": 1}
    assert row["path"] == "images/x1.jpg" and row["split"] == "test" and row["au"] == expected
    kept_dirs = import_emotionet(tmp_path, image_names="urlpath", images="mirror/")
    assert [r["path"] for r in rows(kept_dirs)] == ["mirror/Images/dir7/x1.jpg"]
    assert record(m)["masked"] == {"AU 999 (not coded) entries": 1}


# ------------------------------------------------------------------------------------------------ the CLI
def test_cli_import_then_info_matches_the_python_function(tmp_path, capsys):
    affwild2_tree(tmp_path)
    out = tmp_path / "aw2.npz"
    run = subprocess.run([sys.executable, "-m", "fbn_fast.data", "import", "affwild2", str(tmp_path), "--out",
                          str(out), "--prefix", "aw2"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "affwild2: 5 rows into dataset 'affwild2'" in run.stderr
    assert "line with only invalid markers: 1" in run.stderr
    from_cli = load_manifest(out)
    direct = import_affwild2(tmp_path, prefix="aw2")
    assert rows(from_cli) == rows(direct)
    assert rows(from_cli)[0]["path"] == "aw2/cropped_aligned/vid1/00001.jpg"
    assert record(from_cli)["dropped"] == record(direct)["dropped"]
    assert main(["info", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("5 rows, 1 datasets")
    train = next(line.split() for line in lines if line.startswith("affwild2") and " train " in line)
    val = next(line.split() for line in lines if line.startswith("affwild2") and " val " in line)
    assert train[:7] == ["affwild2", "train", "3", "3", "2", "2", "0"]  # rows expr au va compound
    assert val[:7] == ["affwild2", "val", "2", "2", "0", "1", "0"]
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == 5 and info["meta"]["imports"][0]["corpus"] == "affwild2"
    assert {(c["split"], c["rows"]) for c in info["counts"]} == {("train", 3), ("val", 2)}


def test_cli_hands_synth_to_synthface(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["synth", "--help"])
    assert exit_.value.code == 0
    assert "--out" in capsys.readouterr().out


def test_cli_reports_bad_input_drops_bad_rows_and_concatenates(tmp_path, capsys, caplog):
    from fbn_fast.data import Manifest

    Manifest.from_columns(["a.jpg", "../b.jpg"], "x", expr=np.array([1, 2])).save(tmp_path / "bad.npz")
    assert main(["info", str(tmp_path / "bad.npz")]) == 2
    assert "row 1 ('../b.jpg'): path is absolute or leaves the root" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "bad.npz"), "--drop-bad"]) == 0
    assert "1 rows, 1 datasets" in capsys.readouterr().out
    assert any("dropped row 1 ('../b.jpg')" in r.getMessage() for r in caplog.records)
    assert main(["import", "disfa", str(tmp_path / "none"), "--out", str(tmp_path / "d.npz")]) == 2
    assert "no DISFA label folder" in capsys.readouterr().err
    Manifest.from_columns(["c.jpg"], "y", expr=np.array([3])).save(tmp_path / "good.npz")
    assert main(["concat", str(tmp_path / "bad.npz"), str(tmp_path / "good.npz"), "--out",
                 str(tmp_path / "all.npz"), "--drop-bad"]) == 0
    joined = load_manifest(tmp_path / "all.npz")
    assert list(joined.paths) == ["a.jpg", "c.jpg"] and joined.datasets == ("x", "y")
