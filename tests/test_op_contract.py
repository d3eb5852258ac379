"""The contract of the fused op ``fbn_fast::objective``: one input check in its entry point for every backend,
each backend's own limits on top, the CUDA workspace layout tied to ``csrc/``, the launch-mode switch, and
the launch decisions that a GPU run depends on (class labels outside int32, the cooperative-launch retry)."""

from __future__ import annotations

import os
import re

import pytest
import torch
from fbn_fast.kernels import objective as kobj  # triton is a test dependency: an import error fails here
from objective_cases import NAMES, WIDE
from torch._subclasses.fake_tensor import FakeTensorMode

from fbn_fast.losses import available_backends, backends, cpu, cuda
from fbn_fast.losses.op import check_inputs, objective

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
IMPLS = ("torch", "triton", "cpu", "cuda")
needs_cpu_ext = pytest.mark.skipif(cpu._cpu_ext is None, reason=f"{cpu._cpu_missing}")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def make_case(b: int = 6, c: int = 7, k: int = 17, dtype: torch.dtype = torch.float64, device: str = "cpu") -> dict:
    g = torch.Generator().manual_seed(b + c + k)
    case = dict(
        z_e=torch.randn(b, c, generator=g, dtype=dtype), z_a=torch.randn(b, k, generator=g, dtype=dtype),
        v=torch.randn(b, 2, generator=g, dtype=dtype).tanh(), expr=torch.randint(0, c, (b,), generator=g),
        expr_mask=torch.rand(b, generator=g) < 0.5, au=(torch.rand(b, k, generator=g) < 0.5).to(dtype),
        au_mask=torch.rand(b, k, generator=g) < 0.5, va=torch.rand(b, 2, generator=g, dtype=dtype) * 2 - 1,
        va_mask=torch.rand(b, generator=g) < 0.7, relatedness=torch.rand(c, k, generator=g, dtype=dtype),
        va_means=torch.rand(c, 2, generator=g, dtype=dtype) - 0.5,
        au_pos_weight=torch.rand(k, generator=g, dtype=dtype) * 4,
    )
    return {n: t.to(device) for n, t in case.items()}


def call(case: dict, impl: str, weights=(1.0,) * 6, temperature: float = 1.0, eps: float = 0.05):
    return objective(*(case[n] for n in NAMES), list(weights), temperature, eps, impl)


def _bad(**changes) -> dict:
    case = make_case()
    for name, fn in changes.items():
        case[name] = fn(case[name])
    return case


