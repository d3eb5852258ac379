// The fused objective on CPU: rows in parallel, reductions in a fixed order.
//
// The batch is cut into chunks of kCpuChunkRows rows. Each chunk's partial sums are written to their own
// slot and the slots are added in chunk order afterwards, so the result is the same bits whatever the
// number of threads. Within a chunk, float32 rows go through the math 4, 8 or 16 at a time, one per SIMD
// lane (fbn::f32x4 / f32x8 / f32x16 by instruction set); float64 rows go one at a time (the validation path).
#include "objective_cpu.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <thread>
#include <vector>

#include "objective_math.h"

#ifdef _OPENMP
#include <omp.h>
#endif

// On x86-64 Linux with GCC 12+, the float32 body is also compiled for x86-64-v3 (AVX2 + FMA, 8-row packs) and
// x86-64-v4 (AVX-512, 16-row packs); the best one the CPU runs is used unless set_cpu_isa() picks another
// (the tests run each). Elsewhere only the baseline build runs (4-row packs: SSE2 on x86-64, NEON on arm64).
// The thread count never changes results; the instruction set may, by float32 rounding (FMA contraction).
#if defined(__x86_64__) && defined(__linux__) && !defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 12
#define FBN_X86_ISAS 1
#define FBN_V3 __attribute__((target("arch=x86-64-v3")))
#define FBN_V4 __attribute__((target("arch=x86-64-v4")))
#else
#define FBN_X86_ISAS 0
#endif

namespace fbn {

bool cpu_has_openmp() {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
}

bool cpu_isa_supported(int isa) {
#if FBN_X86_ISAS
    if (isa == kCpuAvx512) return __builtin_cpu_supports("x86-64-v4");
    if (isa == kCpuAvx2) return __builtin_cpu_supports("x86-64-v3");
#endif
    return isa == kCpuBaseline;
}

namespace {

// Calls fn(first, last) on disjoint ranges of [0, n) from up to `threads` threads.
template <class F>
void parallel_ranges(long long n, int threads, F&& fn) {
    int nt = static_cast<int>(std::max<long long>(1, std::min<long long>(threads, n)));
    if (nt == 1) {
        fn(0LL, n);
        return;
    }
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
    {
        long long t = omp_get_thread_num(), m = omp_get_num_threads();
        fn(n * t / m, n * (t + 1) / m);
    }
#else
    std::vector<std::thread> pool;
    for (int t = 1; t < nt; ++t) pool.emplace_back([&, t] { fn(n * t / nt, n * (t + 1) / nt); });
    fn(0LL, n / nt);
    for (auto& th : pool) th.join();
#endif
}

template <class V>
struct Lanes;
template <>
struct Lanes<double> {
    static constexpr int L = 1;
};
template <>
struct Lanes<f32x4> {
    static constexpr int L = 4;
};
template <>
struct Lanes<f32x8> {
    static constexpr int L = 8;
};
template <>
struct Lanes<f32x16> {
    static constexpr int L = 16;
};

template <class V, class T>
FBN_HD V load(const T* p) {
    V x;
    std::memcpy(&x, p, sizeof(V));
    return x;
}
template <class V, class T>
FBN_HD void store(T* p, V x) {
    std::memcpy(p, &x, sizeof(V));
}

// x where m, else +0 (bit masking: no branch on random masks, and a NaN label under a false mask vanishes).
FBN_HD float keep_if(float x, bool m) {
    std::uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    u &= 0u - static_cast<std::uint32_t>(m);
    std::memcpy(&x, &u, sizeof u);
    return x;
}
FBN_HD double keep_if(double x, bool m) {
    std::uint64_t u;
    std::memcpy(&u, &x, sizeof u);
    u &= 0ull - static_cast<std::uint64_t>(m);
    std::memcpy(&x, &u, sizeof u);
    return x;
}

// A pack of L rows transposed into lane-major tiles: element j of lane l at tile[j * L + l].
template <class V, class T>
struct TileRow {
    static constexpr int L = Lanes<V>::L;
    T *ze_, *za_, *ya_, *ma_, *rt_, *ge_, *ga_;
    T me_[L], h_[L], yc_[L], v_[2 * L], yv_[2 * L], mv_[L], gv_[2 * L];

