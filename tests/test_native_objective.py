"""Backends ``cpu`` and ``cuda`` (csrc/): what is their own beyond the kit's edge cases (which every backend runs
in tests/test_objective_backends.py): instruction sets, thread-count determinism, the build (nvcc compiles the
CUDA source; NVRTC gets a self-contained source), life without the extension, and the CUDA launch paths."""

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
from objective_cases import (
    CASES,
    LABELS,
    LOGITS,
    ONES,
    TABLES,
    Case,
    Outputs,
    assert_matches,
    cuda_launches,
    make_inputs,
)

from fbn_fast import face_behavior_loss
from fbn_fast.losses import available_backends, backends, cpu, cuda, resolve_backend
from fbn_fast.losses.op import objective
from fbn_fast.losses.reference import DEFAULT_EPS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
F64, F32 = torch.float64, torch.float32

needs_cpu = pytest.mark.skipif(cpu._cpu_ext is None, reason=f"{cpu._cpu_missing}")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _build_native():
    spec = importlib.util.spec_from_file_location("build_native", os.path.join(CSRC, "build_native.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_cpu(case: Case, dtype: torch.dtype, inputs: dict | None = None, **kw) -> Outputs:
    """``case`` through the ``cpu`` backend's own entry point (``threads=`` and the like in ``kw``)."""
    inputs = case.at(dtype) if inputs is None else inputs
    return Outputs(*cpu.objective_cpu(*(inputs[n] for n in (*LOGITS, *LABELS, *TABLES)), case.weights,
                                      case.temperature, case.eps, **kw))


# ---------------------------------------------------------------------------------------------- cpu
ISAS = cpu.cpu_isas() or ["baseline"]


@needs_cpu
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), b=st.integers(1, 70), c=st.integers(1, 64), k=st.integers(1, 64),
       temperature=st.floats(0.25, 4.0), eps=st.floats(0.01, 0.2), mu=st.booleans(), p_label=st.floats(0.0, 1.0))
def test_cpu_float64_any_shape(seed, b, c, k, temperature, eps, mu, p_label):
    # Rows in chunks, classes and AUs at any count: every remainder of the loops.
    case = Case(make_inputs(b, c, k, seed=seed, p_expr=p_label, p_au=p_label, mu=mu), temperature=temperature,
                eps=eps)
    out = run_cpu(case, F64)
    assert out.terms.dtype == F64
    assert_matches(out, case, F64)


@needs_cpu
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", list(CASES))
def test_cpu_float32_every_instruction_set_on_the_kit(isa, name):
    # float32 rows run 8 or 16 to a SIMD pack with their own exp/log: the kit's bound on every instruction set
    # this CPU has (the kit itself runs the default one).
    case = CASES[name]
    with cpu.cpu_isa(isa):
        out = run_cpu(case, F32)
    assert out.terms.dtype == F32 and all(g.dtype == F32 for g in out[1:])
    assert_matches(out, case, F32, what=f"{isa} {name}")


@needs_cpu
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("b,c,k", [(13, 7, 17), (1000, 7, 17), (300, 5, 9), (61, 20, 40)])
def test_cpu_float32_simd_path_shapes(isa, b, c, k):
    case = Case(make_inputs(b, c, k, seed=b + c), temperature=0.8)
    with cpu.cpu_isa(isa):
        assert_matches(run_cpu(case, F32), case, F32, what=isa)


@needs_cpu
def test_cpu_isa_choice():
    assert "baseline" in cpu.cpu_isas()
    with pytest.raises(ValueError, match="expected None"):
        with cpu.cpu_isa("sse9"):
            pass


@needs_cpu
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype,c,k", [(F32, 7, 17), (F32, 6, 11), (F64, 7, 17)])
def test_cpu_same_bits_with_any_thread_count(isa, dtype, c, k):
    # A promise of the backend: reductions in a fixed chunk order, so the thread count changes no bit.
    case = Case(make_inputs(5000, c, k, seed=40))
    with cpu.cpu_isa(isa):
        outs = [run_cpu(case, dtype, threads=t) for t in (1, 2, 3)]
        with cpu.num_threads(2):
            outs.append(run_cpu(case, dtype))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


@needs_cpu
def test_cpu_rejects_bad_input():
    case = CASES["face 7x17"]
    inputs = case.at(F64)
    inputs["expr_mask"][5] = True
    inputs["expr"][5] = 7
    with pytest.raises(ValueError, match=r"expr: row 5 has class 7 outside \[0, 7\)"):
        run_cpu(case, F64, inputs)
    with pytest.raises(ValueError, match="au_mask"):
        run_cpu(case, F64, {**case.at(F64), "au_mask": inputs["au_mask"][:, :3]})
    with pytest.raises(ValueError, match="positive int"):
        cpu.set_num_threads(0)


