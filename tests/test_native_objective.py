"""Backends ``cpu`` and ``cuda`` (csrc/): against the reference objective, thread-count determinism, the
build (nvcc compiles the CUDA source; NVRTC gets a self-contained source) and life without the extension."""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fbn_fast import face_behavior_loss
from fbn_fast.losses import TERMS, available_backends, backends, native, resolve_backend
from fbn_fast.losses.op import objective
from fbn_fast.losses.reference import reference_terms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
NAMES = ("z_e", "z_a", "v", "expr", "expr_mask", "au", "au_mask", "va", "va_mask", "relatedness", "va_means")

needs_cpu = pytest.mark.skipif(native._cpu_ext is None, reason=f"{native._cpu_missing}")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _build_native():
    spec = importlib.util.spec_from_file_location("build_native", os.path.join(CSRC, "build_native.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_case(b: int, c: int = 7, k: int = 17, seed: int = 0, dtype: torch.dtype = torch.float64,
              scale: float = 2.0, p_label: float = 0.5, mu: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    case = dict(
        z_e=(torch.randn(b, c, generator=g, dtype=f64) * scale).to(dtype),
        z_a=(torch.randn(b, k, generator=g, dtype=f64) * scale).to(dtype),
        v=torch.randn(b, 2, generator=g, dtype=f64).tanh().to(dtype),
        expr=torch.randint(0, c, (b,), generator=g),
        expr_mask=torch.rand(b, generator=g) < p_label,
        au=(torch.rand(b, k, generator=g) < 0.5).to(dtype),
        au_mask=torch.rand(b, k, generator=g) < p_label,
        va=(torch.rand(b, 2, generator=g, dtype=f64) * 2 - 1).to(dtype),
        va_mask=torch.rand(b, generator=g) < 0.7,
        relatedness=torch.rand(c, k, generator=g, dtype=f64).to(dtype),
        va_means=(torch.rand(c, 2, generator=g, dtype=f64) - 0.5).to(dtype) if mu else None,
    )
    # Unlabelled entries hold garbage, which every backend must ignore.
    case["expr"] = torch.where(case["expr_mask"], case["expr"], torch.randint(-5, 50, (b,), generator=g))
    case["au"] = torch.where(case["au_mask"], case["au"], torch.full_like(case["au"], float("nan")))
    case["va"] = torch.where(case["va_mask"][:, None], case["va"], torch.full_like(case["va"], float("nan")))
    return case


def reference(case: dict, weights=(1.0,) * 6, temperature: float = 1.0, eps: float = 0.05):
    """Terms and autograd gradients of the reference objective, in float64."""
    z = [case[n].detach().double().requires_grad_() for n in ("z_e", "z_a", "v")]
    rest = [None if case[n] is None else (case[n].double() if case[n].is_floating_point() else case[n])
            for n in NAMES[3:]]
    terms = reference_terms(*z, *rest, weights, temperature, eps)
    return (terms.detach(), *torch.autograd.grad(terms[0], z))


def run_native(fn, case: dict, weights=(1.0,) * 6, temperature: float = 1.0, eps: float = 0.05, **kw):
    return fn(*(case[n] for n in NAMES), tuple(weights), temperature, eps, **kw)


def assert_matches(out, ref, rtol: float, atol: float) -> None:
    terms, *grads = out
    rterms, *rgrads = ref
    for i, name in enumerate(("total", *TERMS)):
        torch.testing.assert_close(terms[i].double(), rterms[i], rtol=rtol, atol=atol, msg=f"term {name}")
    for name, g, r in zip(("z_e", "z_a", "v"), grads, rgrads):
        scale = max(float(r.abs().max()), 1e-30)
        torch.testing.assert_close(g.double(), r, rtol=rtol, atol=atol * scale, msg=f"grad {name}")


def edge_cases() -> dict[str, dict]:
    cases = {"B=1": make_case(1, seed=1), "B=1 generic": make_case(1, 3, 4, seed=2)}
    allm = make_case(9, seed=3)
    for m in ("expr_mask", "au_mask", "va_mask"):
        allm[m] = torch.zeros_like(allm[m])
    cases["all masked"] = allm
    single = make_case(10, seed=4, p_label=0.0)
    single["expr_mask"][3] = True
    single["expr"][3] = 2
    single["au_mask"][5, 4] = True
    single["au"][5, 4] = 1.0
    single["va_mask"][:] = False
    single["va_mask"][6] = True
    single["va"][6] = torch.tensor([0.3, -0.2], dtype=torch.float64)
    cases["single labelled row"] = single
    big = make_case(33, seed=5)
    g = torch.Generator().manual_seed(6)
    for n in ("z_e", "z_a"):
        sign = torch.where(torch.rand(big[n].shape, generator=g) < 0.5, -1.0, 1.0).double()
        big[n] = 80.0 * sign
    cases["logits +-80"] = big
    cases["no va_means"] = make_case(20, seed=7, mu=False)
    cases["C=1, K=1"] = make_case(12, 1, 1, seed=8)
    cases["C=K=64"] = make_case(40, 64, 64, seed=9)
    cases["several chunks, ragged tail"] = make_case(777, seed=10)
    return cases


EDGES = edge_cases()


# ---------------------------------------------------------------------------------------------- cpu
@needs_cpu
@pytest.mark.parametrize("name", list(EDGES))
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_cpu_float64_matches_reference(name, temperature):
    case = EDGES[name]
    out = run_native(native.objective_cpu, case, temperature=temperature)
    assert out[0].dtype == torch.float64
    assert_matches(out, reference(case, temperature=temperature), rtol=1e-10, atol=1e-12)


@needs_cpu
@pytest.mark.parametrize("zero", range(6))
def test_cpu_each_weight_zero(zero):
    case = make_case(50, seed=20)
    weights = tuple(0.0 if i == zero else 0.5 + 0.25 * i for i in range(6))
    out = run_native(native.objective_cpu, case, weights, temperature=1.7)
    assert_matches(out, reference(case, weights, temperature=1.7), rtol=1e-10, atol=1e-12)


@needs_cpu
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), b=st.integers(1, 70), c=st.integers(1, 64), k=st.integers(1, 64),
       temperature=st.floats(0.25, 4.0), eps=st.floats(0.01, 0.2), mu=st.booleans(), p_label=st.floats(0.0, 1.0))