# (case, call keywords, the error's start): each names the tensor or argument at fault.
BAD = {
    "z_e 1-D": (_bad(z_e=lambda t: t[:, 0]), {}, r"z_e: shape \(6,\), expected"),
    "z_a batch": (_bad(z_a=lambda t: t[:5]), {}, r"z_a: shape \(5, 17\), expected \(6, \*\)"),
    "v columns": (_bad(v=lambda t: torch.cat([t, t[:, :1]], 1)), {}, r"v: shape \(6, 3\), expected \(6, 2\)"),
    "expr 2-D": (_bad(expr=lambda t: t[:, None]), {}, r"expr: shape \(6, 1\), expected \(6,\)"),
    "expr_mask length": (_bad(expr_mask=lambda t: t[:4]), {}, r"expr_mask: shape \(4,\)"),
    "au columns": (_bad(au=lambda t: t[:, :16]), {}, r"au: shape \(6, 16\), expected \(6, 17\)"),
    "au_mask columns": (_bad(au_mask=lambda t: t[:, :3]), {}, r"au_mask: shape \(6, 3\), expected \(6, 17\)"),
    "va columns": (_bad(va=lambda t: t[:, :1]), {}, r"va: shape \(6, 1\)"),
    "va_mask 2-D": (_bad(va_mask=lambda t: t[:, None]), {}, r"va_mask: shape \(6, 1\)"),
    "relatedness transposed": (_bad(relatedness=lambda t: t.T), {},
                               r"relatedness: shape \(17, 7\), expected \(7, 17\) from z_e and z_a"),
    "va_means columns": (_bad(va_means=lambda t: t[:, :1]), {}, r"va_means: shape \(7, 1\), expected \(7, 2\)"),
    "au_pos_weight length": (_bad(au_pos_weight=lambda t: t[:8]), {},
                             r"au_pos_weight: shape \(8,\), expected \(17,\) from z_e and z_a"),
    "au_pos_weight integer": (_bad(au_pos_weight=lambda t: t.long()), {}, r"au_pos_weight: dtype torch.int64"),
    "z_e integer": (_bad(z_e=lambda t: t.long()), {}, r"z_e: dtype torch.int64, expected one of"),
    "v complex": (_bad(v=lambda t: t.to(torch.complex64)), {}, r"v: dtype torch.complex64"),
    "expr float": (_bad(expr=lambda t: t.double()), {}, r"expr: dtype torch.float64, expected an integer"),
    "au_mask float": (_bad(au_mask=lambda t: t.float()), {}, r"au_mask: dtype torch.float32, expected bool"),
    "au integer": (_bad(au=lambda t: t.long()), {}, r"au: dtype torch.int64, expected a floating dtype"),
    "relatedness integer": (_bad(relatedness=lambda t: t.long()), {}, r"relatedness: dtype torch.int64"),
    "K = 0": (make_case(k=0), {}, r"C = 7 and K = 0 must be >= 1"),
    "another device": (_bad(relatedness=lambda t: t.to("meta")), {}, r"relatedness is on meta, z_e on cpu"),
    "five weights": (make_case(), {"weights": (1.0,) * 5}, r"weights: expected 8 per-term weights"),
    "temperature 0": (make_case(), {"temperature": 0.0}, r"temperature must be > 0"),
    "eps 0.5": (make_case(), {"eps": 0.5}, r"eps must be in \(0, 0.5\)"),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(BAD))
def test_every_backend_rejects_the_same_bad_input_naming_the_tensor(name, impl):
    case, kw, message = BAD[name]
    with pytest.raises(ValueError, match=message):
        call(case, impl, **kw)


def test_fake_implementation_runs_the_same_check():
    # Under torch.compile the op is traced with fake tensors: a bad shape fails at trace time, not in a kernel.
    case, _, message = BAD["au_mask columns"]
    with FakeTensorMode() as mode:
        fake = {n: mode.from_tensor(t) for n, t in case.items()}
        with pytest.raises(ValueError, match=message):
            call(fake, "triton")
        total, terms, *grads = call({n: mode.from_tensor(t) for n, t in make_case().items()}, "triton")
    assert total.shape == () and terms.shape == (9,) and [g.shape for g in grads] == [(6, 7), (6, 17), (6, 2)]


def test_backends_add_only_their_own_limits():
    wide = make_case(b=3, c=kobj.MAX_DIM + 1, k=5)
    limit = rf"C = {kobj.MAX_DIM + 1} and K = 5 must be in \[1, {kobj.MAX_DIM}\].*MAX_DIM"
    with pytest.raises(ValueError, match=limit):
        call(wide, "triton")
    torch_total, *_ = call(wide, "torch")  # the reference and the cpu backend have no such limit
    if cpu._cpu_ext is not None:
        cpu_total, *_ = call(wide, "cpu")
        torch.testing.assert_close(cpu_total, torch_total, rtol=1e-6, atol=1e-6)  # float32 outputs of f64 math
    with pytest.raises(ValueError, match=r"z_e is on cpu: backend 'cuda' takes CUDA tensors"):
        call(make_case(), "cuda")
    meta = make_case(device="meta")
    with pytest.raises(ValueError, match=r"z_e is on meta: backend 'cpu' takes CPU tensors"):
        call(meta, "cpu")
    with pytest.raises(ValueError, match=r"z_e is on meta: backend 'triton' takes CUDA tensors"):
        call(meta, "triton")
    # Every backend's own entry point (for tests and tuning) runs the same check.
    case, _, message = BAD["relatedness transposed"]
    args = [case[n] for n in NAMES]
    for fn in (kobj.triton_objective, cpu.objective_cpu, cuda.objective_cuda):
        with pytest.raises(ValueError, match=message):
            fn(*args, (1.0,) * 6, 1.0, 0.05)
    assert check_inputs("torch", *(make_case(b=4, c=3, k=5)[n] for n in NAMES), (1.0,) * 6, 1.0, 0.05) == (4, 3, 5)


