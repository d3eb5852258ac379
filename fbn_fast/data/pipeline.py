"""The input pipeline's single entry point, :func:`build_loader`, and the batch contract every path honours.

A batch is a dict:

=============  =========================  ==================================================================
key            dtype / shape              meaning
=============  =========================  ==================================================================
``image``      float (N, 3, H, W)         normalised (ImageNet, or ``normalization``), channels-last, requested dtype
``expr``       int64 (N,)                 expression class (0 where missing)
``expr_mask``  bool (N,)                  has an expression label
``au``         float32 (N, 17)            AU labels (0/1)
``au_mask``    bool (N, 17)               AU annotated
``va``         float32 (N, 2)             valence, arousal
``va_mask``    bool (N,)                  has VA
``dataset``    int64 (N,)                 dataset code (into ``manifest.datasets``)
``index``      int64 (N,)                 manifest row the image came from (a bad image's replacement)
``compound``   int64 (N,)                 compound-expression id (-1 missing)
``substitute`` bool (N,)                  evaluation only: the image stands in for a bad one (not to be scored)
=============  =========================  ==================================================================

Paths (``backend``): ``"dali"`` (NVIDIA DALI: GPU decode with ``device="mixed"``, or CPU operators without a
GPU), ``"nvjpeg"`` (torchvision's batched nvJPEG decode on the GPU, augmentation as one batched ``grid_sample``),
``"cpu"`` (DataLoader workers: simplejpeg/Pillow decode, Pillow resampling). ``"auto"``: DALI when installed
and the device is CUDA, else nvJPEG when torchvision imports and the device is CUDA, else CPU.

Bad images (missing, empty, not a JPEG, truncated, undecodable) are replaced by another image of the same
dataset (deterministically), logged once per file on the ``fbn_fast.data`` logger, and counted per dataset in
:attr:`Loader.bad_images`; :meth:`Loader.summary` reports them.
"""

from __future__ import annotations

import collections
import importlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..faults import ignore_stop_signals
from .decode import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Augment,
    BadImage,
    BatchKey,
    CpuBatchDataset,
    SampleSource,
    batch_rng,
    identity_collate,
    normalize_nhwc,
    sample_params,
    warp_batch,
)
from .manifest import Manifest
from .sampler import MixingBatchSampler, ShardedEvalSampler

log = logging.getLogger("fbn_fast.data")

BATCH_KEYS: tuple[str, ...] = ("image", "expr", "expr_mask", "au", "au_mask", "va", "va_mask", "dataset", "index",
                               "compound")
BACKENDS: tuple[str, ...] = ("auto", "dali", "cpu", "nvjpeg")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------- availability
def dali_available() -> bool:
    try:
        importlib.import_module("nvidia.dali")
    except Exception:  # ImportError, or a broken install that fails while loading its libraries
        return False
    return True


def torchvision_available() -> bool:
    try:
        importlib.import_module("torchvision.io")
    except Exception:  # torchvision built for another torch raises RuntimeError/OSError on import
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete path for ``backend`` on ``device``; ValueError when it cannot run there."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    cuda = device.type == "cuda"
    if backend == "auto":
        if cuda and dali_available():
            return "dali"
        if cuda and torchvision_available():
            return "nvjpeg"
        return "cpu"
    if backend == "dali" and not dali_available():
        raise ValueError("backend='dali' needs nvidia-dali (pip install 'fbn_fast[dali]')")
    if backend == "nvjpeg":
        if not cuda:
            raise ValueError(f"backend='nvjpeg' decodes on a CUDA device; device is {device}")
        if not torchvision_available():
            raise ValueError("backend='nvjpeg' needs torchvision built for this torch")
    return backend


