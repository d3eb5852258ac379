// Python module fbn_fast._native_cuda: launches the CUDA objective on raw device addresses and a raw
// stream handle (no torch C++ API, so the module neither depends on nor is rebuilt for a particular torch).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "objective_cuda.h"

namespace py = pybind11;

namespace {

void check(int code, const char* err) {
    if (code != 0) throw std::runtime_error(std::string("fbn_fast CUDA objective: ") + err);
}

int max_blocks(int dtype, bool face, bool cooperative, int block, long long smem, int device) {
    char err[512] = {0};
    int out = 0;
    check(fbn::cuda_max_blocks(dtype, face, cooperative, block, smem, device, &out, err, sizeof(err)), err);
    return out;
}

void launch(int dtype, bool face, bool cooperative, int device, std::uintptr_t stream, long long grid, long long block, long long smem,
            py::sequence ptrs, long long work_bytes, long long B, int C, int K, bool has_mu, bool use_smem,
            double inv_temperature, double eps) {
    if (py::len(ptrs) != 19) throw std::invalid_argument("launch: ptrs must hold 19 addresses");
    fbn::CudaLaunch a{};
    a.dtype = dtype;
    a.face = face;
    a.cooperative = cooperative;
    a.device = device;
    a.stream = reinterpret_cast<void*>(stream);
    a.grid = grid;
    a.block = block;
    a.smem = smem;
    for (int i = 0; i < 19; ++i) a.ptrs[i] = reinterpret_cast<void*>(ptrs[i].cast<std::uintptr_t>());
    a.work_bytes = work_bytes;
    a.B = B;
    a.C = C;
    a.K = K;
    a.has_mu = has_mu ? 1 : 0;
    a.use_smem = use_smem ? 1 : 0;
    a.inv_temperature = inv_temperature;
    a.eps = eps;
    char err[512] = {0};
    int code;
    {
        py::gil_scoped_release unlocked;
        code = fbn::cuda_launch(a, err, sizeof(err));
    }
    check(code, err);
}

}  // namespace

PYBIND11_MODULE(_native_cuda, m) {
    m.doc() = "The fused FaceBehaviorNet objective on CUDA: terms and gradients in one pass over the rows.";
    m.def("max_blocks", &max_blocks, "Blocks that can be resident at once (the cooperative launch limit).",
          py::arg("dtype"), py::arg("face"), py::arg("cooperative"), py::arg("block"), py::arg("smem"),
          py::arg("device"));
    m.def("launch", &launch,
          "Enqueues the objective on `stream` (a cudaStream_t as an integer): one cooperative launch, or the two "
          "launches of the split plan.",
          py::arg("dtype"), py::arg("face"), py::arg("cooperative"), py::arg("device"), py::arg("stream"), py::arg("grid"), py::arg("block"),
          py::arg("smem"), py::arg("ptrs"), py::arg("work_bytes"), py::arg("B"), py::arg("C"), py::arg("K"),
          py::arg("has_mu"), py::arg("use_smem"), py::arg("inv_temperature"), py::arg("eps"));
}
