"""The reference objective of docs/method.md §3 in plain differentiable PyTorch: the oracle of every backend.

Everything is computed in float32 (float64 when the logits are float64) whatever the input dtype and
whatever autocast is active, in log-softmax / log-sigmoid form, with masked means whose denominators stay on
the device (no host sync).

Weights: one per term (:data:`TERM_WEIGHTS`, the order of :data:`TERMS`). The six weights of docs/method.md §3
(:data:`WEIGHTS`: the supervised terms, λ_ca, λ_dm, λ_ev) map onto them through :data:`WEIGHT_GROUPS`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

#: Names of the terms, in the order every backend reports them (after the total).
TERMS: tuple[str, ...] = ("expr", "au", "va", "ca_ea", "ca_ae", "dm_ea", "dm_ae", "dm_ev")
#: One weight per term: the weight vector the fused op takes is indexed like :data:`TERMS`.
TERM_WEIGHTS: tuple[str, ...] = TERMS
#: The six weights of docs/method.md §3 (supervised terms, λ_ca, λ_dm, λ_ev), each applied to these terms.
WEIGHT_GROUPS: dict[str, tuple[str, ...]] = {
    "expr": ("expr",), "au": ("au",), "va": ("va",), "ca": ("ca_ea", "ca_ae"), "dm": ("dm_ea", "dm_ae"),
    "ev": ("dm_ev",),
}
#: Names of the six docs/method.md weights, in the order of the legacy 6-value form.
WEIGHTS: tuple[str, ...] = tuple(WEIGHT_GROUPS)
#: Smoothing of the relatedness table, Rs = clip(R, eps, 1 - eps) (docs/method.md §3, our choice).
DEFAULT_EPS = 0.05
#: Stabiliser of the CCC denominator (docs/method.md §3).
CCC_EPS = 1e-8


def expand_weights(weights: Sequence[float]) -> tuple[float, ...]:
    """Eight per-term weights (:data:`TERM_WEIGHTS`) from eight, or from the six of :data:`WEIGHTS`."""
    values = tuple(float(w) for w in weights)
    if len(values) == len(TERM_WEIGHTS):
        return values
    if len(values) == len(WEIGHTS):
        per_group = dict(zip(WEIGHTS, values))
        return tuple(per_group[g] for t in TERM_WEIGHTS for g, ts in WEIGHT_GROUPS.items() if t in ts)
    raise ValueError(f"weights: expected {len(TERM_WEIGHTS)} per-term weights {TERM_WEIGHTS} (or the "
                     f"{len(WEIGHTS)} of {WEIGHTS}), got {len(values)}")


def weight_vector(weights: Tensor | Sequence[float], like: Tensor) -> Tensor:
    """The (8,) per-term weight tensor on ``like``'s device in ``like``'s dtype; a tensor stays in the graph
    (so that it may require grad)."""
    if torch.is_tensor(weights):
        if weights.shape != (len(TERM_WEIGHTS),):
            raise ValueError(f"weights: shape {tuple(weights.shape)}, expected ({len(TERM_WEIGHTS)},) = one per "
                             f"term {TERM_WEIGHTS}")
        return weights.to(like.dtype)
    return torch.tensor(expand_weights(weights), dtype=like.dtype, device=like.device)


def invalid_classes(expr: Tensor, expr_mask: Tensor, num_classes: int) -> Tensor:
    """Rows whose expression class lies outside [0, C) under a true mask (a bool vector, on the device)."""
    return expr_mask.bool() & ((expr < 0) | (expr >= num_classes))


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
    au_pos_weight: Tensor | None = None,
    weights: Tensor | Sequence[float] = (1.0,) * 8,
    temperature: float = 1.0,
    eps: float = DEFAULT_EPS,
) -> Tensor:
    """The total and the eight terms of docs/method.md §3 as one vector ``[total, *TERMS]`` (differentiable, to any
    order, also with respect to ``weights``: eight per-term weights, or the six of :data:`WEIGHTS`).

    Shapes: ``z_e`` (B,C), ``z_a`` (B,K), ``v`` (B,2), ``expr`` (B,) int, ``expr_mask`` (B,),
    ``au``/``au_mask`` (B,K), ``va`` (B,2), ``va_mask`` (B,), ``relatedness`` (C,K), ``va_means`` (C,2),
    ``au_pos_weight`` (K,): the weight of each AU's positive labels in ``L_au`` (``None``: 1, plain BCE).
    Labels under a false mask are ignored whatever their value (NaN included); a class outside [0, C) under
    a true mask makes the ``expr`` term and the total NaN. An empty batch gives zeros.
    """
    # docs/method.md §3: fp32 computation whatever the input dtype, so autocast must not narrow the matmuls.
    with torch.autocast(z_e.device.type, enabled=False):
        return _reference_terms(z_e, z_a, v, expr, expr_mask, au, au_mask, va, va_mask, relatedness, va_means,
                                au_pos_weight, weights, temperature, eps)


def _reference_terms(z_e: Tensor, z_a: Tensor, v: Tensor, expr: Tensor, expr_mask: Tensor, au: Tensor,
                     au_mask: Tensor, va: Tensor, va_mask: Tensor, relatedness: Tensor, va_means: Tensor | None,
                     au_pos_weight: Tensor | None, weights: Tensor | Sequence[float], temperature: float,
                     eps: float) -> Tensor:
    dt = torch.float64 if z_e.dtype == torch.float64 else torch.float32
    ze, za, vv = z_e.to(dt), z_a.to(dt), v.to(dt)
    me, ma, mv = expr_mask.bool(), au_mask.bool(), va_mask.bool()
    y_a = torch.where(ma, au.to(dt), torch.zeros((), dtype=dt, device=au.device))
    y_v = torch.where(mv[:, None], va.to(dt), torch.zeros((), dtype=dt, device=va.device))
    bad = invalid_classes(expr, me, ze.shape[1])
    cls = torch.where(me & ~bad, expr.long(), torch.zeros_like(expr, dtype=torch.long))
    log_r, log_1mr = relatedness_log_terms(relatedness.to(dt), eps)
    r_raw = relatedness.to(dt)

    log_p = F.log_softmax(ze, dim=1)
    p = log_p.exp()
    log_s, log_1ms = F.logsigmoid(za), F.logsigmoid(-za)
    s = log_s.exp()
    inv_t = 1.0 / temperature

    # Supervised terms.
    l_expr = _masked_mean(-log_p.gather(1, cls[:, None])[:, 0], me)
    l_expr = torch.where(bad.any(), torch.full_like(l_expr, float("nan")), l_expr)
    pos = y_a if au_pos_weight is None else au_pos_weight.to(dt) * y_a
    bce = -(pos * log_s + (1.0 - y_a) * log_1ms)
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
    b, k = za.shape
    l_dm_ea = kl_a.sum() / max(b * k, 1)  # an empty batch gives 0, not NaN
    # AU -> expression: KL(softmax(ℓ(s) / T) ‖ p), mean over samples.
    log_q_e = F.log_softmax(au_log_likelihood(s, log_r, log_1mr) * inv_t, dim=1)
    l_dm_ae = (log_q_e.exp() * (log_q_e - log_p)).sum() / max(b, 1)
    # Expression -> VA: ½‖v − p·μ‖², mean over samples (0 without μ).
    if va_means is None:
        l_dm_ev = torch.zeros((), dtype=dt, device=z_e.device)
    else:
        l_dm_ev = 0.5 * ((vv - p @ va_means.to(dt)) ** 2).sum() / max(b, 1)

    terms = torch.stack([l_expr, l_au, l_va, l_ca_ea, l_ca_ae, l_dm_ea, l_dm_ae, l_dm_ev])
    total = (weight_vector(weights, terms) * terms).sum()
    return torch.cat([total[None], terms])