# ---------------------------------------------------------------------------------------------- labels
class LabelTable:
    """Manifest label columns, gathered by row into the contract's tensors."""

    def __init__(self, manifest: Manifest) -> None:
        self.expr = np.asarray(manifest.expr)
        self.au = np.asarray(manifest.au)
        self.au_mask = np.asarray(manifest.au_mask, bool)
        self.va = np.asarray(manifest.va, np.float32)
        self.va_mask = np.asarray(manifest.va_mask, bool)
        self.dataset = np.asarray(manifest.dataset)
        self.compound = np.asarray(manifest.compound)

    def gather(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        expr = self.expr[rows].astype(np.int64)
        mask = expr >= 0
        return {
            "expr": torch.from_numpy(np.where(mask, expr, 0)),
            "expr_mask": torch.from_numpy(mask),
            "au": torch.from_numpy(self.au[rows].astype(np.float32)),
            "au_mask": torch.from_numpy(self.au_mask[rows]),
            "va": torch.from_numpy(self.va[rows]),
            "va_mask": torch.from_numpy(self.va_mask[rows]),
            "dataset": torch.from_numpy(self.dataset[rows].astype(np.int64)),
            "compound": torch.from_numpy(self.compound[rows].astype(np.int64)),
        }


# ---------------------------------------------------------------------------------------------- backends
class _EpochKeys:
    """The DataLoader's sampler: the batch keys from the loader's current position (read at each ``iter``)."""

    def __init__(self, sampler) -> None:
        self.sampler = sampler
        self.epoch = 0
        self.start = 0

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.start)

    def __iter__(self) -> Iterator[BatchKey]:
        for i, rows in enumerate(self.sampler.iter_from(self.epoch, self.start)):
            yield BatchKey(self.epoch, self.start + i, rows)


class CpuBackend:
    """DataLoader workers decode and resample whole batches to uint8; the main process normalises them."""

    name = "cpu"

    def __init__(self, source: SampleSource, sampler, *, size: int, train: bool, aug: Augment, seed: int, rank: int,
                 num_workers: int, device: torch.device, dtype: torch.dtype) -> None:
        self.keys = _EpochKeys(sampler)
        self.train, self.device, self.dtype = train, device, dtype
        ds = CpuBatchDataset(source, size=size, train=train, aug=aug, seed=seed, rank=rank)
        self.loader = torch.utils.data.DataLoader(
            ds, sampler=self.keys, batch_size=None, collate_fn=identity_collate, num_workers=num_workers,
            pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
            prefetch_factor=4 if num_workers > 0 else None, worker_init_fn=ignore_stop_signals)

    def batches(self, epoch: int, start: int) -> Iterator[dict]:
        self.keys.epoch, self.keys.start = epoch, start
        for raw in self.loader:
            b, c = (raw["brightness"], raw["contrast"]) if self.train else (None, None)
            image = normalize_nhwc(raw["image"], b, c, self.dtype, self.device)
            yield {"image": image, "index": raw["index"], "_bad": raw["_bad"]}

    def close(self) -> None:
        # Stop the (persistent) workers now rather than whenever the iterator is collected.
        workers = getattr(self.loader, "_iterator", None)
        if workers is not None and hasattr(workers, "_shutdown_workers"):
            workers._shutdown_workers()
        self.loader = None