def test_cpu_float64_any_shape(seed, b, c, k, temperature, eps, mu, p_label):
    case = make_case(b, c, k, seed, p_label=p_label, mu=mu)
    out = run_native(native.objective_cpu, case, temperature=temperature, eps=eps)
    assert_matches(out, reference(case, temperature=temperature, eps=eps), rtol=1e-10, atol=1e-12)


ISAS = native.cpu_isas() or ["baseline"]


@needs_cpu
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("b,c,k", [(1, 7, 17), (13, 7, 17), (1000, 7, 17), (300, 5, 9), (61, 20, 40)])
def test_cpu_float32_simd_path(isa, b, c, k):
    # float32 rows run 8 or 16 to a SIMD pack with their own exp/log: within float32 rounding of the reference,
    # on every instruction set this CPU has.
    case = make_case(b, c, k, seed=b + c, dtype=torch.float32)
    with native.cpu_isa(isa):
        out = run_native(native.objective_cpu, case, temperature=0.8)
    assert out[0].dtype == torch.float32 and all(g.dtype == torch.float32 for g in out[1:])
    assert_matches(out, reference(case, temperature=0.8), rtol=2e-5, atol=2e-5)


@needs_cpu
@pytest.mark.parametrize("isa", ISAS)
def test_cpu_float32_extreme_logits(isa):
    case = EDGES["logits +-80"]
    f32 = {n: (t.float() if t is not None and t.is_floating_point() else t) for n, t in case.items()}
    with native.cpu_isa(isa):
        out = run_native(native.objective_cpu, f32)
    assert_matches(out, reference(f32), rtol=1e-5, atol=1e-5)


@needs_cpu
def test_cpu_isa_choice():
    assert "baseline" in native.cpu_isas()
    with pytest.raises(ValueError, match="expected None"):
        with native.cpu_isa("sse9"):
            pass


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_half_inputs(dtype):
    case = make_case(100, seed=30, dtype=torch.float32)
    for n in ("z_e", "z_a", "v"):
        case[n] = case[n].to(dtype)
    terms, ge, ga, gv = run_native(native.objective_cpu, case)
    assert (ge.dtype, ga.dtype, gv.dtype) == (dtype,) * 3
    ref = reference(case)  # the reference of the same half-precision values
    torch.testing.assert_close(terms.double(), ref[0], rtol=1e-5, atol=1e-5)
    for g, r in zip((ge, ga, gv), ref[1:]):
        torch.testing.assert_close(g.double(), r, rtol=2e-2, atol=2e-2 * float(r.abs().max()))


