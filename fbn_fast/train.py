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

import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

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
    unwrap_model,
)
from .config import TrainConfig, dump_toml, explicit_values
from .labels import AUS, COMPOUNDS, EXPRESSIONS
from .losses import TERMS, FaceBehaviorLoss, LossWeights
from .model import FaceBehaviorNet, build_model

log = logging.getLogger("fbn_fast.train")

__all__ = [
    "EXIT_DIVERGED",
    "NonFiniteLossError",
    "TrainStep",
    "Trainer",
    "WarmupCosine",
    "build_optimizer",
    "default_synth_dir",
    "evaluate",
    "main",
    "resolve_amp",
]

EXIT_OK, EXIT_USAGE, EXIT_DIVERGED = 0, 2, 3
BATCH_LABELS = ("expr", "expr_mask", "au", "au_mask", "va", "va_mask")
#: Settings of one invocation that a resumed run does not inherit from its checkpoint.
PER_INVOCATION = ("resume", "max_steps_per_run", "cuda_profile_steps", "progress")


class NonFiniteLossError(RuntimeError):
    """Raised when ``--max-nonfinite`` consecutive steps had a non-finite loss or gradient."""


# ---------------------------------------------------------------------------------------------------- helpers
class _Nvtx:
    """NVTX ranges when CUDA is in use (so an Nsight Systems timeline reads data/forward/loss/...); else free."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and torch.cuda.is_available()

    @contextlib.contextmanager
    def range(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()


class WarmupCosine:
    """Learning-rate factor: linear warm-up from ~0 to 1 over ``warmup`` steps, then cosine to ``min_ratio``.

    A plain callable object, so ``LambdaLR.state_dict()`` stores its fields and a checkpoint restores it.
    """

    def __init__(self, total_steps: int, warmup_steps: int, min_ratio: float) -> None:
        self.total = max(1, int(total_steps))
        self.warmup = max(0, min(int(warmup_steps), self.total - 1))
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_amp(amp_dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (``None``: full precision). ``auto``: bf16 on GPUs that support it, else none."""
    if amp_dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp_dtype]


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weight matrices and conv kernels only (not on biases or normalisation scales)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg: TrainConfig, model: nn.Module, device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    """The configured optimizer and which implementation runs it.

    AdamW / SGD use torch's fused kernels when this torch and device support them (capability detection: the
    constructor is tried), else the multi-tensor ``foreach`` path; ``lamb`` is apex's ``FusedLAMB`` (CUDA only).
    """
    groups = _param_groups(model, cfg.weight_decay)
    if cfg.opt == "lamb":
        try:
            from apex.optimizers import FusedLAMB
        except ImportError:
            raise ValueError("--opt lamb needs NVIDIA apex (apex.optimizers.FusedLAMB), which is not installed "
                             "(apex is built from source, it is not on PyPI); use --opt adamw or sgd") from None
        if device.type != "cuda":
            raise ValueError(f"--opt lamb: apex's FusedLAMB runs on CUDA devices only, not {device}")
        return FusedLAMB(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay), "apex FusedLAMB"
    if cfg.opt == "adamw":
        cls, kwargs = torch.optim.AdamW, {"lr": cfg.lr, "betas": tuple(cfg.betas)}
    else:
        cls, kwargs = torch.optim.SGD, {"lr": cfg.lr, "momentum": cfg.momentum, "nesterov": cfg.momentum > 0}
    for impl in ("fused", "foreach"):
        try:
            return cls(groups, **kwargs, **{impl: True}), impl
        except (RuntimeError, ValueError, TypeError):  # not supported for this torch / device / dtype
            continue
    return cls(groups, **kwargs), "for-loop"


def default_synth_dir(cfg: TrainConfig) -> Path:
    """Where the default job caches SynthFace: ``$FBN_FAST_DATA`` if set, else ``$XDG_CACHE_HOME/fbn_fast`` (or
    ``~/.cache/fbn_fast``), in a folder named after size, image size and seed."""
    if cfg.synth_dir:
        return Path(cfg.synth_dir)
    base = os.environ.get("FBN_FAST_DATA")
    if base:
        root = Path(base)
    else:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = Path(cache) / "fbn_fast"
    return root / f"synthface-{cfg.synth_size}-{cfg.synth_image_size}px-seed{cfg.synth_seed}"


