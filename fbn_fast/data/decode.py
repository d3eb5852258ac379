"""Reading, checking, decoding and augmenting face JPEGs: the pieces every input path shares, and the CPU path.

Augmentation is described by per-sample parameters drawn in numpy from a generator seeded by
``(seed, epoch, batch, rank)``, so every path (CPU workers, torch/nvJPEG, DALI) applies the same kind of
transform and a resumed run redraws exactly the same parameters:

- a window inside the sample's *base region* (its face box clipped to the image, or the whole image), given
  relative to that region: a random resized crop (area ``scale``, aspect ``ratio``) in training, the whole
  region in evaluation;
- a rotation angle (degrees) about the window centre and a horizontal flip;
- brightness ``b`` and contrast ``c``, applied as ``b * (128 + c * (x - 128))`` on the 0..255 scale (DALI's
  ``brightness_contrast`` formula) in float, fused with the normalisation, without clipping.

The CPU path decodes with simplejpeg (libjpeg-turbo, scaled decoding) when it is installed, else Pillow with
``Image.draft`` (downscale-on-decode), warps each image with one affine resampling (crop, scale, rotation
and flip at once), and hands uint8 HWC batches to the main process, which normalises them.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

try:  # simplejpeg is an optional extra (fast-jpeg); Pillow is the fallback
    import simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
    simplejpeg = None

from PIL import Image

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: Attempts to find a readable replacement for a bad image before the run gives up on its dataset.
MAX_REPLACEMENTS = 32
_EOI_WINDOW = 1024


class BadImage(Exception):
    """An image that cannot be used; ``reason`` says why (missing, empty, not a JPEG, truncated, undecodable)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Augment:
    """Training augmentation ranges. ``scale``: window area as a fraction of the base region; ``ratio``: window
    aspect (w/h) range, sampled log-uniformly; ``rotate``: max |angle| in degrees; ``flip``: probability of a
    horizontal flip; ``brightness``/``contrast``: multiplier ranges."""

    scale: tuple[float, float] = (0.8, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    rotate: float = 10.0
    flip: float = 0.5
    brightness: tuple[float, float] = (0.8, 1.2)
    contrast: tuple[float, float] = (0.8, 1.2)

    def __post_init__(self) -> None:
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"Augment.scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"Augment.ratio must satisfy 0 < lo <= hi, got {self.ratio}")
        if not 0 <= self.flip <= 1:
            raise ValueError(f"Augment.flip must be a probability, got {self.flip}")
        for name in ("brightness", "contrast"):
            a, b = getattr(self, name)
            if not 0 <= a <= b:
                raise ValueError(f"Augment.{name} must satisfy 0 <= lo <= hi, got {(a, b)}")


@dataclass
class Params:
    """Per-sample augmentation parameters of one batch (arrays of length N)."""

    window: np.ndarray  # (N, 4) float64: x0, y0, w, h relative to the base region (fractions)
    angle: np.ndarray  # (N,) degrees
    flip: np.ndarray  # (N,) bool
    brightness: np.ndarray  # (N,) float32
    contrast: np.ndarray  # (N,) float32

    def __len__(self) -> int:
        return len(self.angle)


def batch_rng(seed: int, epoch: int, batch: int, rank: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, 0xA06, epoch, batch, rank])


def sample_params(n: int, train: bool, aug: Augment, rng: np.random.Generator | None) -> Params:
    """Draw ``n`` samples' parameters; evaluation (``train=False``) takes the whole base region, unchanged."""
    if not train or rng is None:
        window = np.tile(np.array([0.0, 0.0, 1.0, 1.0]), (n, 1))
        ones = np.ones(n, np.float32)
        return Params(window, np.zeros(n), np.zeros(n, bool), ones, ones.copy())
    area = rng.uniform(aug.scale[0], aug.scale[1], n)
    log_r = rng.uniform(math.log(aug.ratio[0]), math.log(aug.ratio[1]), n)
    r = np.exp(log_r)
    w = np.minimum(np.sqrt(area * r), 1.0)
    h = np.minimum(np.sqrt(area / r), 1.0)
    x0 = rng.uniform(0.0, 1.0, n) * (1.0 - w)
    y0 = rng.uniform(0.0, 1.0, n) * (1.0 - h)
    angle = rng.uniform(-aug.rotate, aug.rotate, n)
    flip = rng.random(n) < aug.flip
    bright = rng.uniform(*aug.brightness, n).astype(np.float32)
    contrast = rng.uniform(*aug.contrast, n).astype(np.float32)
    return Params(np.stack([x0, y0, w, h], 1), angle, flip, bright, contrast)


