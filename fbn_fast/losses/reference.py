"""The reference objective of method.md §3 in plain differentiable PyTorch: the oracle of every backend.

Everything is computed in float32 (float64 when the logits are float64) whatever the input dtype, in
log-softmax / log-sigmoid form, with masked means whose denominators stay on the device (no host sync).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: Names of the terms, in the order every backend reports them (after the total).
TERMS: tuple[str, ...] = ("expr", "au", "va", "ca_ea", "ca_ae", "dm_ea", "dm_ae", "dm_ev")
#: Names of the weights, in the order the fused op takes them.
WEIGHTS: tuple[str, ...] = ("expr", "au", "va", "ca", "dm", "ev")
#: Smoothing of the relatedness table, Rs = clip(R, eps, 1 - eps) (method.md §3, our choice).
DEFAULT_EPS = 0.05
#: Stabiliser of the CCC denominator (method.md §3).
CCC_EPS = 1e-8


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over ``mask``; 0 (not NaN) when the mask is empty."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def relatedness_log_terms(relatedness: Tensor, eps: float = DEFAULT_EPS) -> tuple[Tensor, Tensor]:
    """``log Rs`` and ``log(1 - Rs)`` of the smoothed table (C×K each)."""
    rs = relatedness.clamp(eps, 1.0 - eps)
    return rs.log(), torch.log1p(-rs)


def au_log_likelihood(x: Tensor, log_r: Tensor, log_1mr: Tensor, mask: Tensor | None = None) -> Tensor:
    """``ℓ(x)[b, c] = Σ_k x_k log Rs[c,k] + (1 - x_k) log(1 - Rs[c,k])``, summed over ``mask`` if given."""
    if mask is None:
        return x @ (log_r - log_1mr).T + log_1mr.sum(1)
    m = mask.to(x.dtype)
    return (x * m) @ log_r.T + ((1.0 - x) * m) @ log_1mr.T


def _ccc_loss(v: Tensor, y: Tensor, mask: Tensor) -> Tensor:
    """Mean over the two VA dimensions of 1 - CCC over the masked samples; 0 with fewer than two."""
    m = mask.to(v.dtype)[:, None]
    n = m.sum()
    denom = n.clamp(min=1.0)
    mv = (v * m).sum(0) / denom
    my = (y * m).sum(0) / denom
    dv, dy = (v - mv) * m, (y - my) * m
    var_v = (dv * dv).sum(0) / denom
    var_y = (dy * dy).sum(0) / denom
    cov = (dv * dy).sum(0) / denom
    ccc = 2.0 * cov / (var_v + var_y + (mv - my) ** 2 + CCC_EPS)
    return torch.where(n >= 2, (1.0 - ccc).mean(), torch.zeros_like(n))


def reference_terms(
    z_e: Tensor,
    z_a: Tensor,
    v: Tensor,
    expr: Tensor,
    expr_mask: Tensor,
    au: Tensor,
    au_mask: Tensor,
    va: Tensor,
    va_mask: Tensor,
    relatedness: Tensor,
    va_means: Tensor | None = None,
    weights: tuple[float, ...] = (1.0,) * 6,
    temperature: float = 1.0,
    eps: float = DEFAULT_EPS,
) -> Tensor:
    """The total and the eight terms of method.md §3 as one vector ``[total, *TERMS]`` (differentiable).

    Shapes: ``z_e`` (B,C), ``z_a`` (B,K), ``v`` (B,2), ``expr`` (B,) int, ``expr_mask`` (B,),
    ``au``/``au_mask`` (B,K), ``va`` (B,2), ``va_mask`` (B,), ``relatedness`` (C,K), ``va_means`` (C,2).
    Labels under a false mask are ignored whatever their value (NaN included).
    """
    dt = torch.float64 if z_e.dtype == torch.float64 else torch.float32
    ze, za, vv = z_e.to(dt), z_a.to(dt), v.to(dt)
    me, ma, mv = expr_mask.bool(), au_mask.bool(), va_mask.bool()
    y_a = torch.where(ma, au.to(dt), torch.zeros((), dtype=dt, device=au.device))
    y_v = torch.where(mv[:, None], va.to(dt), torch.zeros((), dtype=dt, device=va.device))
    cls = torch.where(me, expr.long(), torch.zeros_like(expr, dtype=torch.long))
    log_r, log_1mr = relatedness_log_terms(relatedness.to(dt), eps)
    r_raw = relatedness.to(dt)

    log_p = F.log_softmax(ze, dim=1)
    p = log_p.exp()
    log_s, log_1ms = F.logsigmoid(za), F.logsigmoid(-za)
    s = log_s.exp()
    inv_t = 1.0 / temperature

    # Supervised terms.
    l_expr = _masked_mean(-log_p.gather(1, cls[:, None])[:, 0], me)
    bce = -(y_a * log_s + (1.0 - y_a) * log_1ms)
    l_au = _masked_mean(bce, ma)
    l_va = _ccc_loss(vv, y_v, mv)

    # Co-annotation: expression label -> soft targets R[c] on the unannotated AUs.
    t_a = r_raw[cls]
    l_ca_ea = _masked_mean(-(t_a * log_s + (1.0 - t_a) * log_1ms), me[:, None] & ~ma)
    # AU labels (no expression label) -> soft expression target softmax(ℓ(y_a) / T).
    has_au = ma.any(1) & ~me
    t_e = torch.softmax(au_log_likelihood(y_a, log_r, log_1mr, ma) * inv_t, dim=1)
    l_ca_ae = _masked_mean(-(t_e * log_p).sum(1), has_au)

    # Distribution matching, expression -> AU: KLb(p·Rs ‖ s), mean over samples and AUs.
    q_a = p @ log_r.exp()
    kl_a = q_a * (q_a.log() - log_s) + (1.0 - q_a) * (torch.log1p(-q_a) - log_1ms)
    l_dm_ea = kl_a.mean()
    # AU -> expression: KL(softmax(ℓ(s) / T) ‖ p), mean over samples.
    log_q_e = F.log_softmax(au_log_likelihood(s, log_r, log_1mr) * inv_t, dim=1)
    l_dm_ae = (log_q_e.exp() * (log_q_e - log_p)).sum(1).mean()
    # Expression -> VA: ½‖v − p·μ‖², mean over samples (0 without μ).
    if va_means is None:
        l_dm_ev = torch.zeros((), dtype=dt, device=z_e.device)
    else:
        l_dm_ev = 0.5 * ((vv - p @ va_means.to(dt)) ** 2).sum(1).mean()

    w_expr, w_au, w_va, w_ca, w_dm, w_ev = (float(w) for w in weights)
    total = (
        w_expr * l_expr
        + w_au * l_au
        + w_va * l_va
        + w_ca * (l_ca_ea + l_ca_ae)
        + w_dm * (l_dm_ea + l_dm_ae)
        + w_ev * l_dm_ev
    )
    return torch.stack([total, l_expr, l_au, l_va, l_ca_ea, l_ca_ae, l_dm_ea, l_dm_ae, l_dm_ev])
