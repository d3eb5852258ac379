"""FaceBehaviorNet trunks and heads, trunk weight loading, checkpoints and model loading for inference."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from fbn_fast import relatedness
from fbn_fast.checkpoint import (
    capture_rng,
    checkpoint_path,
    find_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    load_model,
    prune_checkpoints,
    restore_rng,
    save_checkpoint,
    unwrap_model,
)
from fbn_fast.config import TrainConfig
from fbn_fast.model import FaceBehaviorNet, build_model, build_trunk


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# torchvision's parameter counts (resnet18 11,689,512; resnet50 25,557,032; vgg16 138,357,544) minus their
# 1000-way classifier, which the trunks do not have: the layouts must be exactly torchvision's.
@pytest.mark.parametrize("name, expected", [
    ("resnet18", 11_689_512 - (512 * 1000 + 1000)),
    ("resnet50", 25_557_032 - (2048 * 1000 + 1000)),
])
def test_resnet_trunks_match_torchvision_layout(name, expected):
    trunk = build_trunk(name)
    assert _n_params(trunk) == expected
    assert "layer4.1.conv2.weight" in trunk.state_dict()


def test_vgg16_trunk_matches_torchvision_layout():
    trunk = build_trunk("vgg16")
    assert _n_params(trunk) == 138_357_544 - (4096 * 1000 + 1000)
    keys = trunk.state_dict().keys()
    assert {"features.0.weight", "features.28.weight", "classifier.0.weight", "classifier.3.weight"} <= set(keys)
    assert trunk.out_features == 4096
    with torch.no_grad():
        assert trunk.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 4096)


@pytest.mark.parametrize("name, size", [("small", 64), ("resnet18", 32)])
def test_heads_shapes_ranges_and_gradients(name, size):
    torch.manual_seed(0)
    model = build_model(name, num_classes=5, num_aus=11)
    x = torch.randn(3, 3, size, size).contiguous(memory_format=torch.channels_last)
    out = model(x)
    assert out.expr.shape == (3, 5) and out.au.shape == (3, 11) and out.va.shape == (3, 2)
    (out.expr.sum() + out.au.sum() + out.va.sum()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # tanh head: VA stays in [-1, 1] even when the features are huge
    with torch.no_grad():
        model.va_head.weight.fill_(100.0)
        v = model(x * 1e3).va
    assert torch.all(v.abs() <= 1.0) and torch.isfinite(v).all()


def test_channels_last_model_and_inputs():
    model = build_model("small")
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    x = torch.randn(2, 3, 64, 64)  # plain NCHW input still works (converted once)
    model.eval()
    with torch.no_grad():
        a = model(x)
        b = model(x.contiguous(memory_format=torch.channels_last))
    # The NCHW input is converted before the first layer, so the same kernels run on the same values: bit-equal.
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    plain = build_model("small", channels_last=False)
    assert not any(m.weight.is_contiguous(memory_format=torch.channels_last) and not m.weight.is_contiguous()
                   for m in plain.modules() if isinstance(m, torch.nn.Conv2d))


def test_bad_trunk_names_and_options():
    with pytest.raises(ValueError, match="unknown trunk 'nope'"):
        build_model("nope")
    with pytest.raises(ValueError, match="ships no weights"):
        build_model("resnet18", pretrained=True)
    with pytest.raises(ValueError, match="trunk_kwargs"):
        build_model("small", trunk_kwargs={"depth": 3})
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="pip install timm"):
            build_model("timm:resnet18")


def test_pretrained_weights_load_from_torchvision_layout(tmp_path):
    torch.manual_seed(1)
    source = build_trunk("resnet18")
    state = dict(source.state_dict())
    state["fc.weight"] = torch.zeros(1000, 512)  # a torchvision file carries its classifier: ignored
    state["fc.bias"] = torch.zeros(1000)
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    model = build_model("resnet18", pretrained=str(path))
    for k, v in source.state_dict().items():
        torch.testing.assert_close(model.trunk.state_dict()[k], v)
    del state["layer1.0.conv1.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match="missing.*layer1.0.conv1.weight"):
        build_model("resnet18", pretrained=str(path))


def test_arch_rebuilds_the_same_model():
    model = build_model("small", num_classes=6, num_aus=9, head_dropout=0.1, trunk_kwargs={"width": 8})
    again = build_model(**model.arch)
    assert isinstance(again, FaceBehaviorNet)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------- checkpoints
def _train_a_bit(model, steps=3):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        out = model(torch.randn(4, 3, 32, 32))
        (out.expr.logsumexp(1).mean() + out.au.pow(2).mean()).backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_checkpoint_roundtrip_and_load_model(tmp_path):
    torch.manual_seed(0)
    model = build_model("small", trunk_kwargs={"width": 8})
    opt = _train_a_bit(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    cfg = TrainConfig(trunk="small", trunk_kwargs={"width": 8}, image_size=32)
    rel = relatedness.prior()
    loader_state = {"epoch": 2, "batch": 7, "sampler": {"rows": np.arange(5)}}
    path = save_checkpoint(checkpoint_path(tmp_path, 12), model=model, step=12, optimizer=opt, scheduler=sched,
                           loader_states=[loader_state], rng_states=[capture_rng()], config=cfg.to_dict(),
                           relatedness=rel.to_json(), counters={"nonfinite_total": 1})
    assert path == tmp_path / "checkpoints" / "step_00000012.pt"
    # the checkpoint and its checksum, no temporary file left behind
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, path.name + ".sha256"]

    ckpt = load_checkpoint(path)  # weights_only: plain data only
    assert ckpt["step"] == 12 and ckpt["counters"]["nonfinite_total"] == 1
    np.testing.assert_array_equal(ckpt["loader"][0]["sampler"]["rows"], np.arange(5))
    assert ckpt["loader"][0]["epoch"] == 2

    loaded, cfg2, rel2 = load_model(path)
    assert cfg2 == cfg and np.array_equal(rel2.matrix, rel.matrix)
    assert not loaded.training
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    # Same weights, input, batch and threads: the same kernels run, so the outputs are bit-equal.
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


def test_checkpoint_of_wrapped_model_is_unwrapped(tmp_path):
    model = build_model("small", trunk_kwargs={"width": 4})
    wrapped = torch.compile(model, backend="eager")  # an OptimizedModule, like --torchcompile gives
    assert unwrap_model(wrapped) is model
    path = save_checkpoint(tmp_path / "c.pt", model=wrapped, step=1)
    assert all(not k.startswith(("_orig_mod.", "module.")) for k in load_checkpoint(path)["model"])


def test_bad_checkpoint_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "cut.pt"
    path = save_checkpoint(tmp_path / "good.pt", model=build_model("small", trunk_kwargs={"width": 4}), step=1)
    bad.write_bytes(path.read_bytes()[:500])  # truncated, as by a crash without the atomic rename
    with pytest.raises(ValueError, match="cut.pt.*cannot be read"):
        load_checkpoint(bad)
    torch.save({"format": "other"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="format 'other'"):
        load_checkpoint(tmp_path / "other.pt")


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = build_model("small", trunk_kwargs={"width": 4})
    path = save_checkpoint(tmp_path / "c.pt", model=model, step=1)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model=model, step=2)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["c.pt", "c.pt.sha256"]


def test_rng_capture_restore():
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    state = capture_rng()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    restore_rng(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_checkpoint_listing_and_pruning(tmp_path):
    model = build_model("small", trunk_kwargs={"width": 4})
    for step in (5, 10, 15):
        save_checkpoint(checkpoint_path(tmp_path, step), model=model, step=step)
    (tmp_path / "checkpoints" / ".step_00000020.pt.abc.tmp").write_bytes(b"partial")
    assert [s for s, _ in find_checkpoints(tmp_path)] == [5, 10, 15]
    assert latest_checkpoint(tmp_path).name == "step_00000015.pt"
    prune_checkpoints(tmp_path, keep=2)
    assert [s for s, _ in find_checkpoints(tmp_path)] == [10, 15]
