"""The inference layer that evaluation, prediction, few-shot and the trainer's evaluation share.

- :func:`resolve_device`, :func:`resolve_amp_dtype` (train's ``--amp-dtype`` vocabulary: ``auto``, ``bf16``,
  ``fp16``, ``none``), :func:`image_dtype`, :func:`autocast`, :func:`nvtx_range`;
- :func:`load_trained`: a checkpoint or a run folder → :class:`TrainedModel` (the model in eval mode on the device, its
  config, the image size and training manifest it was trained with), through
  :func:`fbn_fast.checkpoint.load_model`;
- :func:`open_loader` (the evaluation input pipeline of a manifest) and :func:`iter_outputs` (float32 model
  outputs batch by batch);
- :class:`HiddenTruth`: the complete labels SynthFace keeps beside its published manifest;
- zero-shot compound classes: :func:`parse_compound_classes` (the ``--compound-classes`` option),
  :func:`compound_scorer` (a :class:`~fbn_fast.compound.CompoundScorer` for a manifest), :func:`add_compound_options`;
- the commands' shared pieces: :func:`command_parser` (a parser whose first argument is the checkpoint),
  :func:`add_inference_options`, :func:`run_manifest_command` (the body of the commands that score a manifest).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from .compound import CompoundScorer
from .config import AMP_DTYPE_ALIASES, TrainConfig, add_config_options, check_options, warn_deprecated
from .labels import MISSING

if TYPE_CHECKING:
    from .data import Manifest
    from .data.pipeline import Loader
    from .relatedness import Relatedness

__all__ = [
    "AMP_DTYPES",
    "BatchOutputs",
    "HiddenTruth",
    "TrainedModel",
    "INFERENCE_ALIASES",
    "add_compound_options",
    "add_inference_options",
    "as_manifest",
    "autocast",
    "command_parser",
    "compound_scorer",
    "image_dtype",
    "image_root",
    "iter_outputs",
    "load_trained",
    "model_normalization",
    "nvtx_range",
    "open_loader",
    "parse_compound_classes",
    "present_compounds",
    "resolve_amp_dtype",
    "resolve_device",
    "run_manifest_command",
    "save_result",
]

#: ``--amp-dtype`` values → autocast dtype (``None``: full precision, no autocast); ``auto`` is resolved per device.
AMP_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


# ------------------------------------------------------------------------------------------------ device, dtype
def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto``/``None``: the first CUDA device when there is one, else the CPU; ``cuda`` means ``cuda:0``.

    ``ValueError`` naming ``--device`` for a device that is not one or is not available.
    """
    from .distributed import resolve_device as resolve

    return resolve("auto" if device is None else str(device))


