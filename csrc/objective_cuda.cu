// The fused objective on CUDA: every term and every gradient in one pass over the rows.
//
// Phases of the kernel (grid-stride over rows, one row per thread at a time):
//   0. tables of the relatedness matrix into the workspace;
//   1. label counts and VA moments, reduced per block;           [barrier]
//   every block reduces the per-block sums (same order everywhere) and forms the batch scales;
//   2. per-row terms and gradients (objective_math.h), term sums reduced per block;   [barrier]
//   one block reduces the term sums and writes the nine terms.
// Two launch modes (argument `phase`):
//   PHASE_ALL (grid barrier, opt-in): one cooperative launch, the barriers are grid.sync();
//   PHASE_STATS then PHASE_ROWS (split plan, the default): two ordinary launches on one stream, so the first
//     barrier is the launch boundary; the last block of the second launch to take a ticket (an atomic counter
//     that the first launch zeroes) does the final reduction. Nothing ever waits on another block.
// All reductions run in a fixed order, so launches with the same grid give the same bits in both modes; no
// host synchronisation anywhere.
//
// This file compiles with nvcc (the built extension, with the host launcher at the bottom) and with NVRTC
// (cupy, at run time: everything under !__CUDACC_RTC__ is left out and the header is pasted in).
#include <cooperative_groups.h>

#include "objective_math.h"

namespace fbn {

// Half-precision storage types, converted without cuda_fp16.h / cuda_bf16.h (NVRTC has no default
// include path for them).
struct f16 {
    unsigned short x;
};
struct bf16 {
    unsigned short x;
};

__device__ __forceinline__ float to_compute(float x) { return x; }
__device__ __forceinline__ double to_compute(double x) { return x; }
__device__ __forceinline__ float to_compute(f16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h.x));
    return f;
}
__device__ __forceinline__ float to_compute(bf16 h) { return __uint_as_float(static_cast<unsigned>(h.x) << 16); }

template <class TIn>
struct Store;
template <>
struct Store<float> {
    __device__ static float from(float x) { return x; }
};
template <>
struct Store<double> {
    __device__ static double from(double x) { return x; }
};
template <>
struct Store<f16> {
    __device__ static f16 from(float x) {
        f16 h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.x) : "f"(x));
        return h;
    }
};
template <>
struct Store<bf16> {
    __device__ static bf16 from(float x) {  // round to nearest even; NaN stays NaN
        unsigned u = __float_as_uint(x);
        bf16 h;
        const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
        h.x = nan ? 0x7fc0 : static_cast<unsigned short>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
        return h;
    }
};

// One row read straight from global memory (masked labels replaced by zeros) for objective_row().
template <class TIn, class T>
struct GpuRow {
    const TIn *ze_, *za_, *v_;
    const T *au_, *rrow_, *va_;
    const unsigned char* am_;
    TIn *ge_, *ga_, *gv_;
    T me_, h_, yc_, mv_;

    __device__ T ze(int c) const { return to_compute(ze_[c]); }
    __device__ T za(int k) const { return to_compute(za_[k]); }
    __device__ T ya(int k) const { return am_[k] ? au_[k] : T(0); }
    __device__ T ma(int k) const { return am_[k] ? T(1) : T(0); }
    __device__ T rt(int k) const { return rrow_[k]; }
    __device__ T me() const { return me_; }
    __device__ T h() const { return h_; }
    __device__ T ycls() const { return yc_; }
    __device__ T v(int i) const { return to_compute(v_[i]); }
    __device__ T yv(int i) const { return mv_ != T(0) ? va_[i] : T(0); }
    __device__ T mv() const { return mv_; }
    __device__ void put_ge(int c, T g) { ge_[c] = Store<TIn>::from(g); }
    __device__ void put_ga(int k, T g) { ga_[k] = Store<TIn>::from(g); }
    __device__ void put_gv(int i, T g) { gv_[i] = Store<TIn>::from(g); }
};