    FBN_HD V ze(int c) const { return load<V>(ze_ + c * L); }
    FBN_HD V za(int k) const { return load<V>(za_ + k * L); }
    FBN_HD V ya(int k) const { return load<V>(ya_ + k * L); }
    FBN_HD V ma(int k) const { return load<V>(ma_ + k * L); }
    FBN_HD V rt(int k) const { return load<V>(rt_ + k * L); }
    FBN_HD V me() const { return load<V>(me_); }
    FBN_HD V h() const { return load<V>(h_); }
    FBN_HD V ycls() const { return load<V>(yc_); }
    FBN_HD V v(int i) const { return load<V>(v_ + i * L); }
    FBN_HD V yv(int i) const { return load<V>(yv_ + i * L); }
    FBN_HD V mv() const { return load<V>(mv_); }
    FBN_HD void put_ge(int c, V g) { store(ge_ + c * L, g); }
    FBN_HD void put_ga(int k, V g) { store(ga_ + k * L, g); }
    FBN_HD void put_gv(int i, V g) { store(gv_ + i * L, g); }
};

template <class T>
struct Job {
    const CpuArgs& a;
    const T *ze, *za, *v, *au, *va, *rel;
    const T* tab;
    Scales<T> sc;
    double* part2;  // NSUM2 per chunk
    long long nchunks;
};

// Pass 2 over chunks [ch0, ch1): the row math, the gradients, and each chunk's term sums.
template <class V, class T, int CC, int KK>
FBN_HD void pass2_range(const Job<T>& j, long long ch0, long long ch1) {
    constexpr int L = Lanes<V>::L;
    const CpuArgs& a = j.a;
    const int C = a.C, K = a.K;
    const Dims<CC, KK> d{C, K};
    std::vector<T> tiles(static_cast<size_t>((2 * C + 5 * K) * L));
    // Row arrays of packs, aligned by hand to 64 bytes: operator new only promises 16.
    std::vector<T> scratch(static_cast<size_t>((6 * C + 2 * K) * L) + 64 / sizeof(T));
    const std::uintptr_t raw = reinterpret_cast<std::uintptr_t>(scratch.data());
    V* s = reinterpret_cast<V*>((raw + 63) / 64 * 64);
    TileRow<V, T> row;
    row.ze_ = tiles.data();
    row.ge_ = row.ze_ + C * L;
    row.za_ = row.ge_ + C * L;
    row.ya_ = row.za_ + K * L;
    row.ma_ = row.ya_ + K * L;
    row.rt_ = row.ma_ + K * L;
    row.ga_ = row.rt_ + K * L;
    const RowScratch<Dense<V>> w{{s}, {s + C}, {s + 2 * C}, {s + 3 * C}, {s + 4 * C}, {s + 5 * C},
                                 {s + 6 * C}, {s + 6 * C + K}};
    T* gze = static_cast<T*>(a.grad_ze);
    T* gza = static_cast<T*>(a.grad_za);
    T* gv = static_cast<T*>(a.grad_v);

    for (long long ch = ch0; ch < ch1; ++ch) {
        const V zero = V{};
        V acc[NSUM2];
        for (int i = 0; i < NSUM2; ++i) acc[i] = zero;
        const long long end = std::min(a.B, (ch + 1) * kCpuChunkRows);
        for (long long b0 = ch * kCpuChunkRows; b0 < end; b0 += L) {
            const int n = static_cast<int>(std::min<long long>(L, end - b0));
            T valid[L];
            for (int l = 0; l < L; ++l) {
                const bool live = l < n;
                const long long b = live ? b0 + l : b0;  // dead lanes repeat a live row, masked out below
                valid[l] = live ? T(1) : T(0);
                const bool me = a.expr_mask[b] != 0;
                const long long cls = me ? a.expr[b] : 0;  // pass 1 rejected classes outside [0, C)
                row.me_[l] = me ? T(1) : T(0);
                row.yc_[l] = me ? T(cls) : T(-1);
                const T* rr = j.rel + cls * K;
                const T* zer = j.ze + b * C;
                for (int c = 0; c < C; ++c) row.ze_[c * L + l] = zer[c];
                const T* zar = j.za + b * K;
                const T* aur = j.au + b * K;
                const std::uint8_t* amr = a.au_mask + b * K;
                unsigned any = 0;
                for (int k = 0; k < K; ++k) {
                    const bool m = amr[k] != 0;
                    any |= m;
                    row.za_[k * L + l] = zar[k];
                    row.ma_[k * L + l] = T(m);
                    row.ya_[k * L + l] = keep_if(aur[k], m);  // unannotated labels may hold anything
                    row.rt_[k * L + l] = rr[k];
                }
                row.h_[l] = T(any && !me);
                const bool mv = a.va_mask[b] != 0;
                row.mv_[l] = T(mv);
                for (int i = 0; i < 2; ++i) {
                    row.v_[i * L + l] = j.v[2 * b + i];
                    row.yv_[i * L + l] = keep_if(j.va[2 * b + i], mv);
                }
            }
            const RowLoss<V> r = objective_row<V, T>(d, j.tab, j.sc, row, w);
            const V live = load<V>(valid);
            acc[S2_EXPR] = acc[S2_EXPR] + r.expr * live;
            acc[S2_AU] = acc[S2_AU] + r.au * live;
            acc[S2_CA_EA] = acc[S2_CA_EA] + r.ca_ea * live;
            acc[S2_CA_AE] = acc[S2_CA_AE] + r.ca_ae * live;
            acc[S2_DM_EA] = acc[S2_DM_EA] + r.dm_ea * live;
            acc[S2_DM_AE] = acc[S2_DM_AE] + r.dm_ae * live;
            acc[S2_DM_EV] = acc[S2_DM_EV] + r.dm_ev * live;
            for (int l = 0; l < n; ++l) {
                const long long b = b0 + l;
                for (int c = 0; c < C; ++c) gze[b * C + c] = row.ge_[c * L + l];
                for (int k = 0; k < K; ++k) gza[b * K + k] = row.ga_[k * L + l];
                gv[2 * b] = row.gv_[l];
                gv[2 * b + 1] = row.gv_[L + l];
            }
        }
        double* out = j.part2 + ch * NSUM2;
        for (int i = 0; i < NSUM2; ++i) {
            T lanes[L];
            store(lanes, acc[i]);
            double t = 0.0;
            for (int l = 0; l < L; ++l) t += double(lanes[l]);
            out[i] = t;
        }
    }
}

// One compiled body per (precision, shape class, instruction set).
using Pass2 = void (*)(const Job<float>&, long long, long long);
void pass2_f32_face_base(const Job<float>& j, long long c0, long long c1) {
    pass2_range<f32x4, float, 7, 17>(j, c0, c1);
}
void pass2_f32_any_base(const Job<float>& j, long long c0, long long c1) {
    pass2_range<f32x4, float, 0, 0>(j, c0, c1);
}
#if FBN_X86_ISAS
FBN_V3 void pass2_f32_face_v3(const Job<float>& j, long long c0, long long c1) {
    pass2_range<f32x8, float, 7, 17>(j, c0, c1);
}
FBN_V3 void pass2_f32_any_v3(const Job<float>& j, long long c0, long long c1) {
    pass2_range<f32x8, float, 0, 0>(j, c0, c1);
}
FBN_V4 void pass2_f32_face_v4(const Job<float>& j, long long c0, long long c1) {
    pass2_range<f32x16, float, 7, 17>(j, c0, c1);
}
FBN_V4 void pass2_f32_any_v4(const Job<float>& j, long long c0, long long c1) {
    pass2_range<f32x16, float, 0, 0>(j, c0, c1);
}
#endif

// float64 is the validation path: one plain body, the same on every machine.
void pass2(const Job<double>& j, long long c0, long long c1) {
    (j.a.C == 7 && j.a.K == 17) ? pass2_range<double, double, 7, 17>(j, c0, c1)
                                : pass2_range<double, double, 0, 0>(j, c0, c1);
}

std::atomic<int> g_isa{-1};  // -1: the best supported

void pass2(const Job<float>& j, long long c0, long long c1) {
    const bool face = j.a.C == 7 && j.a.K == 17;
    Pass2 fn = face ? pass2_f32_face_base : pass2_f32_any_base;
#if FBN_X86_ISAS
    const int isa = cpu_isa();
    if (isa == kCpuAvx512) fn = face ? pass2_f32_face_v4 : pass2_f32_any_v4;
    if (isa == kCpuAvx2) fn = face ? pass2_f32_face_v3 : pass2_f32_any_v3;
#endif
    fn(j, c0, c1);
}

template <class T>
long long run(const CpuArgs& a, int threads) {
    const long long B = a.B;
    const int C = a.C, K = a.K;
    const long long nch = (B + kCpuChunkRows - 1) / kCpuChunkRows;
    const T* rel = static_cast<const T*>(a.relatedness);
    const T* mu = static_cast<const T*>(a.va_means);
    const T* pw = static_cast<const T*>(a.pos_weight);
    const T* v = static_cast<const T*>(a.v);
    const T* va = static_cast<const T*>(a.va);

    // Tables of the relatedness matrix, once per call.
    std::vector<T> tab(static_cast<size_t>(tab_size(C, K)), T(0));
    for (int c = 0; c < C; ++c) {
        T sl = T(0);
        for (int k = 0; k < K; ++k) sl += table_entry<T>(rel[c * K + k], T(a.eps), tab.data(), c * K + k, C, K);
        tab[tab_sl1m(C, K) + c] = sl;
        for (int i = 0; i < 2; ++i) tab[tab_mu(C, K) + 2 * c + i] = mu ? mu[2 * c + i] : T(0);
    }
    for (int k = 0; k < K; ++k) tab[tab_pw(C, K) + k] = pw ? pw[k] : T(1);

    // Pass 1: counts and VA moments per chunk, then the chunks in order.
    std::vector<double> part1(static_cast<size_t>(nch * NSUM1), 0.0);
    std::vector<long long> bad(static_cast<size_t>(nch), -1);
    parallel_ranges(nch, threads, [&](long long c0, long long c1) {
        for (long long ch = c0; ch < c1; ++ch) {
            double* s = part1.data() + ch * NSUM1;
            const long long end = std::min(B, (ch + 1) * kCpuChunkRows);
            for (long long b = ch * kCpuChunkRows; b < end; ++b) {
                int n_ann = 0;
                for (int k = 0; k < K; ++k) n_ann += a.au_mask[b * K + k] != 0;
                const bool me = a.expr_mask[b] != 0, mv = a.va_mask[b] != 0;
                const double before = s[S1_BAD];
                row_counts<T>(me, a.expr[b], C, n_ann, K, mv, v[2 * b], v[2 * b + 1], mv ? va[2 * b] : T(0),
                              mv ? va[2 * b + 1] : T(0), s);
                if (s[S1_BAD] > before && bad[ch] < 0) bad[ch] = b;
            }
        }
    });
    double s1[NSUM1] = {0};
    for (long long ch = 0; ch < nch; ++ch) {
        if (bad[ch] >= 0) return bad[ch];
        for (int i = 0; i < NSUM1; ++i) s1[i] += part1[ch * NSUM1 + i];
    }

    // Pass 2: rows, then the chunks' term sums in order.
    std::vector<double> part2(static_cast<size_t>(nch * NSUM2), 0.0);
    const Job<T> job{a,
                     static_cast<const T*>(a.ze),
                     static_cast<const T*>(a.za),
                     v,
                     static_cast<const T*>(a.au),
                     va,
                     rel,
                     tab.data(),
                     make_scales<T>(s1, a.weights, B, K, a.inv_temperature, mu != nullptr),
                     part2.data(),
                     nch};
    parallel_ranges(nch, threads, [&](long long c0, long long c1) { pass2(job, c0, c1); });
    double s2[NSUM2] = {0};
    for (long long ch = 0; ch < nch; ++ch)
        for (int i = 0; i < NSUM2; ++i) s2[i] += part2[ch * NSUM2 + i];
    finalize_terms<T>(s1, s2, a.weights, B, K, mu != nullptr, static_cast<T*>(a.terms));
    return -1;
}

}  // namespace

int cpu_isa() {
    const int isa = g_isa.load();
    if (isa >= 0) return isa;
    return cpu_isa_supported(kCpuAvx512) ? kCpuAvx512 : (cpu_isa_supported(kCpuAvx2) ? kCpuAvx2 : kCpuBaseline);
}

bool set_cpu_isa(int isa) {
    if (isa >= 0 && !cpu_isa_supported(isa)) return false;
    g_isa.store(isa < 0 ? -1 : isa);
    return true;
}

long long objective_cpu(const CpuArgs& a, int threads) {
    return a.is_double ? run<double>(a, threads) : run<float>(a, threads);
}

}  // namespace fbn
