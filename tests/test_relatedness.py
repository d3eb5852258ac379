import json

import numpy as np
import pytest

from fbn_fast import relatedness as R
from fbn_fast.labels import AUS, COMPOUNDS, EXPRESSIONS, MISSING

# docs/method.md §2, transcribed as "AU:weight" strings (an independent spelling of the same tables).
PRIOR_TEXT = {
    "Neutral": "",
    "Anger": "4:1 7:1 24:1 10:.26 17:.52 23:.29",
    "Disgust": "9:1 10:1 17:1 4:.31 24:.26",
    "Fear": "1:1 4:1 20:1 25:1 2:.57 5:.63 26:.33",
    "Happiness": "12:1 25:1 6:.51",
    "Sadness": "4:1 15:1 1:.60 6:.50 17:.67",
    "Surprise": "1:1 2:1 25:1 26:1 5:.66",
}
COMPOUND_TEXT = {
    "Happily surprised": "1:1 2:1 12:1 25:1 5:.64 26:.67",
    "Happily disgusted": "10:1 12:1 25:1 4:.32 6:.61 9:.59",
    "Sadly fearful": "1:1 4:1 20:1 25:1 2:.46 5:.24 6:.34 15:.30",
    "Sadly angry": "4:1 15:1 6:.26 7:.48 17:.50",
    "Sadly surprised": "1:1 4:1 25:1 26:1 2:.27 6:.31",
    "Sadly disgusted": "4:1 10:1 1:.49 6:.61 9:.20 15:.54 17:.47 25:.43",
    "Fearfully angry": "4:1 20:1 25:1 5:.40 7:.39 10:.30",
    "Fearfully surprised": "1:1 2:1 5:1 20:1 25:1 4:.47 10:.35 26:.51",
    "Angrily surprised": "4:1 25:1 26:1 5:.35 7:.50 10:.34",
    "Angrily disgusted": "4:1 10:1 17:1 7:.60 9:.57 24:.36",
    "Disgustedly surprised": "1:1 2:1 5:1 10:1 4:.45 9:.37 17:.66 24:.33",
    "Fearfully disgusted": "1:1 4:1 10:1 20:1 25:1 2:.64 5:.50 6:.26 9:.28 15:.33",
    "Appalled": "4:1 10:1 6:.25 9:.56 17:.67 24:.36",
    "Hatred": "4:1 10:1 7:.57 9:.27 17:.63 24:.37",
    "Awed": "1:1 2:1 5:1 25:1 4:.21 20:.62 26:.56",
}


def _expected(text: dict, rows) -> np.ndarray:
    out = np.zeros((len(rows), 17))
    for r, name in enumerate(rows):
        for item in text[name].split():
            au, w = item.split(":")
            out[r, AUS.index(f"AU{au}")] = float(w)
    return out


def test_prior_table_exact():
    rel = R.prior()
    assert rel.classes == EXPRESSIONS and rel.aus == AUS
    np.testing.assert_array_equal(rel.matrix, _expected(PRIOR_TEXT, EXPRESSIONS))
    assert not rel.matrix[0].any()  # Neutral


def test_compound_table_exact():
    rel = R.compound_prior()
    assert rel.classes == COMPOUNDS
    np.testing.assert_array_equal(rel.matrix, _expected(COMPOUND_TEXT, COMPOUNDS))


def test_estimate_pseudo_count_blend_by_hand():
    # Two Anger samples annotate AU4 (one active), one of them AU12 (inactive); one Happiness sample AU12 active.
    k4, k12 = AUS.index("AU4"), AUS.index("AU12")
    expr = np.array([1, 1, 4, MISSING])
    au = np.zeros((4, 17))
    mask = np.zeros((4, 17), bool)
    au[0, k4] = 1
    mask[0, k4] = mask[1, k4] = mask[1, k12] = True
    au[2, k12] = 1
    mask[2, k12] = True
    au[3, :] = 1
    mask[3, :] = True  # no expression label: ignored
    prior = R.prior().matrix
    rel = R.estimate(expr, au, mask, alpha=2.0)
    assert rel.matrix[1, k4] == pytest.approx((1 + 2 * prior[1, k4]) / (2 + 2))
    assert rel.matrix[1, k12] == pytest.approx((0 + 2 * prior[1, k12]) / (1 + 2))
    assert rel.matrix[4, k12] == pytest.approx((1 + 2 * prior[4, k12]) / (1 + 2))
    # Unannotated cell: pseudo-counts alone give back the prior.
    assert rel.matrix[2, k4] == pytest.approx(prior[2, k4])
    pure = R.estimate(expr, au, mask, alpha=0.0)
    assert pure.matrix[1, k4] == 0.5 and pure.matrix[1, k12] == 0.0 and pure.matrix[4, k12] == 1.0
    assert pure.source == "data"


def test_estimate_va_means():
    expr = np.array([4, 4, 1, MISSING])
    va = np.array([[0.8, 0.4], [0.6, 0.2], [-0.5, 0.9], [1.0, 1.0]])
    va_mask = np.array([True, True, True, True])
    rel = R.estimate(expr, np.zeros((4, 17)), np.zeros((4, 17), bool), va=va, va_mask=va_mask)
    np.testing.assert_allclose(rel.va_means[4], [0.7, 0.3])
    np.testing.assert_allclose(rel.va_means[1], [-0.5, 0.9])
    np.testing.assert_allclose(rel.va_means[0], [0.0, 0.0])  # no sample: falls back to 0


def test_save_load_roundtrip_and_label_mismatch(tmp_path):
    rel = R.estimate(np.array([1]), np.ones((1, 17)), np.ones((1, 17), bool), alpha=1.0)
    path = tmp_path / "rel.json"
    R.save(rel, path)
    back = R.load(path, EXPRESSIONS, AUS)
    np.testing.assert_array_equal(back.matrix, rel.matrix)
    assert back.classes == EXPRESSIONS and back.source == "data"
    swapped = list(EXPRESSIONS)
    swapped[1], swapped[2] = swapped[2], swapped[1]
    with pytest.raises(ValueError) as err:
        R.load(path, swapped, AUS)
    assert "Anger" in str(err.value) and str(swapped) in str(err.value) and str(path) in str(err.value)
    obj = json.loads(path.read_text())
    obj["aus"] = obj["aus"][::-1]
    path.write_text(json.dumps(obj))
    with pytest.raises(ValueError, match="columns"):
        R.load(path, EXPRESSIONS, AUS)


def test_bad_tables_rejected():
    with pytest.raises(ValueError, match=r"row 2, column 3 has value 1.5"):
        bad = np.zeros((7, 17))
        bad[2, 3] = 1.5
        R.Relatedness(bad, EXPRESSIONS, AUS)
    with pytest.raises(ValueError, match="shape"):
        R.Relatedness(np.zeros((7, 16)), EXPRESSIONS, AUS)
    with pytest.raises(ValueError, match="va_means row 3"):
        mu = np.zeros((7, 2))
        mu[3, 1] = 2.0
        R.Relatedness(np.zeros((7, 17)), EXPRESSIONS, AUS, va_means=mu)