def resolve_amp_dtype(amp_dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of an ``--amp-dtype`` value on ``device``; ``None`` means full precision.

    ``auto``/``None``: bf16 on GPUs that support it, none elsewhere. A ``torch.dtype`` is taken as given
    (float32 → ``None``). The old spellings ``float32``, ``bfloat16``, ``float16`` (and ``fp32``) still work,
    with a deprecation warning.
    """
    if isinstance(amp_dtype, torch.dtype):
        return None if amp_dtype == torch.float32 else amp_dtype
    value = "auto" if amp_dtype is None else str(amp_dtype)
    if value in AMP_DTYPE_ALIASES:
        warn_deprecated(f"amp dtype {value!r} is deprecated and will be removed in the next release; use "
                        f"{AMP_DTYPE_ALIASES[value]!r}")
        value = AMP_DTYPE_ALIASES[value]
    if value == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    if value not in AMP_DTYPES:
        raise ValueError(f"--amp-dtype {value!r}: choose one of {['auto', *AMP_DTYPES]}")
    return AMP_DTYPES[value]


def image_dtype(device: torch.device, amp_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype the input pipeline delivers images in: the autocast dtype on a GPU (halves the copy), else float32."""
    return amp_dtype if device.type == "cuda" and amp_dtype is not None else torch.float32


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    """An autocast context for reduced precision; nothing for full precision (``None`` or float32)."""
    if amp_dtype is None or amp_dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


@contextmanager
def nvtx_range(name: str | None) -> Iterator[None]:
    """An NVTX range (for Nsight Systems timelines) when ``name`` is given and CUDA is in use; else nothing."""
    if name is None or not torch.cuda.is_available():
        yield
        return
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


# ------------------------------------------------------------------------------------------------ checkpoint
@dataclass
class TrainedModel:
    """A trained model ready for inference, with what its checkpoint says about how it was trained."""

    model: nn.Module
    config: TrainConfig | None
    relatedness: Relatedness | None
    path: Path
    device: torch.device

    @property
    def image_size(self) -> int:
        """The input size it was trained at (64, the default job's, when the checkpoint has no config)."""
        return int(self.config.image_size) if self.config is not None else TrainConfig.image_size

    @property
    def train_datasets(self) -> list[str] | None:
        """The datasets it was trained on (``None``: every dataset with a train split)."""
        return list(self.config.datasets) if self.config is not None and self.config.datasets else None

    @property
    def train_manifest(self) -> Path | None:
        """The training manifest its config names, if it can be found (relative paths are also tried against
        the run folder); SynthFace's published manifest for the default job."""
        cfg = self.config
        if cfg is None:
            return None
        v = cfg.manifest or (str(Path(cfg.synth_dir) / "manifest.npz") if cfg.synth_dir else None)
        if not v:
            return None
        p = Path(v)
        if p.is_file():
            return p
        if not p.is_absolute():
            for base in list(self.path.parents)[:3]:  # checkpoints/ → run folder → runs/
                if (base / p).is_file():
                    return base / p
        return None


def load_trained(path: str | os.PathLike, device: str | torch.device | None = "auto") -> TrainedModel:
    """Load a checkpoint written by ``python -m fbn_fast.train`` for inference, on ``device`` (in eval mode).

    ``path``: a checkpoint file, or a run folder (its ``best.pt``, else its latest checkpoint:
    :func:`fbn_fast.selection.resolve_checkpoint`). ``ValueError`` naming the file when it is missing, unreadable
    or does not fit its architecture.
    """
    from .checkpoint import load_model
    from .selection import resolve_checkpoint

    dev = resolve_device(device)
    path = resolve_checkpoint(path)
    model, config, relatedness = load_model(path, map_location=dev)
    return TrainedModel(model.eval(), config, relatedness, path, dev)


# ------------------------------------------------------------------------------------------------ data
def as_manifest(manifest: Manifest | str | os.PathLike, what: str = "manifest") -> Manifest:
    """A loaded manifest, or the one at a path (``ValueError`` naming ``what`` when the file does not exist)."""
    from .data import Manifest, load_manifest

    if isinstance(manifest, Manifest):
        return manifest
    path = Path(manifest)
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r} does not exist")
    return load_manifest(path)


def open_loader(manifest: Manifest, data_root: str | os.PathLike, *, split: str, batch_size: int, image_size: int,
                device: torch.device, amp_dtype: torch.dtype | None = None, datasets: Sequence[str] | None = None,
                loader_backend: str = "auto", num_workers: int = 2, rank: int = 0, world_size: int = 1,
                normalization: Any = None) -> Loader:
    """The evaluation input pipeline over ``split`` of ``manifest``: every row once, in order, across ranks;
    images as the model expects them (:func:`image_dtype`; ``normalization``: :func:`model_normalization` of the
    model, ImageNet's when ``None``). Close it when done."""
    from .data.pipeline import build_loader

    return build_loader(manifest, data_root, batch_size=batch_size, image_size=image_size, train=False, split=split,
                        datasets=list(datasets) if datasets else None, backend=loader_backend,
                        num_workers=int(num_workers), device=device, dtype=image_dtype(device, amp_dtype),
                        rank=rank, world_size=world_size, normalization=normalization)


