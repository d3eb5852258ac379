"""Training configuration: one dataclass, TOML recipes, command-line overrides.

Precedence: built-in defaults (the default job) < the recipe given with ``--config`` < command-line options.
A recipe groups keys under sections (``[run]``, ``[data]``, ``[model]``, ``[optim]``, ``[loss]``,
``[profile]``); each key is the field name, and the command-line option is the same name with dashes
(``lambda_ca`` ↔ ``--lambda-ca``). Unknown keys, keys in the wrong section and bad values raise
``ValueError`` naming the key (and the file) or the option.

>>> cfg = parse_args(["--config", "training/paper.toml", "--lr", "0.01"])
>>> cfg.trunk, cfg.lr
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import types
import typing
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

_Fn = TypeVar("_Fn", bound=Callable[..., Any])

__all__ = [
    "AMP_DTYPE_ALIASES",
    "SECTIONS",
    "TrainConfig",
    "add_config_options",
    "build_parser",
    "check_options",
    "dump_toml",
    "explicit_values",
    "load_recipe",
    "parse_args",
    "renamed_keywords",
    "warn_deprecated",
]

#: Options whose default changed after runs were saved without them, and the value such a run trained with.
SAVED_BEFORE: dict[str, Any] = {"coupling_scarcity_au": 0.0, "coupling_scarcity_expr": 0.0, "au_pos_weight": "off"}
#: The per-direction coupling weights (each ``None``: its group's λ).
COUPLING_DIRECTIONS: tuple[str, ...] = ("lambda_ca_ea", "lambda_ca_ae", "lambda_dm_ea", "lambda_dm_ae")
SECTIONS: tuple[str, ...] = ("run", "data", "model", "optim", "loss", "profile")
#: Input pipeline paths (fbn_fast.data.pipeline.BACKENDS; repeated here so parsing options stays light).
_LOADER_BACKENDS: tuple[str, ...] = ("auto", "dali", "cpu", "nvjpeg")


def _f(default: Any, section: str, help: str, choices: tuple[str, ...] | None = None,
       metavar: str | None = None) -> Any:
    meta = {"section": section, "help": help, "choices": choices, "metavar": metavar}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every setting of a training run; the defaults are the default job (small SynthFace on a CPU)."""

    # ---- run
    name: str | None = _f(None, "run", "run folder name under --out-dir (default: a timestamp)")
    out_dir: str = _f("runs", "run", "parent folder of run folders")
    seed: int = _f(0, "run", "seed of model init, sampling and augmentation")
    device: str = _f("auto", "run", "auto (GPU LOCAL_RANK when CUDA is available), cpu, cuda or cuda:N")
    num_threads: int = _f(0, "run", "intra-op CPU threads of torch (0: torch's default)")
    log_every: int = _f(20, "run", "steps between log records (metrics.jsonl) and progress updates")
    ckpt_every: int = _f(200, "run", "steps between checkpoints (a killed run loses at most this many steps)")
    keep_checkpoints: int = _f(2, "run", "periodic checkpoints to keep (older ones are deleted; best.pt, the best on "
                               "the val split, is kept besides)")
    resume: str | None = _f(None, "run", "continue a run: a checkpoint file, a run folder, or 'auto' (the newest "
                            "checkpoint of --name, or of the newest run under --out-dir)")
    max_nonfinite: int = _f(20, "run", "stop after this many consecutive steps with a non-finite loss")
    progress: bool = _f(True, "run", "show a progress bar")
    evaluate: bool = _f(True, "run", "at the end, choose best.pt on the val split and score it on --eval-split of "
                        "the datasets that have it")
    eval_every: int = _f(0, "run", "also score the val split every this many steps, with a checkpoint, to choose "
                         "best.pt (0: only at the end)")
    plots: bool = _f(True, "run", "write PNG plots into the run folder")
    debug: bool = _f(False, "run", "print the traceback of a fatal error (train.log always has it)")
    # ---- data
    manifest: str | None = _f(None, "data", "manifest (.npz) to train on (default: SynthFace, generated if not "
                              "cached)")
    data_root: str | None = _f(None, "data", "folder the manifest's image paths are relative to (default: the root "
                               "the manifest records, else the manifest's folder)")
    synth_dir: str | None = _f(None, "data", "where SynthFace is generated/cached (default: $FBN_FAST_DATA/"
                               "synthface-<size>-<px>px-seed<seed>, else ~/.cache/fbn_fast/...)")
    synth_size: str = _f("small", "data", "SynthFace size preset")
    synth_seed: int = _f(0, "data", "SynthFace generation seed")
    synth_image_size: int = _f(64, "data", "SynthFace rendering size in pixels")
    image_size: int = _f(64, "data", "input size the trunk sees, in pixels")
    batch_size: int = _f(64, "data", "images per step per process")
    eval_batch_size: int = _f(256, "data", "images per evaluation batch per process")
    datasets: list[str] = _f([], "data", "training datasets (default: every dataset with a train split)",
                             metavar="NAME")
    ratios: list[float] = _f([], "data", "mixing ratios of --datasets per batch (default: proportional to size)",
                             metavar="R")
    epoch_size: int = _f(0, "data", "batches per epoch (0: training rows // global batch size)")
    loader_backend: str = _f("auto", "data", "input pipeline backend (auto picks the fastest available)",
                             choices=_LOADER_BACKENDS)
    num_workers: int = _f(2, "data", "decode workers per process")
    eval_split: str = _f("test", "data", "split scored at the end, with the model chosen on val (a dataset "
                         "without it is reported as such)", choices=("train", "val", "test"))
    # ---- model
    trunk: str = _f("small", "model", "trunk: vgg16, vgg16_bn, resnet18, resnet50, small, or timm:<name>")
    trunk_kwargs: dict = _f({}, "model", "extra trunk constructor options as JSON, e.g. '{\"width\": 48}'",
                            metavar="JSON")
    pretrained: str | None = _f(None, "model", "trunk weights: a torchvision-layout state dict path (built-in "
                                "trunks) or true (timm trunks; a recipe may write pretrained = true)")
    head_dropout: float = _f(0.0, "model", "dropout on trunk features before the heads")
    channels_last: bool = _f(True, "model", "channels-last memory format for model and inputs")
    torchcompile: bool = _f(False, "model", "compile the model with torch.compile")
    compile_mode: str = _f("default", "model", "torch.compile mode",
                           choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    # ---- optim
    opt: str = _f("adamw", "optim", "optimizer (fused kernels when torch supports them; lamb needs NVIDIA apex)",
                  choices=("adamw", "sgd", "lamb"))
    lr: float = _f(2e-3, "optim", "peak learning rate (after warm-up)")
    weight_decay: float = _f(0.05, "optim", "decoupled weight decay (not applied to biases and norm scales)")
    momentum: float = _f(0.9, "optim", "SGD momentum")
    betas: list[float] = _f([0.9, 0.999], "optim", "Adam/LAMB betas", metavar="B")
    epochs: float = _f(8.0, "optim", "training length in epochs (ignored when --steps > 0)")
    steps: int = _f(0, "optim", "training length in optimizer steps (0: from --epochs)")
    warmup_steps: int = _f(100, "optim", "linear warm-up steps before the cosine decay")
    min_lr_ratio: float = _f(0.01, "optim", "final learning rate as a fraction of --lr")
    grad_clip: float = _f(5.0, "optim", "clip the global gradient norm to this (0: off)")
    amp_dtype: str = _f("auto", "optim", "autocast dtype: bf16, fp16 (with a gradient scaler), none, or auto "
                        "(bf16 on GPUs that support it, none on CPU)", choices=("auto", "bf16", "fp16", "none"))
    # ---- loss
    lambda_ca: float = _f(0.5, "loss", "weight λ_ca of the co-annotation terms (0.5: at 1.0 they cost about two "
                          "points of expression accuracy in the measured ablation, training/results/)")
    lambda_dm: float = _f(1.0, "loss", "weight λ_dm of the distribution-matching terms")
    lambda_ev: float = _f(1.0, "loss", "weight λ_ev of expression→VA matching (needs VA means: --relatedness data)")
    # One coupling direction at a time (None: the group's λ). E→A = expression→AU, A→E = AU→expression.
    lambda_ca_ea: float | None = _f(None, "loss", "weight of E→A co-annotation alone (default: --lambda-ca)")
    lambda_ca_ae: float | None = _f(None, "loss", "weight of A→E co-annotation alone (default: --lambda-ca)")
    lambda_dm_ea: float | None = _f(None, "loss", "weight of E→A distribution matching alone (default: --lambda-dm)")
    lambda_dm_ae: float | None = _f(None, "loss", "weight of A→E distribution matching alone (default: --lambda-dm)")
    relatedness: str = _f("prior", "loss", "relatedness table: prior, data (estimated on the training split and "
                          "saved in the run folder) or a JSON file")
    relatedness_alpha: float = _f(1.0, "loss", "prior pseudo-count α of the data-driven estimate")
    temperature: float = _f(1.0, "loss", "temperature T of the AU→expression softmaxes")
    # Remedies around the objective (docs/method.md §7, fbn_fast.coupling).
    relatedness_background: str = _f("off", "loss", "per-AU background rates in the table, noisy-OR 1-(1-R)(1-b): "
                                     "off, data (estimated from the training labels) or one rate for every AU",
                                     metavar="off|data|RATE")
    coupling_scarcity_au: float = _f(1000.0, "loss", "scale the couplings into the AUs (E→A) by the scarcity of AU "
                                     "labels: the mean over AUs of N/(N+n), n = training images labelling the AU "
                                     "(N: the half-point in images; 0: off)", metavar="N")
    coupling_scarcity_expr: float = _f(1000.0, "loss", "the same for the couplings into the expressions (A→E), n = "
                                       "training images per expression class (0: off)", metavar="N")
    au_pos_weight: str = _f("balanced", "loss", "weight of each AU's positive labels in L_au: balanced (its training "
                            "labels' negatives/positives, within [0.01, 100]) or off (1: plain BCE)",
                            choices=("balanced", "off"))
    relatedness_refresh: int = _f(0, "loss", "re-estimate the table every this many steps from the labels and the "
                                  "model's confident predictions (0: off)", metavar="STEPS")
    refresh_confidence: float = _f(0.9, "loss", "softmax confidence above which an unlabelled sample's predicted "
                                   "expression counts in --relatedness-refresh")
    refresh_strength: float = _f(1000.0, "loss", "pseudo-count per class pulling --relatedness-refresh towards the "
                                 "starting table")
    loss_backend: str = _f("auto", "loss", "objective backend: auto, torch, triton, cpu, cuda")
    # ---- profile
    nvtx: bool = _f(True, "profile", "NVTX ranges around data, forward, loss, backward, optimizer (CUDA only)")
    cuda_profile_steps: str = _f("", "profile", "START:STOP: call cudaProfilerStart/Stop before these steps "
                                 "(for nsys --capture-range=cudaProfilerApi)", metavar="START:STOP")
    max_steps_per_run: int = _f(0, "profile", "stop (with a checkpoint) after this many steps in this process; "
                                "for profiling and tests (0: no limit)")

    # ------------------------------------------------------------------------------------------------ helpers
    @classmethod
    def fields(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls)}

    @staticmethod
    def option(name: str) -> str:
        """The command-line option of field ``name``."""
        return "--" + name.replace("_", "-")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], strict: bool = True, where: str = "config") -> TrainConfig:
        """Build from a flat dict; ``strict=False`` ignores unknown keys (configs saved by other versions)."""
        known = cls.fields()
        unknown = sorted(set(values) - set(known))
        if unknown and strict:
            raise ValueError(f"{where}: unknown key(s) {unknown}")
        cfg = cls(**{k: _coerce(k, v, known[k], where) for k, v in values.items() if k in known})
        cfg.validate()
        return cfg

    @classmethod
    def from_saved(cls, values: Mapping[str, Any], where: str = "checkpoint") -> TrainConfig:
        """A configuration saved with a run, as that run trained: unknown keys are ignored and the options it
        predates take the value they had then (:data:`SAVED_BEFORE`), not today's default."""
        return cls.from_dict(saved_values(values), strict=False, where=where)

    def replace(self, **changes: Any) -> TrainConfig:
        new = dataclasses.replace(self, **changes)
        new.validate()
        return new

    def validate(self) -> None:
        """Raise ``ValueError`` naming the option of the first bad value."""
        def bad(name: str, why: str) -> None:
            raise ValueError(f"{self.option(name)}: {why}, got {getattr(self, name)!r}")

        for name, f in self.fields().items():
            choices = f.metadata.get("choices")
            if choices and getattr(self, name) not in choices:
                bad(name, f"must be one of {list(choices)}")
        positive = ("log_every", "ckpt_every", "keep_checkpoints", "max_nonfinite", "image_size", "batch_size",
                    "eval_batch_size", "synth_image_size")
        for name in positive:
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        for name in ("num_threads", "eval_every", "epoch_size", "num_workers", "steps", "warmup_steps",
                     "max_steps_per_run", "weight_decay", "momentum", "grad_clip", "head_dropout", "lambda_ca",
                     "lambda_dm", "lambda_ev", "relatedness_alpha", "coupling_scarcity_au", "coupling_scarcity_expr",
                     "relatedness_refresh"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                bad(name, "must be finite and >= 0")
        for name in COUPLING_DIRECTIONS:
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v >= 0):
                bad(name, "must be finite and >= 0")
        if not (math.isfinite(self.lr) and self.lr > 0):
            bad("lr", "must be > 0")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            bad("temperature", "must be > 0")
        if self.steps == 0 and not (math.isfinite(self.epochs) and self.epochs > 0):
            bad("epochs", "must be > 0 (or give --steps)")
        if not 0 <= self.min_lr_ratio <= 1:
            bad("min_lr_ratio", "must lie in [0, 1]")
        if self.head_dropout >= 1:
            bad("head_dropout", "must be < 1")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            bad("betas", "must be two numbers in [0, 1)")
        if self.ratios:
            if not self.datasets:
                bad("ratios", "needs --datasets (one ratio per dataset)")
            if len(self.ratios) != len(self.datasets):
                bad("ratios", f"needs one value per --datasets entry ({len(self.datasets)})")
            if any(not (math.isfinite(r) and r > 0) for r in self.ratios):
                bad("ratios", "must all be > 0")
        if self.cuda_profile_steps:
            parts = self.cuda_profile_steps.split(":")
            if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or int(parts[0]) >= int(parts[1]):
                bad("cuda_profile_steps", "must be START:STOP with integers START < STOP")
        from .losses import BACKENDS as LOSS_BACKENDS
        from .model import TRUNKS

        if not (self.trunk in TRUNKS or (self.trunk.startswith("timm:") and len(self.trunk) > 5)):
            bad("trunk", f"must be one of {list(TRUNKS)} or timm:<name>")
        if self.loss_backend not in ("auto", *LOSS_BACKENDS):
            bad("loss_backend", f"must be one of {['auto', *LOSS_BACKENDS]}")
        if not self.relatedness:
            bad("relatedness", "must be prior, data or a file")
        if self.relatedness_background not in ("off", "data"):
            try:
                rate = float(self.relatedness_background)
            except ValueError:
                rate = math.nan
            if not 0.0 <= rate < 1.0:
                bad("relatedness_background", "must be off, data or a rate in [0, 1)")
        if self.relatedness_refresh and self.steps and self.relatedness_refresh > self.steps:
            bad("relatedness_refresh", f"must be at most --steps ({self.steps}), or the table never changes")
        if not 0.0 < self.refresh_confidence <= 1.0:
            bad("refresh_confidence", "must be in (0, 1]")
        if not (math.isfinite(self.refresh_strength) and self.refresh_strength > 0):
            bad("refresh_strength", "must be > 0")

    def loss_weights(self) -> dict[str, float | None]:
        """The keywords of :class:`fbn_fast.losses.LossWeights` this run trains with (per-direction overrides
        included)."""
        out: dict[str, float | None] = {"ca": self.lambda_ca, "dm": self.lambda_dm, "ev": self.lambda_ev}
        for name in COUPLING_DIRECTIONS:
            out[name.removeprefix("lambda_")] = getattr(self, name)
        return out

    def profile_range(self) -> tuple[int, int] | None:
        if not self.cuda_profile_steps:
            return None
        a, b = self.cuda_profile_steps.split(":")
        return int(a), int(b)

    def pretrained_value(self) -> bool | str:
        """``pretrained`` as :func:`fbn_fast.model.build_model` takes it."""
        if self.pretrained is None or self.pretrained.lower() in ("", "false", "no", "0", "none"):
            return False
        if self.pretrained.lower() in ("true", "yes", "1"):
            return True
        return self.pretrained