def base_region(box: np.ndarray, height: int, width: int) -> tuple[float, float, float, float]:
    """The face box clipped to the image as (x0, y0, w, h) in pixels, or the whole image without a usable box."""
    if box is not None and np.isfinite(box).all():
        x0, y0 = max(0.0, float(box[0])), max(0.0, float(box[1]))
        x1, y1 = min(float(width), float(box[2])), min(float(height), float(box[3]))
        if x1 - x0 >= 1.0 and y1 - y0 >= 1.0:
            return x0, y0, x1 - x0, y1 - y0
    return 0.0, 0.0, float(width), float(height)


def pixel_window(box: np.ndarray, height: int, width: int, rel: np.ndarray) -> tuple[float, float, float, float]:
    """Absolute window (x0, y0, w, h) in pixels of relative window ``rel`` inside the sample's base region."""
    bx, by, bw, bh = base_region(box, height, width)
    return bx + rel[0] * bw, by + rel[1] * bh, max(rel[2] * bw, 1.0), max(rel[3] * bh, 1.0)


# ---------------------------------------------------------------------------------------------- reading
def read_checked(path: str) -> bytes:
    """The file's bytes if it looks like a complete JPEG, else :class:`BadImage` naming what is wrong.

    Truncation shows as a missing end-of-image marker (``FF D9``): inside entropy-coded data every ``FF`` byte is
    stuffed, so a cut file cannot end on one by chance.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise BadImage("missing file") from None
    except IsADirectoryError:
        raise BadImage("is a directory") from None
    except OSError as exc:
        raise BadImage(f"unreadable ({exc.strerror or exc})") from None
    check_jpeg(data)
    return data


def check_jpeg(data: bytes) -> None:
    if len(data) == 0:
        raise BadImage("empty file")
    if data[:3] != b"\xff\xd8\xff":
        raise BadImage(f"not a JPEG (starts with {data[:4].hex()})")
    if data.rfind(b"\xff\xd9", max(0, len(data) - _EOI_WINDOW)) < 0:
        raise BadImage("truncated JPEG (no end-of-image marker)")


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(height, width) from the JPEG header, without decoding."""
    try:
        if simplejpeg is not None:
            h, w, _, _ = simplejpeg.decode_jpeg_header(data)
            return int(h), int(w)
        with Image.open(io.BytesIO(data)) as im:
            return im.height, im.width
    except Exception as exc:  # any decoder error means the same thing here
        raise BadImage(f"undecodable JPEG header ({exc})") from None


def decode_rgb(data: bytes, min_height: int = 0, min_width: int = 0) -> np.ndarray:
    """Decode to HWC uint8 RGB, letting the decoder downscale by 1/2, 1/4, 1/8 while staying >= the minimum size."""
    first = None
    if simplejpeg is not None:
        kw = dict(colorspace="RGB", fastdct=True, fastupsample=True, min_height=min_height, min_width=min_width)
        try:
            return simplejpeg.decode_jpeg(data, strict=True, **kw)
        except ValueError as exc:
            msg = str(exc)
            if "extraneous bytes" in msg:  # padding between segments: harmless, decode anyway
                return simplejpeg.decode_jpeg(data, strict=False, **kw)
            if "Corrupt JPEG data" in msg or "Premature end" in msg:
                raise BadImage(f"corrupt JPEG data ({msg})") from None
            first = exc  # CMYK and other rare JPEGs that libjpeg-turbo will not convert: let Pillow try
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "JPEG":
                raise BadImage(f"not a JPEG ({im.format})")
            if min_height > 0 and min_width > 0:
                im.draft("RGB", (min_width, min_height))
            return np.asarray(im.convert("RGB"))
    except BadImage:
        raise
    except Exception as exc:  # Pillow raises many types for broken files
        raise BadImage(f"undecodable JPEG ({first or exc})") from None


# ---------------------------------------------------------------------------------------------- geometry
def affine_matrix(win: tuple[float, float, float, float], angle: float, flip: bool, size: int) -> np.ndarray:
    """2×3 map from output continuous coordinates (pixel centres at i + 0.5) to source coordinates.

    The output square spans the window, rotated by ``angle`` degrees about the window centre, mirrored when
    ``flip``.
    """
    x0, y0, w, h = win
    cx, cy = x0 + w / 2, y0 + h / 2
    t = math.radians(angle)
    cos, sin = math.cos(t), math.sin(t)
    sx = -w if flip else w
    m = np.array([[cos * sx, -sin * h], [sin * sx, cos * h]]) / size
    # source = c + M (o - size/2) for output point o
    off = np.array([cx, cy]) - m @ np.array([size / 2, size / 2])
    return np.concatenate([m, off[:, None]], 1)


