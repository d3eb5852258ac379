"""The DALI path, run with CPU operators (``device_id=None``): contract, alignment, partial batch, resume, bad input.

Skipped when nvidia-dali is not importable; the GPU variant (``device="mixed"`` decoding) is marked ``gpu``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fbn_fast.data.pipeline import build_loader, dali_available

pytestmark = pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed (extra 'dali')")

# the coded-image helpers live beside the pipeline tests; load them by path so either import layout works
_spec = importlib.util.spec_from_file_location("_pipeline_test_helpers", Path(__file__).with_name("test_pipeline.py"))
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)


@pytest.fixture(scope="module")
def coded(tmp_path_factory):
    root = tmp_path_factory.mktemp("coded_dali")
    return helpers.make_coded(str(root)), str(root)


@pytest.mark.parametrize("train,dtype", [(True, torch.float16), (False, torch.float32), (True, torch.bfloat16)])
def test_dali_cpu_alignment_and_contract(coded, train, dtype):
    m, root = coded
    loader = build_loader(m, root, batch_size=20, image_size=64, train=train, backend="dali", device="cpu",
                          dtype=dtype, num_workers=2, seed=3)
    assert loader.backend == "dali"
    seen, sizes = [], []
    for batch in loader:
        helpers.check_batch(batch, m, 64, dtype)
        seen += batch["index"].tolist()
        sizes.append(len(batch["index"]))
    if train:
        assert sizes == [20] * len(loader)
    else:  # batch-mode external source: the partial last batch comes through
        assert sizes == [20, 20, 20, 20, 16] and sorted(seen) == list(range(helpers.N_ROWS))


def test_dali_cpu_agrees_with_cpu_path_in_evaluation(tmp_path):
    """Same crop window and resize: DALI's output and the CPU path's differ by resampling rounding only."""
    from PIL import Image

    from fbn_fast.data import Manifest

    rng = np.random.default_rng(0)
    paths = []
    for i in range(8):
        low = (rng.random((6, 6, 3)) * 255).astype(np.uint8)
        Image.fromarray(low).resize((128, 128), Image.BICUBIC).save(tmp_path / f"{i}.jpg", quality=95)
        paths.append(f"{i}.jpg")
    box = np.tile(np.array([[16, 8, 112, 120]], np.float32), (8, 1))
    m = Manifest.from_columns(paths, "A", box=box)
    kw = dict(batch_size=8, image_size=64, train=False, num_workers=0, device="cpu")
    a = next(iter(build_loader(m, str(tmp_path), backend="dali", **kw)))["image"]
    b = next(iter(build_loader(m, str(tmp_path), backend="cpu", **kw)))["image"]
    diff = (a - b).abs()
    assert diff.mean() < 0.05  # about three uint8 levels: different antialiasing filters, same geometry
    # a window shifted by a few pixels would differ far more on this smooth but non-flat content
    assert (a - torch.roll(b, 3, dims=3)).abs().mean() > 2 * diff.mean()


def test_dali_cpu_exact_resume(coded):
    m, root = coded
    kw = dict(batch_size=16, image_size=32, train=True, backend="dali", device="cpu", seed=5, epoch_size=5)
    full = [(b["index"].clone(), b["image"].clone()) for b in build_loader(m, root, **kw)]
    part = build_loader(m, root, **kw)
    it = iter(part)
    next(it), next(it)
    resumed = build_loader(m, root, **kw)
    resumed.load_state_dict(part.state_dict())
    rest = [(b["index"], b["image"]) for b in resumed]
    assert len(rest) == 3
    for (i0, x0), (i1, x1) in zip(full[2:], rest):
        assert torch.equal(i0, i1) and torch.equal(x0, x1)


def test_dali_cpu_bad_images(tmp_path):
    m, bad = helpers.make_bad_set(str(tmp_path))
    # garbage scan data behind intact headers is only caught by a strict decoder: the DALI path checks on the host
    # (signature, end marker, header) and leaves the pixels to DALI, which decodes such a file with a warning
    host_detectable = {r: k for r, k in bad.items() if k != "corrupt"}
    fixed = os.path.join(str(tmp_path), m.path(30))
    helpers.write_coded(str(tmp_path), 30, m.path(30))
    assert os.path.getsize(fixed) > 0
    loader = build_loader(m, str(tmp_path), batch_size=8, train=False, backend="dali", device="cpu")
    batches = list(loader)
    index = torch.cat([b["index"] for b in batches]).numpy()
    for b in batches:
        helpers.check_batch(b, m, 112, torch.float32)
    for row in host_detectable:
        assert index[row] != row and m.dataset[index[row]] == m.dataset[row]
    assert sum(loader.bad_images.values()) == len(host_detectable)
    assert {p for p, _ in loader.bad_image_log} == {os.path.join(str(tmp_path), m.path(r)) for r in host_detectable}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dali_gpu_alignment(coded):
    m, root = coded
    for train in (True, False):
        loader = build_loader(m, root, batch_size=16, train=train, backend="dali", device="cuda", dtype=torch.float16)
        for batch in loader:
            assert batch["image"].is_cuda
            helpers.check_batch(batch, m, 112, torch.float16)
