"""FaceBehaviorNet (docs/method.md §1): one shared trunk and three heads.

>>> model = build_model("resnet50")                 # channels-last, randomly initialised
>>> out = model(images)                             # images: N×3×H×W, normalised, ideally channels-last
>>> out.expr, out.au, out.va                        # z_e (N, C) logits, z_a (N, K) logits, v (N, 2) in [-1, 1]

Built-in trunks need nothing beyond torch (torchvision is not required):

=================  ==========================================================================  ==========
name               what                                                                        features
=================  ==========================================================================  ==========
``vgg16``          VGG-16 as in the paper (VGG-FACE layout: 13 conv + two 4096 FC layers)      4096
``vgg16_bn``       the same with batch norm after every conv (trains from scratch more easily) 4096
``resnet18``       ResNet-18                                                                   512
``resnet50``       ResNet-50 (bottleneck, stride on the 3×3 conv as in torchvision's v1.5)     2048
``small``          a fast 7-conv CNN for CPU runs and tests (64–112 px inputs; width 16)       128
``timm:<name>``    any timm model (needs ``pip install timm``), classifier removed             model's
=================  ==========================================================================  ==========

Pretrained weights (``pretrained`` here, ``--pretrained`` / ``[model] pretrained`` in a recipe):

* built-in VGG and ResNet trunks name their parameters as torchvision does, so a torchvision (or converted
  VGG-FACE) state dict loads with ``pretrained="path/to/resnet50.pth"``; they ship no weights themselves;
* ``timm:<name>`` with ``pretrained=True`` loads the ImageNet weights timm names for that model (fetched from
  its hub, or read from timm's cache); ``pretrained="path/to/file"`` loads that file in timm's own layout
  instead (``pretrained_cfg_overlay=dict(file=...)``), for machines without network access.

Input normalisation follows the trunk: :attr:`FaceBehaviorNet.normalization` is the (mean, std) per RGB
channel on a 0–1 scale the trunk expects — timm's ``pretrained_cfg`` for timm trunks, the ImageNet constants
for the built-in ones; :func:`fbn_fast.data.pipeline.build_loader` takes it as ``normalization=``.

The model remembers how it was built (:attr:`FaceBehaviorNet.arch`), so a checkpoint rebuilds it with
``build_model(**arch)`` (see :func:`fbn_fast.checkpoint.load_model`).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .data.decode import IMAGENET_MEAN, IMAGENET_STD
from .labels import NUM_AUS, NUM_EXPRESSIONS, NUM_VA

#: (mean, std) per RGB channel on a 0–1 scale, as a trunk expects its input.
Normalization = tuple[tuple[float, float, float], tuple[float, float, float]]
IMAGENET_NORMALIZATION: Normalization = (tuple(IMAGENET_MEAN), tuple(IMAGENET_STD))

__all__ = [
    "IMAGENET_NORMALIZATION",
    "TRUNKS",
    "FaceBehaviorNet",
    "Normalization",
    "FBNOutput",
    "available_trunks",
    "build_model",
    "build_trunk",
]


class FBNOutput(NamedTuple):
    """The three heads' outputs: expression logits ``expr`` (N, C), AU logits ``au`` (N, K), VA ``va`` (N, 2)."""

    expr: Tensor
    au: Tensor
    va: Tensor


# ---------------------------------------------------------------------------------------------------- trunks
class Trunk(nn.Module):
    """A feature extractor: images (N, 3, H, W) → features (N, ``out_features``).

    ``normalization``: the input (mean, std) per channel the trunk was (pre)trained with.
    """

    out_features: int
    normalization: Normalization = IMAGENET_NORMALIZATION


# VGG-16 configuration "D" (Simonyan & Zisserman); "M" is a 2×2 max-pool.
_VGG16_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                                     512, 512, 512, "M")


