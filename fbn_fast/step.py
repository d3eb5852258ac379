"""One optimisation step of FaceBehaviorNet (:class:`TrainStep`), shared by the trainer and the benchmarks, and the
profiler hooks that mark steps on a timeline (:class:`Nvtx`, :class:`CudaProfileRange`)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .inference import nvtx_range
from .losses import TERMS
from .optim import autocast, grad_scaler

__all__ = ["BATCH_LABELS", "CudaProfileRange", "Nvtx", "TrainStep"]

#: The label tensors of a batch, in the order the objective takes them.
BATCH_LABELS = ("expr", "expr_mask", "au", "au_mask", "va", "va_mask")


class Nvtx:
    """NVTX ranges when CUDA is in use (so an Nsight Systems timeline reads data/forward/loss/...); else free."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and torch.cuda.is_available()

    def range(self, name: str) -> contextlib.AbstractContextManager[None]:
        return nvtx_range(name if self.enabled else None)


class CudaProfileRange:
    """``--cuda-profile-steps START:STOP``: ``cudaProfilerStart`` before step START+1, ``cudaProfilerStop`` after
    step STOP (for ``nsys --capture-range=cudaProfilerApi``). Does nothing off CUDA or without a range."""

    def __init__(self, steps: tuple[int, int] | None, device: torch.device) -> None:
        self.start_at, self.stop_at = steps if steps is not None and device.type == "cuda" else (-1, -1)

    def before_step(self, step: int) -> None:
        """Called with the number of steps done before the next one starts."""
        if step == self.start_at:
            torch.cuda.profiler.start()

    def after_step(self, step: int) -> None:
        """Called with the number of steps done once a step is complete."""
        if step == self.stop_at:
            torch.cuda.profiler.stop()


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
                 nvtx: bool = False, observe: Callable[..., None] | None = None) -> None:
        self.net, self.loss_fn, self.optimizer, self.scheduler = net, loss_fn, optimizer, scheduler
        self.observe = observe  # sees (z_e, z_a, expr, expr_mask, au, au_mask, bad) after every backward
        self.device, self.amp_dtype, self.grad_clip = device, amp_dtype, float(grad_clip)
        self.nvtx = Nvtx(nvtx and device.type == "cuda")
        self.scaler = grad_scaler(device, amp_dtype)
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    def forward_backward(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        with self.nvtx.range("forward"), autocast(self.device, self.amp_dtype):
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
        if self.observe is not None:  # after the backward: it may change the objective's table in place
            self.observe(out.expr, out.au, batch["expr"], batch["expr_mask"], batch["au"], batch["au_mask"], bad)
        # The objective's own [total, *TERMS] vector (no re-stacking of nine tensors per step); a loss module
        # that builds its LossOutput without one gets it stacked from its terms.
        values = res.values
        if values is None:
            values = torch.stack([res.total, *(res.terms[t] for t in TERMS)])
        return values.detach().float(), bad

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
