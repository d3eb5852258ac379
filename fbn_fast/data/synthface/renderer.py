"""The SynthFace renderer: a procedural face whose 17 action units are localised deformations.

A face is drawn with PIL polygons and lines on a canvas 2-4 times the target size (:func:`supersampling`),
box-filtered down (anti-aliasing), then lit by a linear gradient and given sensor noise in numpy. Everything
except the AU intensities lives in a :class:`Look` (identity, pose, lighting, skin tone, background, noise), so
the same look rendered with two AU vectors differs only where those AUs act; :func:`au_regions` says where.

Geometry is written in *face units*: ``u`` to the image right, ``v`` downwards, the face ellipse spanning
``u`` in [-1, 1] and ``v`` in [-height, height]. :meth:`Look.project` maps face units to canvas pixels with a
small yaw (features shift by their depth on an ellipsoid), roll, scale and offset."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from ...labels import AU_NUMBERS, NUM_AUS

#: Version of the renderer's output; bump it whenever a change alters the pixels of a given seed.
VERSION = 2

#: What each AU does in the renderer (the contact sheet labels rows with these).
AU_DESCRIPTIONS: dict[int, str] = {
    1: "inner brow raiser",
    2: "outer brow raiser",
    4: "brow lowerer",
    5: "upper lid raiser",
    6: "cheek raiser",
    7: "lid tightener",
    9: "nose wrinkler",
    10: "upper lip raiser",
    12: "lip corner puller",
    14: "dimpler",
    15: "lip corner depressor",
    17: "chin raiser",
    20: "lip stretcher",
    23: "lip tightener",
    24: "lip pressor",
    25: "lips part",
    26: "jaw drop",
}

_SKIN_LIGHT = np.array([250.0, 218.0, 190.0])
_SKIN_DARK = np.array([88.0, 55.0, 38.0])
_HAIR = np.array([[25, 20, 18], [60, 40, 28], [105, 72, 45], [190, 155, 95], [140, 62, 32], [150, 150, 150]], float)
_IRIS = np.array([[90, 55, 30], [40, 28, 20], [70, 110, 160], [80, 120, 80], [125, 95, 50]], float)
_INTERIOR = (70, 22, 28)
_TEETH = (236, 232, 222)


def supersampling(size: int) -> int:
    """Canvas oversampling factor: enough canvas pixels per output pixel for thin lines to survive at 64 px."""
    return int(min(4, max(2, math.ceil(192 / size))))


@dataclass(frozen=True)
class Look:
    """Everything about one image except its AUs. Sample one with :func:`sample_look`."""

    size: int
    # placement: face centre (fraction of the image), half-width (fraction of the image), roll/yaw (radians)
    cx: float
    cy: float
    scale: float
    roll: float
    yaw: float
    # face shape
    height: float
    p_top: float
    p_bot: float
    # eyes
    eye_sep: float
    eye_y: float
    eye_w: float
    eye_h: float
    eye_tilt: float
    gaze: float
    # brows
    brow_gap: float
    brow_thick: float
    brow_arch: float
    # nose and mouth
    nose_len: float
    nose_w: float
    mouth_gap: float
    mouth_w: float
    mouth_curve: float
    lip_up: float
    lip_lo: float
    # colours
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    bald: bool
    hairline: float
    iris: tuple[int, int, int]
    lip: tuple[int, int, int]
    cloth: tuple[int, int, int]
    bg_style: int
    bg_grid: tuple[int, ...]
    # photometry
    bright: float
    grad_x: float
    grad_y: float
    noise: float
    noise_seed: int
    jpeg_quality: int

    # ------------------------------------------------------------------ derived geometry (face units)
    @property
    def brow_y(self) -> float:
        return self.eye_y - self.eye_h - self.brow_gap

    @property
    def nose_tip(self) -> float:
        return self.eye_y + self.nose_len

    @property
    def mouth_y(self) -> float:
        return self.nose_tip + self.mouth_gap

    @property
    def cheek(self) -> tuple[float, float]:
        """Centre (|u|, v) of the cheek bulge of AU6."""
        return self.eye_sep + 0.05, self.eye_y + 0.55 * (self.nose_tip - self.eye_y) + 0.06

    def project(self, u, v, depth=0.0) -> np.ndarray:
        """Face units → canvas pixels as an (N, 2) array (canvas = ``size * supersampling(size)`` pixels).

        ``depth`` (scalar or per point) is added to the point's depth on the face ellipsoid: under yaw a point
        moves sideways in proportion to its depth, so the nose tip moves more than the cheeks.
        """
        u = np.asarray(u, dtype=np.float64)
        v = np.asarray(v, dtype=np.float64)
        d = 0.55 * np.sqrt(np.maximum(1.0 - u * u - (v / self.height) ** 2, 0.0)) + depth
        uy = u * math.cos(self.yaw) + d * math.sin(self.yaw)
        canvas = self.size * supersampling(self.size)
        s = self.scale * canvas
        cr, sr = math.cos(self.roll), math.sin(self.roll)
        out = np.empty((uy.size, 2))
        out[:, 0] = self.cx * canvas + s * (cr * uy - sr * v)
        out[:, 1] = self.cy * canvas + s * (sr * uy + cr * v)
        return out

    def px(self, units: float) -> int:
        """A length in face units as a whole number of canvas pixels (at least 1), for line widths."""
        return max(1, round(units * self.scale * self.size * supersampling(self.size)))


def _rgb(c) -> tuple[int, int, int]:
    r, g, b = (min(255, max(0, int(round(x)))) for x in np.asarray(c).tolist())
    return r, g, b


#: Ranges of the continuous look parameters, drawn uniformly (one vectorised draw per face).
LOOK_RANGES: dict[str, tuple[float, float]] = {
    "cx": (0.46, 0.54), "cy": (0.42, 0.48), "scale": (0.33, 0.39), "roll": (-0.14, 0.14), "yaw": (-0.3, 0.3),
    "height": (1.22, 1.36), "p_top": (2.0, 2.6), "p_bot": (1.7, 2.4),
    "eye_w": (0.16, 0.21), "eye_sep": (0.16, 0.23), "eye_y": (-0.24, -0.12), "eye_h": (0.085, 0.115),
    "eye_tilt": (-0.03, 0.04), "gaze": (-0.3, 0.3),
    "brow_gap": (0.11, 0.18), "brow_thick": (0.045, 0.08), "brow_arch": (0.0, 0.06),
    "nose_len": (0.42, 0.55), "nose_w": (0.1, 0.15), "mouth_gap": (0.24, 0.31), "mouth_w": (0.28, 0.37),
    "mouth_curve": (-0.02, 0.02), "lip_up": (0.06, 0.085), "lip_lo": (0.07, 0.105),
    "hairline": (-1.15, -0.95), "bright": (0.8, 1.12), "noise": (0.0, 7.0),
    # not fields of Look: skin tone, hair shade, light direction and strength
    "tone": (0.0, 1.0), "hair_shade": (0.85, 1.15), "light_angle": (0.0, 2 * math.pi), "light": (0.0, 0.35),
}
_LOOK_KEYS = tuple(LOOK_RANGES)
_LOOK_LO = np.array([LOOK_RANGES[k][0] for k in _LOOK_KEYS])
_LOOK_HI = np.array([LOOK_RANGES[k][1] for k in _LOOK_KEYS])


def sample_look(rng: np.random.Generator, size: int = 112) -> Look:
    """Draw a random identity, pose, lighting, skin tone, background and noise level."""
    if size < 16:
        raise ValueError(f"image size {size} is too small for SynthFace (at least 16 px)")
    p = dict(zip(_LOOK_KEYS, rng.uniform(_LOOK_LO, _LOOK_HI).tolist()))
    ints = rng.integers(0, 1 << 30, 8).tolist()
    skin = _SKIN_LIGHT + p.pop("tone") ** 1.2 * (_SKIN_DARK - _SKIN_LIGHT) + rng.normal(0.0, 6.0, 3)
    hair = _HAIR[ints[0] % len(_HAIR)] * p.pop("hair_shade")
    lip = skin * np.array([0.93, 0.62, 0.62]) + np.array([25.0, 0.0, 5.0])
    grid_n = 3 if ints[1] % 5 < 3 else 5
    grid = np.minimum(np.maximum(rng.uniform(20, 235, 3) + rng.normal(0, 45, (grid_n, grid_n, 3)), 0), 255)
    grid = tuple(grid.astype(np.uint8).ravel().tolist())
    angle, strength = p.pop("light_angle"), p.pop("light")
    p["eye_sep"] += p["eye_w"]  # keeps the inner eye corners apart whatever the eye width
    return Look(
        size=int(size), **p,
        skin=_rgb(skin), hair=_rgb(hair), bald=ints[2] % 10 == 0, iris=_rgb(_IRIS[ints[3] % len(_IRIS)]),
        lip=_rgb(lip), cloth=_rgb(rng.uniform(0, 255, 3)), bg_style=ints[4] % 3, bg_grid=grid,
        grad_x=strength * math.cos(angle), grad_y=strength * math.sin(angle),
        noise_seed=ints[5], jpeg_quality=80 + ints[6] % 16,
    )


# ---------------------------------------------------------------------- drawing helpers
def _mix(a, b, t: float) -> tuple[int, int, int]:
    """Colour ``a`` moved a fraction ``t`` towards ``b``."""
    return (int(a[0] + t * (b[0] - a[0]) + 0.5), int(a[1] + t * (b[1] - a[1]) + 0.5),
            int(a[2] + t * (b[2] - a[2]) + 0.5))


def _shade(c, f: float) -> tuple[int, int, int]:
    return (int(min(255.0, c[0] * f) + 0.5), int(min(255.0, c[1] * f) + 0.5), int(min(255.0, c[2] * f) + 0.5))


_CIRCLES = {n: (np.cos(np.linspace(0, 2 * np.pi, n, endpoint=False)),
                np.sin(np.linspace(0, 2 * np.pi, n, endpoint=False))) for n in (6, 10, 12, 14, 16, 18, 24)}
_T64 = np.linspace(0, 2 * np.pi, 64, endpoint=False)
_COS64, _SIN64 = np.cos(_T64), np.sin(_T64)
_TX = np.linspace(0.0, 1.0, 13)  # along an eye, inner → outer corner
_BUMP = np.sin(np.pi * _TX)
_BUMP05, _BUMP08, _BUMP09 = _BUMP ** 0.5, _BUMP ** 0.8, _BUMP ** 0.9  # lid and cap profiles
_BT = np.linspace(0.0, 1.0, 11)  # along a brow, inner → outer end
_BT_ARCH = np.sin(np.pi * _BT ** 0.8)
_BT_IN2, _BT_IN3, _BT_OUT3 = (1 - _BT) ** 2, (1 - _BT) ** 3, _BT ** 3
_XT = np.linspace(-1.0, 1.0, 17)  # across the mouth, corner to corner
_R = np.abs(_XT)
_PROF = np.sqrt(np.clip(1.0 - _R * _R, 0.0, 1.0))
_R2, _R3, _R6, _PROF07 = _R ** 2, np.sign(_XT) * _R ** 3, np.sign(_XT) * _R ** 6, _PROF ** 0.7
_ARC6 = np.linspace(0.2, 2.9, 9)  # the fold under a raised cheek
_ARC6_COS, _ARC6_SIN = np.cos(_ARC6), np.sin(_ARC6)
_ARC_COS, _ARC_SIN = np.cos(np.linspace(-1.1, 1.1, 7)), np.sin(np.linspace(-1.1, 1.1, 7))
_W9 = np.linspace(-1.0, 1.0, 9)
_W7 = np.linspace(-1.0, 1.0, 7)


class _Sketch:
    """Shapes in face units, projected to canvas pixels in one vectorised call, then drawn in order."""

    __slots__ = ("us", "vs", "ds", "ops")

    def __init__(self) -> None:
        self.us: list = []
        self.vs: list = []
        self.ds: list = []
        self.ops: list = []

    def poly(self, u, v, fill, depth: float = 0.0) -> None:
        self.us.append(u)
        self.vs.append(v)
        self.ds.append(depth)
        self.ops.append((len(u), fill, 0))

    def line(self, u, v, fill, width: int, depth: float = 0.0) -> None:
        self.us.append(u)
        self.vs.append(v)
        self.ds.append(depth)
        self.ops.append((len(u), fill, width))

    def ellipse(self, cu: float, cv: float, ru: float, rv: float, n: int, fill, depth: float = 0.0) -> None:
        c, s = _CIRCLES[n]
        self.poly(cu + ru * c, cv + rv * s, fill, depth)

    def draw(self, look: Look, img: Image.Image) -> None:
        counts = [len(u) for u in self.us]
        xy = look.project(np.concatenate(self.us), np.concatenate(self.vs), np.repeat(self.ds, counts))
        flat = xy.ravel().tolist()
        draw = ImageDraw.Draw(img)
        i = 0
        for n, fill, width in self.ops:
            seg = flat[i:i + 2 * n]
            if width:
                draw.line(seg, fill=fill, width=width)
            else:
                draw.polygon(seg, fill=fill)
            i += 2 * n


_BG_CACHE: dict[tuple[int, int], np.ndarray] = {}


def _bg_weights(size: int, n: int) -> np.ndarray:
    """(size, n) weights that interpolate an n-point colour profile smoothly (smoothstep) over size pixels."""
    key = (size, n)
    if key not in _BG_CACHE:
        pos = (np.arange(size) + 0.5) / size * n - 0.5
        lo = np.clip(np.floor(pos).astype(int), 0, n - 1)
        hi = np.clip(lo + 1, 0, n - 1)
        f = np.where(pos < 0, 0.0, np.clip(pos - np.floor(pos), 0.0, 1.0))
        f = f * f * (3 - 2 * f)
        w = np.zeros((size, n), np.float32)
        np.add.at(w, (np.arange(size), lo), 1 - f)
        np.add.at(w, (np.arange(size), hi), f)
        _BG_CACHE[key] = w
    return _BG_CACHE[key]


_STRIPES: dict[tuple[int, int], np.ndarray] = {}


def _stripes(size: int, n: int) -> np.ndarray:
    """Boolean size×size mask of diagonal stripes (cached: a handful of (size, n) pairs ever occur)."""
    key = (size, n)
    if key not in _STRIPES:
        step = max(2, size // (4 + n))
        yy, xx = np.mgrid[0:size, 0:size]
        _STRIPES[key] = ((xx - yy) // step) % 2 == 0
    return _STRIPES[key]


def _background(look: Look, ss: int) -> Image.Image:
    """The backdrop, computed at the output size and enlarged to the canvas (it has no detail to lose)."""
    size = look.size
    n = 3 if len(look.bg_grid) == 27 else 5
    canvas = size * ss
    if look.bg_style == 1:  # blocks: the grid itself, enlarged
        return Image.frombytes("RGB", (n, n), bytes(look.bg_grid)).resize((canvas, canvas), Image.NEAREST)
    grid = np.array(look.bg_grid, dtype=np.float32).reshape(n, n, 3)
    w = _bg_weights(size, n)
    field = np.matmul(w, (w @ grid.reshape(n, n * 3)).reshape(size, n, 3)).astype(np.uint8)  # rows, then columns
    if look.bg_style == 2:  # diagonal stripes of one grid colour over the colour field
        field[_stripes(size, n)] = field[0, -1]
    img = Image.fromarray(field)
    return img.resize((canvas, canvas), Image.NEAREST) if ss > 1 else img


_NOISE_CACHE: dict[int, np.ndarray] = {}
_LIGHT_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _noise(look: Look) -> np.ndarray:
    """S×3S Gaussian noise: a window of a fixed field chosen by ``noise_seed`` (fresh normals cost more than a
    face). Rows are interleaved RGB, as in the image, so every operation runs over long contiguous rows."""
    size = look.size
    if size not in _NOISE_CACHE:
        _NOISE_CACHE[size] = np.random.default_rng(size).standard_normal((2 * size, 6 * size), dtype=np.float32)
    seed = look.noise_seed
    ox, oy = seed % size, (seed // size) % size
    return _NOISE_CACHE[size][oy:oy + size, 3 * ox:3 * (ox + size)]


def _light_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Horizontal (1×3S, repeated per channel) and vertical (S×1) coordinates in [-1, 1]."""
    if size not in _LIGHT_CACHE:
        axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
        _LIGHT_CACHE[size] = (np.repeat(axis, 3)[None, :], axis[:, None])
    return _LIGHT_CACHE[size]