def image_root(manifest: Manifest, manifest_path: str | os.PathLike | None = None,
               data_root: str | os.PathLike | None = None) -> Path:
    """The folder a manifest's image paths are read under: ``data_root`` (``--data-root``) when given, else the
    root the manifest records (where it was imported), else the folder of its file ``manifest_path``."""
    if data_root is not None:
        return Path(data_root)
    if manifest.root is not None:
        return Path(manifest.root)
    if manifest_path is None:
        raise ValueError("the manifest records no image root and is not a file: give --data-root")
    return Path(manifest_path).parent


def model_normalization(model: nn.Module) -> Any:
    """The input (mean, std) per RGB channel a model's trunk expects (:attr:`FaceBehaviorNet.normalization`,
    through DDP / compile wrappers); ``None`` (ImageNet's) for a model that does not say."""
    from .checkpoint import unwrap_model

    return getattr(unwrap_model(model), "normalization", None)


class BatchOutputs(NamedTuple):
    """One batch and the model's outputs on it, float32 on the device."""

    batch: Mapping[str, Any]
    expr: Tensor  # (B, C) expression logits
    au: Tensor  # (B, K) AU logits
    va: Tensor  # (B, 2) valence, arousal


@torch.no_grad()
def iter_outputs(model: nn.Module, batches: Iterable[Mapping[str, Any]], device: torch.device,
                 amp_dtype: torch.dtype | None = None, nvtx: str | None = None) -> Iterator[BatchOutputs]:
    """The model's outputs on every batch (its ``image``), in eval mode, under :func:`autocast`."""
    model.eval()
    for batch in batches:
        images = batch["image"].to(device, non_blocking=True)
        with nvtx_range(nvtx), autocast(device, amp_dtype):
            out = model(images)
        yield BatchOutputs(batch, out[0].float(), out[1].float(), out[2].float())


