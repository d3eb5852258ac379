"""Checkpoints: everything needed to continue a run exactly, written atomically; and model loading for inference.

A checkpoint is one ``torch.save`` file holding plain data only (tensors, numbers, strings, lists, dicts), so it
loads with ``torch.load(..., weights_only=True)``: opening a checkpoint never runs code from it.

=================  =======================================================================================
key                content
=================  =======================================================================================
``format``         ``"fbn_fast.checkpoint/1"``
``step``           optimizer steps taken (the number of completed training steps)
``model``          the model's ``state_dict`` (unwrapped: no ``module.`` / ``_orig_mod.`` prefixes)
``arch``           how to rebuild the model: keyword arguments of :func:`fbn_fast.model.build_model`
``optimizer``      optimizer ``state_dict``
``scheduler``      learning-rate scheduler ``state_dict``
``scaler``         ``GradScaler`` ``state_dict`` (fp16) or ``None``
``loader``         per-rank input-pipeline positions (list indexed by rank; exact mid-epoch resume)
``rng``            per-rank RNG states: Python ``random``, NumPy's global generator, torch CPU, every CUDA device
``config``         the run's :class:`~fbn_fast.config.TrainConfig` as a dict
``relatedness``    the relatedness table used, as its JSON object (:mod:`fbn_fast.relatedness`)
``counters``       training counters (non-finite steps skipped, consecutive ones, images seen, ...)
``world_size``     number of processes that wrote it
``trained_on``     what the model was trained on (:func:`training_record`: datasets, data folder, image size,
                   trunk, label spaces, whether only SynthFace); read it with :func:`read_trained_on`
=================  =======================================================================================

Writes go to a temporary file in the same folder, are flushed to disk, then renamed over the target
(``os.replace`` is atomic on POSIX and Windows), so a crash never leaves a truncated checkpoint behind. Beside
each checkpoint ``<name>.sha256`` holds the SHA-256 of its bytes (``sha256sum -c`` reads it);
:func:`load_checkpoint` verifies it, so a checkpoint damaged on disk is refused rather than resumed. A write
that finds the disk full raises :class:`CheckpointWriteError` saying how much space the checkpoint needs.

Inference users need only :func:`load_model`::

    model, config, relatedness = load_model("runs/x/checkpoints/step_00001000.pt", map_location="cpu")
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "FORMAT",
    "CheckpointWriteError",
    "capture_rng",
    "checkpoint_path",
    "find_checkpoints",
    "latest_checkpoint",
    "load_checkpoint",
    "load_model",
    "prune_checkpoints",
    "read_trained_on",
    "restore_rng",
    "save_checkpoint",
    "training_record",
    "unwrap_model",
]

FORMAT = "fbn_fast.checkpoint/1"
_NAME = re.compile(r"^step_(\d{8,})\.pt$")
_ND = "__ndarray__"


# ---------------------------------------------------------------------------------------------------- encoding
def _encode(obj: Any) -> Any:
    """Make ``obj`` loadable with ``weights_only=True``: numpy arrays/scalars become tagged tensors/numbers."""
    if isinstance(obj, np.ndarray):
        return {_ND: torch.from_numpy(np.ascontiguousarray(obj)).clone(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_encode(v) for v in obj)
    return obj


def _decode(obj: Any) -> Any:
    if isinstance(obj, dict):
        if _ND in obj and set(obj) == {_ND, "dtype"}:
            return obj[_ND].numpy().astype(obj["dtype"], copy=False)
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_decode(v) for v in obj)
    return obj


# ---------------------------------------------------------------------------------------------------- RNG
def capture_rng() -> dict[str, Any]:
    """RNG states of this process: Python, NumPy (global), torch CPU and every CUDA device."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng` captured (CUDA states only when CUDA is available here)."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), int(np_state[2]),
                         int(np_state[3]), float(np_state[4])))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


# ---------------------------------------------------------------------------------------------------- model
def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside DDP / ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel) or (
                hasattr(model, "module") and isinstance(model.module, nn.Module)
                and type(model).__name__ in ("DistributedDataParallel", "DataParallel")):
            model = model.module
        else:
            return model


def _clean_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes from a state dict saved by other tools."""
    out = {}
    for k, v in state.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


# ---------------------------------------------------------------------------------------------------- files
def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    """``<run_dir>/checkpoints/step_<step, 8 digits>.pt``."""
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}.pt"


def find_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of a run's checkpoints, oldest first (temporary files are ignored)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint with the highest step in a run folder, or ``None``."""
    found = find_checkpoints(run_dir)
    return found[-1][1] if found else None