// Row scratch: registers when C and K are compile-time constants, else interleaved global scratch.
template <class T, int CC, int KK>
struct RowRunner {
    template <class Row>
    __device__ static RowLoss<T> run(const Dims<CC, KK>& d, const T* tab, const Scales<T>& sc, Row& row, T*,
                                     long long, long long) {
        T lp[CC], p[CC], gp[CC], u[CC], el[CC], qe[CC], ga[KK], sf[KK];
        const RowScratch<Dense<T>> w{{lp}, {p}, {gp}, {u}, {el}, {qe}, {ga}, {sf}};
        return objective_row<T, T>(d, tab, sc, row, w);
    }
};
template <class T>
struct RowRunner<T, 0, 0> {
    template <class Row>
    __device__ static RowLoss<T> run(const Dims<0, 0>& d, const T* tab, const Scales<T>& sc, Row& row, T* scr,
                                     long long gtid, long long nthreads) {
        const int C = d.C(), K = d.K();
        T* s = scr + gtid;
        auto at = [&](long long j) { return Strided<T>{s + j * nthreads, nthreads}; };
        const RowScratch<Strided<T>> w{at(0),     at(C),     at(2 * C),     at(3 * C),
                                       at(4 * C), at(5 * C), at(6 * C),     at(6 * C + K)};
        return objective_row<T, T>(d, tab, sc, row, w);
    }
};