def test_triton_limits_on_tiles():
    # tl.dot does not compile above DOT_MAX_DIM: a clear error, not a compiler failure; at the limit the
    # default tile is raised to tl.dot's 16 rows instead of being rejected.
    over = make_case(b=4, c=kobj.DOT_MAX_DIM + 1, k=5, dtype=torch.float32)
    with pytest.raises(ValueError, match=rf"use_dot=True takes C, K <= {kobj.DOT_MAX_DIM} \(DOT_MAX_DIM\)"):
        # check=False: past the op's check (MAX_DIM, which the op applies first), as the op itself calls it
        kobj.triton_objective(*(over[n] for n in NAMES), (1.0,) * 6, 1.0, 0.05, use_dot=True, check=False)
    face = make_case(b=3, dtype=torch.float32)
    total, *_ = kobj.triton_objective(*(face[n] for n in NAMES), (1.0,) * 6, 1.0, 0.05, use_dot=True)
    assert kobj.last_plan["block_b"] == 16 and torch.isfinite(total)
    assert kobj.BARRIER_MAX_DIM <= kobj.MAX_DIM and kobj.DOT_MAX_DIM <= kobj.MAX_DIM
    assert WIDE == kobj.MAX_DIM  # the kit's widest case is the triton limit, so every backend runs all of it


# ------------------------------------------------------------------------------- labels outside int32
@pytest.mark.parametrize("label", [2**32 + 3, 2**31, -(2**32) + 2])  # int32 wraps: 3 (valid), -2^31, 2
def test_class_labels_outside_int32_are_invalid_not_wrapped(label):
    case = make_case()
    case["expr_mask"][:] = True
    case["expr"][2] = label
    # The kernel itself (what runs unchecked on a GPU) makes the expr term NaN, as for any invalid class.
    total, terms, *_ = kobj.triton_objective(*(case[n] for n in NAMES), (1.0,) * 8, 1.0, 0.05)
    assert torch.isnan(total) and torch.isnan(terms[1])
    # Through the op, CPU tensors are checked on the host: every CPU backend raises the same error.
    for impl in ("torch", "triton", "cpu"):
        with pytest.raises(ValueError, match=rf"expr: row 2 has class {label} outside \[0, 7\)"):
            call(case, impl)


# ---------------------------------------------------------------------------- cooperative-launch retry
def test_only_the_cooperative_refusal_is_retried():
    refusal = RuntimeError(f"Triton Error [CUDA]: {kobj.COOPERATIVE_REFUSAL}")
    assert kobj.cooperative_refusal(refusal)
    for other in (RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered"),
                  RuntimeError("Triton Error [CUDA]: out of memory"),
                  RuntimeError("PassManager::run failed"),
                  ValueError(kobj.COOPERATIVE_REFUSAL)):
        assert not kobj.cooperative_refusal(other), other