def warp_pil(img: np.ndarray, win: tuple[float, float, float, float], angle: float, flip: bool, size: int,
             out: np.ndarray) -> None:
    """Resample ``img`` (HWC uint8) into ``out`` (size×size×3) through the window; outside the image is black."""
    pil = Image.fromarray(img)
    if angle == 0.0 and not flip:
        # No rotation: Pillow's separable resize (with antialiasing) is both faster and better when shrinking.
        x0, y0, w, h = win
        res = pil.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + w, y0 + h))
    else:
        a = affine_matrix(win, angle, flip, size)
        res = pil.transform((size, size), Image.AFFINE, tuple(a.ravel()), resample=Image.BILINEAR)
    out[...] = np.asarray(res)


def decode_window(data: bytes, box: np.ndarray, rel: np.ndarray, angle: float, flip: bool, size: int,
                  out: np.ndarray) -> None:
    """Decode one JPEG and resample its augmentation window into ``out`` (size×size×3 uint8)."""
    height, width = jpeg_size(data)
    win = pixel_window(box, height, width, rel)
    # Ask for the smallest DCT-scaled decode that keeps the window at least ``size`` pixels across.
    need_w = int(math.ceil(width * size / win[2]))
    need_h = int(math.ceil(height * size / win[3]))
    img = decode_rgb(data, min(need_h, height), min(need_w, width))
    fy, fx = img.shape[0] / height, img.shape[1] / width
    if fx != 1.0 or fy != 1.0:
        win = (win[0] * fx, win[1] * fy, win[2] * fx, win[3] * fy)
    warp_pil(img, win, float(angle), bool(flip), size, out)


# ---------------------------------------------------------------------------------------------- samples
class SampleSource:
    """Rows of a manifest as files under a root, with deterministic same-dataset replacement of bad ones.

    Shared by every path: :meth:`load` returns the bytes of row ``row`` or of its replacement, and the list of
    ``(row, path, reason)`` of every bad file met on the way (the caller accounts for them in the main process).
    """

    def __init__(self, manifest, root: str | os.PathLike, pool_rows: np.ndarray, seed: int = 0) -> None:
        self.root = os.fspath(root)
        self.blob = manifest.path_blob
        self.offsets = manifest.path_offsets
        self.dataset = np.asarray(manifest.dataset)
        self.dataset_names = tuple(manifest.datasets)
        self.box = np.asarray(manifest.box, np.float32)
        self.seed = int(seed)
        pool_rows = np.asarray(pool_rows, np.int64)
        codes = self.dataset[pool_rows]
        self.pools = {int(c): np.sort(pool_rows[codes == c]) for c in np.unique(codes)}
        self._bad: dict[int, str] = {}  # per process: skips re-reading files already known bad

    def path(self, row: int) -> str:
        rel = self.blob[self.offsets[row]:self.offsets[row + 1]].tobytes().decode("utf-8")
        return os.path.join(self.root, rel)

    def replacement(self, row: int, attempt: int) -> int:
        """The ``attempt``-th stand-in for ``row``: a row of the same dataset, chosen from (seed, row, attempt)."""
        pool = self.pools.get(int(self.dataset[row]))
        if pool is None or len(pool) < 2:
            raise RuntimeError(f"image {self.path(row)!r} is bad and its dataset has no other image to replace it")
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, 0xBAD, int(row), attempt])
        pick = int(pool[rng.integers(len(pool) - 1)])
        return pick if pick != row else int(pool[-1])

    def load(self, row: int, use, bad: list) -> tuple[int, object]:
        """``use(row, data)`` on row ``row`` or its first good replacement; returns ``(row used, result)``.

        ``use`` may raise :class:`BadImage` (e.g. from the decoder) to reject the file; the rejected row goes into
        ``bad`` as ``(row, path, reason)`` and the next replacement is tried.
        """
        current = int(row)
        first = len(bad)
        for attempt in range(MAX_REPLACEMENTS + 1):
            known = self._bad.get(current)
            try:
                if known is not None:
                    raise BadImage(known)
                return current, use(current, read_checked(self.path(current)))
            except BadImage as exc:
                self._bad[current] = exc.reason
                bad.append((current, self.path(current), exc.reason))
                current = self.replacement(int(row), attempt)
        from ..faults import DataError

        name = self.dataset_names[int(self.dataset[row])]
        tried = bad[first:]
        examples = "; ".join(f"{os.path.relpath(p, self.root)}: {why}" for _, p, why in tried[:3])
        raise DataError(f"dataset {name}: {len(tried)} images in a row are bad, so it has too few readable images "
                        f"to train or evaluate on (first: {examples}); check the images under {self.root!r}, or "
                        f"leave {name} out with --datasets")


