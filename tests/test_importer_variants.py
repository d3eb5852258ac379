"""Importers on the variants real releases ship (header-less lists, other spellings) and on bad values:
every bad value is an error naming the file (a cell quoted at most ~80 characters) or a counted drop."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from fbn_fast.data import Manifest, load_manifest
from fbn_fast.data.__main__ import main
from fbn_fast.data.importers import import_affectnet, import_affwild2, import_bp4d, import_emotionet, import_rafdb
from fbn_fast.data.importers._common import QUOTE_CHARS, ImportRecord, RowBuilder
from fbn_fast.labels import AUS, EXPRESSIONS, MISSING

E = {name: i for i, name in enumerate(EXPRESSIONS)}
HEADER = "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal\n"
# A real landmark cell holds 68 x,y pairs: ~700 characters that no message may print whole.
LANDMARKS = ";".join(f"{10 + i * 0.37:.2f}" for i in range(136))


def write(root: Path, rel: str, data: str | bytes) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    return p


def touch(root: Path, *rels: str) -> None:
    for rel in rels:
        write(root, rel, b"\xff\xd8\xff")  # the importers never decode images


def affectnet(root: Path, validation: str) -> None:
    write(root, "Manually_Annotated_file_lists/training.csv",
          HEADER + f'1/a.jpg,10,20,100,120,"{LANDMARKS}",1,0.5,-0.25\n2/b.jpg,0,0,50,50,{LANDMARKS},6,-2,-2\n')
    write(root, "Manually_Annotated_file_lists/validation.csv", validation)
    touch(root, *(f"Manually_Annotated_Images/{p}" for p in ("1/a.jpg", "2/b.jpg", "4/g.jpg", "4/h.jpg")))


def assert_short(message: str) -> None:
    assert LANDMARKS not in message and LANDMARKS[:QUOTE_CHARS + 1] not in message, message
    assert len(message) < 600, message


# ------------------------------------------------------------------------------------------------ AffectNet
def test_affectnet_validation_list_without_header_reads_like_the_one_with_it(tmp_path):
    body = f"4/g.jpg,1,1,9,9,{LANDMARKS},3,0.9,1.0\r\n4/h.jpg,2,2,8,8,{LANDMARKS},0,-0.1,0.2\r\n"
    affectnet(tmp_path / "plain", body)                 # the copies public loaders read with header=None
    affectnet(tmp_path / "headed", HEADER + body)
    plain, headed = import_affectnet(tmp_path / "plain"), import_affectnet(tmp_path / "headed")
    assert list(plain.paths) == list(headed.paths) == [
        "Manually_Annotated_Images/1/a.jpg", "Manually_Annotated_Images/2/b.jpg",
        "Manually_Annotated_Images/4/g.jpg", "Manually_Annotated_Images/4/h.jpg"]
    for m in (plain, headed):
        assert [m.splits[s] for s in m.split] == ["train", "train", "val", "val"]
        np.testing.assert_array_equal(m.expr, [E["Happiness"], E["Anger"], E["Surprise"], E["Neutral"]])
        np.testing.assert_array_equal(m.va_mask, [True, False, True, True])
        # float32 storage of decimal VA values: compared at float32 resolution
        np.testing.assert_allclose(m.va[[0, 2, 3]], [[0.5, -0.25], [0.9, 1.0], [-0.1, 0.2]], rtol=0, atol=1e-7)
        np.testing.assert_array_equal(m.box[2], [1, 1, 10, 10])
    assert plain.meta["imports"][0]["notes"]["files_without_header"] == ["validation.csv"]
    assert "files_without_header" not in headed.meta["imports"][0]["notes"]


def test_affectnet_first_row_that_is_neither_header_nor_data_is_reported_short(tmp_path):
    affectnet(tmp_path, f"4/g.jpg,1,1,9,9,{LANDMARKS},happy,0.9,1.0\n")
    with pytest.raises(ValueError, match=r"validation.csv: line 1: header lacks columns") as err:
        import_affectnet(tmp_path)
    assert_short(str(err.value))
    assert "4/g.jpg" in str(err.value)


@pytest.mark.parametrize("cell, words", [("3.7", "expression '3.7' is not an integer code"),
                                         ("nan", "expression 'nan' is not an integer code"),
                                         ("x" * 300, "is not a number")])
def test_affectnet_non_integer_expression_is_an_error_not_a_truncation(tmp_path, cell, words):
    affectnet(tmp_path, HEADER + f"4/g.jpg,1,1,9,9,{LANDMARKS},{cell},0.9,1.0\n")
    with pytest.raises(ValueError, match="validation.csv: line 2: ") as err:
        import_affectnet(tmp_path)
    assert words in str(err.value)
    assert len(str(err.value)) < 400


def test_affectnet_bad_valence_quotes_the_cell_short(tmp_path):
    affectnet(tmp_path, HEADER + f"4/g.jpg,1,1,9,9,x,3,{LANDMARKS},1.0\n")
    with pytest.raises(ValueError, match="validation.csv: line 2: valence '10.00;") as err:
        import_affectnet(tmp_path)
    assert_short(str(err.value))


def test_binary_or_undecodable_annotation_files_are_named(tmp_path):
    affectnet(tmp_path, b"PK\x03\x04\x14\x00\x06\x00\x08\x00\x00\x00!\x00" * 20)  # an .xlsx renamed to .csv
    with pytest.raises(ValueError, match=r"validation.csv: binary content"):
        import_affectnet(tmp_path)
    raf = tmp_path / "raf"
    write(raf, "basic/EmoLabel/list_patition_label.txt", b"train_00001.jpg 5\ntrain_0\x9a002.jpg 1\n")
    with pytest.raises(ValueError, match=r"list_patition_label.txt: line 2: not UTF-8 text \(byte 0x9a"):
        import_rafdb(raf)
    bp4d = tmp_path / "bp4d"
    write(bp4d, "AUCoding/AU_OCC/F001_T1.csv", b"\x00\x01\x02binary")
    with pytest.raises(ValueError, match=r"F001_T1.csv: binary content"):
        import_bp4d(bp4d)


# ------------------------------------------------------------------------------------------------ RAF-DB
def test_rafdb_from_the_basic_folder_itself_and_non_integer_labels(tmp_path):
    basic = tmp_path / "basic"
    write(basic, "EmoLabel/list_patition_label.txt", "train_00001.jpg 5\ntest_0001.jpg 4\n")
    touch(basic, "Image/aligned/train_00001_aligned.jpg", "Image/aligned/test_0001_aligned.jpg")
    m = import_rafdb(basic)
    assert list(m.paths) == ["Image/aligned/train_00001_aligned.jpg", "Image/aligned/test_0001_aligned.jpg"]
    np.testing.assert_array_equal(m.expr, [E["Sadness"], E["Happiness"]])
    write(basic, "EmoLabel/list_patition_label.txt", "train_00001.jpg 5.5\n")
    with pytest.raises(ValueError, match=r"line 1: label '5.5' is not an integer"):
        import_rafdb(basic)
    write(basic, "EmoLabel/list_patition_label.txt", f"train_00001.jpg 5 {LANDMARKS}\n")
    with pytest.raises(ValueError, match=r"line 1: expected '<image> <label>'") as err:
        import_rafdb(basic)
    assert_short(str(err.value))


# ------------------------------------------------------------------------------------------------ Aff-Wild2
def test_affwild2_long_bad_line_is_quoted_short_and_fractional_codes_are_errors(tmp_path):
    ann = "ABAW/EXPR_Recognition_Challenge/Train_Set/v1.txt"  # the later editions' folder name
    write(tmp_path, ann, "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other\n0\n4\n")
    touch(tmp_path, "cropped_aligned/v1/00001.jpg", "cropped_aligned/v1/00002.jpg")
    m = import_affwild2(tmp_path)
    np.testing.assert_array_equal(m.expr, [E["Neutral"], E["Happiness"]])
    write(tmp_path, ann, "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other\n0\n3.7\n")
    with pytest.raises(ValueError, match=r"v1.txt: line 3: expression code 3.7 is not an integer"):
        import_affwild2(tmp_path)
    write(tmp_path, ann, f"Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other\n0\n{LANDMARKS}\n")
    with pytest.raises(ValueError, match=r"v1.txt: line 3: expected 1 numbers") as err:
        import_affwild2(tmp_path)
    assert_short(str(err.value))
    write(tmp_path, ann, LANDMARKS + "\n0\n")
    with pytest.raises(ValueError, match=r"v1.txt: line 1: expected the header of expression names") as err:
        import_affwild2(tmp_path)
    assert_short(str(err.value))


# ------------------------------------------------------------------------------------------------ BP4D, EmotioNet
def test_bp4d_fractional_codes_are_counted_not_rounded(tmp_path):
    write(tmp_path, "AUCoding/AU_OCC/F001_T1.csv", "0,1,2,4\n1,1,0.5,9\n2,0,1,1\n")
    touch(tmp_path, "BP4D-training/F001/T1/1.jpg", "BP4D-training/F001/T1/2.jpg")
    m = import_bp4d(tmp_path)
    a = {name: k for k, name in enumerate(AUS)}
    assert m.au_mask[0].tolist() == [k == a["AU1"] for k in range(len(AUS))]  # 0.5 and 9: not annotated
    rec = m.meta["imports"][0]
    assert rec["masked"] == {"AU 9 (not coded) entries": 1, "AU code other than 0/1/9 entries": 1}


def test_emotionet_header_without_au_columns_is_quoted_short(tmp_path):
    write(tmp_path, "table.csv", f"URL,{LANDMARKS}\n'http://x/a.jpg',1\n")
    with pytest.raises(ValueError, match=r"table.csv: line 1: no AU columns in the header") as err:
        import_emotionet(tmp_path)
    assert_short(str(err.value))


# ------------------------------------------------------------------------------------------------ the builder
def builder(tmp_path: Path) -> RowBuilder:
    return RowBuilder(ImportRecord("corpus", "ds", tmp_path))


@pytest.mark.parametrize("labels, words", [
    ({"au": np.full((1, len(AUS)), np.nan), "au_mask": np.eye(1, len(AUS), 3, dtype=bool)},
     "au not 0/1 where annotated: AU5=nan"),
    ({"au": np.eye(1, len(AUS), 0) * 0.5, "au_mask": np.eye(1, len(AUS), 0, dtype=bool)},
     "au not 0/1 where annotated: AU1=0.5"),
    ({"va": np.array([[np.nan, 0.2]]), "va_mask": np.array([True])}, "va not finite where annotated"),
    ({"expr": np.array([255], np.uint8)}, "expr not an integer class code: 255"),
    ({"expr": np.array([3.7])}, "expr not an integer class code: 3.7"),
    ({"compound": np.array([np.nan])}, "compound not an integer class code: nan"),
])
def test_row_builder_rejects_values_that_would_be_coerced(tmp_path, labels, words):
    with pytest.raises(ValueError, match="corpus: 1 label values cannot be stored") as err:
        builder(tmp_path).add(["a.jpg"], "train", **labels)
    assert words in str(err.value) and "'a.jpg'" in str(err.value)


def test_row_builder_still_takes_nan_where_nothing_is_annotated(tmp_path):
    b = builder(tmp_path)
    b.add(["a.jpg", "b.jpg"], "train", expr=np.array([2, MISSING]), au=np.full((2, len(AUS)), np.nan),
          au_mask=np.zeros((2, len(AUS)), bool), va=np.array([[np.nan, np.nan], [0.1, 0.2]]))
    m = b.build()
    assert list(m.paths) == ["a.jpg", "b.jpg"] and m.va_mask.tolist() == [False, True]
    assert not m.au.any() and m.expr.tolist() == [2, MISSING]


def test_from_columns_rejects_or_counts_values_flagged_as_annotated(tmp_path, caplog):
    k = len(AUS)
    au = np.zeros((4, k))
    au[1, 2] = np.nan
    mask = np.zeros((4, k), bool)
    mask[1, 2] = True
    cols = dict(expr=np.array([1, 2, 255, 3], np.int64), au=au, au_mask=mask,
                va=np.array([[0.1, 0.1], [0.2, 0.2], [0.3, 0.3], [np.nan, 0.0]]), va_mask=np.ones(4, bool))
    paths = ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    with pytest.raises(ValueError, match=r"3 label values cannot be stored: row 1 \('b.jpg'\): au not 0/1") as err:
        Manifest.from_columns(paths, "ds", **cols)
    assert "row 2 ('c.jpg'): expr not an integer class code: 255" in str(err.value)
    assert "row 3 ('d.jpg'): va not finite where annotated" in str(err.value)
    with caplog.at_level(logging.WARNING, logger="fbn_fast.data.manifest"):
        m = Manifest.from_columns(paths, "ds", drop_bad=True, **cols)
    assert list(m.paths) == ["a.jpg"] and m.meta["dropped_rows"] == 3
    assert m.meta["dropped_by_reason"] == {"au not 0/1 where annotated": 1, "expr not an integer class code": 1,
                                           "va not finite where annotated": 1}
    assert sum("dropped row" in r.getMessage() for r in caplog.records) == 3
    m.save(tmp_path / "m.npz")
    assert len(load_manifest(tmp_path / "m.npz")) == 1


def test_cli_import_of_a_headerless_affectnet_list(tmp_path, capsys):
    affectnet(tmp_path / "AffectNet", f"4/g.jpg,1,1,9,9,{LANDMARKS},3,0.9,1.0\n")
    out = tmp_path / "an.npz"
    assert main(["import", "affectnet", str(tmp_path / "AffectNet"), "--out", str(out)]) == 0
    assert load_manifest(out).counts()[1] | {"au_names": []} == {
        "dataset": "affectnet", "split": "val", "rows": 1, "expr": 1, "au": 0, "va": 1, "compound": 0,
        "au_names": []}
    affectnet(tmp_path / "Bad", HEADER + f"4/g.jpg,1,1,9,9,{LANDMARKS},3.7,0.9,1.0\n")
    assert main(["import", "affectnet", str(tmp_path / "Bad"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "validation.csv: line 2: expression '3.7' is not an integer code" in err
