"""The objective with its gradients in closed form, in plain PyTorch: the fused kernels' math, readable.

This is what the Triton and C++/CUDA kernels compute per row and reduce per batch; here it serves as the
``torch`` implementation of the fused op (no autograd inside, so it also runs under ``torch.compile``) and
as the derivation the kernels follow. Tests hold it to the autograd of :mod:`.reference`.

Per row b, with p = softmax(z_e), s = sigmoid(z_a), W = log Rs − log(1 − Rs):
- expr:  ∂/∂z_e = m_e (p − onehot(y)) / n_e
- au:    ∂/∂z_a = m_a ((w⁺y + 1 − y) s − w⁺y) / n_a (w⁺: the AU's positive weight, 1 = plain BCE: s − y);
         ca_ea: ∂/∂z_a = m_e ¬m_a (s − R[y]) / n_ca_ea
- ca_ae: ∂/∂z_e = h (p − t) / n_ca_ae, t = softmax(ℓ_masked(y_a) / T)
- dm_ea: q = p·Rs;  ∂/∂z_a = (s − q) / (B K);  ∂/∂q = (logit q − z_a) / (B K), pulled back through p
- dm_ae: q_e = softmax(ℓ(s) / T);  ∂/∂z_e = (p − q_e) / B;
         ∂/∂u = q_e (log q_e − log p − KL) / B with u = ℓ(s)/T, so ∂/∂z_a = (∂/∂u · W / T) s (1 − s)
- dm_ev: r = v − p·μ;  ∂/∂v = r / B;  ∂/∂p = −r·μᵀ / B
- va:    per dim, ∂/∂v_i = −[(y_i − m_y) − CCC (v_i − m_y)] / (n · den)  (n ≥ 2), den = CCC's denominator
A gradient with respect to p is pulled back through the softmax as p (g − Σ p g).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import CCC_EPS, au_log_likelihood, invalid_classes, relatedness_log_terms, weight_vector


def analytic_terms_and_grads(
    z_e: Tensor, z_a: Tensor, v: Tensor, expr: Tensor, expr_mask: Tensor, au: Tensor, au_mask: Tensor,
    va: Tensor, va_mask: Tensor, relatedness: Tensor, va_means: Tensor | None, au_pos_weight: Tensor | None,
    weights: Tensor | Sequence[float], temperature: float, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The total and ``[total, *TERMS]`` (float32, float64 for float64 logits) and the gradients of the total
    w.r.t. ``z_e``, ``z_a``, ``v``; ``weights``: one per term (a tensor or floats; or the six of ``WEIGHTS``);
    ``au_pos_weight``: (K,) weights of the AUs' positive labels in ``L_au`` (``None``: 1)."""
    dt = torch.float64 if z_e.dtype == torch.float64 else torch.float32
    ze, za, vv = z_e.to(dt), z_a.to(dt), v.to(dt)
    b, k = za.shape
    zero = torch.zeros((), dtype=dt, device=ze.device)
    me, ma, mv = expr_mask.bool(), au_mask.bool(), va_mask.bool()
    mef, maf, mvf = me.to(dt), ma.to(dt), mv.to(dt)
    y_a = torch.where(ma, au.to(dt), zero)
    y_v = torch.where(mv[:, None], va.to(dt), zero)
    bad = invalid_classes(expr, me, ze.shape[1])
    cls = torch.where(me & ~bad, expr.long(), torch.zeros_like(expr, dtype=torch.long))
    r_raw = relatedness.to(dt)
    log_r, log_1mr = relatedness_log_terms(r_raw, eps)
    rs, w_mat = log_r.exp(), log_r - log_1mr
    wv = weight_vector(weights, zero)
    w_expr, w_au, w_va, w_caea, w_caae, w_dmea, w_dmae, w_ev = wv.unbind(0)
    inv_t = 1.0 / temperature

    log_p = F.log_softmax(ze, 1)
    p = log_p.exp()
    log_s, log_1ms = F.logsigmoid(za), F.logsigmoid(-za)
    s = log_s.exp()
    onehot = F.one_hot(cls, ze.shape[1]).to(dt)

    # Supervised expression and AU terms, and expression -> AU co-annotation.
    n_e = mef.sum().clamp(min=1.0)
    l_expr = -(log_p * onehot).sum(1).mul(mef).sum() / n_e
    l_expr = torch.where(bad.any(), torch.full_like(l_expr, float("nan")), l_expr)
    g_e = w_expr * mef[:, None] * (p - onehot) / n_e
    n_a = maf.sum().clamp(min=1.0)
    # Positive labels weighted by w+: -(w+ y log s + (1 - y) log(1 - s)), gradient (w+ y + 1 - y) s - w+ y.
    pos = y_a if au_pos_weight is None else au_pos_weight.to(dt) * y_a
    l_au = -(pos * log_s + (1 - y_a) * log_1ms).mul(maf).sum() / n_a
    g_a = w_au * maf * ((pos + 1 - y_a) * s - pos) / n_a
    m_ca = mef[:, None] * (1 - maf)
    n_ca = m_ca.sum().clamp(min=1.0)
    t_a = r_raw[cls]
    l_ca_ea = -(t_a * log_s + (1 - t_a) * log_1ms).mul(m_ca).sum() / n_ca
    g_a = g_a + w_caea * m_ca * (s - t_a) / n_ca

    # AU -> expression co-annotation.
    h = (ma.any(1) & ~me).to(dt)
    n_h = h.sum().clamp(min=1.0)
    t_e = torch.softmax(au_log_likelihood(y_a, log_r, log_1mr, ma) * inv_t, 1)
    l_ca_ae = -(t_e * log_p).sum(1).mul(h).sum() / n_h
    g_e = g_e + w_caae * h[:, None] * (p - t_e) / n_h

    # Distribution matching, expression -> AU.
    q = p @ rs
    log_q, log_1mq = q.log(), torch.log1p(-q)
    bk = max(b * k, 1)  # an empty batch gives 0, not NaN
    l_dm_ea = (q * (log_q - log_s) + (1 - q) * (log_1mq - log_1ms)).sum() / bk
    g_a = g_a + w_dmea * (s - q) / bk
    g_p = w_dmea * ((log_q - log_1mq - za) / bk) @ rs.T

    # Distribution matching, AU -> expression.
    log_qe = F.log_softmax((s @ w_mat.T + log_1mr.sum(1)) * inv_t, 1)
    qe = log_qe.exp()
    f = log_qe - log_p
    kl = (qe * f).sum(1)
    nb = max(b, 1)
    l_dm_ae = kl.sum() / nb
    g_e = g_e + w_dmae * (p - qe) / nb
    g_u = w_dmae * qe * (f - kl[:, None]) / nb
    g_a = g_a + (g_u @ w_mat) * inv_t * s * (1 - s)

    # Distribution matching, expression -> VA.
    g_v = torch.zeros_like(vv)
    if va_means is None:
        l_dm_ev = zero
    else:
        r = vv - p @ va_means.to(dt)
        l_dm_ev = 0.5 * (r * r).sum() / nb
        g_v = g_v + w_ev * r / nb
        g_p = g_p - w_ev * (r @ va_means.to(dt).T) / nb
    g_e = g_e + p * (g_p - (p * g_p).sum(1, keepdim=True))

    # Valence/arousal CCC over the labelled rows (batch statistics).
    n_v = mvf.sum()
    nv = n_v.clamp(min=1.0)
    m = mvf[:, None]
    mean_v, mean_y = (vv * m).sum(0) / nv, (y_v * m).sum(0) / nv
    dv, dy = (vv - mean_v) * m, (y_v - mean_y) * m
    den = (dv * dv).sum(0) / nv + (dy * dy).sum(0) / nv + (mean_v - mean_y) ** 2 + CCC_EPS
    ccc = 2 * (dv * dy).sum(0) / nv / den
    enough = (n_v >= 2).to(dt)
    l_va = enough * (1 - ccc).mean()
    g_v = g_v - w_va * enough * m * ((y_v - mean_y) - ccc * (vv - mean_y)) / (nv * den)

    terms = torch.stack([l_expr, l_au, l_va, l_ca_ea, l_ca_ae, l_dm_ea, l_dm_ae, l_dm_ev])
    total = (wv * terms).sum()
    return total, torch.cat([total[None], terms]), g_e.to(z_e.dtype), g_a.to(z_a.dtype), g_v.to(v.dtype)