def saved_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` of a saved configuration with the options it predates set as they were then."""
    return {**{k: v for k, v in SAVED_BEFORE.items() if k not in values}, **values}


# ---------------------------------------------------------------------------------------------------- coercion
def _base_type(tp: Any) -> tuple[Any, bool]:
    """``(type, optional)`` of an annotation like ``str | None`` or ``list[float]``."""
    if isinstance(tp, str):
        tp = eval(tp, vars(typing), {"list": list, "dict": dict})  # our own annotations only
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _coerce(name: str, value: Any, f: dataclasses.Field, where: str) -> Any:
    """Check a recipe value against the field's type (ints widen to floats; nothing else is guessed)."""
    tp, optional = _base_type(f.type)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{where}: {name} must not be empty")
    if name == "pretrained" and isinstance(value, bool):  # a recipe's `pretrained = true`: timm's weights
        return "true" if value else None
    return _check_type(f"{where}: {name}", value, tp)


def _check_type(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp) or tp
    if origin is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    if origin is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return value
    if origin is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}")
        return float(value)
    if origin is str:
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp) or (str,)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list, got {value!r}")
        return [_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a table/object, got {value!r}")
        return dict(value)
    raise TypeError(f"no check for {key} of type {tp}")  # a bug in this module


# ---------------------------------------------------------------------------------------------------- recipes
def _toml_loads(text: str) -> dict:
    try:
        import tomllib
    except ImportError:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ValueError("reading TOML recipes on Python 3.10 needs tomli: pip install tomli") from None
    return tomllib.loads(text)


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """The flat ``{field: value}`` dict of a TOML recipe, checked key by key (values coerced to the field types)."""
    path = Path(path)
    try:
        raw = _toml_loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"--config: cannot read {str(path)!r}: {exc.strerror or exc}") from None
    except Exception as exc:  # tomllib.TOMLDecodeError (its module differs by Python version)
        raise ValueError(f"{path}: not valid TOML: {exc}") from None
    known = TrainConfig.fields()
    flat: dict[str, Any] = {}

    def put(key: str, value: Any, section: str | None) -> None:
        where = f"{path}" + (f" [{section}]" if section else "")
        if key not in known:
            raise ValueError(f"{where}: unknown key {key!r} (no option {TrainConfig.option(key)})")
        want = known[key].metadata["section"]
        if section is not None and section != want:
            raise ValueError(f"{where}: key {key!r} belongs in section [{want}]")
        if key in flat:
            raise ValueError(f"{where}: key {key!r} is given twice")
        flat[key] = _coerce(key, value, known[key], str(path))

    for key, value in raw.items():
        if key in SECTIONS and isinstance(value, dict) and known.get(key) is None:
            for k, v in value.items():
                put(k, v, key)
        elif isinstance(value, dict) and key not in known:
            raise ValueError(f"{path}: unknown section [{key}]; sections are {list(SECTIONS)}")
        else:
            put(key, value, None)
    return flat


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")


def dump_toml(cfg: TrainConfig) -> str:
    """The configuration as a sectioned TOML recipe (``None`` values are left out: they mean 'default')."""
    lines: list[str] = []
    values = cfg.to_dict()
    for section in SECTIONS:
        lines.append(f"[{section}]")
        for name, f in TrainConfig.fields().items():
            if f.metadata["section"] == section and values[name] is not None:
                lines.append(f"{name} = {_toml_value(values[name])}")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- CLI
class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _option_kwargs(name: str, defaults: TrainConfig) -> dict[str, Any]:
    """``add_argument`` keywords of field ``name`` (help, choices, type, nargs, metavar; no default)."""
    f = TrainConfig.fields()[name]
    tp, _ = _base_type(f.type)
    origin = typing.get_origin(tp) or tp
    kw: dict[str, Any] = {"help": f.metadata["help"], "dest": name}
    if f.metadata.get("metavar"):
        kw["metavar"] = f.metadata["metavar"]
    if f.metadata.get("choices"):
        kw["choices"] = f.metadata["choices"]
    default = getattr(defaults, name)
    kw["help"] += f" (default: {default!r})" if default not in (None, [], {}, "") else ""
    if origin is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif origin is list:
        (item,) = typing.get_args(tp)
        kw.update(nargs="*", type=item)
    elif origin is dict:
        kw["type"] = _json_dict
    else:
        kw["type"] = origin
    return kw


def build_parser(prog: str = "python -m fbn_fast.train", description: str | None = None) -> argparse.ArgumentParser:
    """The command-line parser: ``--config`` plus one option per :class:`TrainConfig` field, grouped by section."""
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog=prog,
        usage=f"{prog} [--config TOML] [OPTION ...]   (--help lists every option)",
        description=description or "Train FaceBehaviorNet. With no options: the default job (generate the small "
        "SynthFace if not cached, train, evaluate, write a run folder under ./runs).",
        formatter_class=_Formatter,
        argument_default=argparse.SUPPRESS,  # only options actually given override the recipe
        allow_abbrev=False,
    )
    parser.add_argument("--config", metavar="TOML", help="recipe file (see training/); options given on the "
                        "command line override it")
    parser.add_argument("--print-config", action="store_true", help="print the resolved recipe as TOML and exit")
    groups = {s: parser.add_argument_group(s) for s in SECTIONS}
    for name, f in TrainConfig.fields().items():
        groups[f.metadata["section"]].add_argument(TrainConfig.option(name), **_option_kwargs(name, defaults))
    return parser


def explicit_values(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None
                    ) -> tuple[dict[str, Any], dict[str, Any], argparse.ArgumentParser]:
    """``(values, control, parser)``: the settings given by the recipe and the command line (defaults left out,
    so a caller can lay them over another configuration, e.g. a checkpoint's), the control options
    (``config``, ``print_config``) and the parser (for ``parser.error``). A bad recipe exits through the parser.
    """
    parser = parser or build_parser()
    ns = vars(parser.parse_args(argv))
    control = {"config": ns.pop("config", None), "print_config": ns.pop("print_config", False)}
    values: dict[str, Any] = {}
    try:
        if control["config"]:
            values.update(load_recipe(control["config"]))
    except ValueError as exc:
        parser.error(str(exc))
    values.update(ns)
    return values, control, parser


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> TrainConfig:
    """Defaults < ``--config`` recipe < options. Bad input exits through ``parser.error`` naming the option."""
    values, control, parser = explicit_values(argv, parser)
    try:
        cfg = TrainConfig.from_dict(values, where=str(control["config"] or "options"))
    except ValueError as exc:
        parser.error(str(exc))
    if control["print_config"]:
        print(dump_toml(cfg))
        parser.exit(0)
    return cfg


# ---------------------------------------------------------------------------------------------------- shared options
#: Old spellings of ``--amp-dtype`` values (the inference tools' former ``--dtype``), accepted for one release.
AMP_DTYPE_ALIASES: dict[str, str] = {"float32": "none", "fp32": "none", "bfloat16": "bf16", "float16": "fp16"}


_WARNED: dict = {}  # the warnings registry of deprecation messages: each is shown once per process


def warn_deprecated(message: str, where: str = "fbn_fast") -> None:
    """A ``FutureWarning`` (shown to users by default, unlike ``DeprecationWarning``), once per message."""
    warnings.warn_explicit(message, FutureWarning, filename=where, lineno=0, module="fbn_fast", registry=_WARNED)


def renamed_keywords(**renames: str) -> Callable[[_Fn], _Fn]:
    """Decorator: keyword arguments renamed to the option vocabulary (``old=new``) still work for one release,
    with a deprecation warning."""
    def wrap(fn: _Fn) -> _Fn:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{fn.__name__}() got both {old}= and its new name {new}=")
                    warn_deprecated(f"{fn.__name__}({old}=...) is deprecated and will be removed in the next "
                                    f"release; use {new}=")
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)
        return inner  # type: ignore[return-value]
    return wrap


class _DeprecatedAlias(argparse.Action):
    """An old option spelling: stores into the new option's ``dest`` (mapping old values) and warns once."""

    def __init__(self, option_strings: list[str], dest: str, *, target: str,
                 value_aliases: dict[str, str] | None = None, **kwargs: Any) -> None:
        self.target = target
        self.value_aliases = dict(value_aliases or {})
        choices = kwargs.pop("choices", None)
        if choices is not None:
            choices = (*choices, *self.value_aliases)
        super().__init__(option_strings, dest, choices=choices, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        warn_deprecated(f"{option_string} is deprecated and will be removed in the next release; use {self.target}",
                        where=parser.prog)
        if self.nargs == 0:  # an old on-switch of a boolean option
            values = True
        elif isinstance(values, list):
            values = [self.value_aliases.get(v, v) for v in values]
        elif isinstance(values, str):
            values = self.value_aliases.get(values, values)
        setattr(namespace, self.dest, values)


def add_config_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, names: Iterable[str], *,
                       defaults: Mapping[str, Any] | None = None, helps: Mapping[str, str] | None = None,
                       aliases: Mapping[str, str | Sequence[str]] | None = None,
                       overrides: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Add the options of :class:`TrainConfig` fields ``names`` to another tool's parser, with train's names,
    help, choices and types, so that every tool speaks one option vocabulary.

    ``defaults`` / ``helps`` replace a field's default / help for this tool (the help then names the default);
    ``aliases`` maps a field to old option spellings, accepted with a deprecation warning (``--dtype``'s old
    values through :data:`AMP_DTYPE_ALIASES`); ``overrides`` adds raw ``add_argument`` keywords (e.g. ``nargs``).
    """
    defaults, helps, aliases, overrides = defaults or {}, helps or {}, aliases or {}, overrides or {}
    base = TrainConfig()
    known = TrainConfig.fields()
    for name in names:
        if name not in known:
            raise KeyError(f"add_config_options: {name!r} is not a TrainConfig field")
        default = defaults.get(name, getattr(base, name))
        kw = _option_kwargs(name, base)
        if name in helps:
            kw["help"] = helps[name] + (f" (default: {default!r})" if default not in (None, [], {}, "") else "")
        elif name in defaults:
            kw["help"] = known[name].metadata["help"] + (
                f" (default: {default!r})" if default not in (None, [], {}, "") else "")
        kw.update(overrides.get(name, {}))
        option = TrainConfig.option(name)
        parser.add_argument(option, default=default, **kw)
        old = aliases.get(name, ())
        for alias in [old] if isinstance(old, str) else old:
            alias_kw = {k: v for k, v in kw.items() if k in ("type", "nargs", "choices", "metavar", "dest")}
            if kw.get("action") is argparse.BooleanOptionalAction:
                alias_kw["nargs"] = 0
            parser.add_argument(alias, action=_DeprecatedAlias, target=option, help=argparse.SUPPRESS,
                                value_aliases=AMP_DTYPE_ALIASES if name == "amp_dtype" else None, **alias_kw)


def check_options(values: Mapping[str, Any]) -> None:
    """Check option values by :meth:`TrainConfig.validate`'s rules (``ValueError`` naming the option);
    ``None`` means "this tool's own default" and is not checked."""
    TrainConfig().replace(**{k: v for k, v in values.items() if v is not None})
