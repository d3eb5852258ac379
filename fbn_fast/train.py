"""``python -m fbn_fast.train``: train FaceBehaviorNet, evaluate it, and write a run folder.

With no options it runs the default job on whatever the machine has: it generates the small SynthFace if it
is not cached, trains the ``small`` trunk at 64 px, evaluates every dataset's test split (plus zero-shot
compound expressions) and writes ``runs/<timestamp>/``:

======================  ================================================================================
``config.toml``         the resolved recipe (rerun with ``--config runs/<x>/config.toml``)
``relatedness.json``    the relatedness table used (prior, estimated from the training split, or a file)
``metrics.jsonl``       one JSON record per log interval (step, epoch, lr, images/s, every loss term,
                        skipped non-finite steps) and one per evaluation
``eval.json``           the last evaluation: per-dataset metrics of method.md §5
``checkpoints/``        ``step_<N>.pt`` every ``--ckpt-every`` steps, at the end and on SIGINT/SIGTERM
``plots/``              ``loss.png``, ``au_f1.png``, ``confusion.png``
``train.log``           the log
======================  ================================================================================

Multi-GPU: ``torchrun --nproc_per_node N -m fbn_fast.train ...`` (see ``training/launch_ddp.sh``): one process
per device, each reading its own shard; NCCL on GPUs, gloo on CPUs.

Exit status: 0 done (or paused by ``--max-steps-per-run``), 2 bad options, 3 stopped after
``--max-nonfinite`` consecutive non-finite losses, 128+N stopped by signal N (SIGINT 130, SIGTERM 143) after
saving a checkpoint; continue with ``--resume auto --name <run>`` or ``--resume <run folder>``.
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

from . import distributed as fdist
from .checkpoint import (
    capture_rng,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    restore_rng,
    save_checkpoint,
)
from .config import TrainConfig, dump_toml, explicit_values
from .data.synthface import default_synth_dir
from .evaluate import evaluate, format_report
from .inference import HiddenTruth, image_dtype
from .labels import AUS, EXPRESSIONS
from .losses import TERMS, FaceBehaviorLoss, LossWeights
from .model import FaceBehaviorNet, build_model
from .optim import WarmupCosine, build_optimizer, resolve_amp
from .progress import (
    RunningWindow,
    add_file_log,
    configure_console_logging,
    format_terms,
    progress_bar,
    remove_log_handler,
)
from .step import CudaProfileRange, Nvtx, TrainStep

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
]

EXIT_OK, EXIT_USAGE, EXIT_DIVERGED = 0, 2, 3
#: Settings of one invocation that a resumed run does not inherit from its checkpoint.
PER_INVOCATION = ("resume", "max_steps_per_run", "cuda_profile_steps", "progress")


class NonFiniteLossError(RuntimeError):
    """Raised when ``--max-nonfinite`` consecutive steps had a non-finite loss or gradient."""


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
        self._stop_signal: int | None = None
        self._old_handlers: dict[int, Any] = {}

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
            (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            self._log_handler = add_file_log(self.run_dir / "train.log")
        fdist.barrier()

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
        self.data_root = Path(cfg.data_root) if cfg.data_root else manifest_path.parent
        try:
            self.manifest = load_manifest(manifest_path)
        except ValueError as exc:
            raise ValueError(f"--manifest: {exc}") from None
        unknown = [d for d in cfg.datasets if d not in self.manifest.datasets]
        if unknown:
            raise ValueError(f"--datasets: {unknown} are not in {manifest_path}, which has "
                             f"{list(self.manifest.datasets)}")
        self.truth = HiddenTruth.beside(manifest_path, self.manifest)
        self.loader = self._build_train_loader()

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
                device=self.device, dtype=image_dtype(self.device, self.amp_dtype))
        except ValueError as exc:
            raise ValueError(f"training data ({self.manifest_path}): {exc}") from None

    def _build_eval_loader(self):
        from .data.pipeline import build_loader

        cfg = self.cfg
        return build_loader(
            self.manifest, self.data_root, batch_size=cfg.eval_batch_size, image_size=cfg.image_size, train=False,
            split=cfg.eval_split, seed=cfg.seed, rank=self.env.rank, world_size=self.env.world_size,
            backend=cfg.loader_backend, num_workers=cfg.num_workers, device=self.device,
            dtype=image_dtype(self.device, self.amp_dtype))

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
            rows = m.split_rows("train")
            self.relatedness = rel_mod.estimate(m.expr[rows], m.au[rows], m.au_mask[rows], m.va[rows],
                                                m.va_mask[rows], alpha=cfg.relatedness_alpha)
            self.relatedness.meta["manifest"] = str(self.manifest_path)
        else:
            path = Path(cfg.relatedness)
            if not path.is_file():
                raise ValueError(f"--relatedness: {cfg.relatedness!r} is neither 'prior', 'data' nor a file")
            self.relatedness = rel_mod.load(path, classes=EXPRESSIONS, aus=AUS)

    def _prepare_model(self) -> None:
        cfg = self.cfg
        model = build_model(cfg.trunk, num_classes=len(EXPRESSIONS), num_aus=len(AUS),
                            pretrained=cfg.pretrained_value(), channels_last=cfg.channels_last,
                            head_dropout=cfg.head_dropout, trunk_kwargs=cfg.trunk_kwargs)
        model.to(self.device)
        self.model = model
        # Every rank built the same initial model; from here on each draws its own random numbers (dropout).
        torch.manual_seed(cfg.seed + 1_000_003 * self.env.rank)
        self.optimizer, self.optimizer_impl = build_optimizer(cfg, model, self.device)
        self.total_steps = cfg.steps if cfg.steps > 0 else max(1, math.ceil(cfg.epochs * len(self.loader)))
        self.schedule = WarmupCosine(self.total_steps, cfg.warmup_steps, cfg.min_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
        weights = LossWeights(ca=cfg.lambda_ca, dm=cfg.lambda_dm, ev=cfg.lambda_ev)
        self.loss_fn = FaceBehaviorLoss(self.relatedness, weights=weights, temperature=cfg.temperature,
                                        backend=cfg.loss_backend, classes=EXPRESSIONS, aus=AUS).to(self.device)
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
                                 amp_dtype=self.amp_dtype, grad_clip=cfg.grad_clip, nvtx=cfg.nvtx)
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
        if ckpt.get("scaler") is not None and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        self.counters = _Counters.from_dict(ckpt.get("counters", {}))
        same_world = int(ckpt.get("world_size", 1)) == self.env.world_size
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
        }
        (self.run_dir / "run.json").write_text(json.dumps(info, indent=1))
        log.info("run folder %s; %s", self.run_dir, ", ".join(f"{k}={v}" for k, v in info.items()))

    # ------------------------------------------------------------------------------------------------ signals
    def _on_signal(self, signum: int, frame) -> None:
        if self._stop_signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self._stop_signal = signum
        log.warning("received %s: finishing the current step, then saving a checkpoint",
                    signal.Signals(signum).name)

    def _install_signals(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
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
                        if self.step % cfg.ckpt_every == 0:
                            self.save()
                        if cfg.eval_every and self.step % cfg.eval_every == 0:
                            self.run_evaluation()
                        if cfg.max_steps_per_run and self.step - started >= cfg.max_steps_per_run:
                            status = "paused"
                            break
            except Exception:
                if self._stop_signal is None:
                    raise
                # A signal also reaches the loader's worker processes; their exit is expected here.
                log.warning("input pipeline stopped after the signal; saving the last completed step")
                status = self._interrupted()
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
        stopping = torch.tensor(float(self._stop_signal is not None), device=bad.device)
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
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
        bar.set_postfix_str(f"{w.images_per_s:.0f} img/s lr={lr:.2e} "
                            + (format_terms(terms) if terms else "non-finite"), refresh=False)

    def _stop_diverged(self) -> NoReturn:
        self.save()
        raise NonFiniteLossError(
            f"stopped at step {self.step}: {self.counters.nonfinite_consecutive} consecutive steps had a "
            f"non-finite loss or gradient (--max-nonfinite {self.cfg.max_nonfinite}); the last good weights "
            f"are saved in {self.run_dir / 'checkpoints'}. Lower --lr, use --amp-dtype bf16/none, or check the data")

    def _interrupted(self) -> str:
        # A signal that reached another rank stops this one too: it is named SIGTERM here.
        return f"interrupted:{signal.Signals(self._stop_signal or signal.SIGTERM).name}"

    # ------------------------------------------------------------------------------------------------ saving
    def save(self) -> Path | None:
        """Checkpoint this step (every rank contributes its loader position and RNG state; rank 0 writes)."""
        loader_states = fdist.all_gather_objects(self.loader.state_dict())
        rng_states = fdist.all_gather_objects(capture_rng())
        path = None
        if self.main_rank:
            path = checkpoint_path(self.run_dir, self.step)
            save_checkpoint(
                path, model=self.model, step=self.step, optimizer=self.optimizer, scheduler=self.scheduler,
                scaler=self.scaler, loader_states=loader_states, rng_states=rng_states, config=self.cfg.to_dict(),
                relatedness=self.relatedness.to_json(), world_size=self.env.world_size,
                counters=asdict(self.counters))
            prune_checkpoints(self.run_dir, self.cfg.keep_checkpoints, protect=(path,))
            log.info("checkpoint %s", path)
        fdist.barrier()
        return path

    # ------------------------------------------------------------------------------------------------ evaluation
    def run_evaluation(self) -> dict[str, Any]:
        """Score the model on ``--eval-split`` of every dataset; writes eval.json and a metrics.jsonl record."""
        if self.env.distributed:
            # BN running statistics drift apart after the last step (each rank saw its own batch): score rank 0's.
            for b in self.model.buffers():
                torch.distributed.broadcast(b, 0)
        loader = self._build_eval_loader()
        try:
            result = evaluate(self.model, self.manifest, batches=loader, split=self.cfg.eval_split,
                              device=self.device, amp_dtype=self.amp_dtype, truth=self.truth,
                              train_manifest=self.manifest, train_datasets=self.cfg.datasets or None,
                              distributed=self.env.distributed, nvtx="eval_forward" if self.nvtx.enabled else None)
        finally:
            loader.close()
        result["step"] = self.step
        if self.main_rank:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"kind": "eval", "step": self.step, "time": time.time(), "results": result}) + "\n")
            tmp = self.run_dir / "eval.json.tmp"
            tmp.write_text(json.dumps(result, indent=1))
            os.replace(tmp, self.run_dir / "eval.json")
            for line in format_report(result).splitlines():
                log.info(line)
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
            label = "all test images, complete labels" if "truth" in result else "labelled test sets"
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


# ---------------------------------------------------------------------------------------------------- CLI
def _resolve_resume(cfg: TrainConfig) -> tuple[Path | None, Path | None]:
    """``(checkpoint, run folder)`` for ``--resume``; ``(None, None)`` for a fresh run."""
    if not cfg.resume:
        return None, None
    if cfg.resume == "auto":
        if cfg.name:
            run_dir = Path(cfg.out_dir) / cfg.name
            ckpt = latest_checkpoint(run_dir)
            return (ckpt, run_dir) if ckpt else (None, None)
        runs = [p for p in Path(cfg.out_dir).glob("*") if p.is_dir() and latest_checkpoint(p)]
        if not runs:
            return None, None
        run_dir = max(runs, key=lambda p: latest_checkpoint(p).stat().st_mtime)
        return latest_checkpoint(run_dir), run_dir
    path = Path(cfg.resume)
    if path.is_dir():
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise ValueError(f"--resume: run folder {str(path)!r} has no checkpoints")
        return ckpt, path
    if path.is_file():
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return path, run_dir
    raise ValueError(f"--resume: {cfg.resume!r} is neither 'auto', a run folder nor a checkpoint file")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m fbn_fast.train`` / ``fbn-train``; returns the exit status (see module doc)."""
    values, control, parser = explicit_values(argv)
    recipe, print_config = control["config"], control["print_config"]
    state = None
    try:
        cfg = TrainConfig.from_dict(values, where=str(recipe or "options"))
        ckpt, run_dir = _resolve_resume(cfg)
        if ckpt is not None:
            # Continue with the run's own settings; options given now (e.g. a longer --steps) override them.
            state = load_checkpoint(ckpt)
            saved = {k: v for k, v in state["config"].items() if k in TrainConfig.fields() and k not in PER_INVOCATION}
            cfg = TrainConfig.from_dict({**saved, **values}, where=f"{ckpt} + options")
    except ValueError as exc:
        parser.error(str(exc))
    if print_config:
        print(dump_toml(cfg))
        return EXIT_OK

    rank = int(os.environ.get("RANK", "0") or 0)
    configure_console_logging(rank)
    try:
        env = fdist.init_distributed(cfg.device)
    except ValueError as exc:
        parser.error(str(exc))
    trainer = None
    try:
        trainer = Trainer(cfg, env, resume_from=ckpt, run_dir=run_dir, checkpoint=state)
        state = None  # the trainer holds it until restored, then frees it
        try:
            trainer.setup()
        except ValueError as exc:
            log.error("%s", exc)
            return EXIT_USAGE
        status = trainer.run()
        if status.startswith("interrupted"):
            name = status.split(":", 1)[1]
            log.warning("stopped by %s at step %d; checkpoint saved. Continue with: python -m fbn_fast.train "
                        "--resume %s", name, trainer.step, trainer.run_dir)
            return 128 + int(signal.Signals[name])
        if status == "paused":
            log.info("paused at step %d; continue with --resume %s", trainer.step, trainer.run_dir)
        elif env.is_main:
            log.info("done: %s", trainer.run_dir)
        return EXIT_OK
    except NonFiniteLossError as exc:
        log.error("%s", exc)
        return EXIT_DIVERGED
    finally:
        if trainer is not None:
            trainer.close()
        fdist.cleanup()


def cli() -> NoReturn:
    """``python -m fbn_fast.train`` / ``fbn-train``: :func:`main`, then :func:`fbn_fast.distributed.exit_process`."""
    fdist.exit_process(main())


if __name__ == "__main__":
    cli()
