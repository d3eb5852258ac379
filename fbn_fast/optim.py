"""How the trainer optimises: the learning-rate schedule, the optimizer factory and the mixed-precision policy.

* :class:`WarmupCosine`: linear warm-up, then cosine decay to a floor (a factor for ``LambdaLR``).
* :func:`build_optimizer`: AdamW / SGD with torch's fused kernels where this torch and device run them, else the
  multi-tensor ``foreach`` path; LAMB through NVIDIA apex's ``FusedLAMB`` where apex is installed.
* :func:`resolve_amp`, :func:`autocast` and :func:`grad_scaler`: which dtype autocast uses and whether a
  ``GradScaler`` is needed (fp16 only: bf16 has fp32's exponent range). The dtype rule and the autocast context
  are the inference layer's (:mod:`fbn_fast.inference`), so that a model trains and is scored alike.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .inference import autocast
from .inference import resolve_amp_dtype as resolve_amp

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = ["WarmupCosine", "autocast", "build_optimizer", "grad_scaler", "resolve_amp"]


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


def grad_scaler(device: torch.device, amp_dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A ``GradScaler``, enabled for fp16 only: fp16 gradients underflow without one, bf16 ones do not."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