# ------------------------------------------------------------------------------------------------ hidden truth
@dataclass
class HiddenTruth:
    """The complete labels of every image of a manifest, aligned to its rows: expression, all AUs, VA, compound.

    SynthFace writes them as ``manifest_full.npz`` beside its published ``manifest.npz`` (the same rows with
    every label). :meth:`beside` finds and aligns that file; :meth:`for_manifest` aligns any full-label manifest
    by image path, so any subset or reordering of the published manifest can be scored.
    """

    expr: np.ndarray  # (N,) int, MISSING where the image has no basic expression (compound faces)
    au: np.ndarray  # (N, K) 0/1
    va: np.ndarray  # (N, 2) float
    au_mask: np.ndarray | None = None  # (N, K) bool; None: every AU known
    va_mask: np.ndarray | None = None  # (N,) bool; None: where VA is finite
    compound: np.ndarray | None = None  # (N,) int compound ids, MISSING where none; None: not scored

    def __post_init__(self) -> None:
        self.expr = np.asarray(self.expr, np.int64)
        self.au = np.asarray(self.au)
        self.va = np.asarray(self.va, np.float32)
        n = len(self.expr)
        if self.au.ndim != 2 or self.au.shape[0] != n or self.va.shape != (n, 2):
            raise ValueError(f"hidden truth: shapes expr {self.expr.shape}, au {self.au.shape}, va {self.va.shape} "
                             f"do not describe {n} rows of K AUs and 2 VA values")
        self.au_mask = np.ones(self.au.shape, bool) if self.au_mask is None else np.asarray(self.au_mask, bool)
        self.va_mask = np.isfinite(self.va).all(1) if self.va_mask is None else np.asarray(self.va_mask, bool)
        if self.au_mask.shape != self.au.shape or self.va_mask.shape != (n,):
            raise ValueError("hidden truth: au_mask / va_mask do not match au / va")
        if self.compound is not None:
            self.compound = np.asarray(self.compound, np.int64)
            if self.compound.shape != (n,):
                raise ValueError(f"hidden truth: compound has shape {self.compound.shape}, expected ({n},)")

    def __len__(self) -> int:
        return len(self.expr)

    @staticmethod
    def default_path(manifest_path: str | os.PathLike) -> Path | None:
        """``manifest_full.npz`` beside a manifest (SynthFace's layout), when it exists and is another file."""
        p = Path(manifest_path)
        full = p.with_name("manifest_full.npz")
        return full if full.is_file() and full.resolve() != p.resolve() else None

    @classmethod
    def beside(cls, manifest_path: str | os.PathLike, manifest: Manifest | None = None) -> HiddenTruth | None:
        """The truth of the manifest at ``manifest_path`` from ``manifest_full.npz`` beside it, ``None`` if absent.

        ``manifest``: the already-loaded manifest (saves reading it again).
        """
        full = cls.default_path(manifest_path)
        if full is None:
            return None
        return cls.for_manifest(manifest if manifest is not None else manifest_path, full)

    @classmethod
    def for_manifest(cls, manifest: Manifest | str | os.PathLike, path: str | os.PathLike) -> HiddenTruth:
        """The truth of ``manifest``'s rows from a full-label manifest at ``path``, matched by image path."""
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"hidden truth {str(p)!r} does not exist")
        m = as_manifest(manifest)
        full = as_manifest(p, "hidden truth")
        if np.array_equal(full.path_offsets, m.path_offsets) and np.array_equal(full.path_blob, m.path_blob):
            rows = np.arange(len(m))
        else:
            where = {full.path(i): i for i in range(len(full))}
            missing = [i for i in range(len(m)) if m.path(i) not in where]
            if missing:
                raise ValueError(f"hidden truth {str(p)!r} has no row for manifest row {missing[0]} "
                                 f"({m.path(missing[0])!r}) and {len(missing) - 1} others")
            rows = np.array([where[m.path(i)] for i in range(len(m))], np.int64)
        return cls(full.expr[rows], full.au[rows], full.va[rows], full.au_mask[rows], full.va_mask[rows],
                   full.compound[rows])

    def labels(self, index: Tensor, device: torch.device) -> dict[str, Tensor]:
        """The labels of manifest rows ``index`` (B,) as :meth:`MultiDatasetMetrics.update` keywords."""
        idx = torch.as_tensor(index).long().cpu().numpy()
        expr = torch.as_tensor(self.expr[idx], device=device)
        out = {"expr": expr.clamp(min=0), "expr_mask": expr >= 0,
               "au": torch.as_tensor(self.au[idx], dtype=torch.float32, device=device),
               "au_mask": torch.as_tensor(self.au_mask[idx], device=device),
               "va": torch.as_tensor(self.va[idx], device=device),
               "va_mask": torch.as_tensor(self.va_mask[idx], device=device)}
        if self.compound is not None:
            out["compound"] = torch.as_tensor(self.compound[idx], device=device)
        return out


# ------------------------------------------------------------------------------------------------ compounds
def present_compounds(manifest: Manifest | str | os.PathLike) -> list[int]:
    """Compound ids (into :data:`fbn_fast.labels.COMPOUNDS`) that occur in a manifest's compound column."""
    m = as_manifest(manifest)
    c = m.compound[m.compound != MISSING]
    return sorted(int(x) for x in np.unique(c))


def parse_compound_classes(spec: str | Sequence[int]) -> str | list[int]:
    """A ``--compound-classes`` value: ``present`` (the classes in the manifest), ``all`` (the 15 of the table)
    or compound ids (a list, or comma-separated text). ``ValueError`` naming the option otherwise."""
    if not isinstance(spec, str):
        return [int(c) for c in spec]
    if spec in ("present", "all"):
        return spec
    try:
        ids = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        ids = []
    if not ids:
        raise ValueError(f"--compound-classes {spec!r}: expected present, all or comma-separated compound ids")
    return ids


