"""The whole co-training objective (docs/method.md §3) and its gradients in one Triton launch.

Launch design
-------------
The per-row gradients need batch-level quantities: the label count of every masked mean (``1/n``) and the
CCC statistics of the VA term (means, variances, covariance, the CCC itself). The kernel therefore makes two
passes over the rows inside one launch, with a persistent grid of programs that each walk row blocks
``pid, pid + nprog, ...``:

1. *statistics*: each program counts its labels in int32 and keeps per-lane Welford moments of ``v`` and the
   VA labels, then writes one partial slot. Program 0 also writes the smoothed relatedness tables
   (Rs, log(1 − Rs), W = log Rs − log(1 − Rs)).
2. *grid barrier*: every program increments an arrival counter and spins until all ``nprog`` arrived. That
   is safe only if all programs are resident at once, so on CUDA the grid is at most ``#SMs × occupancy``
   programs (computed from the compiled kernel's registers) and the launch is *cooperative*: the driver
   refuses a grid that cannot be co-resident instead of letting it hang.
3. *main pass*: every program folds all partial slots in the same fixed order (so all programs, and all
   runs, see bit-identical statistics), then computes per row the softmax/sigmoid, every term's numerator
   and the gradients with respect to ``z_e``, ``z_a`` and ``v``, stored in the input dtypes.
4. *finish*: each program writes its term numerators to its slot and takes a ticket; the last one to arrive
   (it never waits) sums the slots in fixed order, writes the nine terms and re-arms both counters.

No float atomics are used, so results are deterministic. The two int32 counters live in a per-device buffer
that each launch leaves at zero, so nothing is zero-filled per call: the forward is one kernel, and the
op's backward only scales the stored gradients by the incoming gradient.

Modes on a GPU: the *split plan*, the default, runs the passes as two launches of the same kernel
(``split=True``) that never spin; the single launch with the grid barrier above is opt-in
(``FBN_FAST_GRID_BARRIER=1`` or :func:`fbn_fast.losses.backends.set_grid_barrier`) until verified on a card,
needs a Triton with cooperative launch, and is used only for C, K <= :data:`BARRIER_MAX_DIM`. Launches run
on the tensors' device whatever the current device is. The number of programs is :func:`program_count`.
The interpreter, which runs programs one after another, uses a single program by default, hence the fused
form there.

Layout: rows are narrow (C = 7, K = 17 by default), so tiles are classes/AUs × rows and the lanes of a
program (two warps by default, :func:`default_tile`) hold whole rows (or parts of them). Per-row reductions
then stay within a few threads, per-row scalars are not replicated across 32 lanes, and no tile changes
layout through shared memory. The
C×K contractions run one class at a time against table rows that stay in L1 (``use_dot=True`` uses
``tl.dot`` in TF32×3 on tensor cores instead; on sm_90 it compiled to more instructions and spills).
Accumulation is float32 (float64 for float64 inputs); C and K are padded to powers of two and masked.
Limitation of the shared counters: launches on *different streams of one device* must not overlap in time
(a training step on one stream, CUDA graphs and DDP are fine).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fbn_fast.losses.backends import grid_barrier
from fbn_fast.losses.op import check_inputs, kernel_weights, register_impl

try:
    import triton
    import triton.language as tl
except ImportError as _exc:  # pragma: no cover - exercised only where Triton is absent
    triton = None
    _IMPORT_ERROR: str | None = str(_exc)
else:
    _IMPORT_ERROR = None

#: Largest C or K the launcher accepts. Wider tiles spill kilobytes per thread (C = K = 64: 2-13.8 KB on sm_80
#: and sm_90 with the plans it had, ``profiling/results/compile_triton-3.7.1-full.json``; C = K = 256 did not
#: finish compiling in 8 minutes); the ``torch``, ``cpu`` and ``cuda`` backends take any C and K.
MAX_DIM = 32
#: Largest C or K that gets the single-launch grid-barrier mode (wider shapes would take the split plan; with
#: MAX_DIM = 32 every shape the launcher accepts qualifies).
BARRIER_MAX_DIM = 32
#: Largest C or K for ``use_dot=True`` (``tl.dot`` on tensor cores): wider tiles do not compile.
DOT_MAX_DIM = 32
_NSTAT = 16  # float statistics per partial slot (11 used)
_NCNT = 8  # int32 counts per partial slot (4 used)
_NPART = 8  # term numerators per partial slot (7 used)


if triton is not None:

    @triton.jit
    def _log1p(x):
        # log(1 + x) without cancellation for small |x| (no libdevice, so it also runs in the interpreter).
        u = 1.0 + x
        d = u - 1.0
        return tl.where(d == 0.0, x, tl.log(u) * (x / tl.where(d == 0.0, 1.0, d)))

    @triton.jit
    def _log1p_unit(x):
        # log(1 + x) for x in [0, 1] without a division: three Taylor terms below 1e-4 (error < x^4/4), else
        # log(1 + x) (absolute error of one ulp of 1, which is what the callers need).
        return tl.where(x < 1e-4, x * (1.0 - x * (0.5 - x * (1.0 / 3.0))), tl.log(1.0 + x))

    @triton.jit
    def _out(x, ptr, RTNE_BF16: tl.constexpr):
        # ``x`` in the dtype ``ptr`` points to. The interpreter truncates float32 -> bfloat16 (compiled
        # kernels round to nearest even), so there the rounding is done on the bits.
        if RTNE_BF16:
            if ptr.dtype.element_ty == tl.bfloat16:
                x32 = x.to(tl.float32)
                bits = x32.to(tl.uint32, bitcast=True)
                bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
                x = tl.where(x32 != x32, x32, bits.to(tl.float32, bitcast=True))
        return x.to(ptr.dtype.element_ty)

    @triton.jit
    def _merge_slots(n, n_new, mean_v, mean_y, m2_v, m2_y, c_vy, n_i, sp, live, ACC: tl.constexpr):
        # Fold partial slots (count n_i; means, M2s and co-moment at sp[0..4]) into running moments over n rows
        # (Chan et al.'s pairwise update, applied in a fixed order so that every program gets the same bits).
        mv_i = tl.load(sp + 0, mask=live, other=0, volatile=True).to(ACC)
        my_i = tl.load(sp + 1, mask=live, other=0, volatile=True).to(ACC)
        n_c = n_new - n
        inv_c = 1.0 / tl.maximum(n_c, 1.0)
        cmv = tl.sum(n_i * mv_i, 0) * inv_c
        cmy = tl.sum(n_i * my_i, 0) * inv_c
        dv = mv_i - cmv
        dy = my_i - cmy
        cvv = tl.sum(tl.load(sp + 2, mask=live, other=0, volatile=True).to(ACC) + n_i * dv * dv, 0)
        cyy = tl.sum(tl.load(sp + 3, mask=live, other=0, volatile=True).to(ACC) + n_i * dy * dy, 0)
        cvy = tl.sum(tl.load(sp + 4, mask=live, other=0, volatile=True).to(ACC) + n_i * dv * dy, 0)
        f = n_c / tl.maximum(n_new, 1.0)
        g = n * f
        d_v = cmv - mean_v
        d_y = cmy - mean_y
        return (mean_v + d_v * f, mean_y + d_y * f, m2_v + cvv + d_v * d_v * g, m2_y + cyy + d_y * d_y * g,
                c_vy + cvy + d_v * d_y * g)

    @triton.jit
    def _scalar(hi, lo, ACC: tl.constexpr):
        # Host floats arrive as float32 pairs (hi + lo) so that float64 runs keep full precision.
        return tl.cast(hi, ACC) + tl.cast(lo, ACC)

    # Column strides are not specialised: Triton would then lay tiles out along the C/K axis (contiguous in
    # memory) with 32 lanes per row; unspecialised, each row sits on few lanes (see the module docstring).
    @triton.jit(do_not_specialize=["B", "C", "K", "nprog", "tab_stride", "s_ze1", "s_za1", "s_au1", "s_ma1",
                                   "s_ge1", "s_ga1", "s_r1"])
    def _objective_kernel(
        ze_ptr, za_ptr, v_ptr, expr_ptr, me_ptr, au_ptr, ma_ptr, va_ptr, mv_ptr, r_ptr, mu_ptr, pw_ptr,
        terms_ptr, total_ptr, ge_ptr, ga_ptr, gv_ptr, sync_ptr, cnt_ptr, stat_ptr, part_ptr, tab_ptr, w_ptr,
        B, C, K, nprog, tab_stride,
        s_ze0, s_ze1, s_za0, s_za1, s_v0, s_v1, s_ex, s_me, s_au0, s_au1, s_ma0, s_ma1, s_va0, s_va1, s_mv,
        s_r0, s_r1, s_mu0, s_mu1, s_pw, s_ge0, s_ge1, s_ga0, s_ga1, s_gv0, s_gv1,
        inv_t_hi, inv_t_lo, eps_hi, eps_lo,
        ACC: tl.constexpr, HAS_MU: tl.constexpr, HAS_PW: tl.constexpr, BLOCK_B: tl.constexpr, CP: tl.constexpr,
        KP: tl.constexpr,
        CHUNK: tl.constexpr, DO_STATS: tl.constexpr, DO_MAIN: tl.constexpr, SYNC: tl.constexpr,
        RTNE_BF16: tl.constexpr, USE_DOT: tl.constexpr, DOT_PREC: tl.constexpr,
    ):
        pid = tl.program_id(0)
        nblocks = tl.cdiv(B, BLOCK_B)
        offs_b = tl.arange(0, BLOCK_B)
        cols_c = tl.arange(0, CP)
        cols_k = tl.arange(0, KP)
        cm = cols_c < C
        km = cols_k < K

        # ---- phase 1: label counts and Welford moments of the VA columns over this program's rows ----------
        if DO_STATS:
            c_e = tl.zeros([BLOCK_B], tl.int32)
            c_a = tl.zeros([BLOCK_B], tl.int32)
            c_ca = tl.zeros([BLOCK_B], tl.int32)
            c_h = tl.zeros([BLOCK_B], tl.int32)
            n_l = tl.zeros([BLOCK_B], ACC)  # per-lane running count of VA-labelled rows
            mv0_l = tl.zeros([BLOCK_B], ACC)
            my0_l = tl.zeros([BLOCK_B], ACC)
            vv0_l = tl.zeros([BLOCK_B], ACC)
            yy0_l = tl.zeros([BLOCK_B], ACC)
            vy0_l = tl.zeros([BLOCK_B], ACC)
            mv1_l = tl.zeros([BLOCK_B], ACC)
            my1_l = tl.zeros([BLOCK_B], ACC)
            vv1_l = tl.zeros([BLOCK_B], ACC)
            yy1_l = tl.zeros([BLOCK_B], ACC)
            vy1_l = tl.zeros([BLOCK_B], ACC)
            for blk in range(pid, nblocks, nprog):
                rows = blk * BLOCK_B + offs_b
                rm = rows < B
                r64 = rows.to(tl.int64)
                mk = km[:, None] & rm[None, :]
                me = (tl.load(me_ptr + r64 * s_me, mask=rm, other=0) != 0) & rm
                ma = (tl.load(ma_ptr + r64[None, :] * s_ma0 + cols_k[:, None] * s_ma1, mask=mk, other=0) != 0) & mk
                n_row = tl.sum(ma.to(tl.int32), 0)
                c_e += me.to(tl.int32)
                c_a += n_row
                c_ca += tl.where(me, K - n_row, 0)
                c_h += ((n_row > 0) & (~me)).to(tl.int32)
                lab = (tl.load(mv_ptr + r64 * s_mv, mask=rm, other=0) != 0) & rm
                v0 = tl.load(v_ptr + r64 * s_v0, mask=lab, other=0).to(ACC)
                v1 = tl.load(v_ptr + r64 * s_v0 + s_v1, mask=lab, other=0).to(ACC)
                y0 = tl.load(va_ptr + r64 * s_va0, mask=lab, other=0).to(ACC)
                y1 = tl.load(va_ptr + r64 * s_va0 + s_va1, mask=lab, other=0).to(ACC)
                n_new = n_l + lab.to(ACC)
                inv = 1.0 / tl.maximum(n_new, 1.0)
                # Welford with a co-moment: C += dv (y - mean_y_new).
                dv0 = tl.where(lab, v0 - mv0_l, 0.0)
                dy0 = tl.where(lab, y0 - my0_l, 0.0)
                mv0_l += dv0 * inv
                my0_l += dy0 * inv
                vv0_l += tl.where(lab, dv0 * (v0 - mv0_l), 0.0)
                yy0_l += tl.where(lab, dy0 * (y0 - my0_l), 0.0)
                vy0_l += tl.where(lab, dv0 * (y0 - my0_l), 0.0)
                dv1 = tl.where(lab, v1 - mv1_l, 0.0)
                dy1 = tl.where(lab, y1 - my1_l, 0.0)
                mv1_l += dv1 * inv
                my1_l += dy1 * inv
                vv1_l += tl.where(lab, dv1 * (v1 - mv1_l), 0.0)
                yy1_l += tl.where(lab, dy1 * (y1 - my1_l), 0.0)
                vy1_l += tl.where(lab, dv1 * (y1 - my1_l), 0.0)
                n_l = n_new
            # Lanes -> one partial per program (parallel-variance combination).
            n_p = tl.sum(n_l, 0)
            inv_p = 1.0 / tl.maximum(n_p, 1.0)
            a_v0 = tl.sum(n_l * mv0_l, 0) * inv_p
            a_y0 = tl.sum(n_l * my0_l, 0) * inv_p
            a_v1 = tl.sum(n_l * mv1_l, 0) * inv_p
            a_y1 = tl.sum(n_l * my1_l, 0) * inv_p
            sbase = stat_ptr + pid * 16
            tl.store(sbase + 0, n_p)
            tl.store(sbase + 1, a_v0)
            tl.store(sbase + 2, a_y0)
            tl.store(sbase + 3, tl.sum(vv0_l + n_l * (mv0_l - a_v0) * (mv0_l - a_v0), 0))
            tl.store(sbase + 4, tl.sum(yy0_l + n_l * (my0_l - a_y0) * (my0_l - a_y0), 0))
            tl.store(sbase + 5, tl.sum(vy0_l + n_l * (mv0_l - a_v0) * (my0_l - a_y0), 0))
            tl.store(sbase + 6, a_v1)
            tl.store(sbase + 7, a_y1)
            tl.store(sbase + 8, tl.sum(vv1_l + n_l * (mv1_l - a_v1) * (mv1_l - a_v1), 0))
            tl.store(sbase + 9, tl.sum(yy1_l + n_l * (my1_l - a_y1) * (my1_l - a_y1), 0))
            tl.store(sbase + 10, tl.sum(vy1_l + n_l * (mv1_l - a_v1) * (my1_l - a_y1), 0))
            cbase = cnt_ptr + pid * 8
            tl.store(cbase + 0, tl.sum(c_e, 0))
            tl.store(cbase + 1, tl.sum(c_a, 0))
            tl.store(cbase + 2, tl.sum(c_ca, 0))
            tl.store(cbase + 3, tl.sum(c_h, 0))

            if pid == 0:
                # The smoothed relatedness tables (C×K, zero-padded): Rs, log(1 − Rs), W = log Rs − log(1 − Rs).
                tab = cols_c[:, None] * KP + cols_k[None, :]
                rmask = cm[:, None] & km[None, :]
                eps = _scalar(eps_hi, eps_lo, ACC)
                r = tl.load(r_ptr + cols_c[:, None] * s_r0 + cols_k[None, :] * s_r1, mask=rmask, other=0).to(ACC)
                rs = tl.where(rmask, tl.minimum(tl.maximum(r, eps), 1.0 - eps), 0.0)
                log_1mr = tl.where(rmask, _log1p(-rs), 0.0)
                tl.store(tab_ptr + tab, rs)
                tl.store(tab_ptr + CP * KP + tab, log_1mr)
                tl.store(tab_ptr + 2 * CP * KP + tab, tl.where(rmask, tl.log(tl.where(rmask, rs, 1.0)), 0.0) - log_1mr)

        if SYNC:
            # Grid barrier: the partial slots above must be visible to every program before phase 2.
            tl.debug_barrier()
            arrived = tl.atomic_add(sync_ptr, 1, sem="acq_rel") + 1
            while arrived < nprog:
                arrived = tl.atomic_add(sync_ptr, 0, sem="acquire")
            tl.debug_barrier()

        if DO_MAIN:
            # ---- batch statistics: every program combines all slots, CHUNK at a time, in the same order --------
            n_e = tl.zeros((), tl.int32)
            n_a = tl.zeros((), tl.int32)
            n_ca = tl.zeros((), tl.int32)
            n_h = tl.zeros((), tl.int32)
            n_v = tl.zeros((), ACC)
            mean_v0 = tl.zeros((), ACC)
            mean_y0 = tl.zeros((), ACC)
            m2_v0 = tl.zeros((), ACC)
            m2_y0 = tl.zeros((), ACC)
            c_vy0 = tl.zeros((), ACC)
            mean_v1 = tl.zeros((), ACC)
            mean_y1 = tl.zeros((), ACC)
            m2_v1 = tl.zeros((), ACC)
            m2_y1 = tl.zeros((), ACC)
            c_vy1 = tl.zeros((), ACC)
            for start in range(0, nprog, CHUNK):
                slots = start + tl.arange(0, CHUNK)
                live = slots < nprog
                n_e += tl.sum(tl.load(cnt_ptr + slots * 8 + 0, mask=live, other=0, volatile=True), 0)
                n_a += tl.sum(tl.load(cnt_ptr + slots * 8 + 1, mask=live, other=0, volatile=True), 0)
                n_ca += tl.sum(tl.load(cnt_ptr + slots * 8 + 2, mask=live, other=0, volatile=True), 0)
                n_h += tl.sum(tl.load(cnt_ptr + slots * 8 + 3, mask=live, other=0, volatile=True), 0)
                sp = stat_ptr + slots * 16
                n_i = tl.load(sp + 0, mask=live, other=0, volatile=True).to(ACC)
                n_new = n_v + tl.sum(n_i, 0)
                mean_v0, mean_y0, m2_v0, m2_y0, c_vy0 = _merge_slots(
                    n_v, n_new, mean_v0, mean_y0, m2_v0, m2_y0, c_vy0, n_i, sp + 1, live, ACC)
                mean_v1, mean_y1, m2_v1, m2_y1, c_vy1 = _merge_slots(
                    n_v, n_new, mean_v1, mean_y1, m2_v1, m2_y1, c_vy1, n_i, sp + 6, live, ACC)
                n_v = n_new
            n_e = n_e.to(ACC)
            n_a = n_a.to(ACC)
            n_ca = n_ca.to(ACC)
            n_h = n_h.to(ACC)
            inv_nv = 1.0 / tl.maximum(n_v, 1.0)
            enough = (n_v >= 2.0).to(ACC)
            den0 = (m2_v0 + m2_y0) * inv_nv + (mean_v0 - mean_y0) * (mean_v0 - mean_y0) + 1e-8
            den1 = (m2_v1 + m2_y1) * inv_nv + (mean_v1 - mean_y1) * (mean_v1 - mean_y1) + 1e-8
            ccc0 = 2.0 * c_vy0 * inv_nv / den0
            ccc1 = 2.0 * c_vy1 * inv_nv / den1

            # One weight per term, read from a float64 device buffer: new values never recompile.
            w_expr = tl.load(w_ptr + 0).to(ACC)
            w_au = tl.load(w_ptr + 1).to(ACC)
            w_va = tl.load(w_ptr + 2).to(ACC)
            w_caea = tl.load(w_ptr + 3).to(ACC)
            w_caae = tl.load(w_ptr + 4).to(ACC)
            w_dmea = tl.load(w_ptr + 5).to(ACC)
            w_dmae = tl.load(w_ptr + 6).to(ACC)
            w_ev = tl.load(w_ptr + 7).to(ACC)
            inv_t = _scalar(inv_t_hi, inv_t_lo, ACC)
            b_acc = B.to(ACC)
            inv_b = 1.0 / b_acc
            inv_bk = 1.0 / (b_acc * K.to(ACC))
            # Per-term gradient scales (the weight over the term's denominator).
            s_expr = w_expr / tl.maximum(n_e, 1.0)
            s_au = w_au / tl.maximum(n_a, 1.0)
            s_caea = w_caea / tl.maximum(n_ca, 1.0)
            s_caae = w_caae / tl.maximum(n_h, 1.0)
            s_va = w_va * enough * inv_nv

            # ---- the smoothed relatedness tables, written in phase 1, read per block (L1-resident, short-lived)
            tab = cols_c[:, None] * KP + cols_k[None, :]
            tab_t = cols_k[:, None] + cols_c[None, :] * KP  # the same tables read transposed (K×C)
            # One table row broadcast over the rows of a block (AUs × rows): loaded straight in the layout of the
            # AU tiles, so no layout conversion through shared memory per class.
            tab_row = cols_k[:, None] * tab_stride + 0 * offs_b[None, :]
            bias = tl.sum(tl.load(tab_ptr + CP * KP + tab), 1)  # Σ_k log(1 − Rs[c, k]), one per class
            if HAS_MU:
                mu0 = tl.load(mu_ptr + cols_c * s_mu0, mask=cm, other=0).to(ACC)
                mu1 = tl.load(mu_ptr + cols_c * s_mu0 + s_mu1, mask=cm, other=0).to(ACC)
            if HAS_PW:  # the AUs' positive weights in L_au, one column of the AU tiles
                pw = tl.load(pw_ptr + cols_k * s_pw, mask=km, other=1).to(ACC)[:, None]

            t_expr = tl.zeros((), ACC)
            t_au = tl.zeros((), ACC)
            t_caea = tl.zeros((), ACC)
            t_caae = tl.zeros((), ACC)
            t_dmea = tl.zeros((), ACC)
            t_dmae = tl.zeros((), ACC)
            t_dmev = tl.zeros((), ACC)
            for blk in range(pid, nblocks, nprog):
                rows = blk * BLOCK_B + offs_b
                rm = rows < B
                r64 = rows.to(tl.int64)
                mc = cm[:, None] & rm[None, :]
                mk = km[:, None] & rm[None, :]

                # Expression posterior p = softmax(z_e), classes × rows.
                ze = tl.load(ze_ptr + r64[None, :] * s_ze0 + cols_c[:, None] * s_ze1, mask=mc, other=0).to(ACC)
                ze = tl.where(cm[:, None], ze, float("-inf"))
                zmax = tl.max(ze, 0)
                ez = tl.exp(ze - zmax[None, :])
                sz = tl.sum(ez, 0)
                p = ez / sz[None, :]
                log_p = tl.where(cm[:, None], ze - zmax[None, :] - tl.log(sz)[None, :], 0.0)

                # AU probabilities s = sigmoid(z_a), AUs × rows, in log-sigmoid form (z_a = log s − log(1 − s)).
                za = tl.load(za_ptr + r64[None, :] * s_za0 + cols_k[:, None] * s_za1, mask=mk, other=0).to(ACC)
                log_s = tl.minimum(za, 0.0) - _log1p_unit(tl.exp(-tl.abs(za)))
                log_1ms = log_s - za
                s = tl.exp(log_s)

                # Labels (entries under a false mask are never used, whatever their value).
                me = (tl.load(me_ptr + r64 * s_me, mask=rm, other=0) != 0) & rm
                ma = (tl.load(ma_ptr + r64[None, :] * s_ma0 + cols_k[:, None] * s_ma1, mask=mk, other=0) != 0) & mk
                y = tl.where(ma, tl.load(au_ptr + r64[None, :] * s_au0 + cols_k[:, None] * s_au1, mask=ma,
                                         other=0).to(ACC), 0.0)
                maf = ma.to(ACC)

                # The C×K contractions q = Rsᵀp, u = W s and ℓ_masked(y) = W y + log(1 − Rs) m_a (per row).
                if USE_DOT:
                    w = tl.load(tab_ptr + 2 * CP * KP + tab)
                    q = tl.dot(tl.load(tab_ptr + tab_t), p, input_precision=DOT_PREC, out_dtype=ACC)
                    u = tl.dot(w, s, input_precision=DOT_PREC, out_dtype=ACC)
                    ll = tl.dot(w, y, input_precision=DOT_PREC, out_dtype=ACC)
                    ll = tl.dot(tl.load(tab_ptr + CP * KP + tab), maf, acc=ll, input_precision=DOT_PREC,
                                out_dtype=ACC)
                else:
                    # One class at a time against table rows held in L1 (float64: no tensor-core dot).
                    q = tl.zeros([KP, BLOCK_B], ACC)
                    u = tl.zeros([CP, BLOCK_B], ACC)
                    ll = tl.zeros([CP, BLOCK_B], ACC)
                    for c in range(C):
                        sel = cols_c[:, None] == c
                        rs_c = tl.load(tab_ptr + c * KP + tab_row)
                        l1_c = tl.load(tab_ptr + CP * KP + c * KP + tab_row)
                        w_c = tl.load(tab_ptr + 2 * CP * KP + c * KP + tab_row)
                        q += tl.sum(tl.where(sel, p, 0.0), 0)[None, :] * rs_c
                        u = tl.where(sel, tl.sum(s * w_c, 0)[None, :], u)
                        ll = tl.where(sel, tl.sum(y * w_c + maf * l1_c, 0)[None, :], ll)

                # Supervised AU: BCE over the annotated entries, positives weighted by w+ (HAS_PW):
                # -(w+ y log s + (1 - y) log(1 - s)), gradient (w+ y + 1 - y) s - w+ y.
                if HAS_PW:
                    py = y * pw
                    t_au += tl.sum(tl.sum(tl.where(ma, -(py * log_s + (1.0 - y) * log_1ms), 0.0), 0), 0)
                    g_a = s_au * tl.where(ma, (py + 1.0 - y) * s - py, 0.0)
                else:
                    t_au += tl.sum(tl.sum(tl.where(ma, -(y * log_s + (1.0 - y) * log_1ms), 0.0), 0), 0)
                    g_a = s_au * tl.where(ma, s - y, 0.0)
                h = (tl.sum(ma.to(tl.int32), 0) > 0) & (~me)

                # Supervised expression: CE; an out-of-range class under the mask poisons the term with NaN.
                # The range test runs in the labels' own integer type: narrowing first would wrap a class
                # >= 2^31 to a valid one.
                cls = tl.load(expr_ptr + r64 * s_ex, mask=me, other=0)
                bad_cls = me & ((cls < 0) | (cls >= C))
                cls = tl.where(bad_cls, 0, cls).to(tl.int32)
                onehot = (cols_c[:, None] == cls[None, :]) & me[None, :]
                t_expr += tl.sum(tl.where(bad_cls, float("nan"), -tl.sum(tl.where(onehot, log_p, 0.0), 0)), 0)
                g_e = s_expr * tl.where(me[None, :], p - onehot.to(ACC), 0.0)

                # Co-annotation expression -> AU: soft targets R[y] on the unannotated AUs.
                m_ca = me[None, :] & (~ma) & mk
                t_a = tl.load(r_ptr + cls[None, :] * s_r0 + cols_k[:, None] * s_r1, mask=m_ca, other=0).to(ACC)
                t_caea += tl.sum(tl.sum(tl.where(m_ca, -(t_a * log_s + (1.0 - t_a) * log_1ms), 0.0), 0), 0)
                g_a += s_caea * tl.where(m_ca, s - t_a, 0.0)

                # Co-annotation AU -> expression: t = softmax(ℓ_masked(y) / T) on rows with AUs and no class.
                ll = tl.where(cm[:, None], ll * inv_t, float("-inf"))
                e_ll = tl.exp(ll - tl.max(ll, 0)[None, :])
                t_e = e_ll / tl.sum(e_ll, 0)[None, :]
                t_caae += tl.sum(tl.where(h, -tl.sum(t_e * log_p, 0), 0.0), 0)
                g_e += s_caae * tl.where(h[None, :], p - t_e, 0.0)

                # Distribution matching expression -> AU: KLb(q ‖ s).
                qs = tl.where(km[:, None], q, 0.5)
                log_q = tl.log(qs)
                log_1mq = tl.log(1.0 - qs)  # q is within [eps, 1 - eps]
                t_dmea += tl.sum(tl.sum(tl.where(mk, q * (log_q - log_s) + (1.0 - q) * (log_1mq - log_1ms), 0.0),
                                        0), 0)
                g_a += (w_dmea * inv_bk) * (s - q)
                # ∂/∂q up to w_dmea / (B K): logit(q) − z_a.
                g_q = tl.where(km[:, None], (log_q - log_1mq) - (log_s - log_1ms), 0.0)

                # Distribution matching AU -> expression: KL(q_e ‖ p), q_e = softmax(ℓ(s) / T).
                u = tl.where(cm[:, None], (u + bias[:, None]) * inv_t, float("-inf"))
                umax = tl.max(u, 0)
                eu = tl.exp(u - umax[None, :])
                su = tl.sum(eu, 0)
                qe = eu / su[None, :]
                f = tl.where(cm[:, None], u - umax[None, :] - tl.log(su)[None, :], 0.0) - log_p
                kl = tl.sum(qe * f, 0)
                t_dmae += tl.sum(tl.where(rm, kl, 0.0), 0)
                g_e += (w_dmae * inv_b) * (p - qe)
                g_u = qe * (f - kl[None, :])  # ∂/∂u up to w_dmae / B

                # Pull ∂/∂q back to p (Rs g_q) and ∂/∂u back to s (Wᵀ g_u).
                if USE_DOT:
                    g_p = tl.dot(tl.load(tab_ptr + tab), g_q, input_precision=DOT_PREC, out_dtype=ACC)
                    g_s = tl.dot(tl.load(tab_ptr + 2 * CP * KP + tab_t), g_u, input_precision=DOT_PREC,
                                 out_dtype=ACC)
                else:
                    g_p = tl.zeros([CP, BLOCK_B], ACC)
                    g_s = tl.zeros([KP, BLOCK_B], ACC)
                    for c in range(C):
                        sel = cols_c[:, None] == c
                        rs_c = tl.load(tab_ptr + c * KP + tab_row)
                        w_c = tl.load(tab_ptr + 2 * CP * KP + c * KP + tab_row)
                        g_p = tl.where(sel, tl.sum(g_q * rs_c, 0)[None, :], g_p)
                        g_s += tl.sum(tl.where(sel, g_u, 0.0), 0)[None, :] * w_c
                g_p *= w_dmea * inv_bk
                g_a += g_s * ((w_dmae * inv_b) * inv_t) * (s * tl.exp(log_1ms))
                tl.store(ga_ptr + r64[None, :] * s_ga0 + cols_k[:, None] * s_ga1,
                         _out(g_a, ga_ptr, RTNE_BF16), mask=mk)

                # VA inputs and labels.
                lab = (tl.load(mv_ptr + r64 * s_mv, mask=rm, other=0) != 0) & rm
                v0 = tl.load(v_ptr + r64 * s_v0, mask=rm, other=0).to(ACC)
                v1 = tl.load(v_ptr + r64 * s_v0 + s_v1, mask=rm, other=0).to(ACC)
                y0 = tl.where(lab, tl.load(va_ptr + r64 * s_va0, mask=lab, other=0).to(ACC), 0.0)
                y1 = tl.where(lab, tl.load(va_ptr + r64 * s_va0 + s_va1, mask=lab, other=0).to(ACC), 0.0)

                # Distribution matching expression -> VA: ½‖v − p·μ‖².
                g_v0 = tl.zeros([BLOCK_B], ACC)
                g_v1 = tl.zeros([BLOCK_B], ACC)
                if HAS_MU:
                    r0 = v0 - tl.sum(p * mu0[:, None], 0)
                    r1 = v1 - tl.sum(p * mu1[:, None], 0)
                    t_dmev += tl.sum(tl.where(rm, 0.5 * (r0 * r0 + r1 * r1), 0.0), 0)
                    g_v0 += (w_ev * inv_b) * r0
                    g_v1 += (w_ev * inv_b) * r1
                    g_p -= (w_ev * inv_b) * (r0[None, :] * mu0[:, None] + r1[None, :] * mu1[:, None])
                # Pull ∂/∂p back through the softmax.
                g_e += p * (g_p - tl.sum(p * g_p, 0)[None, :])

                # Valence/arousal 1 − CCC with the batch statistics.
                g_v0 -= s_va * tl.where(lab, (y0 - mean_y0) - ccc0 * (v0 - mean_y0), 0.0) / den0
                g_v1 -= s_va * tl.where(lab, (y1 - mean_y1) - ccc1 * (v1 - mean_y1), 0.0) / den1

                tl.store(ge_ptr + r64[None, :] * s_ge0 + cols_c[:, None] * s_ge1,
                         _out(g_e, ge_ptr, RTNE_BF16), mask=mc)
                tl.store(gv_ptr + r64 * s_gv0, _out(g_v0, gv_ptr, RTNE_BF16), mask=rm)
                tl.store(gv_ptr + r64 * s_gv0 + s_gv1, _out(g_v1, gv_ptr, RTNE_BF16), mask=rm)

            # ---- finish: the last program to take a ticket reduces the term numerators -----------------------
            pbase = part_ptr + pid * 8
            tl.store(pbase + 0, t_expr)
            tl.store(pbase + 1, t_au)
            tl.store(pbase + 2, t_caea)
            tl.store(pbase + 3, t_caae)
            tl.store(pbase + 4, t_dmea)
            tl.store(pbase + 5, t_dmae)
            tl.store(pbase + 6, t_dmev)
            tl.debug_barrier()
            ticket = tl.atomic_add(sync_ptr + 1, 1, sem="acq_rel")
            if ticket == nprog - 1:
                sums = tl.zeros([8], ACC)
                for start in range(0, nprog, CHUNK):
                    slots = start + tl.arange(0, CHUNK)
                    pp = part_ptr + slots[:, None] * 8 + tl.arange(0, 8)[None, :]
                    sums += tl.sum(tl.load(pp, mask=(slots < nprog)[:, None], other=0, volatile=True), 0)
                j = tl.arange(0, 8)
                l_expr = tl.sum(tl.where(j == 0, sums, 0.0), 0) / tl.maximum(n_e, 1.0)
                l_au = tl.sum(tl.where(j == 1, sums, 0.0), 0) / tl.maximum(n_a, 1.0)
                l_caea = tl.sum(tl.where(j == 2, sums, 0.0), 0) / tl.maximum(n_ca, 1.0)
                l_caae = tl.sum(tl.where(j == 3, sums, 0.0), 0) / tl.maximum(n_h, 1.0)
                l_dmea = tl.sum(tl.where(j == 4, sums, 0.0), 0) * inv_bk
                l_dmae = tl.sum(tl.where(j == 5, sums, 0.0), 0) * inv_b
                l_dmev = tl.sum(tl.where(j == 6, sums, 0.0), 0) * inv_b
                l_va = enough * (1.0 - 0.5 * (ccc0 + ccc1))
                total = (w_expr * l_expr + w_au * l_au + w_va * l_va + w_caea * l_caea + w_caae * l_caae
                         + w_dmea * l_dmea + w_dmae * l_dmae + w_ev * l_dmev)
                out_t = terms_ptr.dtype.element_ty  # float32, float64 for float64 inputs
                tl.store(total_ptr, total.to(out_t))  # the differentiable output, apart from the log vector
                tl.store(terms_ptr + 0, total.to(out_t))
                tl.store(terms_ptr + 1, l_expr.to(out_t))
                tl.store(terms_ptr + 2, l_au.to(out_t))
                tl.store(terms_ptr + 3, l_va.to(out_t))
                tl.store(terms_ptr + 4, l_caea.to(out_t))
                tl.store(terms_ptr + 5, l_caae.to(out_t))
                tl.store(terms_ptr + 6, l_dmea.to(out_t))
                tl.store(terms_ptr + 7, l_dmae.to(out_t))
                tl.store(terms_ptr + 8, l_dmev.to(out_t))
                # Re-arm both counters for the next launch.
                tl.atomic_xchg(sync_ptr, 0)
                tl.atomic_xchg(sync_ptr + 1, 0)


#: Whether the kernels were defined under the Triton interpreter (``TRITON_INTERPRET=1`` at import): they
#: then run in Python on CPU tensors.
INTERPRET = triton is not None and type(_objective_kernel).__name__ == "InterpretedFunction"

# ---------------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------------

#: Most programs resident per SM that the fused launch asks for.
_OCC_CAP = 16
_lock = threading.Lock()
_SYNC: dict[torch.device, Tensor] = {}  # per device: [arrivals, tickets], left at zero by every launch
_OCC: dict[tuple, int] = {}  # compiled variant -> programs per SM
#: Per compiled GPU variant: registers, spills, shared memory and programs per SM (for benchmarks and tuning).
LAUNCH_INFO: dict[str, dict] = {}
#: The plan of the latest launch (programs, rows per block, warps, fused or split), for benchmarks.
last_plan: dict = {}


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@functools.lru_cache(maxsize=64)
def _scalar_args(values: tuple[float, ...]) -> tuple[float, ...]:
    """Each value as two float32 numbers (hi, lo) whose sum carries ~48 bits, for float64 runs."""
    out: list[float] = []
    for x in values:
        hi = float(np.float32(x))
        out += [hi, float(np.float32(x - hi))]
    return tuple(out)


def _sync_buffer(device: torch.device) -> Tensor:
    buf = _SYNC.get(device)
    if buf is not None:
        return buf
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # Memory allocated now belongs to the graph's private pool: keep it to this call; the captured
        # zero-fill re-arms it on every replay.
        return torch.zeros(2, dtype=torch.int32, device=device)
    with _lock:
        if device not in _SYNC:
            buf = torch.zeros(2, dtype=torch.int32, device=device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # once per device: later calls may come from another stream
            _SYNC[device] = buf
    return _SYNC[device]


@functools.lru_cache(maxsize=1)
def cooperative_launch_supported() -> bool:
    """Whether the installed Triton can launch a grid cooperatively (all programs co-resident or an error)."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_cooperative_grid" in getattr(CUDAOptions, "__dataclass_fields__", {})