@needs_cpu
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype,c,k", [(torch.float32, 7, 17), (torch.float32, 6, 11), (torch.float64, 7, 17)])
def test_cpu_same_bits_with_any_thread_count(isa, dtype, c, k):
    case = make_case(5000, c, k, seed=40, dtype=dtype)
    with native.cpu_isa(isa):
        outs = [run_native(native.objective_cpu, case, threads=t) for t in (1, 2, 3)]
        with native.num_threads(2):
            outs.append(run_native(native.objective_cpu, case))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


@needs_cpu
def test_cpu_ignores_masked_labels():
    case = make_case(64, seed=50)
    base = run_native(native.objective_cpu, case)
    g = torch.Generator().manual_seed(51)
    other = dict(case)
    other["expr"] = torch.where(case["expr_mask"], case["expr"], torch.randint(-100, 100, (64,), generator=g))
    other["au"] = torch.where(case["au_mask"], case["au"], torch.full_like(case["au"], float("inf")))
    other["va"] = torch.where(case["va_mask"][:, None], case["va"], torch.full_like(case["va"], -1e30))
    for a, b in zip(base, run_native(native.objective_cpu, other)):
        assert torch.equal(a, b)


@needs_cpu
def test_cpu_rejects_bad_input():
    case = make_case(8, seed=60)
    case["expr_mask"][5] = True
    case["expr"][5] = 7
    with pytest.raises(ValueError, match=r"expr: row 5 has class 7 outside \[0, 7\)"):
        run_native(native.objective_cpu, case)
    case = make_case(8, seed=61)
    case["au_mask"] = case["au_mask"][:, :3]
    with pytest.raises(ValueError, match="au_mask: shape"):
        run_native(native.objective_cpu, case)
    with pytest.raises(ValueError, match="positive int"):
        native.set_num_threads(0)


@needs_cpu
def test_cpu_backend_through_the_loss_and_op():
    assert resolve_backend("auto", "cpu") == "cpu"
    case = make_case(40, seed=70, dtype=torch.float32)
    z = {n: case[n].clone().requires_grad_() for n in ("z_e", "z_a", "v")}
    labels = {n: case[n] for n in NAMES[3:] if n not in ("relatedness", "va_means")}
    out = face_behavior_loss(**z, **labels, relatedness=case["relatedness"], va_means=case["va_means"],
                             temperature=0.9, backend="cpu")
    (2.0 * out.total).backward()
    ref = reference(case, temperature=0.9)
    torch.testing.assert_close(out.total.double(), ref[0][0], rtol=1e-5, atol=1e-5)
    for n, r in zip(("z_e", "z_a", "v"), ref[1:]):
        torch.testing.assert_close(z[n].grad.double(), 2.0 * r, rtol=2e-5, atol=2e-5 * float(r.abs().max()))
    args = [case[n] for n in NAMES]
    total, terms, *_ = objective(*args, [1.0] * 6, 1.0, 0.05, "cpu")
    assert terms.dtype == torch.float32 and terms.shape == (9,)
    assert total.shape == () and torch.equal(total, terms[0]) and total.data_ptr() != terms.data_ptr()


# ------------------------------------------------------------------------------------- availability
def test_missing_extension_is_reported(monkeypatch):
    real = importlib.import_module

    def no_native(name, *a, **kw):
        if name.startswith("fbn_fast._native"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a, **kw)

    monkeypatch.setattr(native.importlib, "import_module", no_native)
    ext, why = native._load("_native")
    assert ext is None and why.startswith(native.NOT_BUILT)
    monkeypatch.setattr(native, "_cpu_ext", None)
    monkeypatch.setattr(native, "_cpu_missing", why)
    monkeypatch.setattr(backends, "_REASONS", {})  # availability is probed once per (backend, device)
    assert native.availability("cpu", torch.device("cpu")) == why
    assert available_backends("cpu")["cpu"] == why
    assert resolve_backend("auto", "cpu") == "torch"
    with pytest.raises(ValueError, match="not built"):
        resolve_backend("cpu", "cpu")
    with pytest.raises(RuntimeError, match="not built"):
        run_native(native.objective_cpu, make_case(3))