// Sums N values over the block in a fixed order (warp shuffles, then warp 0); thread 0 writes out[].
template <int N>
__device__ void block_sum(double (&v)[N], double* out) {
    __shared__ double red[N][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
    for (int i = 0; i < N; ++i) {
        double x = v[i];
        for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
        if (lane == 0) red[i][warp] = x;
    }
    __syncthreads();
    if (warp == 0) {
        for (int i = 0; i < N; ++i) {
            double x = lane < nwarps ? red[i][lane] : 0.0;
            for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
            if (lane == 0) out[i] = x;
        }
    }
    __syncthreads();
}

// Every block: sums the per-block partials part[nblocks][N] (written before a grid sync) into out[].
template <int N>
__device__ void grid_sum(const double* part, int nblocks, double* out) {
    double v[N];
    for (int i = 0; i < N; ++i) v[i] = 0.0;
    for (int j = threadIdx.x; j < nblocks; j += blockDim.x)
        for (int i = 0; i < N; ++i) v[i] += __ldcg(part + static_cast<long long>(j) * N + i);
    block_sum<N>(v, out);
}

// Workspace layout: tables (16-byte aligned), per-block sums of both passes, the ticket of the split plan
// (TICKET_BYTES), then (generic shapes only) the row scratch. fbn_fast/losses/cuda.py allocates the same
// size (_workspace_bytes; a test ties the two).
__host__ __device__ inline long long align16(long long n) { return (n + 15) / 16 * 16; }
constexpr long long TICKET_BYTES = 16;
enum Phase { PHASE_ALL = 0, PHASE_STATS = 1, PHASE_ROWS = 2 };

template <class TIn, class T, int CC, int KK>
__global__ void __launch_bounds__(256) objective_kernel(
    const TIn* __restrict__ ze, const TIn* __restrict__ za, const TIn* __restrict__ v,
    const long long* __restrict__ expr, const unsigned char* __restrict__ em, const T* __restrict__ au,
    const unsigned char* __restrict__ am, const T* __restrict__ va, const unsigned char* __restrict__ vm,
    const T* __restrict__ rel, const T* __restrict__ mu, const T* __restrict__ pw, T* __restrict__ terms,
    T* __restrict__ total,
    TIn* __restrict__ gze,
    TIn* __restrict__ gza, TIn* __restrict__ gv, unsigned char* __restrict__ work, const double* __restrict__ w,
    long long work_bytes, long long B, int C_rt, int K_rt, int has_mu, int use_smem, double inv_t, double eps,
    int phase) {
    namespace cg = cooperative_groups;
    cg::grid_group grid = cg::this_grid();
    extern __shared__ __align__(16) unsigned char smem_tab[];
    __shared__ double tot1[NSUM1];
    __shared__ double tot2[NSUM2];
    __shared__ Scales<T> scales;

    const Dims<CC, KK> d{C_rt, K_rt};
    const int C = d.C(), K = d.K();
    const long long nthreads = static_cast<long long>(gridDim.x) * blockDim.x;
    const long long gtid = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;

    T* gtab = reinterpret_cast<T*>(work);
    double* part1 = reinterpret_cast<double*>(work + align16(tab_size(C, K) * sizeof(T)));
    double* part2 = part1 + static_cast<long long>(gridDim.x) * NSUM1;
    unsigned int* ticket = reinterpret_cast<unsigned int*>(part2 + static_cast<long long>(gridDim.x) * NSUM2);
    T* scr = reinterpret_cast<T*>(reinterpret_cast<unsigned char*>(ticket) + TICKET_BYTES);
    const long long scratch = (CC > 0 && KK > 0) ? 0 : nthreads * (6LL * C + 2LL * K) * sizeof(T);
    const long long need = reinterpret_cast<unsigned char*>(scr) - work + scratch;
    if (need > work_bytes) {  // a caller bug; every thread sees the same sizes, so nobody waits at a sync
        if (gtid < 9) terms[gtid] = T(quiet_nan());
        if (gtid == 0 && total) *total = T(quiet_nan());
        return;
    }

    if (phase != PHASE_ROWS) {
        if (gtid == 0) *ticket = 0u;  // read by the next launch of the split plan only
        // 0. Tables.
        for (long long i = gtid; i < static_cast<long long>(C) * K; i += nthreads)
            table_entry<T>(rel[i], T(eps), gtab, i, C, K);
        for (long long c = gtid; c < C; c += nthreads) {
            T sl = T(0);
            for (int k = 0; k < K; ++k) sl += vlog1p(-clip_r(rel[c * K + k], T(eps)));
            gtab[tab_sl1m(C, K) + c] = sl;
            gtab[tab_mu(C, K) + 2 * c] = has_mu ? mu[2 * c] : T(0);
            gtab[tab_mu(C, K) + 2 * c + 1] = has_mu ? mu[2 * c + 1] : T(0);
        }
        for (long long k = gtid; k < K; k += nthreads) gtab[tab_pw(C, K) + k] = pw ? pw[k] : T(1);

        // 1. Counts and VA moments.
        double s[NSUM1];
        for (int i = 0; i < NSUM1; ++i) s[i] = 0.0;
        for (long long b = gtid; b < B; b += nthreads) {
            int n_ann = 0;
            for (int k = 0; k < K; ++k) n_ann += am[b * K + k] != 0;
            const bool mvb = vm[b] != 0;
            row_counts<T>(em[b] != 0, expr[b], C, n_ann, K, mvb, to_compute(v[2 * b]), to_compute(v[2 * b + 1]),
                          mvb ? va[2 * b] : T(0), mvb ? va[2 * b + 1] : T(0), s);
        }
        block_sum<NSUM1>(s, part1 + static_cast<long long>(blockIdx.x) * NSUM1);
    }
    if (phase == PHASE_STATS) return;  // the launch boundary is the barrier
    if (phase == PHASE_ALL) grid.sync();
    grid_sum<NSUM1>(part1, gridDim.x, tot1);
    if (threadIdx.x == 0) scales = make_scales<T>(tot1, w, B, K, inv_t, has_mu != 0);
    const T* tab = gtab;
    if (use_smem) {
        T* st = reinterpret_cast<T*>(smem_tab);
        for (long long i = threadIdx.x; i < tab_size(C, K); i += blockDim.x) st[i] = __ldcg(gtab + i);
        tab = st;
    }
    __syncthreads();
    const Scales<T> sc = scales;

    // 2. Rows.
    {
        double s[NSUM2];
        for (int i = 0; i < NSUM2; ++i) s[i] = 0.0;
        for (long long b = gtid; b < B; b += nthreads) {
            const bool me = em[b] != 0;
            const long long cls = expr[b];
            const bool ok = me && cls >= 0 && cls < C;  // an invalid class made the terms NaN in pass 1
            const unsigned char* amr = am + b * K;
            bool any = false;
            for (int k = 0; k < K; ++k) any = any || amr[k] != 0;
            GpuRow<TIn, T> row;
            row.ze_ = ze + b * C;
            row.za_ = za + b * K;
            row.v_ = v + 2 * b;
            row.au_ = au + b * K;
            row.am_ = amr;
            row.rrow_ = tab + (ok ? cls : 0) * K;
            row.va_ = va + 2 * b;
            row.ge_ = gze + b * C;
            row.ga_ = gza + b * K;
            row.gv_ = gv + 2 * b;
            row.me_ = ok ? T(1) : T(0);
            row.h_ = (any && !me) ? T(1) : T(0);
            row.yc_ = ok ? T(cls) : T(-1);
            row.mv_ = vm[b] != 0 ? T(1) : T(0);
            const RowLoss<T> L = RowRunner<T, CC, KK>::run(d, tab, sc, row, scr, gtid, nthreads);
            s[S2_EXPR] += L.expr;
            s[S2_AU] += L.au;
            s[S2_CA_EA] += L.ca_ea;
            s[S2_CA_AE] += L.ca_ae;
            s[S2_DM_EA] += L.dm_ea;
            s[S2_DM_AE] += L.dm_ae;
            s[S2_DM_EV] += L.dm_ev;
        }
        block_sum<NSUM2>(s, part2 + static_cast<long long>(blockIdx.x) * NSUM2);
    }
    __shared__ bool last;
    if (phase == PHASE_ALL) {
        grid.sync();
        last = blockIdx.x == 0;  // every thread writes the same value
    } else if (threadIdx.x == 0) {
        // Thread 0 wrote this block's sums (block_sum); publish them, then take a ticket: the last block to
        // arrive reduces them all (it never waits for the others, which have finished their sums).
        __threadfence();
        last = atomicAdd(ticket, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (last) {
        __threadfence();
        grid_sum<NSUM2>(part2, gridDim.x, tot2);
        if (threadIdx.x == 0) {
            finalize_terms<T>(tot1, tot2, w, B, K, has_mu != 0, terms);
            // The differentiable total as an allocation of its own (optional): autograd then hands the
            // incoming gradient straight to the backward's scaling, with no scatter into the term vector.
            if (total) *total = terms[0];
        }
    }
}

}  // namespace fbn

#if !defined(__CUDACC_RTC__)
// ---------------------------------------------------------------------------------------------------
// Host launcher of the built extension (the NVRTC path launches through cupy instead).
// ---------------------------------------------------------------------------------------------------
#include <cuda_runtime.h>

#include <cstdio>

#include "objective_cuda.h"

namespace fbn {
namespace {

template <class TIn, class T>
const void* pick(bool face) {
    return face ? reinterpret_cast<const void*>(&objective_kernel<TIn, T, 7, 17>)
                : reinterpret_cast<const void*>(&objective_kernel<TIn, T, 0, 0>);
}

const void* kernel_for(int dtype, bool face) {
    switch (dtype) {
        case kF32: return pick<float, float>(face);
        case kF16: return pick<f16, float>(face);
        case kBF16: return pick<bf16, float>(face);
        case kF64: return pick<double, double>(face);
        default: return nullptr;
    }
}

int fail(cudaError_t e, const char* what, char* err, int errlen) {
    std::snprintf(err, static_cast<size_t>(errlen), "%s: %s", what, cudaGetErrorString(e));
    return static_cast<int>(e);
}

// Makes `device` current for the guard's lifetime and then restores the caller's current device.
class DeviceGuard {
  public:
    cudaError_t set(int device) {
        cudaError_t e = cudaGetDevice(&prev_);
        if (e != cudaSuccess || prev_ == device) return e;
        e = cudaSetDevice(device);
        changed_ = e == cudaSuccess;
        return e;
    }
    ~DeviceGuard() {
        if (changed_) cudaSetDevice(prev_);
    }

  private:
    int prev_ = -1;
    bool changed_ = false;
};

}  // namespace

int cuda_max_blocks(int dtype, bool face, bool cooperative, int block, long long smem, int device, int* out, char* err,
                    int errlen) {
    const void* fn = kernel_for(dtype, face);
    if (!fn) return fail(cudaErrorInvalidValue, "unknown dtype code", err, errlen);
    DeviceGuard guard;
    cudaError_t e = guard.set(device);
    if (e != cudaSuccess) return fail(e, "cudaSetDevice", err, errlen);
    int sms = 0, per_sm = 0, coop = 0;
    if (cooperative) {
        if ((e = cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device)) != cudaSuccess)
            return fail(e, "cudaDeviceGetAttribute", err, errlen);
        if (!coop) return fail(cudaErrorNotSupported, "device lacks cooperative launch", err, errlen);
    }
    if ((e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess)
        return fail(e, "cudaDeviceGetAttribute", err, errlen);
    if ((e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fn, block, static_cast<size_t>(smem))) !=
        cudaSuccess)
        return fail(e, "cudaOccupancyMaxActiveBlocksPerMultiprocessor", err, errlen);
    *out = sms * per_sm;
    return 0;
}

int cuda_launch(const CudaLaunch& a, char* err, int errlen) {
    const void* fn = kernel_for(a.dtype, a.face);
    if (!fn) return fail(cudaErrorInvalidValue, "unknown dtype code", err, errlen);
    DeviceGuard guard;
    cudaError_t e = guard.set(a.device);
    if (e != cudaSuccess) return fail(e, "cudaSetDevice", err, errlen);
    // Argument addresses in the kernel's parameter order; the pointer types share one representation.
    long long work_bytes = a.work_bytes, B = a.B;
    int C = a.C, K = a.K, has_mu = a.has_mu, use_smem = a.use_smem, phase = PHASE_ALL;
    double inv_t = a.inv_temperature, eps = a.eps;
    void* p[19];
    for (int i = 0; i < 19; ++i) p[i] = a.ptrs[i];
    void* args[] = {&p[0],  &p[1],  &p[2],  &p[3],  &p[4],  &p[5],  &p[6],  &p[7],       &p[8], &p[9],
                    &p[10], &p[11], &p[12], &p[13], &p[14], &p[15], &p[16], &p[17],      &p[18], &work_bytes,
                    &B,     &C,     &K,     &has_mu, &use_smem, &inv_t, &eps, &phase};
    const dim3 grid(static_cast<unsigned>(a.grid)), block(static_cast<unsigned>(a.block));
    const size_t smem = static_cast<size_t>(a.smem);
    cudaStream_t stream = static_cast<cudaStream_t>(a.stream);
    if (a.cooperative) {
        e = cudaLaunchCooperativeKernel(fn, grid, block, args, smem, stream);
        if (e != cudaSuccess) return fail(e, "cudaLaunchCooperativeKernel", err, errlen);
        return 0;
    }
    for (int ph : {PHASE_STATS, PHASE_ROWS}) {  // the split plan: two ordinary launches on one stream
        phase = ph;
        e = cudaLaunchKernel(fn, grid, block, args, smem, stream);
        if (e != cudaSuccess) return fail(e, "cudaLaunchKernel", err, errlen);
    }
    return 0;
}

}  // namespace fbn
#endif