# ---------------------------------------------------------------------------------------------- CPU path
@dataclass(frozen=True)
class BatchKey:
    """What a worker needs to build one batch: which rows, and which augmentation stream."""

    epoch: int
    batch: int
    rows: np.ndarray


class CpuBatchDataset(torch.utils.data.Dataset):
    """Map-style dataset whose items are whole batches: ``ds[BatchKey]`` decodes and augments every row.

    Returned dict: ``image`` uint8 (N, H, W, 3), ``index`` int64 (N,) (the rows actually used: replacements
    included), ``brightness``/``contrast`` float32 (N,) for the main process, ``_bad`` list of
    ``(row, path, reason)``.
    """

    def __init__(self, source: SampleSource, *, size: int, train: bool, aug: Augment, seed: int, rank: int) -> None:
        self.source = source
        self.size, self.train, self.aug = int(size), bool(train), aug
        self.seed, self.rank = int(seed), int(rank)

    def __len__(self) -> int:  # items are addressed by key, not by position
        return 0

    def __getitem__(self, key: BatchKey) -> dict:
        rows = np.asarray(key.rows, np.int64)
        n, s = len(rows), self.size
        rng = batch_rng(self.seed, key.epoch, key.batch, self.rank) if self.train else None
        p = sample_params(n, self.train, self.aug, rng)
        images = torch.empty((n, s, s, 3), dtype=torch.uint8)
        if torch.utils.data.get_worker_info() is not None:
            # write straight into shared memory: otherwise the batch is copied there when it is sent to the main
            # process (a measured ~15% of the CPU time per image at 112 px)
            images.share_memory_()
        out = images.numpy()
        used = np.empty(n, np.int64)
        bad: list = []
        for i, row in enumerate(rows.tolist()):
            def use(r: int, data: bytes, i: int = i) -> None:
                decode_window(data, self.source.box[r], p.window[i], p.angle[i], p.flip[i], s, out[i])
            used[i], _ = self.source.load(row, use, bad)
        return {"image": images, "index": torch.from_numpy(used), "brightness": torch.from_numpy(p.brightness),
                "contrast": torch.from_numpy(p.contrast), "_bad": bad}


def identity_collate(batch):
    return batch


