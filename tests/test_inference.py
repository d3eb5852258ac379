"""The inference layer (fbn_fast.inference) and the one ``evaluate`` as the trainer calls it: prebuilt batches,
hidden truth, and statistics summed across two gloo ranks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from tiny_model import tiny_model

from fbn_fast.checkpoint import save_checkpoint
from fbn_fast.config import TrainConfig
from fbn_fast.data import Manifest
from fbn_fast.evaluate import ALL, evaluate
from fbn_fast.inference import (
    HiddenTruth,
    autocast,
    compound_scorer,
    image_dtype,
    iter_outputs,
    load_trained,
    open_loader,
    parse_compound_classes,
    resolve_amp_dtype,
    resolve_device,
)
from fbn_fast.labels import AUS, COMPOUNDS, MISSING

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two datasets (expressions + VA; compounds) × (train, test), JPEGs, and the complete labels beside it."""
    root = tmp_path_factory.mktemp("inference")
    rng = np.random.default_rng(1)
    paths, dataset, split = [], [], []
    for d in ("basic", "cmp"):
        for s, n in (("train", 4), ("test", 15)):
            for i in range(n):
                rel = f"{d}_{s}_{i}.jpg"
                img = np.clip(rng.uniform(0, 255, 3) + rng.normal(0, 50, (36, 36, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(root / rel, quality=92)
                paths.append(rel)
                dataset.append(d)
                split.append(s)
    n = len(paths)
    ds = np.array(dataset)
    expr = rng.integers(0, 7, n)
    au = (rng.random((n, len(AUS))) < 0.4).astype(np.uint8)
    va = rng.uniform(-1, 1, (n, 2)).astype(np.float32)
    compound = np.where(ds == "cmp", rng.choice([1, 4, 7], n), MISSING)
    cols = dict(datasets=("basic", "cmp"), split=np.array(split, dtype=object), au=au, va=va, compound=compound)
    published = Manifest.from_columns(paths, ds.astype(object), expr=np.where(ds == "basic", expr, MISSING),
                                      au_mask=np.zeros(au.shape, bool), va_mask=ds == "basic", **cols)
    published.save(root / "manifest.npz")
    Manifest.from_columns(paths, ds.astype(object), expr=expr, au_mask=np.ones(au.shape, bool),
                          va_mask=np.ones(n, bool), **cols).save(root / "manifest_full.npz")
    return root, published


# ------------------------------------------------------------------------------------------------ resolution
def test_amp_dtype_speaks_trains_vocabulary_and_old_spellings_warn():
    assert resolve_amp_dtype("none", CPU) is None
    assert resolve_amp_dtype("bf16", CPU) == torch.bfloat16
    assert resolve_amp_dtype("fp16", CPU) == torch.float16
    assert resolve_amp_dtype("auto", CPU) is None  # no autocast on the CPU unless asked
    assert resolve_amp_dtype(torch.float32, CPU) is None and resolve_amp_dtype(torch.bfloat16, CPU) == torch.bfloat16
    for old, new in (("float32", "none"), ("bfloat16", "bf16"), ("float16", "fp16")):
        with pytest.warns(FutureWarning, match=f"'{old}' is deprecated.*'{new}'"):
            assert resolve_amp_dtype(old, CPU) == resolve_amp_dtype(new, CPU)
    with pytest.raises(ValueError, match="--amp-dtype 'half'"):
        resolve_amp_dtype("half", CPU)


def test_device_and_autocast():
    assert resolve_device("cpu") == CPU and resolve_device(CPU) == CPU
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto") == CPU and resolve_device(None) == CPU
        with pytest.raises(ValueError, match="--device cuda: CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="--device"):
        resolve_device("tpu")
    x = torch.randn(4, 4)
    with autocast(CPU, torch.bfloat16):
        assert (x @ x).dtype == torch.bfloat16
    with autocast(CPU, None):
        assert (x @ x).dtype == torch.float32
    assert image_dtype(CPU, torch.bfloat16) == torch.float32  # the CPU pipeline hands over float32


def test_compound_classes_are_parsed_in_one_place(data):
    _, m = data
    assert parse_compound_classes("present") == "present" and parse_compound_classes("2,5") == [2, 5]
    assert parse_compound_classes([3, 1]) == [3, 1]
    for bad in ("some", "1,x", ""):
        with pytest.raises(ValueError, match="--compound-classes"):
            parse_compound_classes(bad)
    assert compound_scorer("present", m).names == [COMPOUNDS[c] for c in (1, 4, 7)]
    assert len(compound_scorer("all", m)) == len(COMPOUNDS)
    assert compound_scorer([7, 1], m).classes == [7, 1]


# ------------------------------------------------------------------------------------------------ checkpoint, outputs
def test_load_trained_finds_what_the_run_used(data, tmp_path):
    root, _ = data
    model = tiny_model()
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "data" / "train.npz").write_bytes((root / "manifest.npz").read_bytes())
    ckpt = run / "checkpoints" / "step_00000003.pt"
    # a manifest path relative to the run folder, as a recipe run from there would record it
    save_checkpoint(ckpt, model=model, step=3, config=TrainConfig(image_size=SIZE, manifest="data/train.npz",
                                                                  datasets=["basic"]).to_dict())
    trained = load_trained(ckpt, "cpu")
    assert trained.image_size == SIZE and trained.train_datasets == ["basic"]
    assert trained.train_manifest == run / "data" / "train.npz"
    assert not trained.model.training and trained.device == CPU
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        for a, b in zip(trained.model(x), model(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same weights, the same CPU kernels
    with pytest.raises(ValueError, match="missing.pt"):
        load_trained(tmp_path / "missing.pt", "cpu")


def test_iter_outputs_gives_float32_outputs_of_every_batch(data):
    root, m = data
    model = tiny_model().train()
    loader = open_loader(m, root, split="test", batch_size=4, image_size=SIZE, device=CPU, num_workers=0)
    try:
        seen = []
        for batch, z_e, z_a, v in iter_outputs(model, loader, CPU, torch.bfloat16):
            assert z_e.dtype == z_a.dtype == v.dtype == torch.float32
            with torch.no_grad(), autocast(CPU, torch.bfloat16):
                ref = model(batch["image"])
            torch.testing.assert_close(z_a, ref[1].float(), rtol=0, atol=0)  # the same bf16 computation
            seen += batch["index"].tolist()
    finally:
        loader.close()
    assert not model.training  # outputs are inference outputs (eval mode)
    assert sorted(seen) == np.flatnonzero(m.split_rows("test")).tolist()


def test_hidden_truth_beside_the_published_manifest(data, tmp_path):
    root, m = data
    truth = HiddenTruth.beside(root / "manifest.npz", m)
    assert truth is not None and len(truth) == len(m)
    np.testing.assert_array_equal(truth.compound, m.compound)
    assert truth.au_mask.all() and (truth.expr >= 0).all()
    labels = truth.labels(torch.tensor([0, 5]), CPU)
    assert set(labels) == {"expr", "expr_mask", "au", "au_mask", "va", "va_mask", "compound"}
    assert labels["au"].dtype == torch.float32 and labels["expr_mask"].all()
    m.save(tmp_path / "alone.npz")
    assert HiddenTruth.beside(tmp_path / "alone.npz") is None


# ------------------------------------------------------------------------------------------ evaluate, trainer style
def test_evaluate_on_prebuilt_batches_is_the_same_evaluation(data):
    """The trainer's call (a loaded manifest, its own loader, the truth object, an NVTX name) gives the CLI's
    result: the same rows through the same backend, batch size and threads, hence exactly the same numbers."""
    root, m = data
    model = tiny_model(3).train()
    by_path = evaluate(model, root / "manifest.npz", root, batch_size=6, image_size=SIZE, device="cpu",
                       num_workers=0, train_manifest=m)
    assert model.training  # the caller's mode is restored
    loader = open_loader(m, root, split="test", batch_size=6, image_size=SIZE, device=CPU, num_workers=0)
    try:
        trainer_style = evaluate(model, m, batches=loader, device=CPU, amp_dtype=None,
                                 truth=HiddenTruth.beside(root / "manifest.npz", m), train_manifest=m,
                                 nvtx="eval_forward")
    finally:
        loader.close()
    for key in ("rows", "image_size", "compound_classes", "datasets", "truth", "unlabelled_aus"):
        assert trainer_style[key] == by_path[key], key
    assert by_path["rows"] == 30 and by_path["image_size"] == SIZE
    assert set(by_path["datasets"]) == {"basic", "cmp"} and set(by_path["datasets"]["cmp"]) == {"compound"}
    # the hidden truth scores compounds too, with the same scorer and classes
    assert set(by_path["truth"]) == {"basic", "cmp", ALL}
    assert by_path["truth"]["cmp"]["compound"] == by_path["datasets"]["cmp"]["compound"]
    assert np.sum(by_path["truth"][ALL]["compound"]["confusion"]) == 15
    assert by_path["unlabelled_aus"]["aus"] == list(AUS)  # the training split labels no AU


DRIVER = textwrap.dedent("""
    import json, sys
    import torch.distributed as dist
    from fbn_fast.data import load_manifest
    from fbn_fast.evaluate import evaluate
    from fbn_fast.inference import HiddenTruth, load_trained, open_loader

    ckpt, root, out = sys.argv[1:4]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    m = load_manifest(f"{root}/manifest.npz")
    trained = load_trained(ckpt, "cpu")
    loader = open_loader(m, root, split="test", batch_size=4, image_size=32, device=trained.device, num_workers=0,
                         rank=rank, world_size=world)
    try:
        res = evaluate(trained.model, m, batches=loader, device=trained.device, amp_dtype=None,
                       truth=HiddenTruth.beside(f"{root}/manifest.npz", m), distributed=True)
    finally:
        loader.close()
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_two_ranks_sum_their_statistics(data, tmp_path):
    root, _ = data
    ckpt = tmp_path / "step_00000001.pt"
    save_checkpoint(ckpt, model=tiny_model(4), step=1, config=TrainConfig(image_size=SIZE).to_dict())
    (tmp_path / "driver.py").write_text(DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(tmp_path / "driver.py"),
           str(ckpt), str(root), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    single = json.loads(json.dumps(evaluate(load_trained(ckpt, "cpu").model, root / "manifest.npz", root,
                                            batch_size=4, image_size=SIZE, device="cpu", num_workers=0,
                                            amp_dtype="none")))
    assert ranks[0]["datasets"] == ranks[1]["datasets"]  # every rank holds the summed statistics
    assert ranks[0]["rows"] == single["rows"] == 30
    for section in ("datasets", "truth"):
        for name, tasks in single[section].items():
            for task, res in tasks.items():
                got = ranks[0][section][name][task]
                for key in ("confusion", "n"):  # counts: every test row counted once across the ranks
                    if key in res:
                        assert got[key] == res[key], (section, name, task, key)
                # sums of shards in another order: float32 rounding only (rel 1e-5)
                for key in ("accuracy", "macro_f1", "mean_f1", "ccc_valence", "ccc_arousal"):
                    if res.get(key) is not None:
                        assert got[key] == pytest.approx(res[key], rel=1e-5, abs=1e-6), (section, name, task, key)