def default_tile(c: int, k: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """``(block_b, num_warps, num_stages)`` on a GPU for C, K and the logits' dtype.

    Tiles are classes/AUs × rows; a block's rows are spread over the lanes of its warps so that per-row
    reductions stay within a few threads, per-row scalars are not replicated 32 times, and no layout conversion
    is needed. The sizes come from ptxas's reports for sm_80 and sm_90 (``profiling/compile_targets.py``,
    tables in ``profiling/results/compile_triton-*.json``). Face shape, Triton 3.7.1: 8 rows on 2 warps use
    at most 229 registers with VA means and AU positive weights (210 without) and spill nothing on either
    target for any logit dtype, where 16 rows on one warp
    spill 28-180 B a thread (float64: 1.5-1.9 KB) and 8 rows on one warp reach 237-255 registers (float64
    spills 152-432 B); float64 takes 2 rows on 2 warps (8 rows on 2 warps spill 32-128 B). Triton 3.6.0 spills
    nothing on sm_90 either (what the tests enforce) but 48 B on sm_80 without VA means (float32 single launch,
    float64 both modes). C, K <= :data:`MAX_DIM` share these plans: C = K = 32 spills nothing (230-251
    registers), the small test shapes (1×1 to 5×9), at 96-238 registers, spill 4-36 B on some kernels. (The
    candidate tiles were compared before the AU positive weights existed: ``compile_triton-3.7.1-full.json``.)
    """
    return (2, 2, 1) if dtype == torch.float64 else (8, 2, 1)


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _occupancy(compiled, num_warps: int, device: torch.device) -> int:
    """Programs of ``compiled`` that one SM holds at once, from its registers and shared memory."""
    props = torch.cuda.get_device_properties(device)
    regs_sm = getattr(props, "regs_per_multiprocessor", 65536)
    smem_sm = getattr(props, "shared_memory_per_multiprocessor", 96 * 1024)
    warps_sm = getattr(props, "max_threads_per_multi_processor", 1536) // 32
    warp_regs = -(-max(int(compiled.n_regs), 1) * 32 // 256) * 256
    by_regs = (regs_sm // warp_regs) // num_warps
    shared = int(compiled.metadata.shared)
    by_smem = smem_sm // (shared + 1024) if shared else _OCC_CAP
    return max(1, min(by_regs, by_smem, warps_sm // num_warps, 32, _OCC_CAP))


def program_count(device: torch.device, row_blocks: int, per_sm: int | None = None) -> int:
    """Programs of a GPU launch: ``min(row_blocks, #SMs × per_sm)``.

    ``per_sm`` is ``_OCC_CAP`` (16) for the split plan, so there the count is a function of the device alone
    (and the batch): results are bit-identical across Triton versions and register allocations. The grid-barrier
    mode passes the programs per SM of its compiled kernel (registers, shared memory), so there it is a
    function of (device, kernel build); a refused cooperative launch halves it (see :func:`cooperative_refusal`).
    """
    return max(1, min(row_blocks, _sm_count(device) * (per_sm or _OCC_CAP)))


#: What the driver says when a cooperative grid is larger than what fits at once
#: (CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE; Triton raises it as "Triton Error [CUDA]: <this>").
COOPERATIVE_REFUSAL = "too many blocks in cooperative launch"


def cooperative_refusal(exc: BaseException) -> bool:
    """Whether ``exc`` is the driver refusing a cooperative grid as too large (nothing ran: a smaller grid may be
    retried). Any other error (an illegal address, a compile error) is not, and must propagate unchanged."""
    return isinstance(exc, RuntimeError) and COOPERATIVE_REFUSAL in str(exc)


def limits(z_e: Tensor, b: int, c: int, k: int) -> None:
    """The ``triton`` backend's own limits on top of the op's contract: C, K <= :data:`MAX_DIM`, CUDA (or,
    under the interpreter, CPU) tensors."""
    if c > MAX_DIM or k > MAX_DIM:
        raise ValueError(f"z_e, z_a: C = {c} and K = {k} must be in [1, {MAX_DIM}] for backend 'triton' "
                         f"(MAX_DIM: wider tiles spill kilobytes per thread); use backend 'cuda', 'cpu' or 'torch'")
    if z_e.device.type not in ("cuda", "cpu"):  # CPU tensors run under the interpreter (see availability())
        raise ValueError(f"z_e is on {z_e.device}: backend 'triton' takes CUDA tensors (or CPU tensors under "
                         f"TRITON_INTERPRET=1)")


def triton_objective(
    z_e: Tensor, z_a: Tensor, v: Tensor, expr: Tensor, expr_mask: Tensor, au: Tensor, au_mask: Tensor,
    va: Tensor, va_mask: Tensor, relatedness: Tensor, va_means: Tensor | None, au_pos_weight: Tensor | None,
    weights: Tensor | Sequence[float], temperature: float, eps: float, *, split: bool | None = None,
    block_b: int | None = None,
    num_warps: int | None = None, num_stages: int | None = None, programs: int | None = None,
    use_dot: bool | None = None, check: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The total (0-d), ``[total, *TERMS]`` (float32, float64 for float64 inputs) and the gradients of the total
    w.r.t. ``z_e``, ``z_a``, ``v``. ``weights``: one per term (a tensor on the device, which the kernel reads
    from memory, so new values never recompile; or floats; or the six of ``WEIGHTS``); ``au_pos_weight``: (K,)
    weights of the AUs' positive labels in ``L_au`` (``None``: 1).

    Backend ``triton``; ``check`` runs the op's input check (:func:`fbn_fast.losses.op.check_inputs`; the op
    itself calls this with ``check=False``, having checked). The keywords override the launch plan, for tests
    and tuning: ``split`` (two launches instead of the grid barrier; under the interpreter more than one
    program needs it; ``None``: the documented switch, :func:`fbn_fast.losses.backends.grid_barrier`),
    ``block_b`` (rows per block), ``num_warps``, ``num_stages``, ``programs`` (at most this many programs)
    and ``use_dot`` (the C×K contractions as ``tl.dot`` on tensor cores in TF32×3, C, K <=
    :data:`DOT_MAX_DIM`; float64 never uses ``tl.dot``).
    """
    if check:
        check_inputs("triton", z_e, z_a, v, expr, expr_mask, au, au_mask, va, va_mask, relatedness, va_means,
                     au_pos_weight, weights, temperature, eps)
    if triton is None:
        raise RuntimeError(f"triton is not importable: {_IMPORT_ERROR}")
    b, c = z_e.shape
    k = z_a.shape[1]
    device = z_e.device
    acc, acc_t = (tl.float64, torch.float64) if z_e.dtype == torch.float64 else (tl.float32, torch.float32)
    on_gpu = device.type == "cuda" and not INTERPRET
    use_dot = bool(use_dot) and acc_t == torch.float32
    if use_dot and max(c, k) > DOT_MAX_DIM:
        raise ValueError(f"use_dot=True takes C, K <= {DOT_MAX_DIM} (DOT_MAX_DIM), got C = {c}, K = {k}")
    floor = 16 if use_dot else 2  # tl.dot needs every dimension >= 16
    c_pad, k_pad = max(floor, _next_pow2(c)), max(floor, _next_pow2(k))
    if on_gpu:
        tile = default_tile(c, k, z_e.dtype)
    else:
        # The interpreter pays per program and per loop trip, not per element: big blocks, one program.
        tile = (min(256, _next_pow2(b)), 4, 1)
    block = block_b or max(floor, tile[0])
    if block < floor or block & (block - 1):
        raise ValueError(f"block_b = {block} must be a power of two >= {floor}")
    num_warps = num_warps or tile[1]
    num_stages = num_stages or tile[2]
    nblocks = -(-b // block)

    terms = torch.empty(9, dtype=acc_t, device=device)
    total = torch.empty((), dtype=acc_t, device=device)
    wts = kernel_weights(weights, device)
    g_e, g_a, g_v = torch.empty_like(z_e), torch.empty_like(z_a), torch.empty_like(v)
    mu = relatedness if va_means is None else va_means  # placeholder pointer when there is no μ
    pw = relatedness if au_pos_weight is None else au_pos_weight  # likewise without positive weights
    hi_lo = _scalar_args((1.0 / float(temperature), float(eps)))
    scalar_names = [f"{n}_{part}" for n in ("inv_t", "eps") for part in ("hi", "lo")]
    # Partial slots for the most programs this launch can have.
    slots = program_count(device, 1 << 62) if on_gpu else max(1, min(programs or 1, nblocks))
    kw = dict(
        ze_ptr=z_e, za_ptr=z_a, v_ptr=v, expr_ptr=expr, me_ptr=expr_mask, au_ptr=au, ma_ptr=au_mask, va_ptr=va,
        mv_ptr=va_mask, r_ptr=relatedness, mu_ptr=mu, pw_ptr=pw, terms_ptr=terms, total_ptr=total, ge_ptr=g_e,
        ga_ptr=g_a,
        gv_ptr=g_v,
        cnt_ptr=torch.empty(slots * _NCNT, dtype=torch.int32, device=device),
        stat_ptr=torch.empty(slots * _NSTAT, dtype=acc_t, device=device),
        part_ptr=torch.empty(slots * _NPART, dtype=acc_t, device=device),
        tab_ptr=torch.empty(3 * c_pad * k_pad, dtype=acc_t, device=device), w_ptr=wts,
        B=b, C=c, K=k, nprog=1, tab_stride=1,
        s_ze0=z_e.stride(0), s_ze1=z_e.stride(1), s_za0=z_a.stride(0), s_za1=z_a.stride(1), s_v0=v.stride(0),
        s_v1=v.stride(1), s_ex=expr.stride(0), s_me=expr_mask.stride(0), s_au0=au.stride(0), s_au1=au.stride(1),
        s_ma0=au_mask.stride(0), s_ma1=au_mask.stride(1), s_va0=va.stride(0), s_va1=va.stride(1),
        s_mv=va_mask.stride(0), s_r0=relatedness.stride(0), s_r1=relatedness.stride(1), s_mu0=mu.stride(0),
        s_mu1=mu.stride(1), s_pw=pw.stride(0), s_ge0=g_e.stride(0), s_ge1=g_e.stride(1), s_ga0=g_a.stride(0),
        s_ga1=g_a.stride(1),
        s_gv0=g_v.stride(0), s_gv1=g_v.stride(1), **dict(zip(scalar_names, hi_lo)),
        ACC=acc, HAS_MU=va_means is not None, HAS_PW=au_pos_weight is not None, BLOCK_B=block, CP=c_pad, KP=k_pad,
        CHUNK=32 * num_warps,
        RTNE_BF16=INTERPRET, USE_DOT=use_dot, DOT_PREC="tf32x3", num_warps=num_warps, num_stages=num_stages,
    )

    if not on_gpu:
        nprog = max(1, min(programs or 1, nblocks))
        # Programs run one after another here, so a barrier among several would never open.
        fused = not split and nprog == 1
        kw["sync_ptr"] = _sync_buffer(device)
        return _run(kw, nprog, fused, total, terms, g_e, g_a, g_v)
    with torch.cuda.device(device):  # compile, query and launch on the tensors' device, not the current one
        kw["sync_ptr"] = _sync_buffer(device)  # its capture check and first zero-fill use this device's stream
        coop = cooperative_launch_supported()
        # Without a cooperative launch nothing promises that all programs are resident: never spin then. The
        # barrier is opt-in (a documented switch) and only for tiles that do not spill.
        if split is None:
            fused = coop and grid_barrier() and max(c, k) <= BARRIER_MAX_DIM
        else:
            fused = not split and coop
        if fused:
            kw["launch_cooperative_grid"] = True
        key = (device, *(t.dtype for t in (z_e, z_a, v)), va_means is not None, au_pos_weight is not None, c_pad,
               k_pad, block, num_warps,
               num_stages, fused, use_dot)
        occ = _OCC.get(key)
        if occ is None:
            # Compile (without launching) the variant whose registers bound the occupancy: the fused kernel, or
            # the main pass of the split pair.
            compiled = _objective_kernel.warmup(**kw, grid=(1,), DO_STATS=fused, DO_MAIN=True, SYNC=fused)
            compiled._init_handles()
            occ = _OCC.setdefault(key, _occupancy(compiled, num_warps, device))
            LAUNCH_INFO[repr(key)] = {"n_regs": int(compiled.n_regs), "n_spills": int(compiled.n_spills),
                                      "shared": int(compiled.metadata.shared), "programs_per_sm": occ}
        nprog = min(programs or nblocks, program_count(device, nblocks, occ if fused else None))
        if not fused:
            return _run(kw, nprog, False, total, terms, g_e, g_a, g_v)
        return _run_cooperative(kw, key, occ, nprog, nblocks, device, (total, terms, g_e, g_a, g_v))


def _run_cooperative(kw: dict, key: tuple, occ: int, nprog: int, nblocks: int, device: torch.device,
                     outs: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The fused launch of ``nprog`` programs (``occ`` per SM, the estimate stored under ``key``). Only the
    driver's refusal of a too-large cooperative grid (nothing ran) is retried, with half the programs per SM,
    remembered for this variant; anything else propagates unchanged and leaves the estimate alone."""
    while True:
        try:
            return _run(kw, nprog, True, *outs)
        except RuntimeError as exc:
            if not (cooperative_refusal(exc) and occ > 1 and not torch.cuda.is_current_stream_capturing()):
                raise
            occ = _OCC[key] = occ // 2
            LAUNCH_INFO.get(repr(key), {})["programs_per_sm"] = occ
            nprog = min(nprog, program_count(device, nblocks, occ))


def _run(kw: dict, nprog: int, fused: bool, total: Tensor, terms: Tensor, g_e: Tensor, g_a: Tensor,
         g_v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Launch ``nprog`` programs: one fused launch (the grid barrier), or the split pair (statistics, then the
    main pass reading their partial slots) that never spins."""
    kw["nprog"] = nprog
    last_plan.update(programs=nprog, block_b=kw["BLOCK_B"], num_warps=kw["num_warps"], fused=fused,
                     use_dot=kw["USE_DOT"])
    if fused:
        _objective_kernel[(nprog,)](**kw, DO_STATS=True, DO_MAIN=True, SYNC=True)
    else:
        _objective_kernel[(nprog,)](**kw, DO_STATS=True, DO_MAIN=False, SYNC=False)
        _objective_kernel[(nprog,)](**kw, DO_STATS=False, DO_MAIN=True, SYNC=False)
    return total, terms, g_e, g_a, g_v


def availability(backend: str, device: torch.device) -> str | None:
    """``None`` when ``backend`` (``triton``) can run on ``device``, else the reason it cannot."""
    if backend != "triton":
        return f"{__name__} provides only the 'triton' backend, not {backend!r}"
    if triton is None:
        return f"triton is not importable: {_IMPORT_ERROR}"
    device = torch.device(device)
    if device.type == "cpu":
        if not INTERPRET:
            return "Triton runs on CPU tensors only through its interpreter (set TRITON_INTERPRET=1 before import)"
        return None
    if device.type == "cuda":
        if INTERPRET:
            return "Triton is in interpreter mode (TRITON_INTERPRET=1); CUDA tensors need the compiled kernels"
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        return None
    return f"no Triton path for {device.type} tensors"


def _op_impl(*args: Any) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return triton_objective(*args, check=False)


register_impl("triton", _op_impl, limits)
