// Python module fbn_fast._native: the CPU objective over raw buffer addresses (no torch C++ API, so the
// module neither depends on nor is rebuilt for a particular torch).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "objective_cpu.h"

namespace py = pybind11;

namespace {

template <class T>
T* ptr(std::uintptr_t p) {
    return reinterpret_cast<T*>(p);
}

long long objective(bool is_double, long long B, int C, int K, std::uintptr_t ze, std::uintptr_t za,
                    std::uintptr_t v, std::uintptr_t expr, std::uintptr_t expr_mask, std::uintptr_t au,
                    std::uintptr_t au_mask, std::uintptr_t va, std::uintptr_t va_mask, std::uintptr_t relatedness,
                    std::uintptr_t va_means, std::uintptr_t pos_weight, std::uintptr_t weights,
                    double inv_temperature, double eps,
                    std::uintptr_t terms, std::uintptr_t grad_ze, std::uintptr_t grad_za, std::uintptr_t grad_v,
                    int threads) {
    if (B < 1 || C < 1 || K < 1) throw std::invalid_argument("objective: B, C and K must be >= 1");
    fbn::CpuArgs a{};
    a.is_double = is_double;
    a.B = B;
    a.C = C;
    a.K = K;
    a.ze = ptr<const void>(ze);
    a.za = ptr<const void>(za);
    a.v = ptr<const void>(v);
    a.expr = ptr<const std::int64_t>(expr);
    a.expr_mask = ptr<const std::uint8_t>(expr_mask);
    a.au = ptr<const void>(au);
    a.au_mask = ptr<const std::uint8_t>(au_mask);
    a.va = ptr<const void>(va);
    a.va_mask = ptr<const std::uint8_t>(va_mask);
    a.relatedness = ptr<const void>(relatedness);
    a.va_means = ptr<const void>(va_means);
    a.pos_weight = ptr<const void>(pos_weight);
    a.weights = ptr<const double>(weights);
    a.inv_temperature = inv_temperature;
    a.eps = eps;
    a.terms = ptr<void>(terms);
    a.grad_ze = ptr<void>(grad_ze);
    a.grad_za = ptr<void>(grad_za);
    a.grad_v = ptr<void>(grad_v);
    py::gil_scoped_release unlocked;
    return fbn::objective_cpu(a, threads < 1 ? 1 : threads);
}

const char* const kIsaNames[] = {"baseline", "avx2", "avx512"};

py::list supported_isas() {
    py::list out;
    for (int i = 0; i < 3; ++i)
        if (fbn::cpu_isa_supported(i)) out.append(kIsaNames[i]);
    return out;
}

void set_isa(py::object name) {
    if (name.is_none()) {
        fbn::set_cpu_isa(-1);
        return;
    }
    const std::string want = name.cast<std::string>();
    for (int i = 0; i < 3; ++i) {
        if (want == kIsaNames[i]) {
            if (!fbn::set_cpu_isa(i)) throw std::invalid_argument("set_isa: this CPU cannot run " + want);
            return;
        }
    }
    throw std::invalid_argument("set_isa: expected None, 'baseline', 'avx2' or 'avx512', got '" + want + "'");
}

}  // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() = "The fused FaceBehaviorNet objective on CPU (forward terms and gradients in one pass).";
    m.def("objective", &objective,
          "Reads the 8 per-term weights (float64) at `weights` and the K AU positive weights at `pos_weight` (0: ones); writes the 9 terms and the gradients w.r.t. z_e, z_a, v into the given buffers; returns -1, or the "
          "first row whose expression class is outside [0, C) under a true mask.",
          py::arg("is_double"), py::arg("B"), py::arg("C"), py::arg("K"), py::arg("z_e"), py::arg("z_a"),
          py::arg("v"), py::arg("expr"), py::arg("expr_mask"), py::arg("au"), py::arg("au_mask"), py::arg("va"),
          py::arg("va_mask"), py::arg("relatedness"), py::arg("va_means"), py::arg("pos_weight"), py::arg("weights"),
          py::arg("inv_temperature"), py::arg("eps"), py::arg("terms"), py::arg("grad_z_e"), py::arg("grad_z_a"),
          py::arg("grad_v"), py::arg("threads"));
    m.def("supported_isas", &supported_isas, "Instruction sets of the float32 body that this CPU runs.");
    m.def("isa", [] { return std::string(kIsaNames[fbn::cpu_isa()]); }, "The instruction set in use.");
    m.def("set_isa", &set_isa, "Use this instruction set (None: the best supported).", py::arg("name"));
    m.attr("has_openmp") = fbn::cpu_has_openmp();
    m.attr("chunk_rows") = fbn::kCpuChunkRows;
}