def test_the_retry_loop_halves_the_grid_once_and_lets_other_errors_through(monkeypatch):
    """The fused launch's loop itself, its launch replaced by one that fails as a driver would: a refused
    cooperative grid is retried once with half the programs per SM (remembered); any other error propagates
    as it was raised and leaves the occupancy estimate alone."""
    device = torch.device("cuda", 0)  # never touched: the launch and the SM count are stand-ins
    monkeypatch.setattr(kobj, "_sm_count", lambda dev: 4)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    outs = tuple(torch.zeros(1) for _ in range(5))
    grids: list[int] = []

    def refuse_once(kw, nprog, fused, *rest):
        grids.append(nprog)
        if len(grids) == 1:
            raise RuntimeError(f"Triton Error [CUDA]: {kobj.COOPERATIVE_REFUSAL}")
        return rest

    key = ("retry-test", "refusal")
    monkeypatch.setitem(kobj._OCC, key, 8)
    monkeypatch.setattr(kobj, "_run", refuse_once)
    nblocks = 1000
    got = kobj._run_cooperative({}, key, 8, kobj.program_count(device, nblocks, 8), nblocks, device, outs)
    assert got == outs
    assert grids == [4 * 8, 4 * 4]  # one retry, on half the grid
    assert kobj._OCC[key] == 4

    illegal = RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered")

    def fail(kw, nprog, fused, *rest):
        grids.append(nprog)
        raise illegal

    grids.clear()
    key = ("retry-test", "other")
    monkeypatch.setitem(kobj._OCC, key, 8)
    monkeypatch.setattr(kobj, "_run", fail)
    with pytest.raises(RuntimeError) as info:
        kobj._run_cooperative({}, key, 8, 32, nblocks, device, outs)
    assert info.value is illegal and grids == [32]  # the same exception object, no retry
    assert kobj._OCC[key] == 8


# --------------------------------------------------------------------------------------- launch mode
def test_grid_barrier_is_off_by_default_and_switched_on_by_the_documented_switch(monkeypatch):
    monkeypatch.delenv(backends.GRID_BARRIER_ENV, raising=False)
    monkeypatch.setattr(backends, "_grid_barrier", None)
    assert backends.GRID_BARRIER_ENV == "FBN_FAST_GRID_BARRIER"
    assert not backends.grid_barrier() and backends.launch_mode().startswith("split plan")
    monkeypatch.setenv("FBN_FAST_GRID_BARRIER", "1")
    assert backends.grid_barrier() and "FBN_FAST_GRID_BARRIER=1" in backends.launch_mode()
    backends.set_grid_barrier(False)  # the function overrides the environment
    assert not backends.grid_barrier()
    backends.set_grid_barrier(True)
    monkeypatch.setenv("FBN_FAST_GRID_BARRIER", "0")
    assert backends.grid_barrier() and "set_grid_barrier(True)" in backends.launch_mode()
    backends.set_grid_barrier(None)
    monkeypatch.setenv("FBN_FAST_GRID_BARRIER", "yes")
    with pytest.raises(ValueError, match="FBN_FAST_GRID_BARRIER must be 0 or 1"):
        backends.grid_barrier()
    with pytest.raises(ValueError, match="set_grid_barrier"):
        backends.set_grid_barrier("on")


def test_available_backends_says_which_mode_runs(monkeypatch):
    monkeypatch.delenv(backends.GRID_BARRIER_ENV, raising=False)
    monkeypatch.setattr(backends, "_grid_barrier", None)
    gpu = torch.device("cuda")
    # As probed on a GPU machine: both CUDA-launching backends runnable there.
    monkeypatch.setattr(backends, "_REASONS", {("triton", gpu): None, ("cuda", gpu): None, ("cpu", gpu): "x"})
    report = available_backends("cuda")
    for name in ("triton", "cuda"):
        assert report[name].startswith("available (split plan") and "FBN_FAST_GRID_BARRIER=1" in report[name]
    assert report["torch"] == "available" and report["cpu"] == "x"
    monkeypatch.setenv("FBN_FAST_GRID_BARRIER", "1")
    assert available_backends("cuda")["cuda"].startswith("available (grid barrier")
    assert available_backends("cpu")["torch"] == "available"  # no launch mode on the CPU


def test_program_count_of_the_split_plan_depends_on_the_device_only(monkeypatch):
    monkeypatch.setattr(kobj, "_sm_count", lambda device: 132)
    dev = torch.device("cuda")
    assert kobj.program_count(dev, 10**6) == 132 * kobj._OCC_CAP
    assert kobj.program_count(dev, 7) == 7
    assert kobj.program_count(dev, 10**6, per_sm=3) == 396  # the barrier mode: the compiled kernel's occupancy


# ---------------------------------------------------------------------------- workspace tied to csrc/
def _read(name: str) -> str:
    with open(os.path.join(CSRC, name)) as f:
        return f.read()