class VGG16Trunk(Trunk):
    """VGG-16 up to its second 4096-unit fully connected layer (the paper's FaceBehaviorNet trunk).

    Layout and parameter names follow torchvision's ``vgg16``/``vgg16_bn`` (``features.*``, ``classifier.0``,
    ``classifier.3``) so that their weights, or VGG-FACE converted to that layout, load directly. The 7×7
    adaptive pool lets any input size ≥ 32 px through (at 112 px it repeats the 3×3 map, as torchvision does).
    """

    def __init__(self, batch_norm: bool = False, dropout: float = 0.5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            layers.append(nn.Conv2d(channels, int(v), 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(int(v)))
            layers.append(nn.ReLU(inplace=True))
            channels = int(v)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(dropout),
        )
        self.out_features = 4096
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetTrunk(Trunk):
    """ResNet up to global average pooling, with torchvision's parameter names (``conv1``, ``layer1`` …).

    ``zero_init_residual`` starts each residual branch at zero (its last BN scale is 0), which makes training
    from scratch with large batches more stable (Goyal et al., 2017).
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, int, int, int],
                 zero_init_residual: bool = True) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_features = 512 * block.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallTrunk(Trunk):
    """A plain 7-conv CNN (3×3 conv-BN-ReLU, four stride-2 stages) for CPU runs.

    Plain 3×3 convolutions are what CPU convolution libraries run fastest; at 64 px the last stage sees a 4×4
    map, enough for the localised AU deformations. ``width`` scales every stage: the default 16 (0.29 M
    parameters, about 11 MMAC per 64 px image forward) trains at about 2,000 images/s on two idle CPU cores
    (fp32, batch 64, synthetic tensors); 32 costs about three times as much.
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = int(width)
        if w < 4:
            raise ValueError(f"small trunk: width must be >= 4, got {width}")
        self.features = nn.Sequential(
            _conv_bn(3, w, 2),
            _conv_bn(w, 2 * w, 2), _conv_bn(2 * w, 2 * w, 1),
            _conv_bn(2 * w, 4 * w, 2), _conv_bn(4 * w, 4 * w, 1),
            _conv_bn(4 * w, 8 * w, 2), _conv_bn(8 * w, 8 * w, 1),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_features = 8 * w
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


class TimmTrunk(Trunk):
    """A timm model with its classifier removed (``num_classes=0``): pooled features.

    ``pretrained``: ``True`` loads the weights timm names for the model (its hub or cache); a path loads
    that file (timm's layout for the model) through ``pretrained_cfg_overlay``. The input normalisation is
    the model's ``pretrained_cfg`` mean/std.
    """

    def __init__(self, name: str, pretrained: bool | str | os.PathLike = False, **kwargs: Any) -> None:
        super().__init__()
        try:
            import timm
        except ImportError as exc:
            raise ValueError(f"trunk 'timm:{name}' needs timm ({exc}): pip install timm (or 'fbn_fast[timm]'), or "
                             "choose a built-in trunk (--trunk resnet50 --pretrained path/to/resnet50.pth)") from None
        if pretrained not in (True, False):
            path = os.fspath(pretrained)
            if not os.path.isfile(path):
                raise ValueError(f"pretrained: weights file {path!r} for trunk 'timm:{name}' does not exist")
            overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {}, file=path)
            kwargs["pretrained_cfg_overlay"] = overlay
            pretrained = True
        try:
            self.model = timm.create_model(name, pretrained=bool(pretrained), num_classes=0, **kwargs)
        except TypeError:
            raise  # a bad trunk_kwargs key: build_model names it
        except Exception as exc:  # unknown name (RuntimeError), no network / no file (OSError, hub errors), ...
            what = "cannot get its pretrained weights" if pretrained else "cannot be built"
            hint = (" (pretrained = true downloads timm's ImageNet weights: without network access, set "
                    "pretrained to a local weights file for this model)") if pretrained else ""
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ValueError(f"trunk 'timm:{name}' {what}: {first}{hint}") from None
        self.out_features = int(self.model.num_features)
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        mean, std = cfg.get("mean"), cfg.get("std")
        if mean is not None and std is not None and len(mean) == 3 and len(std) == 3:
            self.normalization = (tuple(float(v) for v in mean), tuple(float(v) for v in std))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


#: Built-in trunk constructors, ``name -> factory(**kwargs)``.
TRUNKS: dict[str, Callable[..., Trunk]] = {
    "vgg16": lambda **kw: VGG16Trunk(batch_norm=False, **kw),
    "vgg16_bn": lambda **kw: VGG16Trunk(batch_norm=True, **kw),
    "resnet18": lambda **kw: ResNetTrunk(BasicBlock, (2, 2, 2, 2), **kw),
    "resnet50": lambda **kw: ResNetTrunk(Bottleneck, (3, 4, 6, 3), **kw),
    "small": lambda **kw: SmallTrunk(**kw),
}


def available_trunks() -> list[str]:
    """Names accepted by :func:`build_trunk`: the built-ins, plus ``timm:<name>`` when timm is installed."""
    names = list(TRUNKS)
    try:
        import timm  # noqa: F401

        names.append("timm:<name>")
    except ImportError:
        pass
    return names


def _load_trunk_weights(trunk: nn.Module, path: str | os.PathLike, name: str) -> None:
    """Load a torchvision-layout state dict into a built-in trunk; classifier heads in the file are ignored."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"pretrained weights {str(path)!r} for trunk {name!r} cannot be read: {first}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"pretrained weights {str(path)!r}: expected a state dict, got {type(state).__name__}")
    own = trunk.state_dict()
    usable = {k: v for k, v in state.items() if k in own}
    missing = sorted(set(own) - set(usable))
    if missing:
        raise ValueError(f"pretrained weights {str(path)!r} do not fit trunk {name!r}: missing {missing[:5]}"
                         f"{' …' if len(missing) > 5 else ''}")
    for k, v in usable.items():
        if v.shape != own[k].shape:
            raise ValueError(f"pretrained weights {str(path)!r}: {k} has shape {tuple(v.shape)}, trunk {name!r} "
                             f"expects {tuple(own[k].shape)}")
    trunk.load_state_dict(usable, strict=True)


def build_trunk(name: str, pretrained: bool | str = False, **kwargs: Any) -> Trunk:
    """A trunk by name (see the module docstring); ``kwargs`` go to its constructor.

    ``pretrained``: for built-in trunks a path to a torchvision-layout state dict (or ``False``); for
    ``timm:<name>`` ``True`` (timm's ImageNet weights) or a path to a weights file in timm's layout.
    """
    if name.startswith("timm:"):
        return TimmTrunk(name[len("timm:"):], pretrained=pretrained, **kwargs)
    if name not in TRUNKS:
        raise ValueError(f"unknown trunk {name!r}; choose one of {available_trunks()}")
    trunk = TRUNKS[name](**kwargs)
    if pretrained is True:
        raise ValueError(f"pretrained = true: built-in trunk {name!r} ships no weights; set pretrained to a "
                         f"torchvision-layout state dict (e.g. torchvision's {name} weights file), or use trunk "
                         f"'timm:{name}' with timm installed")
    if pretrained:
        _load_trunk_weights(trunk, pretrained, name)
    return trunk


# ---------------------------------------------------------------------------------------------------- model
class FaceBehaviorNet(nn.Module):
    """Trunk → features → three linear heads (docs/method.md §1).

    ``expr``: C logits (softmax gives the expression posterior); ``au``: K logits (sigmoid gives AU
    probabilities); ``va``: ``tanh`` of a linear layer, so valence and arousal lie in [-1, 1].

    Args:
        trunk: a :class:`Trunk` (anything with ``out_features`` mapping images to (N, F) features).
        num_classes, num_aus: C and K.
        head_dropout: dropout on the features before the heads (0 disables it).
        arch: how to rebuild this model with :func:`build_model` (set by it; stored in checkpoints).
    """

    def __init__(self, trunk: Trunk, num_classes: int = NUM_EXPRESSIONS, num_aus: int = NUM_AUS,
                 head_dropout: float = 0.0, arch: dict[str, Any] | None = None) -> None:
        super().__init__()
        if num_classes < 2 or num_aus < 1:
            raise ValueError(f"num_classes must be >= 2 and num_aus >= 1, got {num_classes}, {num_aus}")
        self.trunk = trunk
        self.num_classes, self.num_aus = int(num_classes), int(num_aus)
        f = trunk.out_features
        self.dropout = nn.Dropout(head_dropout) if head_dropout > 0 else nn.Identity()
        self.expr_head = nn.Linear(f, self.num_classes)
        self.au_head = nn.Linear(f, self.num_aus)
        self.va_head = nn.Linear(f, NUM_VA)
        for head in (self.expr_head, self.au_head, self.va_head):
            nn.init.normal_(head.weight, 0.0, 0.01)  # small: start near uniform posteriors and VA ≈ 0
            nn.init.zeros_(head.bias)
        self.arch: dict[str, Any] = dict(arch or {})

    @property
    def feature_dim(self) -> int:
        return self.trunk.out_features

    @property
    def normalization(self) -> Normalization:
        """(mean, std) per RGB channel on a 0–1 scale that input images are normalised with for this trunk."""
        return getattr(self.trunk, "normalization", IMAGENET_NORMALIZATION)

    def features(self, x: Tensor) -> Tensor:
        """Trunk features (N, F) of images (N, 3, H, W)."""
        if x.ndim == 4 and not x.is_contiguous(memory_format=torch.channels_last) \
                and self.arch.get("channels_last", False):
            # A no-op when the pipeline already delivers channels-last (the normal case).
            x = x.contiguous(memory_format=torch.channels_last)
        return self.trunk(x)

    def heads(self, feats: Tensor) -> FBNOutput:
        """The three heads on trunk features."""
        h = self.dropout(feats)
        return FBNOutput(self.expr_head(h), self.au_head(h), torch.tanh(self.va_head(h)))

    def forward(self, x: Tensor) -> FBNOutput:
        return self.heads(self.features(x))


def build_model(
    trunk: str = "small",
    num_classes: int = NUM_EXPRESSIONS,
    num_aus: int = NUM_AUS,
    pretrained: bool | str = False,
    channels_last: bool = True,
    head_dropout: float = 0.0,
    trunk_kwargs: dict[str, Any] | None = None,
) -> FaceBehaviorNet:
    """FaceBehaviorNet with the named trunk, in channels-last memory format unless ``channels_last=False``.

    ``trunk_kwargs`` go to the trunk's constructor (e.g. ``{"width": 48}`` for ``small``, ``{"dropout": 0.5}``
    for VGG, ``{"zero_init_residual": False}`` for ResNets, any ``timm.create_model`` option for timm).
    """
    trunk_kwargs = dict(trunk_kwargs or {})
    arch = {"trunk": trunk, "num_classes": int(num_classes), "num_aus": int(num_aus),
            "channels_last": bool(channels_last), "head_dropout": float(head_dropout),
            "trunk_kwargs": trunk_kwargs}
    try:
        body = build_trunk(trunk, pretrained=pretrained, **trunk_kwargs)
    except TypeError as exc:  # a trunk_kwargs key the constructor does not take
        raise ValueError(f"trunk {trunk!r}: bad trunk_kwargs {trunk_kwargs}: {exc}") from None
    model = FaceBehaviorNet(body, num_classes, num_aus, head_dropout=head_dropout, arch=arch)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
