// CPU entry point of the fused objective (objective_cpu.cpp), independent of Python and of torch.
#pragma once

#include <cstdint>

namespace fbn {

// Raw, contiguous, row-major buffers. Floating buffers are float32, or float64 when is_double.
struct CpuArgs {
    bool is_double;
    long long B;
    int C, K;
    const void *ze, *za, *v;         // (B,C), (B,K), (B,2)
    const std::int64_t* expr;        // (B,)
    const std::uint8_t* expr_mask;   // (B,) bool
    const void* au;                  // (B,K)
    const std::uint8_t* au_mask;     // (B,K) bool
    const void* va;                  // (B,2)
    const std::uint8_t* va_mask;     // (B,) bool
    const void* relatedness;         // (C,K)
    const void* va_means;            // (C,2) or null
    const void* pos_weight;          // (K,) weights of the AUs' positive labels in L_au, or null (ones)
    const double* weights;           // (8,) one per term: expr, au, va, ca_ea, ca_ae, dm_ea, dm_ae, dm_ev
    double inv_temperature, eps;
    void *terms, *grad_ze, *grad_za, *grad_v;  // (9,), (B,C), (B,K), (B,2)
};

// Computes the nine terms and the three gradients with `threads` threads; the result does not depend on
// the thread count. Returns -1, or the first row whose expression class lies outside [0, C) under a true
// mask (nothing is written then).
long long objective_cpu(const CpuArgs& a, int threads);

// Rows per reduction chunk: partial sums are formed per chunk and added in chunk order.
constexpr long long kCpuChunkRows = 256;

bool cpu_has_openmp();

// Instruction sets of the float32 body: what this machine runs, which one is used (the best supported one
// unless set), and a way to choose (returns false, changing nothing, when the CPU lacks it; -1 = best).
enum CpuIsa { kCpuBaseline = 0, kCpuAvx2 = 1, kCpuAvx512 = 2 };
bool cpu_isa_supported(int isa);
int cpu_isa();
bool set_cpu_isa(int isa);

}  // namespace fbn