def prune_checkpoints(run_dir: str | os.PathLike, keep: int, protect: tuple[Path, ...] = ()) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (never those in ``protect``); returns what was deleted."""
    found = find_checkpoints(run_dir)
    doomed = [p for _, p in found[:-keep] if p not in protect] if keep > 0 else []
    for p in doomed:
        p.unlink(missing_ok=True)
        _checksum_path(p).unlink(missing_ok=True)
    return doomed


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. the disk is full); the earlier checkpoints are untouched."""


def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _payload_bytes(obj: Any) -> int:
    """The bytes of the tensors in ``obj``: about the size of its checkpoint file."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_payload_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_payload_bytes(v) for v in obj)
    return 0


def _write_failed(exc: BaseException, obj: Any, path: Path, free_at_failure: int) -> CheckpointWriteError | None:
    """The error to raise for a failed write of ``obj`` to ``path`` (saying what space it needs when it ran out);
    ``None`` when the failure was not the file system's."""
    from .faults import is_disk_full

    need = _payload_bytes(obj)
    free = shutil.disk_usage(path.parent).free
    # torch's writer reports a short write in its own words ("unexpected pos ..."): the free space tells.
    if is_disk_full(exc) or free_at_failure < min(need, 1 << 20):
        return CheckpointWriteError(
            errno.ENOSPC, f"no space left on the device of {str(path.parent)!r} to write checkpoint {path.name}: "
            f"it needs about {need / 1e6:.1f} MB, {free / 1e6:.1f} MB are free; the earlier checkpoints are intact. "
            f"Free space (or lower --keep-checkpoints), then continue with --resume")
    if not isinstance(exc, OSError):
        return None
    return CheckpointWriteError(exc.errno or errno.EIO, f"cannot write checkpoint {str(path)!r}: {exc.strerror or exc}")


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    sum_tmp = Path(tmp + ".sha256.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        sum_tmp.write_text(f"{_sha256(Path(tmp))}  {path.name}\n")
        # The checksum first: a checkpoint under its final name always has its checksum beside it.
        os.replace(sum_tmp, _checksum_path(path))
        os.replace(tmp, path)
    except Exception as exc:
        free_at_failure = shutil.disk_usage(path.parent).free
        Path(tmp).unlink(missing_ok=True)
        sum_tmp.unlink(missing_ok=True)
        failed = _write_failed(exc, obj, path, free_at_failure)
        if failed is not None:
            raise failed from exc
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        sum_tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # some file systems (and Windows) cannot fsync a folder
        pass


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    step: int,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    loader_states: list[Any] | None = None,
    rng_states: list[dict[str, Any]] | None = None,
    config: dict[str, Any] | None = None,
    relatedness: dict[str, Any] | None = None,
    counters: dict[str, Any] | None = None,
    world_size: int = 1,
    trained_on: dict[str, Any] | None = None,
    refresh: list[dict[str, Any]] | None = None,
) -> Path:
    """Write a checkpoint atomically (temporary file, fsync, rename). Returns the path.

    ``loader_states`` and ``rng_states`` are lists indexed by rank (gather them before calling on rank 0).
    ``relatedness`` is :meth:`fbn_fast.relatedness.Relatedness.to_json` of the table the run started with;
    ``trained_on`` is :func:`training_record` of the run; ``refresh`` (per rank, like ``loader_states``) the
    state of the table re-estimated since (:class:`fbn_fast.coupling.RelatednessRefresh`: its ``"table"``).
    """
    plain = unwrap_model(model)
    obj = {
        "format": FORMAT,
        "step": int(step),
        "model": {k: v.detach().cpu() if v.device.type != "cpu" else v.detach()
                  for k, v in plain.state_dict().items()},
        "arch": dict(getattr(plain, "arch", {}) or {}),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "scaler": None if scaler is None or not scaler.is_enabled() else scaler.state_dict(),
        "loader": _encode(list(loader_states or [])),
        "rng": _encode(list(rng_states or [])),
        "config": _encode(dict(config or {})),
        "relatedness": relatedness,
        "counters": dict(counters or {}),
        "world_size": int(world_size),
        "trained_on": _encode(dict(trained_on or {})),
        "refresh": refresh,
    }
    path = Path(path)
    _atomic_torch_save(obj, path)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only``: no code runs on load).

    Raises ``ValueError`` naming the file when it is missing, truncated, corrupt (its content does not match the
    checksum written with it) or of another format.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    data = path.read_bytes()
    checksum = _checksum_path(path)
    if checksum.is_file():  # checkpoints of earlier versions have none
        want = checksum.read_text().split()[0] if checksum.read_text().strip() else ""
        got = hashlib.sha256(data).hexdigest()
        if got != want:
            raise ValueError(f"checkpoint {str(path)!r} is corrupt: its SHA-256 {got[:12]}… differs from "
                             f"{want[:12]}… written with it in {checksum.name}")
    try:
        obj = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, unpickling refusal, ...: all mean "not a usable checkpoint"
        raise ValueError(f"checkpoint {str(path)!r} cannot be read: {exc}") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        got = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"checkpoint {str(path)!r} has format {got!r}, expected {FORMAT!r}")
    for key in ("loader", "rng", "config", "trained_on"):
        obj[key] = _decode(obj.get(key))
    return obj