def _au_vector(au) -> np.ndarray:
    if au is None:
        return np.zeros(NUM_AUS)
    a = np.asarray(au, dtype=np.float64)
    if a.shape != (NUM_AUS,):
        raise ValueError(f"AU intensities have shape {a.shape}, expected ({NUM_AUS},) in the order {AU_NUMBERS}")
    if not np.isfinite(a).all():
        raise ValueError(f"AU intensities must be finite, got {a.tolist()}")
    return np.minimum(np.maximum(a, 0.0), 1.0)


# ---------------------------------------------------------------------- the face
def render(look: Look, au=None) -> np.ndarray:
    """Render ``look`` with AU intensities ``au`` (17 values in [0, 1], canonical order) as uint8 H×W×3."""
    (a1, a2, a4, a5, a6, a7, a9, a10, a12, a14, a15, a17, a20, a23, a24, a25, a26) = _au_vector(au).tolist()
    ss = supersampling(look.size)
    img = _background(look, ss)
    sk = _Sketch()
    skin = look.skin
    dark = _shade(skin, 0.42)
    white = (255, 255, 255)
    H = look.height
    ey, e, ew, eh = look.eye_y, look.eye_sep, look.eye_w, look.eye_h
    my, tip, by, nw = look.mouth_y, look.nose_tip, look.brow_y, look.nose_w
    lw = look.px(0.028)  # wrinkle and fold lines

    # Clothes, neck, ears: context that identity varies and no AU touches.
    sk.ellipse(0.0, H + 1.15, 1.9, 0.75, 24, look.cloth)
    sk.poly([-0.5, 0.5, 0.62, -0.62], [0.5 * H, 0.5 * H, H + 0.9, H + 0.9], _shade(skin, 0.82))
    sk.ellipse(-0.97, -0.02, 0.13, 0.24, 12, _shade(skin, 0.9))
    sk.ellipse(0.97, -0.02, 0.13, 0.24, 12, _shade(skin, 0.9))

    # Face outline: a super-ellipse, pointier below; the jaw drop (AU26) stretches the part below the mouth.
    p = np.where(_SIN64 > 0, look.p_bot, look.p_top)
    fu = np.sign(_COS64) * np.abs(_COS64) ** (2 / p)
    fv = H * np.sign(_SIN64) * np.abs(_SIN64) ** (2 / p)
    drop = 0.2 * a26
    if drop:
        fv = fv + drop * np.minimum(np.maximum((fv - my) / (H - my), 0.0), 1.0)
    sk.poly(fu, fv, skin)
    chin = H + drop

    # Hair: a cap over the top of the head down to a hairline that curves down at the temples.
    if not look.bald:
        top = slice(33, 64)  # the upper half of the outline, left to right
        hu = _W9[::-1] * 1.0
        hv = look.hairline + (-0.25 - look.hairline) * hu ** 4
        sk.poly(np.concatenate([[-1.08], 1.08 * fu[top], [1.08], hu]),
                np.concatenate([[0.0], 1.05 * fv[top] - 0.02, [0.0], hv]), look.hair)

    # AU1: central forehead wrinkles (drawn under the brows).
    if a1:
        col = _mix(skin, dark, 0.55 * a1)
        wu = 0.26 * _W9
        for k in range(3):
            sk.line(wu, by - 0.25 - 0.065 * k + 0.05 * _W9 ** 2, col, lw)
    # AU2: lateral forehead lines above the outer brows.
    if a2:
        col = _mix(skin, dark, 0.45 * a2)
        wu = e + 0.3 * ew + 0.9 * ew * _W7
        for k in range(2):
            wv = by - 0.28 - 0.065 * k + 0.03 * _W7 ** 2
            sk.line(wu, wv, col, lw)
            sk.line(-wu, wv, col, lw)
    # AU4: vertical furrows between the brows.
    if a4:
        col = _mix(skin, dark, 0.65 * a4)
        sk.line([-0.06, -0.075], [by - 0.02, by + 0.12], col, lw)
        sk.line([0.06, 0.075], [by - 0.02, by + 0.12], col, lw)

    # AU6: cheek bulge (a raised, lighter cheek with a shadow under it) and crow's feet.
    if a6:
        cu, cv = look.cheek
        bulge, fold, feet = _mix(skin, white, 0.3 * a6), _mix(skin, dark, 0.45 * a6), _mix(skin, dark, 0.6 * a6)
        arc_u, arc_v = 0.17 * _ARC6_COS, cv + 0.1 * _ARC6_SIN
        for side in (-1, 1):
            sk.ellipse(side * cu, cv, 0.2, 0.11, 16, bulge)
            sk.line(side * (cu + arc_u), arc_v, fold, lw)
            x0 = side * (e + ew + 0.035)
            for ang in (-0.45, 0.0, 0.45):
                sk.line([x0, x0 + side * 0.13 * math.cos(ang)], [ey, ey + 0.13 * math.sin(ang)], feet, lw)

    # Eyes. The iris is tucked under the upper lid at rest; AU5 lifts the lid (white shows above the iris),
    # AU7 raises and darkens the lower lid (the lower iris disappears).
    base = ey - look.eye_tilt * _TX
    upper = base - eh * (1.0 + 0.95 * a5) * _BUMP08
    lower = base + eh * 0.72 * (1.0 - 0.75 * a7) * _BUMP09
    cap_up = np.minimum(upper, base - 1.3 * eh * _BUMP05 - 0.005)
    cap_lo = np.maximum(lower, base + 1.3 * eh * _BUMP05 + 0.005)
    ring_v = np.concatenate([upper, lower[::-1]])
    lid_up_v = np.concatenate([upper, cap_up[::-1]])
    lid_lo_v = np.concatenate([lower, cap_lo[::-1]])
    sclera, iris = (242, 240, 234), look.iris
    lid_up_col, lid_lo_col = _shade(skin, 0.88), _mix(skin, dark, 0.12 + 0.3 * a7)
    lash, low_line = (30, 22, 20), _mix(skin, (30, 22, 20), 0.45 + 0.5 * a7)
    low_w = look.px(0.018 + 0.025 * a7)
    for side in (-1, 1):
        xs = side * (e - ew + 2 * ew * _TX)
        ring_u = np.concatenate([xs, xs[::-1]])
        sk.poly(ring_u, ring_v, sclera)
        iu = side * e + look.gaze * eh
        sk.ellipse(iu, ey, 1.1 * eh, 1.1 * eh, 16, iris)
        sk.ellipse(iu, ey, 0.5 * eh, 0.5 * eh, 10, (15, 12, 12))
        # Lids: skin between the lid edges and caps beyond the iris, drawn over the iris.
        sk.poly(ring_u, lid_up_v, lid_up_col)
        sk.poly(ring_u, lid_lo_v, lid_lo_col)
        sk.line(xs, upper, lash, look.px(0.03))
        sk.line(xs, lower, low_line, low_w)

    # Brows: tapered polygons along an arched centre line. AU1 lifts the inner ends, AU2 the outer ends,
    # AU4 lowers the brows and pulls them together.
    bu = e - 1.15 * ew + 2.5 * ew * _BT - 0.07 * a4 * _BT_IN2
    bv = (by - look.brow_arch * _BT_ARCH - 0.22 * a1 * _BT_IN3 - 0.22 * a2 * _BT_OUT3
          + 0.09 * a4 * (1.0 - 0.45 * _BT))
    half = look.brow_thick * (1.0 - 0.45 * _BT) / 2
    pu = np.concatenate([bu, bu[::-1]])
    pv = np.concatenate([bv - half, (bv + half)[::-1]])
    brow = _mix(_shade(look.hair, 0.6), dark, 0.5)  # darker than the skin whatever the hair colour
    sk.poly(pu, pv, brow)
    sk.poly(-pu, pv, brow)

    # Nose: bridge shading, wings and nostrils. AU9 wrinkles the bridge and lifts the wings.
    lift = 0.04 * a9
    bridge, wing, nostril = _shade(skin, 0.88), _shade(skin, 0.9), _shade(skin, 0.35)
    for side in (-1, 1):
        sk.line([side * 0.07, side * 0.09], [ey + 0.05, tip - 0.08], bridge, lw, depth=0.1)
        sk.ellipse(side * nw * 0.85, tip - 0.01 - lift, 0.075, 0.06, 12, wing, depth=0.12)
        sk.ellipse(side * nw * 0.55, tip + 0.025 - lift, 0.045, 0.022, 10, nostril, depth=0.15)
    sk.ellipse(0.0, tip - 0.02, 0.07, 0.055, 12, _shade(skin, 1.04), depth=0.2)
    if a9:
        col = _mix(skin, dark, 0.8 * a9)
        for k in range(3):
            sk.line(0.12 * _W7, ey + 0.02 + 0.07 * k - 0.025 * (1 - _W7 ** 2), col, look.px(0.035), depth=0.1)

    # AU10: deepened folds from the nose wings down towards the mouth.
    if a10:
        col = _mix(skin, dark, 0.6 * a10)
        f = _TX[::2]
        sk.line(nw + 0.06 + 0.12 * f, tip + (my - 0.06 - tip) * f, col, lw)
        sk.line(-(nw + 0.06 + 0.12 * f), tip + (my - 0.06 - tip) * f, col, lw)

    # Mouth. Corner motion is weighted towards the corners so that each AU stays local.
    mw = look.mouth_w * (1.0 + 0.45 * a20 - 0.2 * a23)
    x = mw * _XT + (0.06 * a12 - 0.02 * a15) * _R3 - 0.05 * a14 * _R6
    corner = (look.mouth_curve - 0.13 * a12 + 0.11 * a15 + 0.03 * a20) * (1.0 - 0.9 * a24)
    meet = my + corner * _R2 - 0.045 * a17 * _PROF
    thick = (1.0 - 0.3 * a20) * (1.0 - 0.45 * a23) * (1.0 - 0.75 * a24)
    ui = meet - 0.065 * a10 * _PROF07
    li = meet + (0.075 * a25 + 0.2 * a26) * _PROF
    bow = 0.3 * look.lip_up * np.exp(-(x / 0.07) ** 2) * (1.0 - a24)
    uo = ui - look.lip_up * thick * (0.3 + 0.7 * _PROF) + bow
    lo = li + look.lip_lo * thick * (0.3 + 0.7 * _PROF) - 0.03 * a17 * _PROF
    xx = np.concatenate([x, x[::-1]])
    if a10 or a25 or a26:
        sk.poly(xx, np.concatenate([ui, li[::-1]]), _INTERIOR)
        sk.poly(xx, np.concatenate([ui, (ui + np.minimum(0.5 * (li - ui), 0.055))[::-1]]), _TEETH)
    sk.poly(xx, np.concatenate([uo, ui[::-1]]), _shade(look.lip, 0.95))
    sk.poly(xx, np.concatenate([li, lo[::-1]]), _shade(look.lip, 1.05))
    sk.line(x, ui, _shade(look.lip, 0.5), look.px(0.018))
    if a23:  # tightened lips: dark, hard-edged vermilion
        col = _mix(look.lip, (60, 12, 18), 0.7 * a23)
        sk.poly(xx, np.concatenate([uo, ui[::-1]]), col)
        sk.poly(xx, np.concatenate([li, lo[::-1]]), col)
    if a24:  # pressed lips: skin bulges above and below the mouth, with a fold along each
        bulge, fold = _mix(skin, white, 0.3 * a24), _mix(skin, dark, 0.6 * a24)
        inner = slice(2, 15)
        sk.poly(np.concatenate([x[inner], x[inner][::-1]]), np.concatenate([uo[inner] - 0.06, uo[inner][::-1]]),
                bulge)
        sk.poly(np.concatenate([x[inner], x[inner][::-1]]), np.concatenate([lo[inner], lo[inner][::-1] + 0.06]),
                bulge)
        sk.line(x[inner], uo[inner] - 0.06, fold, lw)
        sk.line(x[inner], lo[inner] + 0.06, fold, lw)
        sk.line(x, ui, _shade(look.lip, 0.5), look.px(0.018))
    if a14:  # dimples just outside the corners: a pit and a crease
        col = _mix(skin, dark, 0.75 * a14)
        for side, cx in ((1, x[-1] + 0.06), (-1, x[0] - 0.06)):
            sk.ellipse(cx, meet[-1] if side > 0 else meet[0], 0.03, 0.05, 10, col)
            sk.line(cx + side * 0.035 * _ARC_COS, (meet[-1] if side > 0 else meet[0]) + 0.09 * _ARC_SIN, col,
                    look.px(0.04))
    if a20:  # stretched skin: folds running down and out from the corners
        col = _mix(skin, dark, 0.65 * a20)
        sk.line([x[-1] + 0.03, x[-1] + 0.13], [meet[-1] + 0.01, meet[-1] + 0.12], col, look.px(0.035))
        sk.line([x[0] - 0.03, x[0] - 0.13], [meet[0] + 0.01, meet[0] + 0.12], col, look.px(0.035))

    # AU17: chin boss pushed up, a dimpled texture and a deeper fold under the lower lip.
    if a17:
        cv = my + 0.55 * (chin - my)
        sk.ellipse(0.0, cv, 0.22, 0.14, 18, _mix(skin, white, 0.22 * a17))
        col = _mix(skin, dark, 0.5 * a17)
        for du, dv in ((-0.1, -0.04), (0.0, -0.06), (0.1, -0.04), (-0.06, 0.04), (0.06, 0.04), (0.0, 0.08)):
            sk.ellipse(du, cv + dv, 0.02, 0.02, 6, col)
        su = 0.16 * _W7
        sk.line(su, lo.max() + 0.05 + 0.03 * (1 - _W7 ** 2), col, lw)

    sk.draw(look, img)
    # Lighting and noise on S×3S views (rows of interleaved RGB): long inner loops instead of loops of 3.
    size = look.size
    gx, gy = _light_grid(size)
    light = (look.bright + look.grad_x * gx) + look.grad_y * gy
    out = np.multiply(np.asarray(img.reduce(ss) if ss > 1 else img).reshape(size, 3 * size), light, dtype=np.float32)
    if look.noise > 0:
        out += np.multiply(_noise(look), look.noise, dtype=np.float32)
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8).reshape(size, size, 3)  # truncation: its half-level bias is far below the noise


