// Host interface of the CUDA objective (objective_cuda.cu), free of CUDA and Python types so that the
// pybind11 module (bind_cuda.cpp) compiles with the host compiler alone.
#pragma once

namespace fbn {

// Storage dtype of z_e, z_a, v and their gradients; the math runs in float32 (float64 for kF64).
enum CudaDtype { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

struct CudaLaunch {
    int dtype;
    bool face;         // the kernel specialised for C = 7, K = 17 (else any C, K)
    bool cooperative;  // one cooperative launch with grid.sync() (else the split plan: two launches)
    int device;
    void* stream;
    long long grid, block, smem;
    // z_e, z_a, v, expr, expr_mask, au, au_mask, va, va_mask, relatedness, va_means (or null),
    // pos_weight (the AUs' positive weights in L_au, or null: ones), terms, total (the compute dtype, or null), grad_z_e, grad_z_a, grad_v, workspace,
    // weights (8 float64 on the device, one per term: read by the kernel, so new values never recompile)
    void* ptrs[19];
    long long work_bytes, B;
    int C, K, has_mu, use_smem;
    double inv_temperature, eps;
};

// Blocks of `block` threads that fit on the device at once (the cooperative launch limit); `cooperative`
// also requires the device to support cooperative launches. The caller's current device is kept.
int cuda_max_blocks(int dtype, bool face, bool cooperative, int block, long long smem, int device, int* out,
                    char* err, int errlen);
// Enqueues the kernel (one launch, or the two of the split plan) on a.stream on device a.device, keeping the
// caller's current device; returns 0 or a CUDA error code with a message in err.
int cuda_launch(const CudaLaunch& a, char* err, int errlen);

}  // namespace fbn