def test_cuda_availability_on_a_cpu_tensor():
    assert "CUDA tensors" in native.availability("cuda", torch.device("cpu"))
    if not torch.cuda.is_available():
        assert "no CUDA device" in native.availability("cuda", torch.device("cuda"))
    assert "not 'triton'" in native.availability("triton", torch.device("cpu"))


def test_install_without_extension(tmp_path):
    # A real install with FBN_FAST_NO_EXT=1: nothing is compiled, the package imports, and the loss falls
    # back to the reference with the reason on record.
    env = dict(os.environ, FBN_FAST_NO_EXT="1", PIP_NO_INPUT="1")
    # A copy of the project, so that the build leaves the source tree (and its build/ folder) alone.
    src = tmp_path / "src"
    skip = shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "*.so", ".*")
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "fbn_fast", "kernels", "csrc"):
        path = os.path.join(ROOT, name)
        if os.path.isdir(path):
            shutil.copytree(path, src / name, ignore=skip)
        elif os.path.isfile(path):
            shutil.copy(path, src / name)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-compile", "--target", str(target), str(src)], check=True, env=env, cwd=tmp_path)
    assert not list(target.glob("fbn_fast/_native*"))
    # The CUDA sources are shipped anyway: the cuda backend can still compile them at run time (cupy/NVRTC).
    assert {p.name for p in target.glob("fbn_fast/_csrc/*")} == {"objective_cuda.cu", "objective_math.h"}
    probe = (
        "import torch, fbn_fast; from fbn_fast.losses import available_backends, resolve_backend\n"
        f"assert fbn_fast.__file__.startswith({str(target)!r}), fbn_fast.__file__\n"
        "why = available_backends('cpu')['cpu']; assert 'not built' in why, why\n"
        "assert resolve_backend('auto', 'cpu') == 'torch'\n"
        "from fbn_fast.losses import native\n"
        f"assert native._csrc_dir().startswith({str(target)!r}) and 'finalize_terms' in native.nvrtc_source()\n"
        "z = torch.zeros(2, 7, requires_grad=True)\n"
        "out = fbn_fast.FaceBehaviorLoss(torch.full((7, 17), 0.5))(z, torch.zeros(2, 17), torch.zeros(2, 2))\n"
        "out.total.backward(); print('ok')\n"
    )
    # -S: no .pth processing, so an editable install of the source tree (which has the extension) stays out.
    paths = sysconfig.get_paths()
    env["PYTHONPATH"] = os.pathsep.join([str(target), paths["purelib"], paths["platlib"]])
    res = subprocess.run([sys.executable, "-S", "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


# -------------------------------------------------------------------------------------------- build
def test_build_flags():
    bn = _build_native()
    old = {k: os.environ.get(k) for k in ("FBN_FAST_CUDA", "FBN_FAST_CUDA_ARCH")}
    try:
        os.environ["FBN_FAST_CUDA"] = "0"
        assert bn.cuda_plan() == (False, "FBN_FAST_CUDA=0")
        os.environ["FBN_FAST_CUDA_ARCH"] = "8.0;90"
        assert bn.cuda_archs() == ["80", "90"]
        cmd = bn.nvcc_command("nvcc", "a.cu", "a.o", bn.cuda_archs())
        assert cmd[:5] == ["nvcc", "-c", "a.cu", "-o", "a.o"]
        assert "arch=compute_80,code=sm_80" in cmd and "arch=compute_90,code=[sm_90,compute_90]" in cmd
        os.environ["FBN_FAST_CUDA_ARCH"] = "sm_90"
        with pytest.raises(ValueError, match="FBN_FAST_CUDA_ARCH"):
            bn.cuda_archs()
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.mark.skipif(_build_native().find_nvcc() is None, reason="nvcc not found")
def test_nvcc_compiles_the_cuda_source(tmp_path):
    # The build's own nvcc line for one architecture, device optimisers off to keep CI quick: a syntax or type
    # error in objective_cuda.cu or objective_math.h fails here even without a GPU.
    bn = _build_native()
    obj = tmp_path / "objective_cuda.o"
    cmd = bn.nvcc_command(bn.find_nvcc(), os.path.join(CSRC, "objective_cuda.cu"), str(obj), ["90"],
                          extra=["-Xcicc", "-O0", "-Xptxas", "-O0"])
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert obj.stat().st_size > 10_000


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ preprocessor")
def test_nvrtc_source_is_self_contained(tmp_path):
    src = native.nvrtc_source(CSRC)
    assert '#include "objective_math.h"' not in src and "objective_row" in src and "objective_kernel" in src
    # As NVRTC sees it: no standard headers, only cooperative_groups.h (stubbed here) may be included.
    (tmp_path / "cooperative_groups.h").write_text("")
    (tmp_path / "rtc.cu").write_text(src)
    res = subprocess.run(["c++", "-E", "-x", "c++", "-nostdinc", "-D__CUDACC_RTC__", "-D__CUDA_ARCH__=900",
                          "-I", str(tmp_path), str(tmp_path / "rtc.cu")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "cuda_launch" not in res.stdout  # the host launcher is left out


def _libnvrtc() -> str | None:
    """libnvrtc from FBN_FAST_NVRTC_LIB, the loader's path, or the nvidia-cuda-nvrtc wheel."""
    if os.environ.get("FBN_FAST_NVRTC_LIB"):
        return os.environ["FBN_FAST_NVRTC_LIB"]
    found = ctypes.util.find_library("nvrtc")
    if found:
        return found
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        for hit in sorted(glob.glob(os.path.join(root, "*", "lib", "libnvrtc.so*"))):
            if "builtins" not in hit:
                return hit
    return None


@pytest.mark.skipif(_libnvrtc() is None, reason="libnvrtc not found (pip install nvidia-cuda-nvrtc to run this)")
@pytest.mark.parametrize("kernel", ["fbn::objective_kernel<float, float, 7, 17>",
                                    "fbn::objective_kernel<fbn::bf16, float, 0, 0>"])
def test_nvrtc_compiles_the_runtime_source(kernel):
    # What cupy does at run time on a GPU machine, short of loading the result: NVRTC needs no GPU.
    lib = ctypes.CDLL(_libnvrtc())
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), native.nvrtc_source(CSRC).encode(), b"objective.cu", 0,
                                  None, None) == 0
    assert lib.nvrtcAddNameExpression(prog, kernel.encode()) == 0
    opts = [b"-std=c++17", b"--gpu-architecture=compute_90", b"-rdc=true"]
    opts += [("-I" + d).encode() for d in native._cuda_include_dirs()]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    assert rc == 0, log.value.decode(errors="replace")
    lowered = ctypes.c_char_p()
    assert lib.nvrtcGetLoweredName(prog, kernel.encode(), ctypes.byref(lowered)) == 0
    assert lowered.value.startswith(b"_ZN3fbn16objective_kernel")
    lib.nvrtcDestroyProgram(ctypes.byref(prog))


# ---------------------------------------------------------------------------------------------- gpu
GPU_SHAPES = [(1, 7, 17), (37, 7, 17), (4096, 7, 17), (100_000, 7, 17), (300, 5, 9), (2000, 64, 64)]


def _gpu_paths() -> list[str]:
    paths = []
    if native._cuda_ext is not None:
        paths.append("built")
    if native._cupy_reason() is None:
        paths.append("nvrtc")
    return paths


def _to(case: dict, device: str) -> dict:
    return {n: None if t is None else t.to(device) for n, t in case.items()}


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("b,c,k", GPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_reference(b, c, k, dtype):
    paths = _gpu_paths()
    if not paths:
        pytest.skip(native.availability("cuda", torch.device("cuda")))
    case = make_case(b, c, k, seed=b + c + k, dtype=dtype)
    ref = reference(case, temperature=0.8)
    tol = (1e-10, 1e-12) if dtype == torch.float64 else (2e-5, 2e-5)
    for path in paths:
        out = run_native(native.objective_cuda, _to(case, "cuda"), temperature=0.8, path=path)
        assert_matches([t.cpu() for t in out], ref, *tol)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", list(EDGES))
def test_cuda_edge_cases(name):
    paths = _gpu_paths()
    if not paths:
        pytest.skip(native.availability("cuda", torch.device("cuda")))
    case = EDGES[name]
    for path in paths:
        out = run_native(native.objective_cuda, _to(case, "cuda"), temperature=0.6, path=path)
        assert_matches([t.cpu() for t in out], reference(case, temperature=0.6), rtol=1e-10, atol=1e-12)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_inputs(dtype):
    case = make_case(3000, seed=80, dtype=torch.float32)
    for n in ("z_e", "z_a", "v"):
        case[n] = case[n].to(dtype)
    ref = reference(case)
    for path in _gpu_paths():
        terms, ge, ga, gv = run_native(native.objective_cuda, _to(case, "cuda"), path=path)
        assert (ge.dtype, ga.dtype, gv.dtype) == (dtype,) * 3
        torch.testing.assert_close(terms.cpu().double(), ref[0], rtol=1e-5, atol=1e-5)
        for g, r in zip((ge, ga, gv), ref[1:]):
            torch.testing.assert_close(g.cpu().double(), r, rtol=2e-2, atol=2e-2 * float(r.abs().max()))


@pytest.mark.gpu
@needs_cuda
def test_cuda_one_launch_deterministic_and_graph_safe():
    paths = _gpu_paths()
    if not paths:
        pytest.skip(native.availability("cuda", torch.device("cuda")))
    case = _to(make_case(50_000, seed=90, dtype=torch.float32), "cuda")
    for path in paths:
        first = run_native(native.objective_cuda, case, path=path)
        again = run_native(native.objective_cuda, case, path=path)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            run_native(native.objective_cuda, case, path=path)
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        assert len(kernels) == 1, [e.name for e in kernels]
        # Captured in a CUDA graph and replayed, the launch gives the same result.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run_native(native.objective_cuda, case, path=path)  # warm-up outside capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = run_native(native.objective_cuda, case, path=path)
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(first, captured))


@pytest.mark.gpu
@needs_cuda
def test_cuda_forward_and_backward_through_the_api_are_two_launches(monkeypatch):
    # As for the Triton backend: the forward kernel (which also writes the total apart from the term vector)
    # and one multi-tensor kernel scaling the stored gradients.
    paths = _gpu_paths()
    if not paths:
        pytest.skip(native.availability("cuda", torch.device("cuda")))
    case = make_case(4096, seed=91, dtype=torch.float32)
    cuda = _to(case, "cuda")
    z = [cuda[n].detach().requires_grad_() for n in ("z_e", "z_a", "v")]
    labels = {n: cuda[n] for n in NAMES[3:] if n not in ("relatedness", "va_means")}
    seed = torch.full((), 2.0, device="cuda")
    ref = reference(case)
    for path in paths:
        monkeypatch.setenv("FBN_FAST_CUDA_NVRTC", "1" if path == "nvrtc" else "0")

        def step():
            out = face_behavior_loss(*z, **labels, relatedness=cuda["relatedness"], va_means=cuda["va_means"],
                                     backend="cuda")
            return out.total, torch.autograd.grad(out.total, z, seed)

        step()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            total, grads = step()
            torch.cuda.synchronize()
        kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        assert len(kernels) == 2, (path, kernels)
        torch.testing.assert_close(total.double().cpu(), ref[0][0], rtol=1e-5, atol=1e-5)
        for g, r in zip(grads, ref[1:]):
            torch.testing.assert_close(g.double().cpu(), 2.0 * r, rtol=2e-5, atol=2e-5 * float(r.abs().max()))


@pytest.mark.gpu
@needs_cuda
def test_cuda_backend_through_the_loss():
    if native.availability("cuda", torch.device("cuda")) is not None:
        pytest.skip(native.availability("cuda", torch.device("cuda")))
    case = make_case(512, seed=100, dtype=torch.float32)
    cuda = _to(case, "cuda")
    z = {n: cuda[n].clone().requires_grad_() for n in ("z_e", "z_a", "v")}
    labels = {n: cuda[n] for n in NAMES[3:] if n not in ("relatedness", "va_means")}
    out = face_behavior_loss(**z, **labels, relatedness=cuda["relatedness"], va_means=cuda["va_means"],
                             backend="cuda")
    out.total.backward()
    ref = reference(case)
    torch.testing.assert_close(out.total.double().cpu(), ref[0][0], rtol=1e-5, atol=1e-5)
    for n, r in zip(("z_e", "z_a", "v"), ref[1:]):
        torch.testing.assert_close(z[n].grad.double().cpu(), r, rtol=2e-5, atol=2e-5 * float(r.abs().max()))
    # An invalid class under a true mask cannot be checked without a sync: it makes the total NaN instead.
    bad = dict(cuda)
    bad["expr_mask"] = torch.ones_like(cuda["expr_mask"])
    bad["expr"] = torch.full_like(cuda["expr"], 7)
    terms, *_ = run_native(native.objective_cuda, bad)
    assert torch.isnan(terms[0]).item() and torch.isnan(terms[1]).item()