@needs_cpu
def test_cpu_backend_through_the_loss_and_op():
    assert resolve_backend("auto", "cpu") == "cpu"
    case = CASES["T=0.6"]
    inputs = case.at(F32)
    z = [inputs[n].requires_grad_() for n in LOGITS]
    rest = {n: inputs[n] for n in (*LABELS, *TABLES)}
    out = face_behavior_loss(*z, **rest, **case.loss(), backend="cpu")
    (2.0 * out.total).backward()  # the op's backward scales the stored gradients by the incoming one
    assert_matches(Outputs(out.total.detach()[None], *(t.grad / 2.0 for t in z)), case, F32)
    total, terms, *_ = objective(*case.args(F32), [1.0] * 6, 1.0, DEFAULT_EPS, "cpu")
    assert terms.dtype == F32 and terms.shape == (9,)
    assert total.shape == () and torch.equal(total, terms[0]) and total.data_ptr() != terms.data_ptr()


# ------------------------------------------------------------------------------------- availability
def test_missing_extension_is_reported(monkeypatch):
    real = importlib.import_module

    def no_native(name, *a, **kw):
        if name.startswith("fbn_fast._native"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a, **kw)

    monkeypatch.setattr(backends.importlib, "import_module", no_native)
    ext, why = backends.load_extension("_native")
    assert ext is None and why.startswith(backends.NOT_BUILT)
    monkeypatch.setattr(cpu, "_cpu_ext", None)
    monkeypatch.setattr(cpu, "_cpu_missing", why)
    monkeypatch.setattr(backends, "_REASONS", {})  # availability is probed once per (backend, device)
    assert cpu.availability("cpu", torch.device("cpu")) == why
    assert available_backends("cpu")["cpu"] == why
    assert resolve_backend("auto", "cpu") == "torch"
    with pytest.raises(ValueError, match="not built"):
        resolve_backend("cpu", "cpu")
    with pytest.raises(RuntimeError, match="not built"):
        cpu.objective_cpu(*CASES["face 7x17"].args(F64), ONES, 1.0, DEFAULT_EPS)


def test_cuda_availability_on_a_cpu_tensor():
    assert "CUDA tensors" in cuda.availability("cuda", torch.device("cpu"))
    if not torch.cuda.is_available():
        assert "no CUDA device" in cuda.availability("cuda", torch.device("cuda"))
    assert "not 'triton'" in cuda.availability("triton", torch.device("cpu"))
    assert "not 'triton'" in cpu.availability("triton", torch.device("cpu"))


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
        "from fbn_fast.losses import cuda\n"
        f"assert cuda._csrc_dir().startswith({str(target)!r}) and 'finalize_terms' in cuda.nvrtc_source()\n"
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
    src = cuda.nvrtc_source(CSRC)
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
            return hit
    return None


@pytest.mark.skipif(_libnvrtc() is None, reason="libnvrtc not found (pip install nvidia-cuda-nvrtc to run this)")
@pytest.mark.parametrize("kernel", ["fbn::objective_kernel<float, float, 7, 17>",
                                    "fbn::objective_kernel<fbn::bf16, float, 0, 0>"])
def test_nvrtc_compiles_the_runtime_source(kernel):
    # What cupy does at run time on a GPU machine, short of loading the result: NVRTC needs no GPU.
    path = _libnvrtc()
    # NVRTC opens its builtins library by name: from a wheel, that folder is not on the loader's path, so load it
    # first (once loaded, the name resolves).
    for builtins in glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so*")):
        ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(path)
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), cuda.nvrtc_source(CSRC).encode(), b"objective.cu", 0,
                                  None, None) == 0
    assert lib.nvrtcAddNameExpression(prog, kernel.encode()) == 0
    opts = [b"-std=c++17", b"--gpu-architecture=compute_90", b"-rdc=true"]
    opts += [("-I" + d).encode() for d in cuda._cuda_include_dirs()]
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
# The kit's edge cases on every dtype run through the API (path ``auto``) in tests/test_objective_backends.py;
# here both launch paths (the built extension and NVRTC), large batches, launch counts and CUDA graphs.
GPU_SHAPES = [(1, 7, 17), (37, 7, 17), (4096, 7, 17), (100_000, 7, 17), (300, 5, 9), (2000, 64, 64)]


