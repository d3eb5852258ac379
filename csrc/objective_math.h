// The co-training objective of method.md §3, per row: forward terms and closed-form gradients.
//
// Written once and compiled three ways: by the host C++ compiler (CPU backend, where the value type V is
// a pack of rows handled in SIMD lanes, or one double), by nvcc and by NVRTC (CUDA backend, V = one row
// per thread). The formulas follow fbn_fast/losses/analytic.py term by term; that file's docstring is the
// derivation. Nothing here allocates, and under NVRTC nothing includes a header.
//
// A caller runs two passes over the batch:
//   1. row_counts(): label counts and raw valence/arousal moments, summed over the batch (Sum1);
//   2. objective_row(): the per-row terms and gradients, which need those batch statistics (Scales),
//      with the per-row terms summed over the batch (Sum2);
// and finally finalize_terms() turns the sums of both passes into the nine reported terms.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define FBN_HD __host__ __device__ __forceinline__
#define FBN_DEVICE_BUILD 1
#else
#include <cmath>
#define FBN_HD inline __attribute__((always_inline))
#endif

namespace fbn {

// ---------------------------------------------------------------------------------------------------
// Scalar math, overloaded on the value type (float or double; the CPU pack type adds its own below).
// ---------------------------------------------------------------------------------------------------
#if defined(FBN_DEVICE_BUILD)
FBN_HD float vexp(float x) { return expf(x); }
FBN_HD double vexp(double x) { return exp(x); }
FBN_HD float vlog(float x) { return logf(x); }
FBN_HD double vlog(double x) { return log(x); }
FBN_HD float vlog1p(float x) { return log1pf(x); }
FBN_HD double vlog1p(double x) { return log1p(x); }
#else
FBN_HD float vexp(float x) { return std::exp(x); }
FBN_HD double vexp(double x) { return std::exp(x); }
FBN_HD float vlog(float x) { return std::log(x); }
FBN_HD double vlog(double x) { return std::log(x); }
FBN_HD float vlog1p(float x) { return std::log1p(x); }
FBN_HD double vlog1p(double x) { return std::log1p(x); }
#endif

// Written with the conditional operator so that the same text works for scalars and for GCC vector
// types (where `m ? a : b` is a lane-wise blend).
template <class M, class V>
FBN_HD V select(M m, V a, V b) { return m ? a : b; }
template <class V>
FBN_HD V vmax(V a, V b) { return a > b ? a : b; }
template <class V>
FBN_HD V vmin(V a, V b) { return a < b ? a : b; }

FBN_HD double quiet_nan() {
#if defined(__CUDA_ARCH__)
    return __longlong_as_double(0x7ff8000000000000LL);
#else
    return __builtin_nan("");
#endif
}

#if !defined(FBN_DEVICE_BUILD)
// CPU packs of 4, 8 or 16 rows, one per SIMD lane (GCC/Clang vector extension). exp and log are the
// branch-free Cephes single-precision forms (about 1 ulp), so whole rows vectorise.
// Compiled for the SSE2 baseline, GCC gives these types 16-byte alignment, while the AVX clones of the
// CPU driver assume their full size: arrays of packs on the heap are therefore aligned by hand.
typedef float f32x4 __attribute__((vector_size(16)));
typedef int i32x4 __attribute__((vector_size(16)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef int i32x8 __attribute__((vector_size(32)));
typedef float f32x16 __attribute__((vector_size(64)));
typedef int i32x16 __attribute__((vector_size(64)));

template <class F, class I>
FBN_HD F vexp_pack(F x) {
    const F zero = F{};
    x = vmin(vmax(x, zero - 87.0f), zero + 88.0f);  // keeps 2^n a normal number
    F n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
    F r = x - n * 0.693359375f + n * 2.12194440e-4f;
    F p = zero + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    F y = p * (r * r) + r + 1.0f;
    I bits = (__builtin_convertvector(n, I) + 127) << 23;
    return y * (F)bits;
}

// Natural log of positive normal numbers (every argument here is >= eps or >= 1).
template <class F, class I>
FBN_HD F vlog_pack(F x) {
    const F zero = F{};
    I bits = (I)x;
    I e = ((bits >> 23) & 0xff) - 126;
    F m = (F)((bits & 0x807fffff) | 0x3f000000);  // x = m 2^e, m in [0.5, 1)
    I small = m < zero + 0.707106781186547524f;
    e = e + small;  // true lanes are -1
    m = select(small, m + m, m) - 1.0f;
    F z = m * m;
    F y = zero + 7.0376836292e-2f;
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z;
    F ef = __builtin_convertvector(e, F);
    y = y - ef * 2.12194440e-4f - z * 0.5f;
    return m + y + ef * 0.693359375f;
}

FBN_HD f32x4 vexp(f32x4 x) { return vexp_pack<f32x4, i32x4>(x); }
FBN_HD f32x8 vexp(f32x8 x) { return vexp_pack<f32x8, i32x8>(x); }
FBN_HD f32x16 vexp(f32x16 x) { return vexp_pack<f32x16, i32x16>(x); }
FBN_HD f32x4 vlog(f32x4 x) { return vlog_pack<f32x4, i32x4>(x); }
FBN_HD f32x8 vlog(f32x8 x) { return vlog_pack<f32x8, i32x8>(x); }
FBN_HD f32x16 vlog(f32x16 x) { return vlog_pack<f32x16, i32x16>(x); }
#endif

// ---------------------------------------------------------------------------------------------------
// Shapes, tables and batch statistics.
// ---------------------------------------------------------------------------------------------------

// C and K, either fixed at compile time (CC, KK > 0: loops unroll and row arrays live in registers)
// or given at run time (CC = KK = 0).
template <int CC, int KK>
struct Dims {
    int c_, k_;
    FBN_HD int C() const { return CC > 0 ? CC : c_; }
    FBN_HD int K() const { return KK > 0 ? KK : k_; }
};

// Per-call tables derived from the relatedness matrix R (C×K), stored back to back:
//   R (raw, the co-annotation targets), Rs = clip(R, eps, 1-eps), W = log Rs - log(1-Rs), L1m = log(1-Rs),
//   then sum_k L1m[c,k] (C values), the VA means mu (C×2, zeros without them) and the AUs' positive weights
//   in L_au (K values, ones without them).
FBN_HD long long tab_size(int C, int K) { return 4LL * C * K + 3LL * C + K; }
FBN_HD long long tab_rs(int C, int K) { return 1LL * C * K; }
FBN_HD long long tab_w(int C, int K) { return 2LL * C * K; }
FBN_HD long long tab_l1m(int C, int K) { return 3LL * C * K; }
FBN_HD long long tab_sl1m(int C, int K) { return 4LL * C * K; }
FBN_HD long long tab_mu(int C, int K) { return 4LL * C * K + C; }
FBN_HD long long tab_pw(int C, int K) { return 4LL * C * K + 3LL * C; }

// Rs = clip(R, eps, 1 - eps).
template <class T>
FBN_HD T clip_r(T r, T eps) { return r < eps ? eps : (r > T(1) - eps ? T(1) - eps : r); }

// One entry of the tables; returns log(1 - Rs) so that callers can form the row sums.
template <class T>
FBN_HD T table_entry(T r, T eps, T* tab, long long i, int C, int K) {
    T rs = clip_r(r, eps);
    T l1m = vlog1p(-rs);
    tab[i] = r;
    tab[tab_rs(C, K) + i] = rs;
    tab[tab_w(C, K) + i] = vlog(rs) - l1m;
    tab[tab_l1m(C, K) + i] = l1m;
    return l1m;
}

// Batch sums of pass 1 (all in double: counts are exact, moments are sums of values in [-1, 1]).
enum Sum1 {
    S1_NE,     // rows with an expression label
    S1_NA,     // annotated AU entries
    S1_NCA,    // entries (b, k) with an expression label and AU k unannotated
    S1_NH,     // rows with AU labels and no expression label
    S1_NV,     // rows with a VA label
    S1_BAD,    // rows whose expression label is outside [0, C) under a true mask
    S1_V = 6,  // sum of v_i over VA rows (i = 0, 1), then y_i, v_i^2, y_i^2, v_i*y_i
    S1_Y = 8,
    S1_VV = 10,
    S1_YY = 12,
    S1_VY = 14,
    NSUM1 = 16
};
// Terms (and per-term weights): expr, au, va, ca_ea, ca_ae, dm_ea, dm_ae, dm_ev.
constexpr int NTERMS = 8;
// Batch sums of pass 2: the unnormalised terms.
enum Sum2 { S2_EXPR, S2_AU, S2_CA_EA, S2_CA_AE, S2_DM_EA, S2_DM_AE, S2_DM_EV, NSUM2 };

// Pass 1 for one row: adds its counts and moments to s (NSUM1 doubles).
template <class T>
FBN_HD void row_counts(bool me, long long cls, int C, int n_ann, int K, bool mv, T v0, T v1, T y0, T y1,
                       double* s) {
    s[S1_NE] += me ? 1.0 : 0.0;
    s[S1_NA] += n_ann;
    s[S1_NCA] += me ? double(K - n_ann) : 0.0;
    s[S1_NH] += (n_ann > 0 && !me) ? 1.0 : 0.0;
    s[S1_BAD] += (me && (cls < 0 || cls >= C)) ? 1.0 : 0.0;
    if (mv) {
        double a0 = double(v0), a1 = double(v1), b0 = double(y0), b1 = double(y1);
        s[S1_NV] += 1.0;
        s[S1_V] += a0; s[S1_V + 1] += a1;
        s[S1_Y] += b0; s[S1_Y + 1] += b1;
        s[S1_VV] += a0 * a0; s[S1_VV + 1] += a1 * a1;
        s[S1_YY] += b0 * b0; s[S1_YY + 1] += b1 * b1;
        s[S1_VY] += a0 * b0; s[S1_VY + 1] += a1 * b1;
    }
}

// Concordance statistics of dimension i from the pass-1 sums (population moments, method.md §3).
struct VaStats {
    double mean_y, den, ccc;
};
FBN_HD double norm1(double n) { return n > 1.0 ? n : 1.0; }  // a count, at least 1 (empty terms are 0)

FBN_HD VaStats va_stats(const double* s, int i) {
    double n = norm1(s[S1_NV]);
    double mv = s[S1_V + i] / n, my = s[S1_Y + i] / n;
    double var_v = s[S1_VV + i] / n - mv * mv;
    double var_y = s[S1_YY + i] / n - my * my;
    double cov = s[S1_VY + i] / n - mv * my;
    double den = var_v + var_y + (mv - my) * (mv - my) + 1e-8;
    VaStats st;
    st.mean_y = my;
    st.den = den;
    st.ccc = 2.0 * cov / den;
    return st;
}

// Everything a row needs from the batch: each term's weight over its normaliser, and the CCC pieces.
template <class T>
struct Scales {
    T a_expr, a_au, a_ca_ea, a_ca_ae, a_dm_ea, a_dm_ae, a_dm_ev, inv_t;
    T va_coef[2], va_mean_y[2], va_ccc[2];
};

// w: one weight per term (expr, au, va, ca_ea, ca_ae, dm_ea, dm_ae, dm_ev), read from memory (a device
// tensor on the GPU) so that new values never recompile a caller; has_mu: whether VA means were given.
template <class T>
FBN_HD Scales<T> make_scales(const double* s, const double* w, long long B, int K, double inv_t, bool has_mu) {
    Scales<T> sc;
    sc.a_expr = T(w[0] / norm1(s[S1_NE]));
    sc.a_au = T(w[1] / norm1(s[S1_NA]));
    sc.a_ca_ea = T(w[3] / norm1(s[S1_NCA]));
    sc.a_ca_ae = T(w[4] / norm1(s[S1_NH]));
    sc.a_dm_ea = T(w[5] / (double(B) * double(K)));
    sc.a_dm_ae = T(w[6] / double(B));
    sc.a_dm_ev = has_mu ? T(w[7] / double(B)) : T(0);
    sc.inv_t = T(inv_t);
    bool enough = s[S1_NV] >= 2.0;
    for (int i = 0; i < 2; ++i) {
        VaStats st = va_stats(s, i);
        // d(1 - mean CCC)/dv_b = -m_b [(y_b - mean_y) - CCC (v_b - mean_y)] / (n den)
        sc.va_coef[i] = enough ? T(-w[2] / (norm1(s[S1_NV]) * st.den)) : T(0);
        sc.va_mean_y[i] = T(st.mean_y);
        sc.va_ccc[i] = T(st.ccc);
    }
    return sc;
}

// [total, expr, au, va, ca_ea, ca_ae, dm_ea, dm_ae, dm_ev] from the reduced sums of both passes.
template <class T>
FBN_HD void finalize_terms(const double* s1, const double* s2, const double* w, long long B, int K, bool has_mu,
                           T* out) {
    double t[9];
    t[1] = s2[S2_EXPR] / norm1(s1[S1_NE]);
    t[2] = s2[S2_AU] / norm1(s1[S1_NA]);
    t[3] = s1[S1_NV] >= 2.0 ? 1.0 - 0.5 * (va_stats(s1, 0).ccc + va_stats(s1, 1).ccc) : 0.0;
    t[4] = s2[S2_CA_EA] / norm1(s1[S1_NCA]);
    t[5] = s2[S2_CA_AE] / norm1(s1[S1_NH]);
    t[6] = s2[S2_DM_EA] / (double(B) * double(K));
    t[7] = s2[S2_DM_AE] / double(B);
    t[8] = has_mu ? s2[S2_DM_EV] / double(B) : 0.0;
    if (s1[S1_BAD] > 0.0) t[1] = quiet_nan();  // an invalid class under a true mask
    t[0] = 0.0;
    for (int i = 0; i < NTERMS; ++i) t[0] += w[i] * t[i + 1];
    for (int i = 0; i < 9; ++i) out[i] = T(t[i]);
}

// ---------------------------------------------------------------------------------------------------
// The row: views of scratch arrays, and the math.
// ---------------------------------------------------------------------------------------------------

// A row-local array of C or K values: contiguous (registers / L1) or strided (interleaved global scratch
// on the GPU's generic-shape kernel, so that neighbouring threads touch neighbouring words).
template <class V>
struct Dense {
    V* a;
    FBN_HD V& operator[](int j) const { return a[j]; }
};
template <class V>
struct Strided {
    V* a;
    long long stride;
    FBN_HD V& operator[](int j) const { return a[j * stride]; }
};

template <class V>
struct RowLoss {
    V expr, au, ca_ea, ca_ae, dm_ea, dm_ae, dm_ev;
};

// Scratch of one row: six C-arrays and two K-arrays.
template <class A>
struct RowScratch {
    A lp, p, gp, u, el, qe;  // C: log p, p, dL/dp, ℓ(s)/T then dL/du, ℓ_masked(y_a)/T then t_e, q_e
    A ga, sf;                // K: partial dL/dz_a, s(1-s)/T
};

// The objective of one row (or of one pack of rows, lane-wise). `Row` supplies the inputs with masked
// labels already replaced by zeros:
//   ze(c), za(k), ya(k) (AU label, 0 if unannotated), ma(k) (0/1), rt(k) = R[y, k] (finite when me = 0),
//   me() (0/1), h() (0/1: AU labels and no expression label), ycls() (class as a value), v(i), yv(i), mv()
// and receives the gradients through put_ge(c, g), put_ga(k, g), put_gv(i, g).
// Returns the row's unnormalised terms (sums over the row, before the batch means).
template <class V, class T, class D, class Row, class A>
FBN_HD RowLoss<V> objective_row(const D& d, const T* tab, const Scales<T>& sc, Row& row, const RowScratch<A>& w) {
    const int C = d.C(), K = d.K();
    const V zero = V{};
    const V one = zero + T(1);
    const T* rs_t = tab + tab_rs(C, K);
    const T* w_t = tab + tab_w(C, K);
    const T* l1m_t = tab + tab_l1m(C, K);
    const T* sl1m_t = tab + tab_sl1m(C, K);
    const T* mu_t = tab + tab_mu(C, K);
    const T* pw_t = tab + tab_pw(C, K);
    const V me = row.me(), h = row.h();

    // p = softmax(z_e), and log p.
    V mx = row.ze(0);
    for (int c = 1; c < C; ++c) mx = vmax(mx, row.ze(c));
    V se = zero;
    for (int c = 0; c < C; ++c) {
        V z = row.ze(c) - mx;
        w.lp[c] = z;
        w.p[c] = vexp(z);
        se = se + w.p[c];
    }
    const V lse = vlog(se), inv_se = one / se;
    for (int c = 0; c < C; ++c) {
        w.lp[c] = w.lp[c] - lse;
        w.p[c] = w.p[c] * inv_se;
        w.gp[c] = zero;
        w.u[c] = zero + sl1m_t[c];
        w.el[c] = zero;
    }

    // AU loop: supervised BCE, expression->AU co-annotation, dm_ea, and the K-sums that build
    // ℓ(s), ℓ_masked(y_a) and dL/dp (k outermost so that each AU's values are read once).
    RowLoss<V> L;
    L.au = zero;
    L.ca_ea = zero;
    L.dm_ea = zero;
    for (int k = 0; k < K; ++k) {
        V z = row.za(k), m = row.ma(k), y = row.ya(k), t = row.rt(k);
        // log s and log(1 - s) as -softplus(-z) and -softplus(z), with log1p(e) = log(u) - (u - 1 - e)/u,
        // u = 1 + e (the correction restores what rounding u lost, so tiny e gives e itself).
        V az = select(z < zero, -z, z);
        V e = vexp(-az);
        V u1 = one + e;
        V inv = one / u1;
        V sp = vlog(u1) - ((u1 - one) - e) * inv;
        V ls = vmin(z, zero) - sp;
        V l1s = ls - z;
        V s = select(z < zero, e * inv, inv);
        V s1 = select(z < zero, inv, e * inv);
        // BCE with the positives weighted by w+: -(w+ y ls + (1 - y) l1s) = (1 - y) z - a ls with the entry's
        // weight a = w+ y + 1 - y (l1s = ls - z); gradient a s - w+ y.
        V py = y * pw_t[k];
        V a = py + one - y;
        L.au = L.au + m * ((one - y) * z - a * ls);
        V mca = me * (one - m);
        L.ca_ea = L.ca_ea + mca * -(t * ls + (one - t) * l1s);
        V g = m * (a * s - py) * sc.a_au + mca * (s - t) * sc.a_ca_ea;
        // dm_ea: q = p·Rs[:, k], KLb(q || s).
        V q = zero;
        for (int c = 0; c < C; ++c) q = q + w.p[c] * rs_t[c * K + k];
        V lq = vlog(q), l1q = vlog(one - q);
        L.dm_ea = L.dm_ea + q * (lq - ls) + (one - q) * (l1q - l1s);
        g = g + (s - q) * sc.a_dm_ea;
        V gq = (lq - l1q - z) * sc.a_dm_ea;
        V my = m * y;
        for (int c = 0; c < C; ++c) {
            const int i = c * K + k;
            w.gp[c] = w.gp[c] + gq * rs_t[i];
            w.u[c] = w.u[c] + s * w_t[i];
            w.el[c] = w.el[c] + my * w_t[i] + m * l1m_t[i];
        }
        w.ga[k] = g;
        w.sf[k] = s * s1 * sc.inv_t;
    }

    // Class loop: expression CE, AU->expression co-annotation, dm_ae and dm_ev.
    V ycls = row.ycls();
    V lpy = zero, mxu = w.u[0] * sc.inv_t, mxl = w.el[0] * sc.inv_t;
    for (int c = 0; c < C; ++c) {
        lpy = lpy + select(ycls == zero + T(c), w.lp[c], zero);
        w.u[c] = w.u[c] * sc.inv_t;
        w.el[c] = w.el[c] * sc.inv_t;
        mxu = vmax(mxu, w.u[c]);
        mxl = vmax(mxl, w.el[c]);
    }
    L.expr = me * -lpy;
    V su = zero, sl = zero;
    for (int c = 0; c < C; ++c) {
        w.qe[c] = vexp(w.u[c] - mxu);
        su = su + w.qe[c];
        w.el[c] = vexp(w.el[c] - mxl);
        sl = sl + w.el[c];
    }
    const V lseu = mxu + vlog(su), inv_su = one / su, inv_sl = one / sl;
    V kl = zero, ce_h = zero, r0 = row.v(0), r1 = row.v(1);
    for (int c = 0; c < C; ++c) {
        V lqe = w.u[c] - lseu;
        V qe = w.qe[c] * inv_su;
        V te = w.el[c] * inv_sl;
        w.u[c] = lqe;
        w.qe[c] = qe;
        w.el[c] = te;
        kl = kl + qe * (lqe - w.lp[c]);
        ce_h = ce_h - te * w.lp[c];
        r0 = r0 - w.p[c] * mu_t[2 * c];
        r1 = r1 - w.p[c] * mu_t[2 * c + 1];
    }
    L.dm_ae = kl;
    L.ca_ae = h * ce_h;
    L.dm_ev = (r0 * r0 + r1 * r1) * T(0.5);

    // dL/dz_e: direct terms plus dL/dp pulled back through the softmax.
    V dot = zero;
    for (int c = 0; c < C; ++c) {
        w.gp[c] = w.gp[c] - (r0 * mu_t[2 * c] + r1 * mu_t[2 * c + 1]) * sc.a_dm_ev;
        dot = dot + w.p[c] * w.gp[c];
    }
    for (int c = 0; c < C; ++c) {
        V p = w.p[c];
        V onehot = select(ycls == zero + T(c), one, zero);
        V g = me * (p - onehot) * sc.a_expr + h * (p - w.el[c]) * sc.a_ca_ae + (p - w.qe[c]) * sc.a_dm_ae
              + p * (w.gp[c] - dot);
        row.put_ge(c, g);
        w.u[c] = w.qe[c] * (w.u[c] - w.lp[c] - kl) * sc.a_dm_ae;  // dL/du, u = ℓ(s)/T
    }

    // dL/dz_a: the AU-loop part plus dm_ae through u = ℓ(s)/T.
    for (int k = 0; k < K; ++k) {
        V acc = zero;
        for (int c = 0; c < C; ++c) acc = acc + w.u[c] * w_t[c * K + k];
        row.put_ga(k, w.ga[k] + acc * w.sf[k]);
    }

    // dL/dv: dm_ev plus the concordance term over the VA-labelled rows.
    V mv = row.mv();
    for (int i = 0; i < 2; ++i) {
        V vi = row.v(i), yi = row.yv(i), ri = i == 0 ? r0 : r1;
        V gva = ((yi - sc.va_mean_y[i]) - (vi - sc.va_mean_y[i]) * sc.va_ccc[i]) * (mv * sc.va_coef[i]);
        row.put_gv(i, ri * sc.a_dm_ev + gva);
    }
    return L;
}

}  // namespace fbn