def load_model(path: str | os.PathLike, map_location: Any = "cpu", *, eval_mode: bool = True):
    """Rebuild the trained model of a checkpoint for inference.

    Returns ``(model, config, relatedness)``: the :class:`~fbn_fast.model.FaceBehaviorNet` on ``map_location``
    (in eval mode unless ``eval_mode=False``), the run's :class:`~fbn_fast.config.TrainConfig` (keys unknown to
    this version are ignored) and the :class:`~fbn_fast.relatedness.Relatedness` it was trained with (``None``
    if the checkpoint has none). Input images must be prepared as in training: ``config.image_size`` pixels,
    normalised like the input pipeline does.
    """
    from .config import TrainConfig
    from .model import build_model
    from .relatedness import Relatedness

    ckpt = load_checkpoint(path, map_location="cpu")
    arch = dict(ckpt.get("arch") or {})
    if "trunk" not in arch:
        raise ValueError(f"checkpoint {str(path)!r} does not say how to build its model (no 'arch')")
    try:
        model = build_model(**arch)  # pretrained weights are not needed: the checkpoint has every parameter
    except TypeError as exc:
        raise ValueError(f"checkpoint {str(path)!r}: arch {arch} does not fit build_model: {exc}") from None
    missing, unexpected = model.load_state_dict(_clean_state(ckpt["model"]), strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {str(path)!r} does not fit its architecture: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.to(map_location)
    if arch.get("channels_last", False):
        model.to(memory_format=torch.channels_last)
    model.train(not eval_mode)
    config = TrainConfig.from_saved(ckpt["config"], where=str(path)) if ckpt.get("config") else None
    rel = Relatedness.from_json(ckpt["relatedness"]) if ckpt.get("relatedness") else None
    return model, config, rel


# ---------------------------------------------------------------------------------------------------- provenance
def training_record(model: nn.Module, *, datasets: list[str] | tuple[str, ...], image_size: int,
                    expressions: list[str] | tuple[str, ...], aus: list[str] | tuple[str, ...],
                    manifest: str | os.PathLike | None = None, data_root: str | os.PathLike | None = None,
                    synthface: bool = False) -> dict[str, Any]:
    """What a model was trained on, as a checkpoint records it (``trained_on``).

    ``datasets``: the names of the datasets whose train split it saw; ``expressions``/``aus``: the label spaces
    (the manifest's names); ``manifest``/``data_root``: where the images came from (stored as absolute paths);
    ``synthface``: only SynthFace's synthetic faces (predict warns when such a model meets other images).
    """
    arch = dict(getattr(unwrap_model(model), "arch", {}) or {})
    absolute = lambda p: None if p is None else str(Path(p).resolve())
    return {"datasets": list(datasets), "synthface_only": bool(synthface), "manifest": absolute(manifest),
            "data_root": absolute(data_root), "image_size": int(image_size), "trunk": arch.get("trunk"),
            "expressions": list(expressions), "aus": list(aus)}


def read_trained_on(source: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    """``trained_on`` of a checkpoint (a path or a loaded checkpoint); for a checkpoint that predates it, what its
    config and arch say: image size, trunk, datasets when the config lists them, and ``synthface_only`` when it
    names no manifest (the default job trains on SynthFace)."""
    ckpt = source if isinstance(source, dict) else load_checkpoint(source)
    if ckpt.get("trained_on"):
        return dict(ckpt["trained_on"])
    cfg, arch = ckpt.get("config") or {}, ckpt.get("arch") or {}
    out: dict[str, Any] = {"datasets": list(cfg.get("datasets") or []) or None, "trunk": arch.get("trunk"),
                           "image_size": cfg.get("image_size")}
    if cfg:
        out["synthface_only"] = not cfg.get("manifest")
        if not cfg.get("manifest") and cfg.get("synth_dir"):
            out["data_root"] = str(Path(cfg["synth_dir"]).resolve())
    return out
