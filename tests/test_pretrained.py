"""Pretrained trunks: torchvision-layout files for the built-in trunks, timm weights (from a local file, as
no download is possible in tests), the errors that name the option, and the input normalisation they imply."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from fbn_fast.data.decode import IMAGENET_MEAN, IMAGENET_STD
from fbn_fast.data.pipeline import renormalization
from fbn_fast.model import IMAGENET_NORMALIZATION, build_model, build_trunk

HAS_TIMM = importlib.util.find_spec("timm") is not None


def test_builtin_trunk_loads_a_torchvision_layout_file_and_keeps_imagenet_normalisation(tmp_path):
    source = build_trunk("resnet18")
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in source.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)  # ignored classifier
    torch.save(state, tmp_path / "resnet18.pth")
    model = build_model("resnet18", pretrained=str(tmp_path / "resnet18.pth"))
    for k, v in model.trunk.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)  # a copy: exact
    assert model.normalization == IMAGENET_NORMALIZATION == (tuple(IMAGENET_MEAN), tuple(IMAGENET_STD))


def test_pretrained_errors_name_the_option(tmp_path):
    with pytest.raises(ValueError, match="pretrained = true: built-in trunk 'resnet50' ships no weights"):
        build_model("resnet50", pretrained=True)
    (tmp_path / "junk.pth").write_bytes(b"not a state dict")
    with pytest.raises(ValueError, match="junk.pth' for trunk 'resnet18' cannot be read"):
        build_model("resnet18", pretrained=str(tmp_path / "junk.pth"))
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="expected a state dict, got list"):
        build_model("resnet18", pretrained=str(tmp_path / "list.pth"))


@pytest.mark.skipif(HAS_TIMM, reason="checks the message shown when timm is not installed")
def test_timm_trunk_without_timm_names_the_extra():
    with pytest.raises(ValueError, match=r"trunk 'timm:resnet50' needs timm .*pip install timm"):
        build_model("timm:resnet50", pretrained=True)


def test_renormalization_maps_imagenet_inputs_to_the_trunks_statistics():
    assert renormalization(None, torch.device("cpu")) is None
    assert renormalization(IMAGENET_NORMALIZATION, torch.device("cpu")) is None
    target = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    scale, shift = renormalization(target, torch.device("cpu"))
    u = torch.rand(2, 3, 4, 4)  # pixels on a 0-1 scale
    imagenet = (u - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    # float32 affine maps composed in another order: a few ulps apart
    torch.testing.assert_close(imagenet * scale + shift, (u - 0.5) / 0.5, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="normalization must be"):
        renormalization(((0.5, 0.5), (1, 1)), torch.device("cpu"))


@pytest.mark.skipif(not HAS_TIMM, reason="timm is an optional extra (pip install 'fbn_fast[timm]')")
def test_timm_trunk_loads_pretrained_weights_from_a_file_and_follows_its_normalisation(tmp_path):
    import timm

    reference = timm.create_model("resnet18", pretrained=False, num_classes=0)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in reference.state_dict().items()}
    torch.save(state, tmp_path / "resnet18_timm.pth")
    # pretrained = <file>: the same code path as pretrained = true, with timm reading the file, not the hub
    model = build_model("timm:resnet18", pretrained=str(tmp_path / "resnet18_timm.pth"))
    for k, v in model.trunk.model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    cfg = reference.pretrained_cfg
    assert model.normalization == (tuple(cfg["mean"]), tuple(cfg["std"]))
    # A trunk whose pretrained config has other statistics: the model reports them.
    other = build_model("timm:resnet18", trunk_kwargs={"pretrained_cfg_overlay": {"mean": (0.5,) * 3,
                                                                                   "std": (0.5,) * 3}})
    assert other.normalization == ((0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ValueError, match="pretrained: weights file .*nowhere.pth' for trunk 'timm:resnet18'"):
        build_model("timm:resnet18", pretrained=str(tmp_path / "nowhere.pth"))
    with pytest.raises(ValueError, match="trunk 'timm:no_such_model_x' cannot be built"):
        build_model("timm:no_such_model_x")
