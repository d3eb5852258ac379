"""Face detection on a real photo (scikit-image's astronaut), crop geometry, box files and the detector registry."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from skimage import data

from fbn_fast.faces import (
    DEFAULT_MARGIN,
    OpenCVHaarDetector,
    available_detectors,
    boxes_for,
    check_box,
    crop_box,
    get_detector,
    read_boxes_file,
    register_detector,
)

# Eileen Collins' face in astronaut() (512×512): eyes at about (207, 113) and (245, 113), mouth at (227, 148).
FACE_POINTS = np.array([[207, 113], [245, 113], [227, 148]], np.float64)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return data.astronaut()


@pytest.fixture(scope="module")
def detector() -> OpenCVHaarDetector:
    return get_detector("opencv")


def _holds(box, points) -> bool:
    x0, y0, x1, y1 = box
    return bool(np.all((points[:, 0] > x0) & (points[:, 0] < x1) & (points[:, 1] > y0) & (points[:, 1] < y1)))


def test_opencv_finds_the_one_face_in_the_astronaut_photo(astronaut, detector):
    boxes = detector(astronaut)
    assert len(boxes) == 1
    x0, y0, x1, y1 = boxes[0]
    assert 0 <= x0 < x1 <= 512 and 0 <= y0 < y1 <= 512
    assert _holds(boxes[0], FACE_POINTS)  # eyes and mouth inside the box
    assert 60 <= x1 - x0 <= 160  # a face, not the whole picture (her face is about 95 px wide)


def test_opencv_finds_every_face_of_a_group_picture(astronaut, detector):
    # Three people: the photo, its mirror image, and a copy at 60 % scale below them on a grey canvas.
    small = np.asarray(Image.fromarray(astronaut).resize((307, 307)))
    canvas = np.full((512 + 307, 1024, 3), 90, np.uint8)
    canvas[:512, :512] = astronaut
    canvas[:512, 512:] = astronaut[:, ::-1]
    canvas[512:, 300:607] = small
    boxes = detector(canvas)
    assert len(boxes) == 3
    mirrored = np.stack([1023 - FACE_POINTS[:, 0], FACE_POINTS[:, 1]], 1)
    scaled = FACE_POINTS * 0.6 + [300, 512]
    for points in (FACE_POINTS, mirrored, scaled):
        assert sum(_holds(b, points) for b in boxes) == 1
    areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]
    assert areas == sorted(areas, reverse=True)  # largest first: the small copy comes last
    assert _holds(boxes[-1], scaled)


def test_opencv_finds_nothing_in_a_plain_picture(detector):
    assert detector(np.full((200, 300, 3), 128, np.uint8)) == []


def test_detector_rejects_an_image_that_is_not_rgb_uint8(detector):
    with pytest.raises(ValueError, match="RGB uint8"):
        detector(np.zeros((10, 10), np.uint8))


def test_crop_box_adds_the_margin_squares_and_stays_inside():
    # A 100×80 box in the middle: square of side 100 * (1 + 2 * margin) about its centre.
    x0, y0, x1, y1 = crop_box((200, 200, 300, 280), 600, 800, margin=0.2)
    assert (x1 - x0, y1 - y0) == pytest.approx((140, 140))
    assert ((x0 + x1) / 2, (y0 + y1) / 2) == pytest.approx((250, 240))
    # Near the top-left corner the square is moved inside, not cut (its size stays).
    c = crop_box((0, 5, 50, 55), 600, 800, margin=DEFAULT_MARGIN)
    assert c[0] == 0 and c[1] == 0 and c[2] - c[0] == pytest.approx(70) and c[3] - c[1] == pytest.approx(70)
    # Larger than the image in one direction: clipped to it there.
    assert crop_box((10, 10, 90, 40), 50, 100, margin=0.5) == (0.0, 0.0, 100.0, 50.0)
    with pytest.raises(ValueError, match="--margin"):
        crop_box((0, 0, 10, 10), 20, 20, margin=-0.1)


def test_check_box_names_the_image_for_boxes_outside_it():
    assert check_box([1, 2, 30, 40], 50, 60, "a.jpg") == (1.0, 2.0, 30.0, 40.0)
    with pytest.raises(ValueError, match=r"a\.jpg: face box .* lies outside the 60x50 image"):
        check_box([10, 10, 61, 40], 50, 60, "a.jpg")
    with pytest.raises(ValueError, match=r"b\.png: face box .* lies outside"):
        check_box([-1, 0, 10, 10], 50, 60, "b.png")
    with pytest.raises(ValueError, match=r"c\.png: face box .* needs x1 > x0"):
        check_box([10, 10, 5, 20], 50, 60, "c.png")
    with pytest.raises(ValueError, match=r"d\.png: face box .* not four"):
        check_box([1, 2, 3], 50, 60, "d.png")


def test_boxes_file_is_read_and_matched_by_path_or_name(tmp_path):
    f = tmp_path / "boxes.json"
    f.write_text(json.dumps({"photos/a.jpg": [[1, 2, 3, 4]], "b.png": [], "x/c.png": [[0, 0, 5, 5]],
                             "y/c.png": [[1, 1, 5, 5]]}))
    table = read_boxes_file(f)
    assert boxes_for(table, "photos/a.jpg") == [[1, 2, 3, 4]]
    assert boxes_for(table, "elsewhere/b.png") == []  # by file name, unique
    assert boxes_for(table, "z/c.png") is None  # two entries share the name: no guess
    assert boxes_for(table, "missing.jpg") is None
    f.write_text(json.dumps({"a.jpg": [[1, 2, 3]]}))
    with pytest.raises(ValueError, match=r"--boxes .*entry 'a.jpg'"):
        read_boxes_file(f)
    f.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected an object"):
        read_boxes_file(f)
    with pytest.raises(ValueError, match="does not exist"):
        read_boxes_file(tmp_path / "none.json")


def test_registry_plugs_detectors_by_name_and_by_module_path():
    class Fixed:
        def __init__(self, box=(1.0, 2.0, 3.0, 4.0)):
            self.box = box

        def __call__(self, image):
            return [self.box]

    register_detector("fixed-for-test", Fixed)
    assert "fixed-for-test" in available_detectors() and "opencv" in available_detectors()
    assert get_detector("fixed-for-test", box=(0, 0, 9, 9))(np.zeros((10, 10, 3), np.uint8)) == [(0, 0, 9, 9)]
    with pytest.raises(ValueError, match="already registered"):
        register_detector("fixed-for-test", Fixed)
    assert isinstance(get_detector("fbn_fast.faces:OpenCVHaarDetector"), OpenCVHaarDetector)
    with pytest.raises(ValueError, match="--detector 'nope'"):
        get_detector("nope")
    with pytest.raises(ValueError, match="cannot import"):
        get_detector("fbn_fast.faces:NoSuchThing")


def test_retinaface_without_its_package_says_how_to_install_it():
    try:
        import retinaface  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="pip install retina-face"):
            get_detector("retinaface")
    else:  # installed here: it builds (its weights download on first call, not at construction)
        assert callable(get_detector("retinaface"))