def normalize_nhwc(u8: torch.Tensor, brightness: torch.Tensor | None, contrast: torch.Tensor | None,
                   dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (N, H, W, 3) -> normalised float (N, 3, H, W) in channels-last memory format, on ``device``.

    Brightness/contrast (``b * (128 + c * (x - 128))``) and the ImageNet normalisation are one affine map per
    sample and channel, so they cost a single fused multiply-add over the batch.
    """
    x = u8.to(device, non_blocking=True)
    n = x.shape[0]
    mean = torch.tensor(IMAGENET_MEAN, device=x.device) * 255.0
    inv_std = 1.0 / (torch.tensor(IMAGENET_STD, device=x.device) * 255.0)
    if brightness is None:
        scale = inv_std.expand(n, 3)
        shift = (-mean * inv_std).expand(n, 3)
    else:
        b = brightness.to(x.device, torch.float32)[:, None]
        c = contrast.to(x.device, torch.float32)[:, None]
        scale = b * c * inv_std
        shift = (b * 128.0 * (1.0 - c) - mean) * inv_std
    work = torch.float32 if dtype == torch.bfloat16 or x.device.type == "cpu" else dtype
    y = torch.addcmul(shift[:, None, None, :].to(work), x.to(work), scale[:, None, None, :].to(work))
    return y.to(dtype).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------- batched torch warp
def pixel_windows(boxes: np.ndarray, heights: np.ndarray, widths: np.ndarray, rel: np.ndarray) -> np.ndarray:
    """Vectorised :func:`pixel_window`: (N, 4) windows x0, y0, w, h in pixels."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    x0 = np.maximum(boxes[:, 0], 0.0)
    y0 = np.maximum(boxes[:, 1], 0.0)
    x1 = np.minimum(boxes[:, 2], widths)
    y1 = np.minimum(boxes[:, 3], heights)
    usable = np.isfinite(boxes).all(1) & (x1 - x0 >= 1.0) & (y1 - y0 >= 1.0)
    bx, by = np.where(usable, x0, 0.0), np.where(usable, y0, 0.0)
    bw, bh = np.where(usable, x1 - x0, widths), np.where(usable, y1 - y0, heights)
    return np.stack([bx + rel[:, 0] * bw, by + rel[:, 1] * bh,
                     np.maximum(rel[:, 2] * bw, 1.0), np.maximum(rel[:, 3] * bh, 1.0)], 1)


def affine_theta(win: np.ndarray, angle: np.ndarray, flip: np.ndarray, size: int, canvas_h: int,
                 canvas_w: int) -> np.ndarray:
    """(N, 2, 3) ``affine_grid`` matrices (normalised coordinates, ``align_corners=False``) for the windows.

    Same map as :func:`affine_matrix`; output normalised ``u`` is pixel ``(u + 1) size / 2`` and source pixel
    ``s`` is normalised ``2 s / extent - 1`` on a ``canvas_h × canvas_w`` canvas.
    """
    t = np.radians(np.asarray(angle, np.float64))
    cos, sin = np.cos(t), np.sin(t)
    w, h = win[:, 2], win[:, 3]
    sx = np.where(np.asarray(flip, bool), -w, w)
    cx, cy = win[:, 0] + w / 2, win[:, 1] + h / 2
    theta = np.empty((len(win), 2, 3), np.float64)
    # pixel-space map: source = centre + R diag(sx, h) (o / size - 1/2); in normalised terms o / size - 1/2 = u / 2
    for r, (a, b, c, extent) in enumerate(((cos * sx, -sin * h, cx, canvas_w), (sin * sx, cos * h, cy, canvas_h))):
        theta[:, r, 0] = a / extent
        theta[:, r, 1] = b / extent
        theta[:, r, 2] = 2 * c / extent - 1
    return theta.astype(np.float32)


def warp_batch(images: list[torch.Tensor], boxes: np.ndarray, p: Params, size: int, dtype: torch.dtype,
               train: bool) -> torch.Tensor:
    """Decoded CHW uint8 images (any sizes, one device) -> normalised (N, 3, size, size) channels-last ``dtype``.

    The whole batch is one ``grid_sample`` (crop, scale, rotation and flip in one resampling) and one fused
    multiply-add (brightness/contrast and normalisation): a handful of kernel launches per batch on a GPU.
    Images of different sizes are zero-padded to a common canvas; the grid never reads the padding except where
    the window leaves the image, which is black either way.
    """
    import torch.nn.functional as F

    n = len(images)
    dev = images[0].device
    shapes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    hm, wm = max(h for h, _ in shapes), max(w for _, w in shapes)
    if all(s == (hm, wm) for s in shapes):
        canvas = torch.stack(images)
    else:
        canvas = images[0].new_zeros((n, 3, hm, wm))
        for i, im in enumerate(images):
            canvas[i, :, :shapes[i][0], :shapes[i][1]] = im
    hw = np.array(shapes, np.float64)
    theta = affine_theta(pixel_windows(boxes, hw[:, 0], hw[:, 1], p.window), p.angle, p.flip, size, hm, wm)
    theta_t = torch.from_numpy(theta).to(dev, non_blocking=True)
    grid = F.affine_grid(theta_t, [n, 3, size, size], align_corners=False)
    warped = F.grid_sample(canvas.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, device=dev) * 255.0
    inv_std = 1.0 / (torch.tensor(IMAGENET_STD, device=dev) * 255.0)
    if train:
        b = torch.from_numpy(p.brightness).to(dev)[:, None]
        c = torch.from_numpy(p.contrast).to(dev)[:, None]
        scale = b * c * inv_std
        shift = (b * 128.0 * (1.0 - c) - mean) * inv_std
    else:
        scale, shift = inv_std.expand(n, 3), (-mean * inv_std).expand(n, 3)
    out = torch.empty((n, 3, size, size), dtype=dtype, device=dev, memory_format=torch.channels_last)
    torch.addcmul(shift[:, :, None, None], warped, scale[:, :, None, None], out=out)
    return out