# ---------------------------------------------------------------------- where each AU acts
def au_regions(look: Look) -> dict[int, list[tuple[float, float, float, float]]]:
    """Boxes ``(u0, v0, u1, v1)`` in face units within which each AU (by FACS number) changes the face."""
    e, ew, eh, ey = look.eye_sep, look.eye_w, look.eye_h, look.eye_y
    by, tip, my, H = look.brow_y, look.nose_tip, look.mouth_y, look.height
    nw = look.nose_w
    mw = look.mouth_w
    cu, cv = look.cheek
    outer = e + 1.35 * ew
    both = lambda u0, v0, u1, v1: [(u0, v0, u1, v1), (-u1, v0, -u0, v1)]  # a box and its mirror image
    mouth = lambda grow, up, down: [(-(mw * grow + 0.12), my - look.lip_up - up, mw * grow + 0.12,
                                     my + look.lip_lo + down)]
    return {
        1: [(-(e + 0.9 * ew), by - 0.45, e + 0.9 * ew, by + 0.08)],
        2: both(e - 0.9 * ew, by - 0.42, outer + 0.08, by + 0.08),
        4: [(-(outer + 0.08), by - look.brow_arch - 0.1, outer + 0.08, by + 0.2)],
        5: both(e - ew - 0.05, ey - 2.1 * eh - 0.08, e + ew + 0.05, ey + 0.04),
        6: both(e - 0.2, ey - 0.14, max(e + ew + 0.2, cu + 0.25), cv + 0.16),
        7: both(e - ew - 0.05, ey - 0.04, e + ew + 0.05, ey + 1.4 * eh + 0.06),
        9: [(-(nw + 0.16), ey - 0.06, nw + 0.16, tip + 0.08)],
        10: [(-(max(mw, nw + 0.18) + 0.08), tip - 0.06, max(mw, nw + 0.18) + 0.08, my + 0.05)],
        12: mouth(1.2, 0.2, 0.08),
        14: both(0.55 * mw, my - 0.16, mw + 0.16, my + 0.16),
        15: mouth(1.0, 0.08, 0.16),
        17: [(-0.42, my - 0.1, 0.42, H + 0.06)],
        20: mouth(1.5, 0.08, 0.2),
        23: mouth(1.0, 0.08, 0.08),
        24: mouth(1.0, 0.12, 0.12),
        25: mouth(1.0, 0.08, 0.16),
        26: [(-1.08, my - 0.1, 1.08, H + 0.3)],
    }


def region_mask(look: Look, au_number: int) -> np.ndarray:
    """Boolean H×W mask (output pixels) of the region where AU ``au_number`` acts on this look."""
    if au_number not in AU_NUMBERS:
        raise ValueError(f"AU {au_number} is not among {AU_NUMBERS}")
    ss = supersampling(look.size)
    img = Image.new("L", (look.size * ss,) * 2, 0)
    draw = ImageDraw.Draw(img)
    edge = np.linspace(0.0, 1.0, 9)
    for u0, v0, u1, v1 in au_regions(look)[au_number]:
        # Densely sampled edges, so that the yaw's curvature is followed.
        uu = np.concatenate([u0 + (u1 - u0) * edge, np.full(9, u1), u1 - (u1 - u0) * edge, np.full(9, u0)])
        vv = np.concatenate([np.full(9, v0), v0 + (v1 - v0) * edge, np.full(9, v1), v1 - (v1 - v0) * edge])
        draw.polygon(look.project(uu, vv).ravel().tolist(), fill=255)
    return np.asarray(img.reduce(ss)) > 0