def _cpp_int_expr(src: str, pattern: str) -> str:
    m = re.search(pattern, src, re.S)
    assert m, f"pattern {pattern!r} not found"
    return re.sub(r"(\d+)LL\b", r"\1", m.group(1))


def test_workspace_constants_match_the_cuda_sources():
    header, cu = _read("objective_math.h"), _read("objective_cuda.cu")
    nsum1 = int(_cpp_int_expr(header, r"\bNSUM1\s*=\s*(\d+)"))
    sum2 = re.search(r"enum\s+Sum2\s*\{([^}]*)\}", header).group(1)
    entries = [e.strip() for e in sum2.split(",") if e.strip()]
    assert entries[-1] == "NSUM2" and all("=" not in e for e in entries)  # NSUM2 counts the entries before it
    assert (cuda._NSUM1, cuda._NSUM2) == (nsum1, len(entries) - 1)
    ticket = int(_cpp_int_expr(cu, r"constexpr long long TICKET_BYTES\s*=\s*(\d+);"))
    assert cuda._TICKET_BYTES == ticket
    phases = re.search(r"enum\s+Phase\s*\{([^}]*)\}", cu).group(1)
    assert phases.replace(" ", "") == "PHASE_ALL=0,PHASE_STATS=1,PHASE_ROWS=2"
    assert (cuda._PHASE_ALL, cuda._PHASE_STATS, cuda._PHASE_ROWS) == (0, 1, 2)
    tab = _cpp_int_expr(header, r"tab_size\(int C, int K\)\s*\{\s*return ([^;]+);")
    scratch = _cpp_int_expr(cu, r"nthreads \* \(([^)]+)\) \* sizeof\(T\)")
    for c, k in ((7, 17), (1, 1), (64, 64), (5, 9)):
        assert cuda._tab_size(c, k) == eval(tab, {"C": c, "K": k})  # an integer formula of C and K
        for grid, block, itemsize, generic in ((1, 256, 4, False), (264, 128, 8, True), (3, 128, 4, True)):
            # The layout of objective_kernel: tables (16-byte aligned), both passes' sums, the ticket, scratch.
            want = (-(-cuda._tab_size(c, k) * itemsize // 16) * 16 + grid * (nsum1 + len(entries) - 1) * 8
                    + ticket + (grid * block * eval(scratch, {"C": c, "K": k}) * itemsize if generic else 0))
            assert cuda._workspace_bytes(c, k, grid, block, itemsize, generic) == want


# ------------------------------------------------------------------------------------------------ gpu
def _gpu_backends() -> list[str]:
    report = available_backends("cuda") if torch.cuda.is_available() else {}
    return [n for n in ("triton", "cuda") if report.get(n, "").startswith("available")]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_split_plan_and_grid_barrier_agree(dtype, monkeypatch):
    case = make_case(b=5000, dtype=dtype, device="cuda")
    assert _gpu_backends(), available_backends("cuda")  # a card without a fused backend is a failure here
    for impl in _gpu_backends():
        monkeypatch.setattr(backends, "_grid_barrier", False)
        split = call(case, impl)
        monkeypatch.setattr(backends, "_grid_barrier", True)
        fused = call(case, impl)
        if impl == "cuda":  # the same grid in both modes and a fixed reduction order: the same bits
            assert all(torch.equal(a, b) for a, b in zip(split, fused))
        else:  # Triton's program counts differ between the modes (program_count), so the summation order does
            tol = 1e-12 if dtype == torch.float64 else 1e-5
            for a, b in zip(split, fused):
                torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launch_on_the_tensors_device_and_keep_the_current_one():
    ref = [t.cpu() for t in call(make_case(b=300, device="cuda:0"), "torch")]
    case = make_case(b=300, device="cuda:1")
    assert _gpu_backends(), available_backends("cuda:1")
    for impl in _gpu_backends():
        torch.cuda.set_device(0)
        out = call(case, impl)
        assert torch.cuda.current_device() == 0 and all(t.device == torch.device("cuda:1") for t in out)
        for a, b in zip(out, ref):  # float64 inputs: the kernels' sums differ from the reference's in order only
            torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-12)
