"""``python -m fbn_fast.train``: train FaceBehaviorNet, evaluate it, and write a run folder.

With no options it runs the default job on whatever the machine has: it generates the small SynthFace if it
is not cached, trains the ``small`` trunk at 64 px, chooses ``best.pt`` on the val split, scores it on every
dataset's test split (plus zero-shot compound expressions) and writes ``runs/<timestamp>/``.

Protocol: ``train`` trains, ``val`` selects (:mod:`fbn_fast.selection`: scored every ``--eval-every`` steps,
each time with a checkpoint, and at the end) and ``--eval-split`` (``test``) scores the chosen model where a
dataset has that split; a dataset without it is reported ("no test split"), not an error. What can be checked
before the first step is (:mod:`fbn_fast.preflight`: splits, ``--datasets``/``--ratios``, a sample of the images
under the root in use, relatedness, label spaces), each failure naming the option to change.

======================  ================================================================================
``config.toml``         the resolved recipe (rerun with ``--config runs/<x>/config.toml``)
``relatedness.json``    the relatedness table used (prior, estimated from the training split, or a file)
``metrics.jsonl``       one JSON record per log interval (step, epoch, lr, images/s, every loss term,
                        skipped non-finite steps) and one per evaluation
``tensorboard/``        the same records and the config as TensorBoard events, when the ``tensorboard``
                        package is installed (``pip install "fbn_fast[tensorboard]"``)
``eval.json``           the end: per-dataset metrics of docs/method.md §5 of the chosen model on ``--eval-split``
                        (``no_split`` names the datasets without it), ``validation`` (the last val scores)
``best.json``           step and validation score of ``checkpoints/best.pt``
``checkpoints/``        ``step_<N>.pt`` every ``--ckpt-every`` and ``--eval-every`` steps, at the end and on
                        SIGINT/SIGTERM/SIGUSR1, each with its SHA-256 in ``step_<N>.pt.sha256``; the last
                        ``--keep-checkpoints`` are kept, and ``best.pt`` (the best on val) besides
``plots/``              ``loss.png``, ``au_f1.png``, ``confusion.png``
``train.log``           the log
======================  ================================================================================

Multi-GPU: ``torchrun --nproc_per_node N -m fbn_fast.train ...`` (see ``training/launch_ddp.sh``): one process
per device, each reading its own shard; NCCL on GPUs, gloo on CPUs.

A run folder has one owner (``.lock``, see :mod:`fbn_fast.runlock`); a new run under the ``--name`` of an
existing one needs ``--resume``. Exit status (:mod:`fbn_fast.faults`; ``docs/reliability.md``): 0 done (or
paused by ``--max-steps-per-run``), 1 internal error, 2 usage, 3 stopped after ``--max-nonfinite`` consecutive
non-finite losses, 4 data, 5 I/O (e.g. disk full), 75 saved after SIGUSR1 (requeue), 128+N stopped by signal N
(SIGINT 130, SIGTERM 143) after saving a checkpoint; continue with ``--resume auto --name <run>`` or
``--resume <run folder>``. Every fatal error is one line on stderr and in ``train.log`` (which also gets the
traceback; ``--debug`` prints it too).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
import torch
from torch import Tensor, nn

from . import coupling
from . import distributed as fdist
from .checkpoint import (
    capture_rng,
    checkpoint_path,
    find_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    restore_rng,
    save_checkpoint,
    training_record,
)
from .config import TrainConfig, dump_toml, explicit_values, saved_values
from .data.synthface import default_synth_dir
from .evaluate import evaluate, format_report
from .faults import (
    EXIT_DIVERGED,
    EXIT_OK,
    STOP_SIGNALS,
    NonFiniteLossError,
    check_physical_limits,
    nonfinite_tensors,
    report_fatal,
    sigchld_deferred,
    signal_exit_status,
)
from .inference import HiddenTruth, image_dtype, image_root
from .labels import AUS, EXPRESSIONS
from .losses import TERMS, FaceBehaviorLoss, LossWeights
from .model import FaceBehaviorNet, build_model
from .optim import WarmupCosine, build_optimizer, resolve_amp
from .preflight import datasets_with_split, preflight
from .progress import (
    RunningWindow,
    add_file_log,
    configure_console_logging,
    format_terms,
    progress_bar,
    remove_log_handler,
)
from .runlock import RunLock, holds_a_run, remove_stale_files
from .selection import SELECTION_SPLIT, BestCheckpoint, validation_score
from .step import CudaProfileRange, Nvtx, TrainStep
from .tensorboard import TensorBoardWriter, tensorboard_available

if TYPE_CHECKING:
    from tqdm import tqdm

    from .data.manifest import Manifest
    from .data.pipeline import Loader
    from .relatedness import Relatedness

log = logging.getLogger("fbn_fast.train")

__all__ = [
    "EXIT_DIVERGED",
    "NonFiniteLossError",
    "TrainStep",
    "Trainer",
    "WarmupCosine",
    "build_optimizer",
    "default_synth_dir",
    "main",
    "resolve_amp",
    "resolve_resume",
]

#: Settings of one invocation that a resumed run does not inherit from its checkpoint.
PER_INVOCATION = ("resume", "max_steps_per_run", "cuda_profile_steps", "progress", "debug")


# ---------------------------------------------------------------------------------------------------- trainer
@dataclass
class _Counters:
    """Training counters that a checkpoint carries."""

    nonfinite_total: int = 0
    nonfinite_consecutive: int = 0
    images_seen: int = 0

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any]) -> _Counters:
        return cls(**{f.name: int(saved.get(f.name, 0)) for f in fields(cls)})


class Trainer:
    """One training run: set-up, the loop, checkpoints, evaluation and the run folder.

    Typical use is :func:`main`; programmatic use::

        trainer = Trainer(cfg, fdist.init_distributed(cfg.device))
        status = trainer.run()        # sets up first; "done", "paused", "interrupted:<signal>"

    Every attribute is declared here; those built by :meth:`setup` are ``None`` until ``is_set_up``.
    """

    def __init__(self, cfg: TrainConfig, env: fdist.DistEnv, resume_from: Path | None = None,
                 run_dir: Path | None = None, checkpoint: dict[str, Any] | None = None) -> None:
        """``resume_from``: the checkpoint to continue from; ``checkpoint``: its contents when the caller has read
        it already (:func:`main` does, for the run's settings), so that the file is read once."""
        if checkpoint is not None and resume_from is None:
            raise ValueError("Trainer: checkpoint= is the contents of resume_from=, which is missing")
        # given
        self.cfg = cfg
        self.env = env
        self.device: torch.device = env.device
        self.main_rank: bool = env.is_main
        self.resume_from = resume_from
        self.run_dir: Path | None = run_dir
        # policies that follow from the configuration
        self.amp_dtype: torch.dtype | None = resolve_amp(cfg.amp_dtype, self.device)
        self.nvtx = Nvtx(cfg.nvtx and self.device.type == "cuda")
        self.cuda_profile = CudaProfileRange(cfg.profile_range(), self.device)
        # where training stands (restored on resume)
        self.step = 0
        self.total_steps = 0
        self.counters = _Counters()
        # built by setup()
        self.is_set_up = False
        self.manifest_path: Path | None = None
        self.data_root: Path | None = None
        self.manifest: Manifest | None = None
        self.truth: HiddenTruth | None = None  # SynthFace's complete hidden labels, when the manifest has them
        self.loader: Loader | None = None
        self.relatedness: Relatedness | None = None
        self._train_rows: np.ndarray | None = None  # the training loader's rows, selected once (_training_rows)
        self.refresh: coupling.RelatednessRefresh | None = None  # --relatedness-refresh
        self.model: FaceBehaviorNet | None = None
        self.net: nn.Module | None = None  # the model as stepped: DDP-wrapped and/or compiled
        self.optimizer: torch.optim.Optimizer | None = None
        self.optimizer_impl: str | None = None
        self.schedule: WarmupCosine | None = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self.loss_fn: FaceBehaviorLoss | None = None
        self.loss_backend: str | None = None
        self.stepper: TrainStep | None = None
        # internal
        self._resume_state: dict[str, Any] | None = checkpoint  # read once, dropped after the restore
        self._pending_rng: dict[str, Any] | None = None  # this rank's RNG state, restored after the first batch
        self._log_handler: logging.Handler | None = None
        self._tensorboard: TensorBoardWriter | None = None  # main rank, when the tensorboard package is installed
        self._stop_signal: int | None = None
        self._old_handlers: dict[int, Any] = {}
        self._lock: RunLock | None = None  # the run folder's, held by the main rank until close()
        self._last_checkpoint: Path | None = resume_from  # the newest checkpoint known to hold finite state

    # ------------------------------------------------------------------------------------------------ set-up
    def setup(self) -> None:
        """Run folder, data, relatedness, model, optimizer and (when resuming) their saved state. Once only."""
        if self.is_set_up:
            return
        cfg = self.cfg
        if cfg.num_threads > 0:
            torch.set_num_threads(cfg.num_threads)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self._seed(cfg.seed)
        self._prepare_run_dir()
        self._prepare_data()
        self._prepare_relatedness()
        self._prepare_model()
        if self.resume_from is not None:
            self._restore(self._checkpoint())
        self._write_run_files()
        self.is_set_up = True

    def _seed(self, seed: int) -> None:
        import random

        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _prepare_run_dir(self) -> None:
        cfg = self.cfg
        if self.run_dir is None:
            name = cfg.name or datetime.now().strftime("%Y%m%d-%H%M%S")
            run_dir = Path(cfg.out_dir) / name
            if cfg.name is None:
                suffix = 1
                while run_dir.exists():  # two runs started within a second
                    run_dir = Path(cfg.out_dir) / f"{name}-{suffix}"
                    suffix += 1
            self.run_dir = Path(fdist.broadcast_object(str(run_dir)))
        if self.main_rank:
            self._claim_run_dir()
            (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            self._log_handler = add_file_log(self.run_dir / "train.log")
        fdist.barrier()

    def _claim_run_dir(self) -> None:
        """Lock the run folder for this run's life, refuse to start a new run over an old one, and remove what
        writers killed mid-write left behind (nobody else writes here once the lock is held)."""
        self._lock = RunLock(self.run_dir).acquire()
        if self.resume_from is None and holds_a_run(self.run_dir):
            if not self.cfg.resume:
                self._lock.release()
                self._lock = None
                raise ValueError(f"--name {self.run_dir.name}: {str(self.run_dir)!r} already holds a run; continue "
                                 f"it with --resume auto --name {self.run_dir.name}, or start a new one under "
                                 "another --name (or remove the folder)")
            self._truncate_metrics(0)  # --resume auto found no checkpoint: this run starts the log afresh
        remove_stale_files(self.run_dir)

    def _prepare_data(self) -> None:
        from .data import load_manifest
        from .data.pipeline import resolve_backend as resolve_loader

        cfg = self.cfg
        try:
            resolve_loader(cfg.loader_backend, self.device)
        except ValueError as exc:
            raise ValueError(f"--loader-backend {cfg.loader_backend}: {exc}") from None
        if cfg.manifest:
            manifest_path = Path(cfg.manifest)
        else:
            from .data.synthface import ensure_synthface

            out = default_synth_dir(cfg)
            if self.main_rank:
                t0 = time.perf_counter()
                log.info("SynthFace (%s, %d px, seed %d) in %s", cfg.synth_size, cfg.synth_image_size,
                         cfg.synth_seed, out)
                try:
                    ensure_synthface(out, size=cfg.synth_size, seed=cfg.synth_seed, image_size=cfg.synth_image_size)
                except ValueError as exc:
                    raise ValueError(f"SynthFace (--synth-size/--synth-image-size/--synth-dir): {exc}") from None
                log.info("SynthFace ready after %.1f s", time.perf_counter() - t0)
            fdist.barrier()
            manifest_path = out / "manifest.npz"
        self.manifest_path = manifest_path
        try:
            self.manifest = load_manifest(manifest_path)
        except ValueError as exc:
            raise ValueError(f"--manifest: {exc}") from None
        # Images are read under --data-root, else where the manifest was imported, else beside the manifest.
        self.data_root = image_root(self.manifest, manifest_path, cfg.data_root)
        source = ("--data-root" if cfg.data_root else
                  "the root the manifest records" if self.manifest.root else "the manifest's folder; --data-root")
        for note in preflight(cfg, self.manifest, manifest_path, self.data_root, root_source=source,
                              check_relatedness=self.resume_from is None):
            if self.main_rank:
                log.info("preflight: %s", note)
        self.truth = HiddenTruth.beside(manifest_path, self.manifest)

    def _build_train_loader(self):
        from .data.pipeline import build_loader

        cfg = self.cfg
        ratios = dict(zip(cfg.datasets, cfg.ratios)) if cfg.ratios else None
        try:
            return build_loader(
                self.manifest, self.data_root, batch_size=cfg.batch_size, image_size=cfg.image_size, train=True,
                split="train", datasets=list(cfg.datasets) or None, ratios=ratios,
                epoch_size=cfg.epoch_size or None, seed=cfg.seed, rank=self.env.rank,
                world_size=self.env.world_size, backend=cfg.loader_backend, num_workers=cfg.num_workers,
                device=self.device, dtype=image_dtype(self.device, self.amp_dtype),
                normalization=self.model.normalization)
        except ValueError as exc:
            raise ValueError(f"training data ({self.manifest_path}): {exc}") from None

    def _build_eval_loader(self, split: str, datasets: list[str]):
        from .data.pipeline import build_loader

        cfg = self.cfg
        return build_loader(
            self.manifest, self.data_root, batch_size=cfg.eval_batch_size, image_size=cfg.image_size, train=False,
            split=split, datasets=datasets, seed=cfg.seed, rank=self.env.rank, world_size=self.env.world_size,
            backend=cfg.loader_backend, num_workers=cfg.num_workers, device=self.device,
            dtype=image_dtype(self.device, self.amp_dtype), normalization=self.model.normalization)

    def _prepare_relatedness(self) -> None:
        from . import relatedness as rel_mod

        cfg = self.cfg
        if self.resume_from is not None:
            ckpt_rel = self._checkpoint().get("relatedness")
            if ckpt_rel is not None:  # the table the run started with, whatever --relatedness says now
                self.relatedness = rel_mod.Relatedness.from_json(ckpt_rel)
                return
        if cfg.relatedness == "prior":
            self.relatedness = rel_mod.prior()
        elif cfg.relatedness == "data":
            m = self.manifest
            rows = self._training_rows()
            self.relatedness = rel_mod.estimate(m.expr[rows], m.au[rows], m.au_mask[rows], m.va[rows],
                                                m.va_mask[rows], alpha=cfg.relatedness_alpha)
            self.relatedness.meta["manifest"] = str(self.manifest_path)
        else:
            path = Path(cfg.relatedness)
            if not path.is_file():
                raise ValueError(f"--relatedness: {cfg.relatedness!r} is neither 'prior', 'data' nor a file")
            self.relatedness = rel_mod.load(path, classes=EXPRESSIONS, aus=AUS)
        if cfg.relatedness_background != "off":
            if cfg.relatedness_background == "data":
                rows = self._training_rows()
                m = self.manifest
                rates, how = coupling.background_rates(m.expr[rows], m.au[rows], m.au_mask[rows], self.relatedness)
                log.info("background rates (--relatedness-background data): %s", ", ".join(
                    f"{a} {r:.3f} ({h})" for a, r, h in zip(AUS, rates, how)))
            else:
                rates = np.full(len(AUS), float(cfg.relatedness_background))
            try:
                self.relatedness = coupling.with_background(self.relatedness, rates)
            except ValueError as exc:
                raise ValueError(f"--relatedness-background {cfg.relatedness_background}: {exc}") from None

    def _training_rows(self) -> np.ndarray:
        """The rows the training loader reads (the train split of the datasets this run trains on)."""
        from .data.pipeline import select_rows

        if self._train_rows is None:
            cfg = self.cfg
            self._train_rows = select_rows(self.manifest, "train", list(cfg.datasets) or None,
                                           dict(zip(cfg.datasets, cfg.ratios)) if cfg.ratios else None)[0]
        return self._train_rows

    def _loss_weights(self) -> dict[str, float | None]:
        """The objective's weights: the configured ones, scaled by label scarcity (--coupling-scarcity-*)."""
        cfg = self.cfg
        weights = cfg.loss_weights()
        if cfg.coupling_scarcity_au > 0 or cfg.coupling_scarcity_expr > 0:
            m = self.manifest
            rows = self._training_rows()
            counts = coupling.label_counts(m.expr[rows], m.expr_mask[rows], m.au_mask[rows], len(EXPRESSIONS))
            scales = coupling.scarcity_scales(*counts, au=cfg.coupling_scarcity_au, expr=cfg.coupling_scarcity_expr)
            weights = coupling.scaled_weights(weights, scales)
            log.info("coupling scaled by label scarcity: into the AUs x%.3f (--coupling-scarcity-au %g), into the "
                     "expressions x%.3f (--coupling-scarcity-expr %g)", scales["au"], cfg.coupling_scarcity_au,
                     scales["expression"], cfg.coupling_scarcity_expr)
        return weights

    def _au_pos_weight(self) -> np.ndarray | None:
        """The weights of the AUs' positive labels in L_au (--au-pos-weight), from the training labels."""
        if self.cfg.au_pos_weight == "off":
            return None
        m = self.manifest
        rows = self._training_rows()
        weights = coupling.balanced_pos_weight(m.au[rows], m.au_mask[rows])
        log.info("AU positive weights (--au-pos-weight balanced): %s",
                 ", ".join(f"{a} {w:.2f}" for a, w in zip(AUS, weights)))
        return weights

    def _prepare_model(self) -> None:
        cfg = self.cfg
        check_physical_limits(
            dict(trunk=cfg.trunk, num_classes=len(EXPRESSIONS), num_aus=len(AUS), channels_last=cfg.channels_last,
                 trunk_kwargs=cfg.trunk_kwargs), image_size=cfg.image_size, batch_size=cfg.batch_size,
            eval_batch_size=cfg.eval_batch_size, device=self.device,
            element_size=torch.finfo(self.amp_dtype).bits // 8 if self.amp_dtype else 4)
        model = build_model(cfg.trunk, num_classes=len(EXPRESSIONS), num_aus=len(AUS),
                            pretrained=cfg.pretrained_value(), channels_last=cfg.channels_last,
                            head_dropout=cfg.head_dropout, trunk_kwargs=cfg.trunk_kwargs)
        model.to(self.device)
        self.model = model
        self.loader = self._build_train_loader()  # after the model: images normalised as its trunk expects
        # Every rank built the same initial model; from here on each draws its own random numbers (dropout).
        torch.manual_seed(cfg.seed + 1_000_003 * self.env.rank)
        self.optimizer, self.optimizer_impl = build_optimizer(cfg, model, self.device)
        self.total_steps = cfg.steps if cfg.steps > 0 else max(1, math.ceil(cfg.epochs * len(self.loader)))
        self.schedule = WarmupCosine(self.total_steps, cfg.warmup_steps, cfg.min_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
        weights = LossWeights(**self._loss_weights())
        self.loss_fn = FaceBehaviorLoss(self.relatedness, weights=weights, temperature=cfg.temperature,
                                        backend=cfg.loss_backend, classes=EXPRESSIONS, aus=AUS,
                                        au_pos_weight=self._au_pos_weight()).to(self.device)
        if cfg.relatedness_refresh > 0:
            self.refresh = coupling.RelatednessRefresh(self.loss_fn.relatedness, every=cfg.relatedness_refresh,
                                                       confidence=cfg.refresh_confidence,
                                                       strength=cfg.refresh_strength)
        from .losses import resolve_backend

        self.loss_backend = resolve_backend(cfg.loss_backend, self.device)
        net: nn.Module = model
        if self.env.distributed:
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.torchcompile:
            net = torch.compile(net, mode=None if cfg.compile_mode == "default" else cfg.compile_mode)
        self.net = net
        self.stepper = TrainStep(net, self.loss_fn, self.optimizer, self.scheduler, device=self.device,
                                 amp_dtype=self.amp_dtype, grad_clip=cfg.grad_clip, nvtx=cfg.nvtx,
                                 observe=self.refresh and self.refresh.observe)
        self.scaler = self.stepper.scaler

    def _checkpoint(self) -> dict[str, Any]:
        """The checkpoint being resumed, read from disk at most once."""
        if self._resume_state is None:
            self._resume_state = load_checkpoint(self.resume_from, map_location="cpu")
        return self._resume_state

    def _restore(self, ckpt: Mapping[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        # The schedule follows this run's settings (the same for an exact resume; a longer --steps extends it).
        vars(self.schedule).update(vars(WarmupCosine(self.total_steps, self.cfg.warmup_steps, self.cfg.min_lr_ratio)))
        if any(base != self.cfg.lr for base in self.scheduler.base_lrs):
            # --lr given now rules over the checkpoint's (e.g. lowered after a non-finite stop).
            log.info("--lr %g replaces the checkpoint's %g", self.cfg.lr, self.scheduler.base_lrs[0])
            self.scheduler.base_lrs = [self.cfg.lr] * len(self.optimizer.param_groups)
            for group in self.optimizer.param_groups:
                group["initial_lr"] = self.cfg.lr
                group["lr"] = self.cfg.lr * self.schedule(self.scheduler.last_epoch)
        if ckpt.get("scaler") is not None and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        self.counters = _Counters.from_dict(ckpt.get("counters", {}))
        # A resume is a deliberate restart (often with another --lr or --amp-dtype after a non-finite stop): the
        # run gets its full --max-nonfinite again.
        self.counters.nonfinite_consecutive = 0
        same_world = int(ckpt.get("world_size", 1)) == self.env.world_size
        saved_refresh = ckpt.get("refresh") or []
        if self.refresh is not None and saved_refresh:
            # The re-estimated table (the same on every rank), and this rank's sums when the world is the same.
            own = saved_refresh[self.env.rank] if same_world and len(saved_refresh) == self.env.world_size else None
            self.refresh.load_state_dict(own or {**saved_refresh[0], "counts": None, "sums": None})
        elif saved_refresh:
            log.warning("the checkpoint's relatedness table was re-estimated during training; without "
                        "--relatedness-refresh this run continues from the table it started with")
        loaders, rngs = ckpt.get("loader") or [], ckpt.get("rng") or []
        if same_world and len(loaders) == self.env.world_size:
            self.loader.load_state_dict(loaders[self.env.rank])
        elif loaders:
            log.warning("checkpoint was written by %s processes, this run has %d: the data order restarts at the "
                        "saved epoch (the resume is not exact)", ckpt.get("world_size"), self.env.world_size)
            self.loader.set_epoch(int(loaders[0]["epoch"]))
        if same_world and len(rngs) == self.env.world_size:
            # Applied after the first batch is fetched: creating the loader's iterator draws from torch's RNG.
            self._pending_rng = rngs[self.env.rank]
        if self.main_rank:
            self._truncate_metrics(self.step)
            BestCheckpoint(self.run_dir).forget_after(self.step)
        self._resume_state = None  # free the host copy
        log.info("resumed from %s at step %d", self.resume_from, self.step)

    def _truncate_metrics(self, step: int) -> None:
        """Drop log records newer than the checkpoint (written before a crash), so the log reads as one run."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if int(rec.get("step", 0)) <= step:
                keep.append(line)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(k + "\n" for k in keep))
        os.replace(tmp, path)

    def _write_run_files(self) -> None:
        if not self.main_rank:
            return
        from . import relatedness as rel_mod

        (self.run_dir / "config.toml").write_text(dump_toml(self.cfg))
        rel_mod.save(self.relatedness, self.run_dir / "relatedness.json")
        info = {
            "device": str(self.device), "world_size": self.env.world_size, "backend": self.env.backend,
            "amp_dtype": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "none",
            "optimizer": f"{self.cfg.opt} ({self.optimizer_impl})", "loss_backend": self.loss_backend,
            "loader_backend": self.loader.backend, "total_steps": self.total_steps,
            "steps_per_epoch": len(self.loader), "manifest": str(self.manifest_path),
            "parameters": sum(p.numel() for p in self.model.parameters()), "torch": torch.__version__,
            # the objective's weights as applied (after --coupling-scarcity-* scaling)
            "loss_weights": dict(zip(TERMS, self.loss_fn.weights.vector())),
            "au_pos_weight": None if self.loss_fn.au_pos_weight is None else dict(
                zip(AUS, self.loss_fn.au_pos_weight.tolist())),
        }
        (self.run_dir / "run.json").write_text(json.dumps(info, indent=1))
        log.info("run folder %s; %s", self.run_dir, ", ".join(f"{k}={v}" for k, v in info.items()))
        if tensorboard_available():
            # On resume, events past the checkpoint (written before a crash) are hidden, as metrics.jsonl drops them.
            self._tensorboard = TensorBoardWriter(self.run_dir / "tensorboard",
                                                  purge_step=self.step + 1 if self.resume_from else None)
            self._tensorboard.write_config(dump_toml(self.cfg), self.step)

    def _record(self, rec: Mapping[str, Any]) -> None:
        """Append a record to metrics.jsonl (the source of truth) and to the TensorBoard events (main rank)."""
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self._tensorboard is not None:
            self._tensorboard.write(rec)

    def _trained_on(self) -> dict[str, Any]:
        """What the model is trained on, as the checkpoint records it."""
        from .data.synthface import DATASETS as SYNTHFACE_DATASETS

        m = self.manifest
        train = m.split_rows("train") if "train" in m.splits else np.zeros(len(m), bool)
        names = list(self.cfg.datasets) or [d for i, d in enumerate(m.datasets) if (train & (m.dataset == i)).any()]
        synthetic = "synthface" in m.meta and set(names) <= {d.name for d in SYNTHFACE_DATASETS}
        return training_record(self.model, datasets=names, image_size=self.cfg.image_size, expressions=m.expressions,
                               aus=m.aus, manifest=self.manifest_path, data_root=self.data_root, synthface=synthetic)

    # ------------------------------------------------------------------------------------------------ signals
    def _on_signal(self, signum: int, frame) -> None:
        if self._stop_signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self._stop_signal = signum
        log.warning("received %s: finishing the current step, then saving a checkpoint",
                    signal.Signals(signum).name)

    def _install_signals(self) -> None:
        for sig in STOP_SIGNALS:
            try:
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread (e.g. called from a worker thread): no handlers
                pass

    def _restore_signals(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    # ------------------------------------------------------------------------------------------------ the loop
    def train(self) -> str:
        """Train to the configured length (setting up first if needed); returns ``"done"``, ``"paused"`` or
        ``"interrupted:<SIG>"``."""
        self.setup()
        cfg, started, status = self.cfg, self.step, "done"
        window = RunningWindow(1 + len(TERMS), self.device)
        batches = self._batches()
        self.net.train()
        with progress_bar(self.total_steps, self.step, enabled=cfg.progress and self.main_rank) as bar:
            try:
                while self.step < self.total_steps:
                    self.cuda_profile.before_step(self.step)
                    batch, data_s = next(batches)
                    values, bad = self.stepper.forward_backward(batch)
                    skip, stop = self._agree(bad)  # across ranks; the one host sync of a step
                    self.stepper.apply(skip)
                    self.step += 1
                    self._count(values, skip, batch["image"].shape[0] * self.env.world_size, data_s, window)
                    bar.update(1)
                    self.cuda_profile.after_step(self.step)
                    if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                        self._log_window(window, bar)
                    if self.counters.nonfinite_consecutive >= cfg.max_nonfinite:
                        self._stop_diverged()
                    if stop:
                        status = self._interrupted()
                        break
                    if self.step < self.total_steps:
                        validating = bool(cfg.eval_every) and self.step % cfg.eval_every == 0
                        if self.step % cfg.ckpt_every == 0 or validating:
                            saved = self.save()  # an evaluated step has its checkpoint: best.pt may be it
                        if validating:
                            self.validate(saved)
                        if cfg.max_steps_per_run and self.step - started >= cfg.max_steps_per_run:
                            status = "paused"
                            break
            except Exception:
                if self._stop_signal is None:
                    raise
                # A signal also reaches the loader's worker processes; their exit is expected here.
                log.warning("input pipeline stopped after the signal; saving the last completed step")
                status = self._interrupted()
        if status.startswith("interrupted"):
            # Save, then stop the loader's workers (they ignore the signal); a worker's exit is no news now.
            with sigchld_deferred():
                self.save()
                self.loader.close()
        else:
            self.save()
        return status

    def _batches(self) -> Iterator[tuple[Mapping[str, Tensor], float]]:
        """Training batches across epochs, each with the seconds spent waiting for it."""
        it = iter(self.loader)
        while True:
            t0 = time.perf_counter()
            with self.nvtx.range("data"):
                try:
                    batch = next(it)
                except StopIteration:  # epoch boundary: the loader moves on to the next epoch itself
                    it = iter(self.loader)
                    batch = next(it)
            if self._pending_rng is not None:  # resuming: now that the iterator exists (see _restore)
                restore_rng(self._pending_rng)
                self._pending_rng = None
            yield batch, time.perf_counter() - t0

    def _agree(self, bad: Tensor) -> tuple[bool, bool]:
        """``(skip, stop)``, the same on every rank: skip the update when any rank's loss or gradient was not
        finite, stop when any rank received a signal. Reading the flags is the one host sync of a step."""
        # a fill on the device, not a copy from host memory (which would wait for the stream: a second sync)
        stopping = bad.new_full((), float(self._stop_signal is not None), dtype=torch.float32)
        flags = fdist.all_reduce_max(torch.stack([bad.float(), stopping]))
        skip, stop = (f > 0 for f in flags.tolist())
        return skip, stop

    def _count(self, values: Tensor, skip: bool, images: int, data_s: float, window: RunningWindow) -> None:
        """The counters and the log window after a step; a skipped step is reported, and left out of the means."""
        self.counters.images_seen += images
        window.add(None if skip else values, images, data_s)
        if not skip:
            self.counters.nonfinite_consecutive = 0
            return
        self.counters.nonfinite_total += 1
        self.counters.nonfinite_consecutive += 1
        log.warning("step %d: non-finite loss or gradient (%s); update skipped (%d in a row, %d in all)",
                    self.step, format_terms(dict(zip(("total", *TERMS), values.tolist()))),
                    self.counters.nonfinite_consecutive, self.counters.nonfinite_total)

    def _log_window(self, window: RunningWindow, bar: tqdm) -> None:
        """A metrics.jsonl record of the steps since the last one, its loss means over every rank's samples."""
        w = window.take(fdist.all_reduce_mean)  # under DDP one small collective per record
        terms = dict(zip(("total", *TERMS), w.means)) if w.means is not None else None
        lr = self.optimizer.param_groups[0]["lr"]
        rec = {
            "kind": "train", "step": self.step, "epoch": self.loader.epoch, "time": time.time(), "lr": lr,
            "images_per_s": w.images_per_s, "data_wait_fraction": w.data_wait_fraction, "steps": w.steps,
            "finite_steps": w.finite_steps, "nonfinite_total": self.counters.nonfinite_total, "loss": terms,
        }
        if self.main_rank:
            self._record(rec)
        bar.set_postfix_str(f"{w.images_per_s:.0f} img/s lr={lr:.2e} "
                            + (format_terms(terms) if terms else "non-finite"), refresh=False)

    def _stop_diverged(self) -> NoReturn:
        saved = self.save()  # None when the weights themselves are no longer finite
        ckpt = fdist.broadcast_object(str(saved or self._last_checkpoint or ""))
        where = (f"the last finite weights are in {ckpt}; continue from it with a lower --lr or another "
                 f"--amp-dtype (--resume {ckpt} --lr ...), or check the data" if ckpt else
                 "no checkpoint of this run holds finite weights: start afresh with a lower --lr")
        raise NonFiniteLossError(
            f"stopped at step {self.step}: {self.counters.nonfinite_consecutive} consecutive steps had a "
            f"non-finite loss or gradient (--max-nonfinite {self.cfg.max_nonfinite}); {where}")

    def _interrupted(self) -> str:
        # A signal that reached another rank stops this one too: it is named SIGTERM here.
        return f"interrupted:{signal.Signals(self._stop_signal or signal.SIGTERM).name}"

    # ------------------------------------------------------------------------------------------------ saving
    def save(self) -> Path | None:
        """Checkpoint this step (every rank contributes its loader position and RNG state; rank 0 writes)."""
        loader_states = fdist.all_gather_objects(self.loader.state_dict())
        rng_states = fdist.all_gather_objects(capture_rng())
        # Each rank's running sums are its own until the next update: keep them per rank, like the loader's.
        refresh = fdist.all_gather_objects(self.refresh.state_dict()) if self.refresh is not None else None
        path = None
        bad = nonfinite_tensors(self.model, self.optimizer) if self.main_rank else []
        if bad:
            # Never overwrite the last usable state with a blown-up one.
            log.warning("step %d: no checkpoint: %d tensors are not finite (%s%s); the newest checkpoint with "
                        "finite state is %s", self.step, len(bad), ", ".join(bad[:3]), " ..." if len(bad) > 3 else "",
                        self._last_checkpoint or "none")
        elif self.main_rank:
            path = checkpoint_path(self.run_dir, self.step)
            with sigchld_deferred():  # a loader worker's exit must not break into the write
                save_checkpoint(
                    path, model=self.model, step=self.step, optimizer=self.optimizer, scheduler=self.scheduler,
                    scaler=self.scaler, loader_states=loader_states, rng_states=rng_states,
                    config=self.cfg.to_dict(), relatedness=self.relatedness.to_json(),
                    world_size=self.env.world_size, counters=asdict(self.counters), trained_on=self._trained_on(),
                    refresh=refresh)
            self._last_checkpoint = path
            prune_checkpoints(self.run_dir, self.cfg.keep_checkpoints, protect=(path,))
            log.info("checkpoint %s", path)
        fdist.barrier()
        return path

    # ------------------------------------------------------------------------------------------------ evaluation
    def _score(self, split: str) -> dict[str, Any] | None:
        """:func:`evaluate` on ``split`` of the datasets that have it; ``None`` when none has."""
        present, _ = datasets_with_split(self.manifest, split)
        if not present:
            return None
        if self.env.distributed:
            # BN running statistics drift apart after the last step (each rank saw its own batch): score rank 0's.
            for b in self.model.buffers():
                torch.distributed.broadcast(b, 0)
        loader = self._build_eval_loader(split, present)
        try:
            result = evaluate(self.model, self.manifest, batches=loader, split=split,
                              device=self.device, amp_dtype=self.amp_dtype, truth=self.truth,
                              train_manifest=self.manifest, train_datasets=self.cfg.datasets or None,
                              distributed=self.env.distributed, nvtx="eval_forward" if self.nvtx.enabled else None)
        finally:
            loader.close()
        result["step"] = self.step
        return result

    def _report(self, result: Mapping[str, Any]) -> None:
        """A metrics.jsonl record of an evaluation and its table in the log (main rank)."""
        if self.main_rank:
            self._record({"kind": "eval", "step": self.step, "split": result["split"], "time": time.time(),
                          "results": result})
            for line in format_report(result).splitlines():
                log.info(line)

    def validate(self, checkpoint: Path | None, report: bool = True) -> dict[str, Any] | None:
        """Score the model on the ``val`` split and offer ``checkpoint`` (this step's) as best.pt by its
        validation score (:mod:`fbn_fast.selection`); ``None`` when no dataset has a ``val`` split.
        ``report``: write its metrics.jsonl record and log its table."""
        result = self._score(SELECTION_SPLIT)
        if result is None:
            return None
        result["selection"] = validation_score(result)
        if report:
            self._report(result)
        if self.main_rank and result["selection"] is not None and checkpoint is not None:
            BestCheckpoint(self.run_dir).offer(checkpoint, self.step, result["selection"])
        fdist.barrier()
        return result

    def run_evaluation(self) -> dict[str, Any]:
        """The end of a run: the ``val`` split chooses best.pt among the evaluated steps and this one, then
        ``--eval-split`` of the datasets that have it scores the chosen model (the others are reported as
        "no <split> split"); writes eval.json and a metrics.jsonl record."""
        split = self.cfg.eval_split
        val = self.validate(checkpoint_path(self.run_dir, self.step), report=False)  # one record: the result's
        best = BestCheckpoint(self.run_dir)
        chosen = best.record()
        if chosen is not None and int(chosen["step"]) != self.step:
            # The chosen weights are scored; the run's last checkpoint keeps the last ones for a resume.
            self.model.load_state_dict(load_checkpoint(best.path, map_location=self.device)["model"])
        if split == SELECTION_SPLIT and val is not None and (chosen is None or int(chosen["step"]) == self.step):
            result = dict(val)
        else:
            result = self._score(split)
        if result is None:  # no dataset has the split
            _, absent = datasets_with_split(self.manifest, split)
            result = {"split": split, "rows": 0, "image_size": self.cfg.image_size, "seconds": 0.0,
                      "datasets": {}, "bad_images": {}, "no_split": {d: f"no {split} split" for d in absent}}
        result["step"] = int(chosen["step"]) if chosen is not None else self.step
        result["model"] = "best.pt" if chosen is not None else "last step"
        if chosen is not None:
            result["best"] = chosen
        if val is not None:
            result["validation"] = val
        self._report(result)
        if self.main_rank:
            tmp = self.run_dir / "eval.json.tmp"
            tmp.write_text(json.dumps(result, indent=1))
            os.replace(tmp, self.run_dir / "eval.json")
        return result

    def write_plots(self, result: Mapping[str, Any] | None) -> list[Path]:
        """Loss curves from ``metrics.jsonl``; per-AU F1 bars and the expression confusion from ``result``."""
        from .plots import plot_confusion, plot_curves, plot_per_au_f1

        out = self.run_dir / "plots"
        out.mkdir(exist_ok=True)
        written = []
        records = [json.loads(line) for line in (self.run_dir / "metrics.jsonl").read_text().splitlines()
                   if line.strip()] if (self.run_dir / "metrics.jsonl").is_file() else []
        train = [r for r in records if r.get("kind") == "train" and r.get("loss")]
        if train:
            steps = [r["step"] for r in train]
            series = {k: (steps, [r["loss"][k] for r in train]) for k in ("total", *TERMS)
                      if any(r["loss"][k] > 0 for r in train)}
            written.append(plot_curves(series, out / "loss.png", title="training loss terms"))
        if result:
            # Per dataset only: the pooled groups of the hidden-truth section would count images twice.
            full = result.get("truth") or result["datasets"]
            section = {k: v for k, v in full.items() if k in self.manifest.datasets}
            split = result["split"]
            label = f"all {split} images, complete labels" if "truth" in result else f"labelled {split} sets"
            au = {name: tasks["au"]["per_au_f1"] for name, tasks in section.items() if "au" in tasks}
            if au:
                written.append(plot_per_au_f1(au, AUS, out / "au_f1.png", title=f"per-AU F1 ({label})"))
            cms = [np.asarray(tasks["expression"]["confusion"]) for tasks in section.values() if "expression" in tasks]
            if cms:
                written.append(plot_confusion(sum(cms), EXPRESSIONS, out / "confusion.png",
                                              title=f"expression confusion ({label})"))
        return written

    # ------------------------------------------------------------------------------------------------ all of it
    def run(self) -> str:
        """Set up (unless done), train, evaluate, plot; returns the training status."""
        self.setup()
        self._install_signals()
        t0 = time.perf_counter()
        try:
            status = self.train()
        finally:
            self._restore_signals()
        train_s = time.perf_counter() - t0
        if self.main_rank:
            log.info("training %s at step %d/%d after %.1f s (%d non-finite steps skipped)", status, self.step,
                     self.total_steps, train_s, self.counters.nonfinite_total)
            log.info(self.loader.summary())
        result = None
        if status == "done" and self.cfg.evaluate:
            result = self.run_evaluation()
            if not result["datasets"]:  # no dataset has --eval-split: plot the validation scores
                result = result.get("validation")
        if self.main_rank and self.cfg.plots and status == "done":
            try:
                for p in self.write_plots(result):
                    log.info("plot %s", p)
            except Exception as exc:  # a plot must never cost a finished run
                log.warning("plots failed: %s", exc)
        return status

    def close(self) -> None:
        # Drop the DDP wrapper (its reducer holds the process group) before the group is destroyed.
        self.net = self.stepper = None
        if self.loader is not None:
            self.loader.close()
        if self._log_handler is not None:
            remove_log_handler(self._log_handler)
            self._log_handler = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None


# ---------------------------------------------------------------------------------------------------- CLI
def _resume_candidates(cfg: TrainConfig) -> tuple[list[Path], Path | None, str | None]:
    """``(checkpoints to try, newest first; their run folder; a note)`` for ``--resume``: no checkpoints for a
    fresh run, with a note when ``--resume auto`` found nothing to resume."""
    if not cfg.resume:
        return [], None, None
    newest_first = lambda run: [p for _, p in reversed(find_checkpoints(run))]
    if cfg.resume == "auto":
        if cfg.name:
            run_dir = Path(cfg.out_dir) / cfg.name
            found = newest_first(run_dir)
            if not found:
                return [], None, f"--resume auto: {str(run_dir)!r} has no checkpoint to resume; starting a new run"
            return found, run_dir, None
        runs = [p for p in Path(cfg.out_dir).glob("*") if p.is_dir() and latest_checkpoint(p)]
        if not runs:
            return [], None, (f"--resume auto: no run under {str(cfg.out_dir)!r} has a checkpoint to resume; "
                              "starting a new run")
        run_dir = max(runs, key=lambda p: latest_checkpoint(p).stat().st_mtime)
        return newest_first(run_dir), run_dir, None
    path = Path(cfg.resume)
    if path.is_dir():
        found = newest_first(path)
        if not found:
            raise ValueError(f"--resume: run folder {str(path)!r} has no checkpoints")
        return found, path, None
    if path.is_file():
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return [path], run_dir, None
    raise ValueError(f"--resume: {cfg.resume!r} is neither 'auto', a run folder nor a checkpoint file")


def _load_newest_intact(candidates: list[Path]) -> tuple[Path | None, dict[str, Any] | None, list[str]]:
    """The first of ``candidates`` that loads and matches its checksum: ``(path, contents, warnings about the
    newer ones skipped)``; ``ValueError`` when none does."""
    skipped: list[tuple[Path, str]] = []
    for path in candidates:
        try:
            state = load_checkpoint(path)
        except ValueError as exc:
            skipped.append((path, str(exc)))
            continue
        notes = [f"{reason}; resuming from {path}, the newest intact checkpoint, instead of {bad.name}"
                 for bad, reason in skipped]
        return path, state, notes
    if skipped:
        raise ValueError("--resume: no intact checkpoint: " + "; ".join(reason for _, reason in skipped))
    return None, None, []


def resolve_resume(cfg: TrainConfig) -> tuple[Path | None, Path | None, dict[str, Any] | None, list[str]]:
    """What ``--resume`` continues: ``(checkpoint, run folder, its contents, warnings)``, the checkpoint being the
    newest intact one (a corrupt newer one is skipped with a warning); ``(None, None, None, notes)`` for a fresh
    run. ``ValueError`` when nothing usable is there."""
    candidates, run_dir, note = _resume_candidates(cfg)
    ckpt, state, notes = _load_newest_intact(candidates)
    return ckpt, (run_dir if ckpt is not None else None), state, notes + ([note] if note else [])


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m fbn_fast.train`` / ``fbn-train``; returns the exit status (see module doc)."""
    values, control, parser = explicit_values(argv)
    recipe, print_config = control["config"], control["print_config"]
    state, notes = None, []
    try:
        cfg = TrainConfig.from_dict(values, where=str(recipe or "options"))
        ckpt, run_dir, state, notes = resolve_resume(cfg)
        if ckpt is not None:
            # Continue with the run's own settings; options given now (e.g. a longer --steps) override them.
            saved = {k: v for k, v in saved_values(state["config"]).items()
                     if k in TrainConfig.fields() and k not in PER_INVOCATION}
            cfg = TrainConfig.from_dict({**saved, **values}, where=f"{ckpt} + options")
    except ValueError as exc:
        parser.error(str(exc))
    if print_config:
        print(dump_toml(cfg))
        return EXIT_OK

    rank = int(os.environ.get("RANK", "0") or 0)
    configure_console_logging(rank)
    for line in notes:
        log.warning("%s", line)
    try:
        env = fdist.init_distributed(cfg.device)
    except ValueError as exc:
        parser.error(str(exc))
    trainer = None
    try:
        trainer = Trainer(cfg, env, resume_from=ckpt, run_dir=run_dir, checkpoint=state)
        state = None  # the trainer holds it until restored, then frees it
        status = trainer.run()
        if status.startswith("interrupted"):
            name = status.split(":", 1)[1]
            code = signal_exit_status(signal.Signals[name])
            log.warning("stopped by %s at step %d; checkpoint saved (exit status %d). Continue with: python -m "
                        "fbn_fast.train --resume %s", name, trainer.step, code, trainer.run_dir)
            return code
        if status == "paused":
            log.info("paused at step %d; continue with --resume %s", trainer.step, trainer.run_dir)
        elif env.is_main:
            log.info("done: %s", trainer.run_dir)
        return EXIT_OK
    except KeyboardInterrupt:  # a second signal while stopping: out now, without a checkpoint of this step
        signum = (trainer and trainer._stop_signal) or signal.SIGINT
        log.error("stopped by a second %s without saving; the newest checkpoint is %s",
                  signal.Signals(signum).name, (trainer and trainer._last_checkpoint) or "none")
        return 128 + int(signum)
    except Exception as exc:  # every fatal error: one line (stderr and train.log), its class's exit status
        return report_fatal(exc, debug=cfg.debug)
    finally:
        if trainer is not None:
            trainer.close()
        fdist.cleanup()


def cli() -> NoReturn:
    """``python -m fbn_fast.train`` / ``fbn-train``: :func:`main`, then :func:`fbn_fast.distributed.exit_process`."""
    fdist.exit_process(main())


if __name__ == "__main__":
    cli()
