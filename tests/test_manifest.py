"""The manifest: round trip, select/concat, validation naming file and row, dropping bad rows."""

from __future__ import annotations

import json
import logging
import zipfile

import numpy as np
import pytest

from fbn_fast.data import Manifest, load_manifest
from fbn_fast.data.manifest import FORMAT, _read_npz
from fbn_fast.labels import AUS, MISSING

K = len(AUS)


def _manifest(n: int = 6, **overrides) -> Manifest:
    rng = np.random.default_rng(0)
    cols = dict(
        dataset=np.array(["a", "b"] * (n // 2), dtype=object),
        split=np.array(["train", "val", "test"] * (n // 3), dtype=object),
        box=np.where(np.arange(n)[:, None] % 2 == 0, np.array([[1, 2, 30, 40]], np.float32), np.nan),
        expr=np.array([0, MISSING, 6, 3, MISSING, 1][:n]),
        au=rng.integers(0, 2, (n, K)),
        au_mask=rng.random((n, K)) < 0.5,
        va=rng.uniform(-1, 1, (n, 2)),
        compound=np.array([MISSING, 14, MISSING, 0, MISSING, MISSING][:n]),
        meta={"note": "x", "imports": [{"corpus": "c1"}]},
    )
    cols.update(overrides)
    paths = overrides.pop("paths", [f"d{i % 3}/img_{i:03d}.jpg" for i in range(n)])
    cols.pop("paths", None)
    return Manifest.from_columns(paths, cols.pop("dataset"), **cols)


def _assert_same(a: Manifest, b: Manifest) -> None:
    assert len(a) == len(b)
    assert list(a.paths) == list(b.paths)
    for c in ("dataset", "split", "expr", "au", "au_mask", "va", "va_mask", "compound"):
        np.testing.assert_array_equal(getattr(a, c), getattr(b, c), err_msg=c)
    np.testing.assert_array_equal(np.isnan(a.box), np.isnan(b.box))
    np.testing.assert_array_equal(np.nan_to_num(a.box), np.nan_to_num(b.box))
    assert a.datasets == b.datasets and a.splits == b.splits and a.aus == b.aus


def test_round_trip_keeps_every_column_path_and_meta(tmp_path):
    m = _manifest(paths=["d0/ü.jpg", "d1/b.jpg", "d2/c d.png", "d0/日本.jpg", "x.jpg", "y/z/w.jpg"])
    m.save(tmp_path / "m.npz")
    back = load_manifest(tmp_path / "m.npz")
    _assert_same(m, back)
    assert back.path(3) == "d0/日本.jpg"
    assert back.meta == {"note": "x", "imports": [{"corpus": "c1"}]}
    assert back.datasets == ("a", "b")
    assert back.tasks("a") == {"expr": True, "au": [a for a, on in zip(AUS, m.au_mask[::2].any(0)) if on],
                               "va": True, "compound": False}
    assert back.tasks("b")["compound"] is True
    assert not (tmp_path / "m.npz.tmp").exists()


def test_from_columns_codes_and_defaults():
    m = Manifest.from_columns(["a.jpg", "b.jpg", "c.jpg"], "ds", split=np.array(["val", "train", "val"]),
                              va=np.array([[0.1, 0.2], [np.nan, np.nan], [0.0, 1.0]]))
    np.testing.assert_array_equal(m.split, [1, 0, 1])
    np.testing.assert_array_equal(m.va_mask, [True, False, True])
    np.testing.assert_array_equal(m.va[1], [0, 0])  # NaN stored as 0 with the mask off
    assert (m.expr == MISSING).all() and (m.compound == MISSING).all() and not m.au_mask.any()
    assert np.isnan(m.box).all()
    with pytest.raises(ValueError, match="split names \\['dev'\\]"):
        Manifest.from_columns(["a.jpg"], "ds", split="dev")
    with pytest.raises(ValueError, match="dataset names"):
        Manifest.from_columns(["a.jpg"], "ds", datasets=("other",))
    with pytest.raises(ValueError, match="va"):
        Manifest.from_columns(["a.jpg", "b.jpg"], "ds", va=np.zeros((3, 2)))


def test_select_by_mask_and_by_indices_keeps_order():
    m = _manifest()
    sub = m.select(np.array([4, 0, 2]))
    assert list(sub.paths) == [m.path(4), m.path(0), m.path(2)]
    np.testing.assert_array_equal(sub.expr, m.expr[[4, 0, 2]])
    np.testing.assert_array_equal(sub.au, m.au[[4, 0, 2]])
    masked = m.select(m.split_rows("val"))
    assert list(masked.paths) == [m.path(1), m.path(4)]
    assert len(m.select(np.zeros(len(m), bool))) == 0
    with pytest.raises(ValueError, match="split 'dev'"):
        m.split_rows("dev")


def test_concat_merges_dataset_codes_by_name_and_import_records():
    a = _manifest()
    b = Manifest.from_columns(["q.jpg", "r.jpg"], np.array(["c", "b"], object), expr=np.array([2, 5]),
                              meta={"imports": [{"corpus": "c2"}]})
    m = Manifest.concat([a, b])
    assert m.datasets == ("a", "b", "c")
    assert len(m) == len(a) + 2
    assert m.path(len(a)) == "q.jpg" and m.path(len(a) + 1) == "r.jpg"
    names = [m.datasets[d] for d in m.dataset]
    assert names[-2:] == ["c", "b"] and names[:len(a)] == [a.datasets[d] for d in a.dataset]
    np.testing.assert_array_equal(m.expr[-2:], [2, 5])
    assert m.meta["imports"] == [{"corpus": "c1"}, {"corpus": "c2"}]
    with pytest.raises(ValueError, match="at least one"):
        Manifest.concat([])


@pytest.mark.parametrize(
    "column, row, value, reason",
    [
        ("expr", 2, 7, "expr outside"),
        ("expr", 3, -3, "expr outside"),
        ("compound", 1, 15, "compound outside"),
        ("va", 4, (1.5, 0.0), "va outside"),
        ("va", 0, (np.nan, 0.0), "va outside"),
        ("box", 1, (1.0, np.nan, 5.0, 5.0), "face box"),
        ("box", 2, (10.0, 0.0, 5.0, 5.0), "face box"),
        ("path", 5, "../escape.jpg", "leaves the root"),
        ("path", 0, "/abs/a.jpg", "leaves the root"),
        ("path", 1, "C:/data/a.jpg", "leaves the root"),
        ("path", 2, "", "empty path"),
    ],
)
def test_validation_error_names_file_row_and_reason(tmp_path, column, row, value, reason):
    m = _manifest()
    if column == "path":
        paths = list(m.paths)
        paths[row] = value
        m = Manifest.from_columns(paths, np.array([m.datasets[d] for d in m.dataset], object),
                                  split=np.array([m.splits[s] for s in m.split], object), expr=m.expr)
    elif column == "va":
        m.va[row] = value
        m.va_mask[row] = True
    else:
        getattr(m, column)[row] = value
    m.save(tmp_path / "bad.npz")
    with pytest.raises(ValueError) as err:
        load_manifest(tmp_path / "bad.npz")
    text = str(err.value)
    assert "bad.npz" in text and f"row {row} " in text and reason in text and "1 bad rows" in text


def test_unannotated_entries_are_not_validated(tmp_path):
    m = _manifest()
    m.au[0] = 7
    m.au_mask[0] = False
    m.va[1] = (5.0, -9.0)
    m.va_mask[1] = False
    m.save(tmp_path / "m.npz")
    assert len(load_manifest(tmp_path / "m.npz")) == len(m)


def test_drop_bad_lists_and_counts_every_dropped_row(tmp_path, caplog):
    m = _manifest()
    m.expr[1] = 9
    m.au[3, 0], m.au_mask[3, 0] = 2, True
    m.va[3], m.va_mask[3] = (0.0, 3.0), True  # a second problem on the same row
    m.save(tmp_path / "m.npz")
    report: list = []
    with caplog.at_level(logging.WARNING, logger="fbn_fast.data.manifest"):
        out = load_manifest(tmp_path / "m.npz", drop_bad=True, report=report)
    assert sorted(report) == [(1, "expr outside [0, 7)"), (3, "au label other than 0/1 where annotated"),
                              (3, "va outside [-1, 1] or not finite")]
    assert out.meta["dropped_rows"] == 2
    assert out.meta["dropped_by_reason"] == {"expr outside [0, 7)": 1, "au label other than 0/1 where annotated": 1,
                                             "va outside [-1, 1] or not finite": 1}
    assert list(out.paths) == [m.path(i) for i in (0, 2, 4, 5)]
    logged = [r.getMessage() for r in caplog.records]
    assert any("m.npz: dropped row 1 ('d1/img_001.jpg'): expr outside" in t for t in logged)
    assert any("m.npz: dropped row 3 ('d0/img_003.jpg'): au label" in t for t in logged)
    assert any("dropped 2 bad rows of 6" in t for t in logged)


def test_unreadable_or_foreign_files_are_rejected_with_the_file_name(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.npz: not a readable manifest"):
        load_manifest(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="other.npz: manifest header missing"):
        load_manifest(tmp_path / "other.npz")
    header = np.frombuffer(json.dumps({"format": "something/2"}).encode(), np.uint8)
    np.savez(tmp_path / "fmt.npz", header=header)
    with pytest.raises(ValueError, match="format 'something/2'"):
        load_manifest(tmp_path / "fmt.npz")
    m = _manifest()
    m.save(tmp_path / "ok.npz")
    data = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.npz"):
        load_manifest(tmp_path / "cut.npz")


def test_column_shapes_are_checked(tmp_path):
    m = _manifest()
    arrays = {c: getattr(m, c) for c in ("dataset", "split", "box", "expr", "au", "au_mask", "va", "va_mask",
                                         "compound", "path_blob", "path_offsets")}
    arrays["au"] = arrays["au"][:, :5]
    header = {"format": FORMAT, "datasets": list(m.datasets), "splits": list(m.splits),
              "expressions": list(m.expressions), "aus": list(m.aus), "meta": {}}
    np.savez(tmp_path / "s.npz", header=np.frombuffer(json.dumps(header).encode(), np.uint8), **arrays)
    with pytest.raises(ValueError, match="column au has shape"):
        load_manifest(tmp_path / "s.npz")


def test_fast_reader_matches_numpy_also_for_compressed_members(tmp_path):
    arrays = {"a": np.arange(12, dtype=np.int16).reshape(3, 4), "b": np.asfortranarray(np.ones((5, 2))),
              "c": np.zeros(0, np.uint8), "d": np.array([True, False])}
    np.savez(tmp_path / "plain.npz", **arrays)
    np.savez_compressed(tmp_path / "packed.npz", **arrays)
    for name in ("plain.npz", "packed.npz"):
        got = _read_npz(tmp_path / name)
        assert got.keys() == arrays.keys()
        for k, v in arrays.items():
            np.testing.assert_array_equal(got[k], v)
            assert got[k].dtype == v.dtype
    with zipfile.ZipFile(tmp_path / "plain.npz") as z:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())


def test_summary_counts_rows_per_dataset_split_and_task():
    m = Manifest.concat([
        Manifest.from_columns(["a.jpg", "b.jpg", "c.jpg"], "expr_va", split=np.array(["train", "train", "test"]),
                              expr=np.array([1, MISSING, 2]), va=np.array([[0.1, 0.1], [0.2, 0.2], [np.nan] * 2])),
        Manifest.from_columns(["d.jpg"], "au_only", au=np.eye(1, K, 2), au_mask=np.eye(1, K, 2).astype(bool)),
    ])
    counts = {(c["dataset"], c["split"]): c for c in m.counts()}
    assert counts[("expr_va", "train")] | {} == {"dataset": "expr_va", "split": "train", "rows": 2, "expr": 1,
                                                 "au": 0, "va": 2, "compound": 0, "au_names": []}
    assert counts[("expr_va", "test")]["rows"] == 1 and counts[("expr_va", "test")]["va"] == 0
    assert counts[("au_only", "train")]["au_names"] == ["AU4"]
    text = m.summary()
    assert text.splitlines()[0] == "4 rows, 2 datasets"
    assert any(line.split()[:3] == ["au_only", "train", "1"] and line.endswith("4") for line in text.splitlines())
    assert repr(m) == "Manifest(4 rows, datasets=['expr_va', 'au_only'])"


def test_root_check_scans_block_boundaries(monkeypatch):
    import fbn_fast.data.manifest as manifest_module

    paths = ["ok/a.jpg", "x/../y.jpg", "b..c.jpg", "abc/..", "D:x.jpg", "fine/z.png", "..", "e/f:g.jpg", "/r.jpg"]
    bad = {1, 3, 4, 6, 8}
    for block in (1, 2, 3, 5, 7, 1 << 22):
        monkeypatch.setattr(manifest_module, "_SCAN_BLOCK", block)
        m = Manifest.from_columns(paths, "d")
        assert set(np.flatnonzero(m._outside_root()).tolist()) == bad, block
