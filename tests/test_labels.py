import numpy as np
import pytest

from fbn_fast import labels as L


def test_canonical_orders():
    assert L.EXPRESSIONS == ("Neutral", "Anger", "Disgust", "Fear", "Happiness", "Sadness", "Surprise")
    assert L.AU_NUMBERS == (1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 17, 20, 23, 24, 25, 26)
    assert len(L.COMPOUNDS) == 15 and len(L.COMPOUND_PARENTS) == 15
    assert all(a in L.EXPRESSIONS and b in L.EXPRESSIONS for a, b in L.COMPOUND_PARENTS)


def test_rafdb_remap():
    # RAF-DB: 1 Surprise, 2 Fear, 3 Disgust, 4 Happiness, 5 Sadness, 6 Anger, 7 Neutral
    got = L.from_rafdb(np.array([1, 2, 3, 4, 5, 6, 7, 0, 8]))
    names = [L.EXPRESSIONS[i] if i >= 0 else None for i in got]
    assert names == ["Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral", None, None]


def test_affectnet_remap_masks_contempt_and_non_expressions():
    got = L.from_affectnet(np.arange(11))
    names = [L.EXPRESSIONS[i] if i >= 0 else None for i in got]
    assert names[:7] == ["Neutral", "Happiness", "Sadness", "Surprise", "Fear", "Disgust", "Anger"]
    assert names[7:] == [None, None, None, None]  # Contempt, None, Uncertain, No-Face


def test_affwild2_remap():
    got = L.from_affwild2(np.array([-1, 0, 4, 6, 7]))
    assert got.tolist() == [L.MISSING, 0, 4, 6, L.MISSING]


def test_au_index_and_errors():
    assert L.au_index(12) == L.AUS.index("AU12") == L.au_index("AU12") == L.au_index("12")
    assert L.au_columns([1, 26]).tolist() == [0, 16]
    with pytest.raises(ValueError, match="AU 11"):
        L.au_index(11)