def _gpu_paths() -> list[str]:
    paths = []
    if cuda._cuda_ext is not None:
        paths.append("built")
    if cuda._cupy_reason() is None:
        paths.append("nvrtc")
    if not paths:
        pytest.skip(cuda.availability("cuda", torch.device("cuda")))
    return paths


def run_cuda(case: Case, dtype: torch.dtype, inputs: dict | None = None, **kw) -> Outputs:
    """``case`` through the ``cuda`` backend's own entry point (``path=``, ``barrier=`` in ``kw``)."""
    inputs = case.at(dtype, "cuda") if inputs is None else inputs
    return Outputs(*cuda.objective_cuda(*(inputs[n] for n in (*LOGITS, *LABELS, *TABLES)), case.weights,
                                        case.temperature, case.eps, **kw))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("b,c,k", GPU_SHAPES)
@pytest.mark.parametrize("dtype", [F32, F64])
def test_cuda_matches_reference(b, c, k, dtype):
    case = Case(make_inputs(b, c, k, seed=b + c + k), temperature=0.8)
    for path in _gpu_paths():
        for barrier in (False, True):
            assert_matches(run_cuda(case, dtype, path=path, barrier=barrier), case, dtype,
                           what=f"{path}, barrier={barrier}")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_both_paths_on_the_kit(name):
    case = CASES[name]
    for path in _gpu_paths():
        for dtype in (F64, F32):
            assert_matches(run_cuda(case, dtype, path=path), case, dtype, what=path)


@pytest.mark.gpu
@needs_cuda
def test_cuda_deterministic_and_graph_safe():
    case = Case(make_inputs(50_000, seed=90))
    inputs = case.at(F32, "cuda")
    for path in _gpu_paths():
        first = run_cuda(case, F32, inputs, path=path)
        for barrier in (False, True):  # one grid for both modes: the same bits
            assert all(torch.equal(a, b) for a, b in zip(first, run_cuda(case, F32, inputs, path=path,
                                                                          barrier=barrier)))
            kernels = cuda_launches(lambda p=path, b=barrier: run_cuda(case, F32, inputs, path=p, barrier=b))
            assert len(kernels) == (1 if barrier else 2), (path, barrier, kernels)
        # Captured in a CUDA graph and replayed, the launch gives the same result.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run_cuda(case, F32, inputs, path=path)  # warm-up outside capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = run_cuda(case, F32, inputs, path=path)
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(first, captured))


@pytest.mark.gpu
@needs_cuda
def test_cuda_forward_and_backward_through_the_api(monkeypatch):
    # As for the Triton backend: the forward launch(es) (which also write the total apart from the term vector)
    # and one multi-tensor kernel scaling the stored gradients.
    case = Case(make_inputs(4096, seed=91))
    inputs = case.at(F32, "cuda")
    z = [inputs[n].requires_grad_() for n in LOGITS]
    rest = {n: inputs[n] for n in (*LABELS, *TABLES)}
    seed = torch.full((), 2.0, device="cuda")
    got: list[torch.Tensor] = []

    def step():
        out = face_behavior_loss(*z, **rest, **case.loss(), backend="cuda")
        got[:] = [out.total.detach(), *torch.autograd.grad(out.total, z, seed)]

    for path in _gpu_paths():
        monkeypatch.setenv("FBN_FAST_CUDA_NVRTC", "1" if path == "nvrtc" else "0")
        step()
        kernels = cuda_launches(step)
        assert len(kernels) == (1 if backends.grid_barrier() else 2) + 1, (path, kernels)
        total, *grads = got
        assert_matches(Outputs(total[None], *(g / 2.0 for g in grads)), case, F32, what=path)


@pytest.mark.gpu
@needs_cuda
def test_cuda_invalid_class_gives_nan_not_a_sync():
    # An invalid class under a true mask cannot be checked without a sync: it makes the total NaN instead.
    if cuda.availability("cuda", torch.device("cuda")) is not None:
        pytest.skip(cuda.availability("cuda", torch.device("cuda")))
    case = CASES["face 7x17"]
    inputs = case.at(F32, "cuda")
    inputs["expr_mask"] = torch.ones_like(inputs["expr_mask"])
    inputs["expr"] = torch.full_like(inputs["expr"], 7)
    terms = run_cuda(case, F32, inputs).terms
    assert torch.isnan(terms[0]).item() and torch.isnan(terms[1]).item()
