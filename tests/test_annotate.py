"""The annotated picture: the input's size, the box drawn where the face is, the text beside it."""

from __future__ import annotations

import numpy as np
from PIL import Image

from fbn_fast.annotate import annotate, face_lines, save_annotated
from fbn_fast.labels import AUS, EXPRESSIONS


def _entry(box, top="Happiness"):
    probs = dict.fromkeys(EXPRESSIONS, 0.02)
    probs[top] = 0.7
    probs["Neutral"] = 0.18
    aus = dict.fromkeys(AUS, 0.1)
    aus["AU6"] = aus["AU12"] = 0.9
    return {"box": list(box), "expression": {"label": top, "probabilities": probs},
            "aus": {"probabilities": aus, "active": ["AU6", "AU12"]}, "va": {"valence": 0.52, "arousal": -0.1}}


def test_face_lines_give_top_expressions_active_aus_and_va():
    assert face_lines(_entry((0, 0, 1, 1)), top_k=2) == ["Happiness 0.70", "Neutral 0.18", "AU 6 12",
                                                         "V +0.52  A -0.10"]


def test_annotated_picture_has_the_inputs_size_and_marks_each_face(tmp_path):
    img = np.full((300, 420, 3), 128, np.uint8)
    faces = [_entry((40, 30, 140, 130)), _entry((250, 160, 330, 240), top="Sadness")]
    pic = annotate(img, faces)
    assert pic.size == (420, 300) and pic.mode == "RGB"
    out = np.asarray(pic).astype(int)
    changed = np.abs(out - img).sum(2) > 0
    assert changed[30, 40:140].all() and changed[30:130, 40].all()  # the first box's top and left edges
    assert changed[130:150, 40:120].any()  # its text panel below the box
    assert not changed[5:25, 180:230].any()  # far from both faces: untouched
    assert (np.asarray(annotate(img, [])) == img).all()
    taken: set[str] = set()
    p1 = save_annotated(pic, "photos/a.jpg", tmp_path / "out", taken)
    p2 = save_annotated(pic, "other/a.png", tmp_path / "out", taken)
    assert (p1.name, p2.name) == ("a.png", "a_2.png")
    with Image.open(p1) as back:
        assert back.size == (420, 300)


def test_message_and_panels_stay_inside_small_images():
    img = np.zeros((64, 64, 3), np.uint8)
    pic = annotate(img, [_entry((0, 0, 64, 64))], message="no face found")
    assert pic.size == (64, 64)