def compound_scorer(spec: str | Sequence[int], manifest: Manifest, *, beta: float = 0.0,
                    temperature: float = 1.0) -> CompoundScorer:
    """The zero-shot compound scorer of a ``--compound-classes`` value on ``manifest`` (docs/method.md §4)."""
    classes = parse_compound_classes(spec)
    if classes == "present":
        classes = present_compounds(manifest) or None  # no compound labels: score over the whole table
    elif classes == "all":
        classes = None
    return CompoundScorer(classes, beta=beta, temperature=temperature)


def _compound_classes_type(text: str) -> str | list[int]:
    try:
        return parse_compound_classes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix(f"--compound-classes {text!r}: ")) from None


def add_compound_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, classes: bool = True) -> None:
    """The zero-shot compound options: ``--compound-classes`` (unless ``classes=False``), ``--beta``,
    ``--temperature``."""
    if classes:
        parser.add_argument("--compound-classes", default="present", type=_compound_classes_type,
                            help="'present' (classes in the manifest, default), 'all' (15), or comma-separated ids")
    parser.add_argument("--beta", type=float, default=0.0,
                        help="weight β of the basic-expression log-posteriors in zero-shot compounds "
                             "(docs/method.md §4)")
    parser.add_argument("--temperature", type=float, default=1.0, help="temperature T of the compound softmax")


# ------------------------------------------------------------------------------------------------ command lines
#: The inference tools' former option spellings (deprecated aliases for one release) of train's options.
INFERENCE_ALIASES: dict[str, str] = {"data_root": "--root", "num_workers": "--workers", "amp_dtype": "--dtype",
                                     "loader_backend": "--backend"}


def add_inference_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, names: Sequence[str], *,
                          batch_size: int = 256) -> tuple[str, ...]:
    """Add train's options ``names`` (:class:`~fbn_fast.config.TrainConfig` fields: ``data_root``, ``datasets``,
    ``batch_size``, ``image_size``, ``device``, ``amp_dtype``, ``loader_backend``, ``num_workers``) with the
    inference defaults (``--image-size``: the checkpoint's) and the old spellings as deprecated aliases.
    Returns ``names`` (for :func:`fbn_fast.config.check_options`)."""
    add_config_options(
        parser, names, defaults={"batch_size": batch_size, "image_size": None},
        helps={"batch_size": "images per batch",
               "image_size": "input size in pixels (default: the one the checkpoint was trained at)",
               "datasets": "datasets to score, space- or comma-separated (default: all)"},
        aliases={k: v for k, v in INFERENCE_ALIASES.items() if k in names})
    return tuple(names)


def save_result(result: Mapping[str, Any], path: str | os.PathLike | None) -> None:
    """Write a JSON-able result to ``path`` (folders created), if a path is given."""
    if path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))


def command_parser(command: str, description: str) -> argparse.ArgumentParser:
    """The parser of ``python -m fbn_fast.<command>``, its first positional argument the checkpoint to load."""
    p = argparse.ArgumentParser(prog=f"python -m fbn_fast.{command}", description=description)
    p.add_argument("checkpoint", help="a checkpoint written by python -m fbn_fast.train, or its run folder (its "
                   "best.pt, the best on validation, else the latest checkpoint)")
    return p


def run_manifest_command(args: argparse.Namespace, shared_options: Sequence[str], check: Callable[[], None],
                         score: Callable[[TrainedModel], dict[str, Any]],
                         report: Callable[[dict[str, Any]], str]) -> int:
    """The body of a command that scores a checkpoint on ``args.manifest``: check train's ``shared_options`` and then
    ``check()``, load the checkpoint, ``score`` it; the result, with the checkpoint and manifest named, goes to
    ``--json`` and as ``report`` to stdout. A ``ValueError`` is one ``error:`` line on stderr and exit status 2."""
    try:
        check_options({n: getattr(args, n) for n in shared_options})
        check()
        trained = load_trained(args.checkpoint, args.device)
        result = score(trained)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result.update(checkpoint=str(trained.path), manifest=str(args.manifest))
    save_result(result, args.json)
    print(report(result))
    return 0