class _Progress:
    """tqdm when installed; otherwise a one-line updater (``\\r`` on a terminal, a line per update elsewhere)."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None
        self.tty = sys.stderr.isatty()
        self.total = total
        self.n = initial
        if not enabled:
            return
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)
        except ImportError:
            self.bar = None

    def update(self, n: int, text: str) -> None:
        self.n += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix_str(text, refresh=True)
            return
        line = f"step {self.n}/{self.total} ({100.0 * self.n / max(1, self.total):.0f}%) {text}"
        if self.tty:
            sys.stderr.write("\r" + line[:200].ljust(120))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.tty:
            sys.stderr.write("\n")


def _fmt_terms(values: Mapping[str, float], keys=("total", "expr", "au", "va", "ca_ea", "ca_ae", "dm_ea",
                                                   "dm_ae")) -> str:
    return " ".join(f"{k}={values[k]:.3f}" for k in keys if k in values)


# ---------------------------------------------------------------------------------------------------- one step
class TrainStep:
    """One optimisation step of FaceBehaviorNet, shared by the trainer and the benchmarks.

    ``forward_backward(batch)`` runs the model under autocast, the objective, the backward pass and gradient
    clipping, and returns ``(values, bad)``: the detached vector ``[total, *TERMS]`` and a 0-d bool tensor that is
    true when the loss (or, without a gradient scaler, the gradient norm) is not finite. Nothing there waits for
    the device. ``apply(skip)`` then steps the optimizer (unless ``skip``), the scaler and the schedule.
    ``step(batch)`` does both with one host sync, for single-process use.

    AMP: ``amp_dtype`` bf16 needs no scaler; fp16 uses a ``GradScaler`` (whose skipped overflow steps are its own
    business, not counted as non-finite losses).
    """

    def __init__(self, net: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None,
                 *, device: torch.device, amp_dtype: torch.dtype | None = None, grad_clip: float = 0.0,
                 nvtx: bool = False) -> None:
        self.net, self.loss_fn, self.optimizer, self.scheduler = net, loss_fn, optimizer, scheduler
        self.device, self.amp_dtype, self.grad_clip = device, amp_dtype, float(grad_clip)
        self.nvtx = _Nvtx(nvtx and device.type == "cuda")
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def forward_backward(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        with self.nvtx.range("forward"), self._autocast():
            out = self.net(batch["image"])
        with self.nvtx.range("loss"):
            res = self.loss_fn(out.expr, out.au, out.va, *(batch[k] for k in BATCH_LABELS))
        with self.nvtx.range("backward"):
            self.scaler.scale(res.total).backward()
        bad = ~torch.isfinite(res.total.detach())
        scaled = self.scaler.is_enabled()
        if self.grad_clip > 0 or not scaled:
            if scaled:
                self.scaler.unscale_(self.optimizer)
            if self.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
            else:
                grads = [p.grad for p in self.params if p.grad is not None]
                norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            if not scaled:
                bad = bad | ~torch.isfinite(norm)
        values = torch.stack([res.total.detach().float(), *(res.terms[t].float() for t in TERMS)])
        return values, bad

    def apply(self, skip: bool) -> None:
        with self.nvtx.range("optimizer"):
            if not skip:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            elif self.scaler.is_enabled():
                # Close the scaler's step (it may have unscaled already); non-finite gradients lower its scale.
                if self.grad_clip == 0:
                    self.scaler.unscale_(self.optimizer)
                self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            if self.scheduler is None:
                return
            if not skip:
                self.scheduler.step()
                return
            with warnings.catch_warnings():
                # After a skipped first step torch warns that the scheduler moved before the optimizer: intended.
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
                self.scheduler.step()

    def step(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, bool]:
        """Forward, backward and update on one batch; returns ``(values, skipped)``."""
        values, bad = self.forward_backward(batch)
        skip = bool(bad)
        self.apply(skip)
        return values, skip


# ---------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    dataset_names: tuple[str, ...] | list[str],
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    compound_table=None,
    truth_labels: Mapping[str, np.ndarray] | None = None,
    distributed: bool = False,
    nvtx: _Nvtx | None = None,
) -> dict[str, Any]:
    """Score ``model`` on every batch of ``loader`` with the per-dataset metrics of method.md §5.

    Returns ``{"datasets": {name: {task: metrics}}}`` (each dataset scored only on the tasks it labels), plus
    zero-shot compound metrics (:func:`fbn_fast.compound.zero_shot_logits` on the AU probabilities) for
    datasets with compound labels. With ``truth_labels`` (manifest columns ``expr, au, au_mask, va, va_mask,
    compound`` indexed by manifest row: e.g. SynthFace's ``manifest_full.npz``), also ``"truth"``: every task
    scored on every image against the complete labels. Under DDP the statistics are summed across ranks.
    """
    from .compound import zero_shot_logits
    from .metrics import MultiDatasetMetrics

    nvtx = nvtx or _Nvtx(False)
    was_training = model.training
    model.eval()
    names = tuple(dataset_names)
    kw = dict(num_classes=unwrap_model(model).num_classes, num_aus=unwrap_model(model).num_aus,
              num_compounds=len(COMPOUNDS), device=device)
    metrics = MultiDatasetMetrics(names, **kw)
    truth = MultiDatasetMetrics(names, **kw) if truth_labels is not None else None
    if truth_labels is not None:
        t_expr = torch.as_tensor(np.asarray(truth_labels["expr"], np.int64))
        t_au = torch.as_tensor(np.asarray(truth_labels["au"], np.float32))
        t_au_mask = torch.as_tensor(np.asarray(truth_labels["au_mask"], bool))
        t_va = torch.as_tensor(np.asarray(truth_labels["va"], np.float32))
        t_va_mask = torch.as_tensor(np.asarray(truth_labels["va_mask"], bool))
        t_comp = torch.as_tensor(np.asarray(truth_labels["compound"], np.int64))
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext())
    for batch in loader:
        with nvtx.range("eval_forward"), autocast:
            out = model(batch["image"])
        z_e, z_a, v = out.expr.float(), out.au.float(), out.va.float()
        s = torch.sigmoid(z_a)
        z_c = zero_shot_logits(s, compound_table)
        comp = batch["compound"]
        metrics.update(batch["dataset"], expr_logits=z_e, expr=batch["expr"], expr_mask=batch["expr_mask"],
                       au_probs=s, au=batch["au"], au_mask=batch["au_mask"], va_pred=v, va=batch["va"],
                       va_mask=batch["va_mask"], compound_logits=z_c, compound=comp.clamp_min(0),
                       compound_mask=comp >= 0)
        if truth is not None:
            idx = batch["index"].cpu()
            te = t_expr[idx]
            tc = t_comp[idx]
            truth.update(batch["dataset"], expr_logits=z_e, expr=te.clamp_min(0).to(device),
                         expr_mask=(te >= 0).to(device), au_probs=s, au=t_au[idx].to(device),
                         au_mask=t_au_mask[idx].to(device), va_pred=v, va=t_va[idx].to(device),
                         va_mask=t_va_mask[idx].to(device), compound_logits=z_c,
                         compound=tc.clamp_min(0).to(device), compound_mask=(tc >= 0).to(device))
    if distributed:
        metrics.reduce_(torch.distributed.all_reduce)
        if truth is not None:
            truth.reduce_(torch.distributed.all_reduce)
    model.train(was_training)
    result: dict[str, Any] = {"datasets": metrics.compute()}
    if truth is not None:
        result["truth"] = truth.compute()
    return result


def summarize_eval(result: Mapping[str, Any]) -> list[str]:
    """Human-readable lines: one per dataset with its headline metrics."""
    lines = []
    for section, title in (("datasets", "labelled tasks"), ("truth", "all tasks vs. complete labels")):
        if section not in result:
            continue
        lines.append(f"evaluation ({title}):")
        for name, tasks in result[section].items():
            parts = []
            if "expression" in tasks:
                e = tasks["expression"]
                parts.append(f"expr acc {e['accuracy']:.3f} F1 {e['macro_f1']:.3f}")
            if "au" in tasks:
                parts.append(f"AU mean F1 {tasks['au']['mean_f1']:.3f} ({tasks['au']['num_annotated_aus']} AUs)")
            if "va" in tasks and tasks["va"].get("ccc_mean") is not None:
                parts.append(f"VA CCC {tasks['va']['ccc_mean']:.3f}")
            if "compound" in tasks:
                c = tasks["compound"]
                parts.append(f"zero-shot compound acc {c['accuracy']:.3f} UAR {c['uar']:.3f}")
            lines.append(f"  {name:<16} " + ("; ".join(parts) if parts else "(no labelled task)"))
    return lines


# ---------------------------------------------------------------------------------------------------- trainer
@dataclass
class _Counters:
    nonfinite_total: int = 0
    nonfinite_consecutive: int = 0
    images_seen: int = 0
    extra: dict = field(default_factory=dict)


class Trainer:
    """One training run: set-up, the loop, checkpoints, evaluation and the run folder.

    Typical use is :func:`main`; programmatic use::

        trainer = Trainer(cfg, fdist.init_distributed(cfg.device))
        status = trainer.run()        # "done", "paused", "interrupted:<signal>"
    """

    def __init__(self, cfg: TrainConfig, env: fdist.DistEnv, resume_from: Path | None = None,
                 run_dir: Path | None = None) -> None:
        self.cfg = cfg
        self.env = env
        self.device = env.device
        self.main_rank = env.is_main
        self.resume_from = resume_from
        self.run_dir = run_dir
        self.nvtx = _Nvtx(cfg.nvtx and self.device.type == "cuda")
        self.amp_dtype = resolve_amp(cfg.amp_dtype, self.device)
        self.counters = _Counters()
        self.step = 0
        self._stop_signal: int | None = None
        self._old_handlers: dict[int, Any] = {}
        self._pending_rng: dict | None = None
        self.loader = None

    # ------------------------------------------------------------------------------------------------ set-up
    def setup(self) -> None:
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
            self._restore(self.resume_from)
        self._write_run_files()

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
            self._setup_file_log()
        fdist.barrier()

    def _setup_file_log(self) -> None:
        handler = logging.FileHandler(self.run_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("fbn_fast").addHandler(handler)
        self._log_handler = handler

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
        full = manifest_path.with_name("manifest_full.npz")
        self.truth = None
        if full.is_file() and manifest_path.name == "manifest.npz":
            truth = load_manifest(full)
            if len(truth) == len(self.manifest) and truth.datasets == self.manifest.datasets:
                self.truth = truth
        self.loader = self._build_train_loader()

    def _image_dtype(self) -> torch.dtype:
        # On a GPU the pipeline can hand over images already in the autocast dtype (halves the copy).
        if self.device.type == "cuda" and self.amp_dtype is not None:
            return self.amp_dtype
        return torch.float32

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
                device=self.device, dtype=self._image_dtype())
        except ValueError as exc:
            raise ValueError(f"training data ({self.manifest_path}): {exc}") from None

    def _build_eval_loader(self):
        from .data.pipeline import build_loader

        cfg = self.cfg
        return build_loader(
            self.manifest, self.data_root, batch_size=cfg.eval_batch_size, image_size=cfg.image_size, train=False,
            split=cfg.eval_split, seed=cfg.seed, rank=self.env.rank, world_size=self.env.world_size,
            backend=cfg.loader_backend, num_workers=cfg.num_workers, device=self.device, dtype=self._image_dtype())

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
        self.model: FaceBehaviorNet = model
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
        if getattr(self, "_ckpt", None) is None:
            self._ckpt = load_checkpoint(self.resume_from, map_location="cpu")
        return self._ckpt

    def _restore(self, path: Path) -> None:
        ckpt = self._checkpoint()
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        # The schedule follows this run's settings (the same for an exact resume; a longer --steps extends it).
        vars(self.schedule).update(vars(WarmupCosine(self.total_steps, self.cfg.warmup_steps, self.cfg.min_lr_ratio)))
        if ckpt.get("scaler") is not None and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        c = ckpt.get("counters", {})
        self.counters = _Counters(int(c.get("nonfinite_total", 0)), int(c.get("nonfinite_consecutive", 0)),
                                  int(c.get("images_seen", 0)))
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
        self._ckpt = None  # free the host copy
        log.info("resumed from %s at step %d", path, self.step)

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

    # ------------------------------------------------------------------------------------------------ the step
    # ------------------------------------------------------------------------------------------------ the loop
    def train(self) -> str:
        """Train to the configured length; returns ``"done"``, ``"paused"`` or ``"interrupted:<SIG>"``."""
        cfg = self.cfg
        self.net.train()
        prof = cfg.profile_range() if self.device.type == "cuda" else None
        progress = _Progress(self.total_steps, self.step, cfg.progress and self.main_rank)
        window_vals = torch.zeros(1 + len(TERMS), device=self.device, dtype=torch.float64)
        window_ok = window_steps = 0
        window_images = 0
        window_data_s = 0.0
        window_t0 = time.perf_counter()
        started = self.step
        status = "done"
        it = iter(self.loader)
        try:
            while self.step < self.total_steps:
                if prof and self.step == prof[0]:
                    torch.cuda.profiler.start()
                t_data = time.perf_counter()
                with self.nvtx.range("data"):
                    try:
                        batch = next(it)
                    except StopIteration:  # epoch boundary: the loader moves on to the next epoch itself
                        it = iter(self.loader)
                        batch = next(it)
                window_data_s += time.perf_counter() - t_data
                if self._pending_rng is not None:
                    restore_rng(self._pending_rng)
                    self._pending_rng = None
                values, bad = self.stepper.forward_backward(batch)
                flags = torch.stack([bad.float(), torch.tensor(float(self._stop_signal is not None),
                                                               device=bad.device)])
                fdist.all_reduce_max(flags)  # every rank takes the same decision
                skip, stop = (f > 0 for f in flags.tolist())  # the one host sync of a step
                self.stepper.apply(skip)
                self.step += 1
                n_img = batch["image"].shape[0] * self.env.world_size
                self.counters.images_seen += n_img
                window_images += n_img
                window_steps += 1
                if skip:
                    self.counters.nonfinite_total += 1
                    self.counters.nonfinite_consecutive += 1
                    log.warning("step %d: non-finite loss or gradient (%s); update skipped (%d in a row, %d in all)",
                                self.step, _fmt_terms(dict(zip(("total", *TERMS), values.tolist()))),
                                self.counters.nonfinite_consecutive, self.counters.nonfinite_total)
                else:
                    self.counters.nonfinite_consecutive = 0
                    window_vals += values.double()
                    window_ok += 1
                if prof and self.step == prof[1]:
                    torch.cuda.profiler.stop()
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    now = time.perf_counter()
                    self._log_window(progress, window_vals, window_ok, window_steps, window_images,
                                     now - window_t0, window_data_s)
                    window_vals.zero_()
                    window_ok = window_steps = window_images = 0
                    window_data_s, window_t0 = 0.0, now
                if self.counters.nonfinite_consecutive >= cfg.max_nonfinite:
                    self.save()
                    raise NonFiniteLossError(
                        f"stopped at step {self.step}: {self.counters.nonfinite_consecutive} consecutive steps had a "
                        f"non-finite loss or gradient (--max-nonfinite {cfg.max_nonfinite}); the last good weights "
                        f"are saved in {self.run_dir / 'checkpoints'}. Lower --lr, use --amp-dtype bf16/none, or "
                        f"check the data")
                if stop:
                    status = f"interrupted:{signal.Signals(self._stop_signal or signal.SIGTERM).name}"
                    break
                if self.step % cfg.ckpt_every == 0 and self.step < self.total_steps:
                    self.save()
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                    self.run_evaluation()
                if cfg.max_steps_per_run and self.step - started >= cfg.max_steps_per_run \
                        and self.step < self.total_steps:
                    status = "paused"
                    break
        except Exception:
            if self._stop_signal is None:
                raise
            # A signal also reaches the loader's worker processes; their exit is expected here.
            log.warning("input pipeline stopped after the signal; saving the last completed step")
            status = f"interrupted:{signal.Signals(self._stop_signal).name}"
        finally:
            progress.close()
        self.save()
        return status

    def _log_window(self, progress: _Progress, vals: Tensor, ok: int, steps: int, images: int, seconds: float,
                    data_seconds: float) -> None:
        if self.env.distributed:  # report the mean over every rank's samples (one small collective per record)
            vals = vals.clone()
            torch.distributed.all_reduce(vals)
            vals /= self.env.world_size
        means = (vals / max(ok, 1)).tolist()
        terms = dict(zip(("total", *TERMS), means))
        ips = images / max(seconds, 1e-9)
        rec = {
            "kind": "train", "step": self.step, "epoch": self.loader.epoch, "time": time.time(),
            "lr": self.optimizer.param_groups[0]["lr"], "images_per_s": ips,
            "data_wait_fraction": data_seconds / max(seconds, 1e-9), "steps": steps, "finite_steps": ok,
            "nonfinite_total": self.counters.nonfinite_total, "loss": terms if ok else None,
        }
        if self.main_rank:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
        progress.update(steps, f"{ips:.0f} img/s lr={rec['lr']:.2e} " + (_fmt_terms(terms) if ok else "non-finite"))

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
                counters={"nonfinite_total": self.counters.nonfinite_total,
                          "nonfinite_consecutive": self.counters.nonfinite_consecutive,
                          "images_seen": self.counters.images_seen})
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
        truth = None
        if self.truth is not None:
            t = self.truth
            truth = {"expr": t.expr, "au": t.au, "au_mask": t.au_mask, "va": t.va, "va_mask": t.va_mask,
                     "compound": t.compound}
        t0 = time.perf_counter()
        try:
            result = evaluate(self.model, loader, self.manifest.datasets, device=self.device, amp_dtype=self.amp_dtype,
                              truth_labels=truth, distributed=self.env.distributed, nvtx=self.nvtx)
        finally:
            loader.close()
        result["step"] = self.step
        result["split"] = self.cfg.eval_split
        result["seconds"] = time.perf_counter() - t0
        if self.main_rank:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"kind": "eval", "step": self.step, "time": time.time(), "results": result}) + "\n")
            tmp = self.run_dir / "eval.json.tmp"
            tmp.write_text(json.dumps(result, indent=1))
            os.replace(tmp, self.run_dir / "eval.json")
            for line in summarize_eval(result):
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
            section = result.get("truth") or result["datasets"]
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
        if not hasattr(self, "model"):
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
        handler = getattr(self, "_log_handler", None)
        if handler is not None:
            logging.getLogger("fbn_fast").removeHandler(handler)
            handler.close()


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


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (it may be redirected after set-up)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _configure_logging(rank: int) -> None:
    logger = logging.getLogger("fbn_fast")
    if not any(getattr(h, "_fbn_console", False) for h in logger.handlers):
        handler = _StderrHandler()
        prefix = f"rank {rank} " if rank else ""
        handler.setFormatter(logging.Formatter(f"[{prefix}%(levelname)s] %(message)s"))
        handler._fbn_console = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if rank != 0:  # other ranks only report problems
        for h in logger.handlers:
            h.setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m fbn_fast.train`` / ``fbn-train``; returns the exit status (see module doc)."""
    values, control, parser = explicit_values(argv)
    recipe, print_config = control["config"], control["print_config"]
    try:
        cfg = TrainConfig.from_dict(values, where=str(recipe or "options"))
        ckpt, run_dir = _resolve_resume(cfg)
        if ckpt is not None:
            # Continue with the run's own settings; options given now (e.g. a longer --steps) override them.
            saved = load_checkpoint(ckpt)["config"]
            saved = {k: v for k, v in saved.items() if k in TrainConfig.fields() and k not in PER_INVOCATION}
            cfg = TrainConfig.from_dict({**saved, **values}, where=f"{ckpt} + options")
    except ValueError as exc:
        parser.error(str(exc))
    if print_config:
        print(dump_toml(cfg))
        return EXIT_OK

    rank = int(os.environ.get("RANK", "0") or 0)
    _configure_logging(rank)
    try:
        env = fdist.init_distributed(cfg.device)
    except ValueError as exc:
        parser.error(str(exc))
    trainer = None
    try:
        trainer = Trainer(cfg, env, resume_from=ckpt, run_dir=run_dir)
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
