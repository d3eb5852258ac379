"""Global normalisation under DDP: the objective of the global batch from each rank's shard (``process_group=``).

Without it every rank normalises its terms by its own label counts and computes the CCC over its own
samples, so that the DDP gradient (the mean of the ranks' gradients) is not the gradient of the global
batch when labels fall unevenly across ranks. With it:

- Every term but ``va`` is a mean over its own count (labelled samples, annotated AUs, samples, ...):
  ``L = S / max(C, 1)``. With rank r's count ``c_r`` and the global count ``C`` (all-reduced), rank r
  weights its local term by ``W · c_r / C`` (``W`` ranks): DDP's mean over ranks of these gradients is the
  gradient of the global term. That scaling multiplies the weight vector passed to the fused op, so the
  op runs as usual (one launch, gradients computed in its forward).
- ``va`` (1 − CCC) does not decompose: it is computed here, outside the fused op (which runs with the
  ``va`` weight 0), from the sufficient statistics ``n, Σv, Σy, Σv², Σy², Σvy`` of each VA dimension summed
  over ranks by a differentiable all-reduce (float64 sums of B×2 values: the variances taken from raw
  moments then keep float32 accuracy despite the cancellation). Its backward all-reduces the statistics'
  gradient, which DDP's mean turns back into the global gradient.
- The values returned (total and terms) are those of the global batch, the same on every rank; the
  gradient that ``backward`` leaves on rank r is ``W`` times rank r's share of the global gradient, so DDP's
  mean over ranks is the global-batch gradient (of weights that require grad too, when DDP averages them).

Cost per step: forward, one all-reduce of 18 numbers (8 counts and 10 VA statistics) before the fused op
and one of 8 numbers (the weighted terms, for the reported values) after it; backward, one all-reduce of 18
numbers. ``group`` is the group DDP averages over (``torch.distributed.group.WORLD`` for a plain DDP run).
Every rank must call the loss (and its backward) alike, as DDP requires anyway. Not traceable
by ``torch.compile(fullgraph=True)`` (the collectives are eager calls).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from .reference import CCC_EPS, TERMS

__all__ = ["global_objective"]

_VA = TERMS.index("va")


def _va_statistics(v: Tensor, va: Tensor, va_mask: Tensor) -> Tensor:
    """``[Σv, Σy, Σv², Σy², Σvy]`` over the samples with VA (10 numbers, float64; differentiable in ``v``)."""
    m = va_mask.bool()[:, None]
    zero = torch.zeros((), dtype=torch.float64, device=v.device)
    x = torch.where(m, v.to(torch.float64), zero)
    y = torch.where(m, va.to(torch.float64), zero)
    return torch.cat([x.sum(0), y.sum(0), (x * x).sum(0), (y * y).sum(0), (x * y).sum(0)])


def _ccc_loss_from_statistics(n: Tensor, stats: Tensor) -> Tensor:
    """1 − CCC averaged over the two VA dimensions from global sums (population statistics, docs/method.md §3)."""
    sv, sy, svv, syy, svy = stats.view(5, 2)
    denom = n.clamp(min=1.0)
    mv, my = sv / denom, sy / denom
    var_v = svv / denom - mv * mv
    var_y = syy / denom - my * my
    cov = svy / denom - mv * my
    ccc = 2.0 * cov / (var_v + var_y + (mv - my) ** 2 + CCC_EPS)
    return torch.where(n >= 2, (1.0 - ccc).mean(), torch.zeros_like(n))


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks of ``group``; the backward sums the incoming gradients the same way."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return _AllReduceSum.apply(grad, ctx.group), None


def global_objective(
    local: Callable[[Tensor], tuple[Tensor, Tensor]],
    v: Tensor,
    va: Tensor,
    va_mask: Tensor,
    counts: Tensor,
    weights: Tensor,
    group: dist.ProcessGroup,
    terms_grad: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(total, terms, counts)`` of the global batch over the ranks of ``group`` (see the module docstring).

    ``local(w)`` runs the objective on this rank's shard with the (8,) per-term weight tensor ``w`` and
    returns its total and its unweighted terms (8,), differentiable when ``terms_grad``. ``counts``: this
    rank's denominator of each term (8,), the ``counts`` of :class:`~fbn_fast.losses.LossOutput`. ``weights``
    is the (8,) per-term weight tensor (it may require grad). ``terms`` is differentiable when
    ``terms_grad``, else detached. ``counts``: the global counts (int64, the same on every rank).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group: torch.distributed is not initialised (call init_process_group first)")
    world = dist.get_world_size(group)
    with torch.autocast(v.device.type, enabled=False):  # docs/method.md §3: fp32 (or fp64) whatever autocast says
        local_counts = counts.to(torch.float64)
        shared = _AllReduceSum.apply(torch.cat([local_counts, _va_statistics(v, va, va_mask)]), group)
        totals, stats = shared[: len(TERMS)].detach(), shared[len(TERMS):]
        # Rank share of each mean term; VA is computed below from the global statistics instead.
        share = world * local_counts / totals.clamp(min=1.0)
        share[_VA] = 0.0
        total_local, terms_local = local(weights * share.to(weights.dtype))
        dt = terms_local.dtype  # the compute dtype of the objective
        share = share.to(dt)
        l_va = _ccc_loss_from_statistics(totals[_VA], stats).to(dt)
        shares = share * terms_local  # W · (c_r / C) · L_r per term: their mean over ranks is the global term
        reported = shares.detach().clone()
        dist.all_reduce(reported, group=group)
        reported = reported / world
        reported[_VA] = l_va.detach()
        total = total_local + weights[_VA].to(dt) * l_va
        value = (weights.detach().to(dt) * reported).sum()
        # The global value on every rank, with the gradient of this rank's share (scaled for DDP's mean).
        total = total + (value - total).detach()
        global_counts = totals.round().to(torch.int64)
        if not terms_grad:
            return total, reported, global_counts
        va_onehot = torch.zeros_like(share)
        va_onehot[_VA] = 1.0
        terms = shares + va_onehot * l_va
        return total, terms + (reported - terms).detach(), global_counts