class TorchDecodeBackend:
    """Encoded bytes read by host threads, decoded as a batch by ``decode`` (nvJPEG through torchvision on CUDA),
    augmented as a batch by :func:`~fbn_fast.data.decode.warp_batch` on the decode device.

    ``decode(list of 1-D uint8 CPU tensors) -> list of CHW uint8 tensors`` must raise on an undecodable image;
    the batch is then decoded one image at a time to find and replace the bad ones.
    """

    name = "nvjpeg"

    def __init__(self, source: SampleSource, sampler, *, size: int, train: bool, aug: Augment, seed: int, rank: int,
                 num_workers: int, device: torch.device, dtype: torch.dtype, decode=None) -> None:
        self.source, self.sampler = source, sampler
        self.size, self.train, self.aug, self.seed, self.rank = size, train, aug, seed, rank
        self.device, self.dtype = device, dtype
        self.threads = max(1, num_workers)
        self.decode = decode if decode is not None else self._nvjpeg

    def _nvjpeg(self, data: list[torch.Tensor]) -> list[torch.Tensor]:
        from torchvision.io import ImageReadMode, decode_jpeg

        return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)

    def _read(self, epoch: int, b: int, rows: np.ndarray):
        bad: list = []
        used = np.empty(len(rows), np.int64)
        datas = []
        for i, row in enumerate(rows.tolist()):
            used[i], data = self.source.load(row, lambda r, d: d, bad)
            datas.append(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        return epoch, b, rows, used, datas, bad

    def _decode_one(self, row: int, bad: list) -> tuple[int, torch.Tensor]:
        def use(r: int, data: bytes) -> torch.Tensor:
            try:
                return self.decode([torch.frombuffer(bytearray(data), dtype=torch.uint8)])[0]
            except RuntimeError as exc:
                raise BadImage(f"undecodable JPEG ({str(exc).splitlines()[0] if str(exc) else exc})") from None

        return self.source.load(row, use, bad)

    def batches(self, epoch: int, start: int) -> Iterator[dict]:
        todo = ((epoch, start + i, rows) for i, rows in enumerate(self.sampler.iter_from(epoch, start)))
        with ThreadPoolExecutor(self.threads) as pool:
            pending: collections.deque = collections.deque()
            for key in todo:
                pending.append(pool.submit(self._read, *key))
                if len(pending) > self.threads:
                    yield self._finish(*pending.popleft().result())
            while pending:
                yield self._finish(*pending.popleft().result())

    def _finish(self, epoch: int, b: int, rows: np.ndarray, used: np.ndarray, datas: list, bad: list) -> dict:
        try:
            images = self.decode(datas)
        except RuntimeError:
            # the batched decoder returns nothing when any image fails: find the culprits one by one
            images = []
            for i, row in enumerate(rows.tolist()):
                used[i], im = self._decode_one(row, bad)
                images.append(im)
        rng = batch_rng(self.seed, epoch, b, self.rank) if self.train else None
        p = sample_params(len(rows), self.train, self.aug, rng)
        image = warp_batch(images, self.source.box[used], p, self.size, self.dtype, self.train)
        return {"image": image, "index": torch.from_numpy(used), "_bad": bad}

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------- normalisation
def renormalization(normalization, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scale, shift) of shape (1, 3, 1, 1) that turn ImageNet-normalised images into images normalised with
    ``normalization`` = (mean, std) per RGB channel on a 0–1 scale (e.g. a timm trunk's ``pretrained_cfg``);
    None when it is ImageNet's (nothing to do). The decoders normalise with the ImageNet constants in the same
    fused pass as the augmentation; a trunk with other statistics costs one extra multiply-add per batch."""
    if normalization is None:
        return None
    mean, std = (tuple(float(v) for v in t) for t in normalization)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"normalization must be ((3 means), (3 positive stds)), got {normalization}")
    if mean == tuple(IMAGENET_MEAN) and std == tuple(IMAGENET_STD):
        return None
    m_in, s_in = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    m_out, s_out = torch.tensor(mean), torch.tensor(std)
    # x_in = (u - m_in) / s_in  ->  x_out = (u - m_out) / s_out = x_in * s_in / s_out + (m_in - m_out) / s_out
    scale, shift = s_in / s_out, (m_in - m_out) / s_out
    return scale.view(1, 3, 1, 1).to(device), shift.view(1, 3, 1, 1).to(device)


def renormalize(image: torch.Tensor, renorm: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """ImageNet-normalised images (N, 3, H, W) normalised as :func:`renormalization` says (in float32, returned
    in their own dtype); the images themselves when ``renorm`` is None."""
    if renorm is None:
        return image
    scale, shift = renorm
    return torch.addcmul(shift.to(image.device, torch.float32), image.float(),
                         scale.to(image.device, torch.float32)).to(image.dtype)


# ---------------------------------------------------------------------------------------------- the loader
class Loader:
    """Iterable over contract batches; one pass is one epoch of ``len(loader)`` batches.

    Position: the loader counts the batches it has handed out in the current epoch. When an epoch completes the
    loader moves on to the next one by itself; :meth:`set_epoch` selects an epoch (a no-op when it is the current
    one, so calling it after :meth:`load_state_dict` resumes mid-epoch). Breaking out of a loop and iterating
    again continues where it stopped.
    """

    def __init__(self, backend, sampler, labels: LabelTable, datasets: tuple[str, ...], device: torch.device,
                 *, train: bool, image_size: int, dtype: torch.dtype, normalization=None) -> None:
        self._backend = backend
        self._renorm = renormalization(normalization, device)
        self.sampler = sampler
        self.labels = labels
        self.datasets = datasets
        self.device = device
        self.train, self.image_size, self.dtype = train, image_size, dtype
        self.epoch = 0
        self._consumed = 0
        self._bad_rows: dict[int, tuple[str, str]] = {}
        self.bad_images: dict[str, int] = {}
        self.bad_image_log: list[tuple[str, str]] = []

    @property
    def backend(self) -> str:
        return self._backend.name

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != self.epoch:
            self.epoch, self._consumed = int(epoch), 0

    @property
    def position(self) -> int:
        """Batches of the current epoch already handed out."""
        return self._consumed

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self._consumed, "sampler": self.sampler.state_dict(),
                "bad_image_log": [(r, p, why) for r, (p, why) in self._bad_rows.items()]}

    def load_state_dict(self, state: Mapping) -> None:
        for k in ("epoch", "batch"):
            if k not in state:
                raise ValueError(f"loader state lacks {k!r}")
        sampler_state = dict(state.get("sampler", {}), epoch=state["epoch"], batch=state["batch"])
        self.sampler.load_state_dict(sampler_state)  # validates batch size, world size, epoch size, seed
        self.epoch, self._consumed = int(state["epoch"]), int(state["batch"])
        for row, path, why in state.get("bad_image_log", []):
            self._record_one(int(row), path, why, announce=False)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._consumed >= len(self):
            self.epoch, self._consumed = self.epoch + 1, 0
        # Evaluation marks the stand-ins of bad images, so that scores count each good image once and no other.
        requested = None if self.train else self.sampler.iter_from(self.epoch, self._consumed)
        for raw in self._backend.batches(self.epoch, self._consumed):
            batch = self._assemble(raw)
            if requested is not None:
                rows = torch.from_numpy(np.asarray(next(requested), np.int64))
                batch["substitute"] = (raw["index"] != rows).to(self.device)
            self._consumed += 1
            yield batch
        if self._consumed >= len(self):
            self.epoch, self._consumed = self.epoch + 1, 0

    def _assemble(self, raw: dict) -> dict[str, torch.Tensor]:
        for row, path, why in raw["_bad"]:
            self._record_one(int(row), path, why)
        index = raw["index"]
        labels = self.labels.gather(index.numpy())
        nb = self.device.type == "cuda"
        out = {"image": renormalize(raw["image"], self._renorm)}
        for k in BATCH_KEYS[1:]:
            t = index if k == "index" else labels[k]
            out[k] = t.to(self.device, non_blocking=nb)
        return out

    def _record_one(self, row: int, path: str, why: str, announce: bool = True) -> None:
        if row in self._bad_rows:
            return
        self._bad_rows[row] = (path, why)
        name = self.datasets[int(self.labels.dataset[row])]
        self.bad_images[name] = self.bad_images.get(name, 0) + 1
        self.bad_image_log.append((path, why))
        if announce:
            log.warning("bad image replaced by another %s image: %s (%s)", name, path, why)

    def summary(self) -> str:
        """One line per dataset with bad images, then each bad file; 'no bad images' when there were none."""
        total = sum(self.bad_images.values())
        if not total:
            return f"input pipeline ({self.backend}): no bad images"
        per = ", ".join(f"{k} {v}" for k, v in sorted(self.bad_images.items()))
        lines = [f"input pipeline ({self.backend}): {total} bad images replaced ({per})"]
        lines += [f"  {p}: {why}" for p, why in self.bad_image_log]
        return "\n".join(lines)

    def close(self) -> None:
        self._backend.close()


# ---------------------------------------------------------------------------------------------- entry point
def select_rows(manifest: Manifest, split: str, datasets: Sequence[str] | None = None,
                ratios: Mapping[str, float] | None = None) -> tuple[np.ndarray, list[int]]:
    """The rows (indices) of ``split`` of the datasets a loader of these ``datasets``/``ratios`` reads, and their
    dataset codes; ``ValueError`` for ratios that do not match the datasets or a dataset without rows."""
    if datasets is None and ratios is not None:
        datasets = list(ratios)
    if datasets is None:
        codes = sorted({int(c) for c in np.unique(manifest.dataset[manifest.split_rows(split)])})
    else:
        codes = [manifest.dataset_index(d) for d in datasets]
    if ratios is not None:
        unknown = set(ratios) - {manifest.datasets[c] for c in codes}
        if unknown:
            raise ValueError(f"ratios name datasets {sorted(unknown)} that are not selected ({datasets})")
        lacking = [manifest.datasets[c] for c in codes if manifest.datasets[c] not in ratios]
        if lacking:
            raise ValueError(f"ratios give no weight to selected datasets {lacking}")
    mask = manifest.split_rows(split) & np.isin(manifest.dataset, codes)
    rows = np.flatnonzero(mask)
    if len(rows) == 0:
        raise ValueError(f"no rows in split {split!r} for datasets {[manifest.datasets[c] for c in codes]}")
    empty = [manifest.datasets[c] for c in codes if not (manifest.dataset[rows] == c).any()]
    if empty:
        raise ValueError(f"datasets {empty} have no rows in split {split!r}")
    return rows, codes


def build_loader(manifest: Manifest, root: str | os.PathLike, *, batch_size: int, image_size: int = 112,
                 train: bool = True, split: str = "train", datasets: list[str] | None = None,
                 ratios: Mapping[str, float] | None = None, epoch_size: int | None = None, seed: int = 0,
                 rank: int = 0, world_size: int = 1, backend: str = "auto", num_workers: int = 2,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 drop_last: bool | None = None, augment: Augment | None = None,
                 normalization=None) -> Loader:
    """Build the input pipeline for ``split`` of ``manifest`` (paths relative to ``root``).

    Training (``train=True``) mixes ``datasets`` (default: those named in ``ratios``, else all in the split) in
    every batch by ``ratios`` (name -> weight; default: proportional to their sizes), ``epoch_size`` batches per
    epoch (default: rows // (batch_size * world_size)), with augmentation. Evaluation reads every row of the split
    once per pass across ranks, in order, with a partial last batch unless ``drop_last`` (training batches are
    always full). ``batch_size`` is per rank. ``device``: where the batch is delivered (and, for DALI and nvJPEG,
    where decoding runs). DALI has no bfloat16: a bfloat16 request is produced as float32 there and cast in torch.
    A manifest row whose path is absolute or leaves ``root`` is rejected here with a ValueError naming it.
    ``normalization``: (mean, std) per RGB channel on a 0–1 scale the images are normalised with (default
    ImageNet's), e.g. ``model.normalization`` of a :class:`~fbn_fast.model.FaceBehaviorNet`.
    """
    dev = torch.device(device)
    if not os.path.isdir(root):
        raise ValueError(f"image root {os.fspath(root)!r} does not exist or is not a directory")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if ratios is not None and not train:
        raise ValueError("ratios apply to training (train=True); evaluation reads every row once")
    if drop_last is None:
        drop_last = train
    kind = resolve_backend(backend, dev)
    rows, codes = select_rows(manifest, split, datasets, ratios)
    outside = [r for r, why in manifest.select(rows).bad_rows() if "root" in why or "absolute" in why]
    if outside:
        r = int(rows[outside[0]])
        raise ValueError(f"manifest row {r} ({manifest.path(r)!r}) points outside the image root {os.fspath(root)!r}")
    if train:
        if ratios is None:
            weights = {c: float((manifest.dataset[rows] == c).sum()) for c in codes}
        else:
            weights = {c: float(ratios[manifest.datasets[c]]) for c in codes}
        sampler = MixingBatchSampler(rows, manifest.dataset[rows], weights, batch_size=batch_size,
                                     epoch_size=epoch_size, seed=seed, rank=rank, world_size=world_size)
    else:
        if epoch_size is not None:
            raise ValueError("epoch_size applies to training; evaluation covers the split once")
        sampler = ShardedEvalSampler(rows, batch_size=batch_size, rank=rank, world_size=world_size,
                                     drop_last=drop_last)
    source = SampleSource(manifest, root, rows, seed=seed)
    aug = augment if augment is not None else Augment()
    common = dict(size=image_size, train=train, aug=aug, seed=seed, rank=rank, num_workers=num_workers,
                  device=dev, dtype=dtype)
    if kind == "cpu":
        impl = CpuBackend(source, sampler, **common)
    elif kind == "nvjpeg":
        impl = TorchDecodeBackend(source, sampler, **common)
    else:
        from .dali import DaliBackend

        impl = DaliBackend(source, sampler, **common)
    return Loader(impl, sampler, LabelTable(manifest), manifest.datasets, dev, train=train, image_size=image_size,
                  dtype=dtype, normalization=normalization)
