"""The input pipeline: batch contract, image/label alignment, mixing, exact resume, sharding, bad input.

The test images encode their own manifest row: a flat colour whose (G - B) / (R - B) ratio is row % 16. The
ratio survives JPEG, resampling, flips, rotations and every brightness/contrast map ``a x + b`` (no clipping in
the ranges used), so the row can be read back from the centre of any augmented output. Rows with a face box
have a different code outside the box: an output that ignores the box reads the wrong code.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fbn_fast.data import Manifest
from fbn_fast.data.decode import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Augment,
    BatchKey,
    CpuBatchDataset,
    SampleSource,
    decode_rgb,
    normalize_nhwc,
    pixel_window,
    sample_params,
    warp_batch,
    warp_pil,
)
from fbn_fast.data.pipeline import (
    BATCH_KEYS,
    LabelTable,
    Loader,
    TorchDecodeBackend,
    build_loader,
    resolve_backend,
)
from fbn_fast.data.sampler import MixingBatchSampler, ShardedEvalSampler

CODES = 16
N_ROWS = 96


def code_colour(k: int) -> tuple[int, int, int]:
    return 196, int(round(60 + 136 * (k + 0.5) / CODES)), 60


def read_code(image: torch.Tensor) -> int:
    """Row code of one normalised CHW image, from the median colour of its central 20%."""
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None] * 255
    std = torch.tensor(IMAGENET_STD)[:, None, None] * 255
    x = image.detach().float().cpu() * std + mean
    s = x.shape[-1]
    lo, hi = int(0.4 * s), int(0.6 * s)
    r, g, b = x[:, lo:hi, lo:hi].reshape(3, -1).median(1).values.tolist()
    return int(np.clip((g - b) / (r - b) * CODES, 0, CODES - 1e-6))


def write_coded(root, i: int, rel: str, size=(128, 128), box=None) -> None:
    h, w = size
    a = np.empty((h, w, 3), np.uint8)
    if box is None:
        a[:] = code_colour(i % CODES)
    else:
        a[:] = code_colour((i + CODES // 2) % CODES)
        x0, y0, x1, y1 = (int(v) for v in box)
        a[y0:y1, x0:x1] = code_colour(i % CODES)
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(a).save(path, quality=95)


def make_coded(root, n: int = N_ROWS, names=("A", "B", "C")) -> Manifest:
    """``n`` coded JPEGs over three datasets (sizes 1/2, 1/3, 1/6), a third of them with an off-centre box."""
    rng = np.random.default_rng(0)
    paths, boxes, ds = [], np.full((n, 4), np.nan, np.float32), []
    for i in range(n):
        d = names[0] if i % 6 < 3 else names[1] if i % 6 < 5 else names[2]
        rel = f"{d}/{i:04d}.jpg"
        size = (128, 128) if i % 4 else (120, 150)
        box = (4, 6, 60, 58) if i % 3 == 0 else None
        if box is not None:
            boxes[i] = box
        write_coded(root, i, rel, size, box)
        paths.append(rel)
        ds.append(d)
    expr = np.where(np.arange(n) % 5 == 0, -1, np.arange(n) % 7)
    au = rng.integers(0, 2, (n, 17))
    au_mask = np.zeros((n, 17), bool)
    au_mask[:, ::2] = np.arange(n)[:, None] % 2 == 0
    va = rng.uniform(-1, 1, (n, 2)).astype(np.float32)
    va_mask = np.arange(n) % 3 != 1
    compound = np.where(np.arange(n) % 4 == 0, np.arange(n) % 11, -1)
    return Manifest.from_columns(paths, np.array(ds), datasets=tuple(names), box=boxes, expr=expr, au=au,
                                 au_mask=au_mask, va=va, va_mask=va_mask, compound=compound)


@pytest.fixture(scope="module")
def coded(tmp_path_factory):
    root = tmp_path_factory.mktemp("coded")
    return make_coded(str(root)), str(root)


def check_batch(batch: dict, m: Manifest, size: int, dtype: torch.dtype) -> None:
    """Contract keys, dtypes, shapes, layout; labels equal the manifest rows; images encode those rows."""
    # Evaluation batches carry one more key: which images stand in for bad ones (not to be scored).
    assert tuple(k for k in batch if k != "substitute") == BATCH_KEYS
    n = batch["index"].shape[0]
    if "substitute" in batch:
        assert batch["substitute"].dtype == torch.bool and batch["substitute"].shape == (n,)
    img = batch["image"]
    assert img.shape == (n, 3, size, size) and img.dtype == dtype
    assert img.is_contiguous(memory_format=torch.channels_last)
    rows = batch["index"].cpu().numpy()
    assert batch["index"].dtype == torch.int64
    expr = m.expr[rows].astype(np.int64)
    assert batch["expr"].dtype == torch.int64 and batch["expr"].tolist() == np.where(expr < 0, 0, expr).tolist()
    assert batch["expr_mask"].dtype == torch.bool and batch["expr_mask"].tolist() == (expr >= 0).tolist()
    assert batch["au"].dtype == torch.float32 and (batch["au"].cpu().numpy() == m.au[rows]).all()
    assert batch["au_mask"].dtype == torch.bool and (batch["au_mask"].cpu().numpy() == m.au_mask[rows]).all()
    assert batch["va"].dtype == torch.float32 and (batch["va"].cpu().numpy() == m.va[rows]).all()
    assert batch["va_mask"].dtype == torch.bool and (batch["va_mask"].cpu().numpy() == m.va_mask[rows]).all()
    assert batch["dataset"].dtype == torch.int64 and (batch["dataset"].cpu().numpy() == m.dataset[rows]).all()
    assert batch["compound"].dtype == torch.int64 and (batch["compound"].cpu().numpy() == m.compound[rows]).all()
    codes = [read_code(img[i]) for i in range(n)]
    assert codes == [int(r) % CODES for r in rows], "image does not encode the row its labels come from"


# ---------------------------------------------------------------------------------------------- CPU path
@pytest.mark.parametrize("train,workers,dtype", [(True, 2, torch.float32), (False, 0, torch.float16),
                                                 (True, 0, torch.bfloat16)])
def test_cpu_path_alignment_and_contract(coded, train, workers, dtype):
    m, root = coded
    loader = build_loader(m, root, batch_size=16, image_size=64, train=train, backend="cpu", num_workers=workers,
                          dtype=dtype, seed=1)
    assert loader.backend == "cpu"
    seen = []
    for batch in loader:
        check_batch(batch, m, 64, dtype)
        seen += batch["index"].tolist()
    assert len(seen) == len(loader) * 16 if train else sorted(seen) == list(range(N_ROWS))


def test_augmentation_changes_pixels_but_not_codes(coded):
    m, root = coded
    rows = np.arange(0, 24, dtype=np.int64)
    source = SampleSource(m, root, np.arange(N_ROWS))
    key = BatchKey(0, 0, rows)
    plain = CpuBatchDataset(source, size=64, train=False, aug=Augment(), seed=0, rank=0)[key]
    aug = CpuBatchDataset(source, size=64, train=True, aug=Augment(), seed=0, rank=0)[key]
    again = CpuBatchDataset(source, size=64, train=True, aug=Augment(), seed=0, rank=0)[key]
    other = CpuBatchDataset(source, size=64, train=True, aug=Augment(), seed=1, rank=0)[key]
    assert torch.equal(aug["image"], again["image"])  # parameters come from (seed, epoch, batch, rank) only
    assert not torch.equal(aug["image"], other["image"])
    differs = (aug["image"].float() - plain["image"].float()).abs().flatten(1).amax(1) > 8
    assert differs.float().mean() > 0.5  # rotation corners and box borders move into view
    assert not torch.equal(aug["brightness"], torch.ones(24))
    for out in (plain, aug):
        b, c = (out["brightness"], out["contrast"])
        x = normalize_nhwc(out["image"], b, c, torch.float32)
        assert [read_code(x[i]) for i in range(24)] == [int(r) % CODES for r in rows]


def test_eval_through_loader_each_row_once_across_ranks(coded):
    m, root = coded
    got = []
    for rank in range(3):
        loader = build_loader(m, root, batch_size=10, train=False, backend="cpu", num_workers=0, rank=rank,
                              world_size=3)
        for batch in loader:
            got += batch["index"].tolist()
    assert sorted(got) == list(range(N_ROWS))


def test_mixing_ratios_through_loader(coded):
    m, root = coded
    loader = build_loader(m, root, batch_size=20, train=True, backend="cpu", num_workers=0,
                          ratios={"A": 1, "B": 1, "C": 2}, epoch_size=6, image_size=16)
    counts = np.zeros(3)
    for batch in loader:
        counts += np.bincount(batch["dataset"].numpy(), minlength=3)
        check_batch(batch, m, 16, torch.float32)
    np.testing.assert_allclose(counts / counts.sum(), [0.25, 0.25, 0.5], atol=1 / 20)


def test_loader_exact_resume_mid_epoch(coded):
    m, root = coded
    kw = dict(batch_size=12, train=True, backend="cpu", num_workers=2, seed=7, image_size=32, epoch_size=6)
    full = build_loader(m, root, **kw)
    full.set_epoch(1)
    reference = [(b["index"].clone(), b["image"].clone()) for b in full]
    assert full.epoch == 2 and full.position == 0  # a completed epoch moves on by itself

    part = build_loader(m, root, **kw)
    part.set_epoch(1)
    it = iter(part)
    for _ in range(2):
        next(it)
    state = part.state_dict()
    assert state["epoch"] == 1 and state["batch"] == 2
    resumed = build_loader(m, root, **kw)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # the usual loop calls set_epoch after loading: it must not rewind
    rest = [(b["index"], b["image"]) for b in resumed]
    assert len(rest) == len(reference) - 2
    for (i0, x0), (i1, x1) in zip(reference[2:], rest):
        assert torch.equal(i0, i1) and torch.equal(x0, x1)
    # breaking out of the loop and iterating again continues where it stopped (workers stay up)
    del it
    more = [b["index"] for b in part]
    assert len(more) == len(reference) - 2
    assert all(torch.equal(a, b) for a, b in zip(more, [i for i, _ in reference[2:]]))


def test_paths_agree_cpu_and_batched_warp():
    """The Pillow warp (CPU path) and the grid_sample warp (nvJPEG path) are the same transform."""
    rng = np.random.default_rng(0)
    low = (rng.random((9, 8, 3)) * 255).astype(np.uint8)
    img = np.asarray(Image.fromarray(low).resize((120, 140), Image.BICUBIC))
    box = np.array([10, 12, 100, 130], np.float32)
    for train in (True, False):
        p = sample_params(6, train, Augment(), np.random.default_rng(3))
        out = np.empty((6, 48, 48, 3), np.uint8)
        for i in range(6):
            warp_pil(img, pixel_window(box, 140, 120, p.window[i]), p.angle[i], p.flip[i], 48, out[i])
        b, c = (torch.from_numpy(p.brightness), torch.from_numpy(p.contrast)) if train else (None, None)
        cpu = normalize_nhwc(torch.from_numpy(out), b, c, torch.float32)
        chw = torch.from_numpy(img.copy()).permute(2, 0, 1).contiguous()
        batched = warp_batch([chw] * 6, np.tile(box, (6, 1)), p, 48, torch.float32, train)
        assert batched.is_contiguous(memory_format=torch.channels_last)
        # one uint8 level is 1 / (255 * 0.225) = 0.017 after normalisation; allow two levels for rounding
        inner = (cpu - batched)[..., 2:-2, 2:-2].abs()
        assert inner.mean() < 0.02 and inner.max() < 0.06


def _cpu_decode(datas: list[torch.Tensor]) -> list[torch.Tensor]:
    """Stand-in decoder with the nvJPEG contract (list of encoded tensors -> CHW uint8), on the host."""
    from fbn_fast.data.decode import BadImage

    out = []
    for d in datas:
        try:
            out.append(torch.from_numpy(decode_rgb(d.numpy().tobytes())).permute(2, 0, 1))
        except BadImage as exc:
            raise RuntimeError(exc.reason) from None
    return out


@pytest.mark.parametrize("train", [True, False])
def test_batched_decode_path_alignment(coded, train):
    """The nvJPEG path's host reading, batching, replacement and warp, with a host decoder in nvJPEG's place."""
    m, root = coded
    rows = np.arange(N_ROWS)
    sampler = MixingBatchSampler(rows, m.dataset, {0: 1, 1: 1, 2: 1}, batch_size=16, seed=0) if train else \
        ShardedEvalSampler(rows, batch_size=16)
    backend = TorchDecodeBackend(SampleSource(m, root, rows), sampler, size=48, train=train, aug=Augment(), seed=0,
                                 rank=0, num_workers=2, device=torch.device("cpu"), dtype=torch.float16,
                                 decode=_cpu_decode)
    loader = Loader(backend, sampler, LabelTable(m), m.datasets, torch.device("cpu"), train=train, image_size=48,
                    dtype=torch.float16)
    n = 0
    for batch in loader:
        check_batch(batch, m, 48, torch.float16)
        n += 1
    assert n == len(loader)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["nvjpeg", "auto"])
def test_gpu_paths_alignment(coded, backend):
    m, root = coded
    try:
        kind = resolve_backend(backend, torch.device("cuda"))
    except ValueError as exc:
        pytest.skip(str(exc))
    for train in (True, False):
        loader = build_loader(m, root, batch_size=16, train=train, backend=kind, device="cuda",
                              dtype=torch.bfloat16)
        for batch in loader:
            assert batch["image"].is_cuda and batch["expr"].is_cuda
            check_batch(batch, m, 112, torch.bfloat16)


# ---------------------------------------------------------------------------------------------- bad input
def make_bad_set(root) -> tuple[Manifest, dict[int, str]]:
    m = make_coded(root, n=48)
    bad = {5: "truncated", 9: "empty", 14: "not a JPEG", 21: "missing", 30: "corrupt", 40: "undecodable"}
    for row, kind in bad.items():
        path = os.path.join(root, m.path(row))
        data = open(path, "rb").read()
        if kind == "truncated":
            open(path, "wb").write(data[: len(data) // 2])
        elif kind == "empty":
            open(path, "wb").close()
        elif kind == "not a JPEG":
            Image.new("RGB", (32, 32)).save(path, format="PNG")
        elif kind == "missing":
            os.remove(path)
        else:  # complete-looking files: garbage scan data after intact headers, or a garbled scan header
            sos = data.index(b"\xff\xda")
            start = sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big") if kind == "corrupt" else sos + 4
            junk = np.random.default_rng(row).integers(0, 255, len(data) - start, dtype=np.uint8)
            open(path, "wb").write(data[:start] + bytes(junk).replace(b"\xff", b"\x00") + b"\xff\xd9")
    return m, bad


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_images_replaced_counted_logged(tmp_path, caplog, workers):
    m, bad = make_bad_set(str(tmp_path))
    loader = build_loader(m, str(tmp_path), batch_size=8, train=False, backend="cpu", num_workers=workers)
    with caplog.at_level(logging.WARNING, logger="fbn_fast.data"):
        batches = list(loader)  # the run goes on
    assert len(batches) == 6
    index = torch.cat([b["index"] for b in batches]).numpy()
    dataset = torch.cat([b["dataset"] for b in batches]).numpy()
    for b in batches:
        check_batch(b, m, 112, torch.float32)  # replacements carry their own labels and image
    for row in bad:
        slot = row  # evaluation reads rows in order: slot i holds row i or its replacement
        assert index[slot] != row
        assert dataset[slot] == m.dataset[row]  # replaced by the same dataset
    good = [i for i in range(48) if i not in bad]
    assert (index[good] == good).all()
    expected: dict[str, int] = {}
    for row in bad:
        name = m.datasets[m.dataset[row]]
        expected[name] = expected.get(name, 0) + 1
    assert loader.bad_images == expected
    logged = {p for p, _ in loader.bad_image_log}
    assert logged == {os.path.join(str(tmp_path), m.path(r)) for r in bad}
    reasons = dict(loader.bad_image_log)
    assert "truncated" in reasons[os.path.join(str(tmp_path), m.path(5))]
    assert "empty" in reasons[os.path.join(str(tmp_path), m.path(9))]
    assert "not a JPEG" in reasons[os.path.join(str(tmp_path), m.path(14))]
    assert "missing" in reasons[os.path.join(str(tmp_path), m.path(21))]
    assert "corrupt" in reasons[os.path.join(str(tmp_path), m.path(30))]
    assert "undecodable" in reasons[os.path.join(str(tmp_path), m.path(40))]
    for r in bad:
        assert any(m.path(r) in rec.getMessage() for rec in caplog.records)
    summary = loader.summary()
    assert "6 bad images" in summary and m.path(30) in summary
    # a second pass meets the same files: counted once, replaced by the same rows
    again = torch.cat([b["index"] for b in loader]).numpy()
    assert (again == index).all() and sum(loader.bad_images.values()) == 6


def test_bad_images_in_training_and_state(tmp_path):
    m, bad = make_bad_set(str(tmp_path))
    loader = build_loader(m, str(tmp_path), batch_size=8, train=True, backend="cpu", num_workers=0, epoch_size=12)
    for batch in loader:
        assert not set(batch["index"].tolist()) & set(bad)
        check_batch(batch, m, 112, torch.float32)
    assert sum(loader.bad_images.values()) == 6
    fresh = build_loader(m, str(tmp_path), batch_size=8, train=True, backend="cpu", num_workers=0, epoch_size=12)
    fresh.load_state_dict(loader.state_dict())
    assert fresh.bad_images == loader.bad_images


def test_manifest_outside_root_and_bad_options(coded, tmp_path):
    m, root = coded
    escaping = Manifest.from_columns(["A/0000.jpg", "../secret.jpg"], "A")
    with pytest.raises(ValueError, match=r"row 1 .*outside the image root"):
        build_loader(escaping, root, batch_size=2)
    absolute = Manifest.from_columns(["/etc/x.jpg"], "A")
    with pytest.raises(ValueError, match="outside the image root"):
        build_loader(absolute, root, batch_size=2)
    with pytest.raises(ValueError, match="does not exist"):
        build_loader(m, str(tmp_path / "nowhere"), batch_size=2)
    with pytest.raises(ValueError, match="backend"):
        build_loader(m, root, batch_size=2, backend="opencv")
    with pytest.raises(ValueError, match="CUDA"):
        build_loader(m, root, batch_size=2, backend="nvjpeg", device="cpu")
    with pytest.raises(ValueError, match="dtype"):
        build_loader(m, root, batch_size=2, dtype=torch.float64)
    with pytest.raises(ValueError, match="no weight"):
        build_loader(m, root, batch_size=2, datasets=["A", "B"], ratios={"A": 1})
    with pytest.raises(ValueError, match="not in this manifest"):
        build_loader(m, root, batch_size=2, datasets=["Z"])
    with pytest.raises(ValueError, match="no rows in split"):
        build_loader(m, root, batch_size=2, split="test")
    assert resolve_backend("auto", torch.device("cpu")) == "cpu"


def test_pillow_fallback_decodes_with_draft_downscale(coded, monkeypatch, tmp_path):
    """Without simplejpeg the CPU path decodes with Pillow, downscaling in the decoder (Image.draft)."""
    import fbn_fast.data.decode as decode

    big = tmp_path / "big.jpg"
    Image.new("RGB", (512, 400), code_colour(3)).save(big, quality=90)
    data = big.read_bytes()
    monkeypatch.setattr(decode, "simplejpeg", None)
    full = decode.decode_rgb(data)
    small = decode.decode_rgb(data, min_height=90, min_width=100)
    assert full.shape == (400, 512, 3)
    assert small.shape == (100, 128, 3)  # 1/4 scale: the smallest DCT scale that keeps >= 90 x 100
    assert decode.jpeg_size(data) == (400, 512)
    m, root = coded
    loader = build_loader(m, root, batch_size=16, train=True, backend="cpu", num_workers=0, epoch_size=2)
    for batch in loader:
        check_batch(batch, m, 112, torch.float32)
    with pytest.raises(decode.BadImage, match="not a JPEG"):
        decode.check_jpeg(b"\x89PNG\r\n")
