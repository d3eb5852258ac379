"""Backend ``triton``: the fused Triton objective against the reference (CPU through the Triton interpreter).

Without a CUDA device, tests/conftest.py switches Triton's interpreter on before anything imports triton, and
the kernels run on CPU tensors. GPU tests are marked ``gpu`` and skipped without a CUDA device
(profiling/gpu_check.sh runs them).
"""

import importlib

import pytest
import torch

from fbn_fast import FaceBehaviorLoss, face_behavior_loss
from fbn_fast import relatedness as rel_tables
from fbn_fast.losses import TERMS, available_backends, resolve_backend
from fbn_fast.losses.op import objective
from fbn_fast.losses.reference import reference_terms

kobj = importlib.import_module("fbn_fast.kernels.objective")  # installed from kernels/ (setup.py's package_dir)
ON_CPU = kobj.availability("triton", torch.device("cpu")) is None
needs_interpreter = pytest.mark.skipif(not ON_CPU, reason="Triton interpreter not active (TRITON_INTERPRET=1)")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
LABELS = ("expr", "expr_mask", "au", "au_mask", "va", "va_mask")
ONES = (1.0,) * 6


def make_case(b, c=7, k=17, seed=0, dtype=torch.float64, scale=2.0, p_label=0.5, mu=True):
    g = torch.Generator().manual_seed(seed)
    return dict(
        z_e=(torch.randn(b, c, generator=g, dtype=torch.float64) * scale).to(dtype),
        z_a=(torch.randn(b, k, generator=g, dtype=torch.float64) * scale).to(dtype),
        v=torch.randn(b, 2, generator=g, dtype=torch.float64).tanh().to(dtype),
        expr=torch.randint(0, c, (b,), generator=g),
        expr_mask=torch.rand(b, generator=g) < p_label,
        au=(torch.rand(b, k, generator=g) < 0.5).float(),
        au_mask=torch.rand(b, k, generator=g) < p_label,
        va=torch.rand(b, 2, generator=g) * 2 - 1,
        va_mask=torch.rand(b, generator=g) < 0.7,
        relatedness=torch.rand(c, k, generator=g),
        va_means=(torch.rand(c, 2, generator=g) - 0.5) if mu else None,
    )


def run_kernel(case, weights=ONES, temperature=1.0, eps=0.05, **plan):
    """``(terms, g_e, g_a, g_v)`` of one launch, after checking its separate total output against ``terms[0]``."""
    total, *out = kobj.triton_objective(case["z_e"], case["z_a"], case["v"], *(case[n] for n in LABELS),
                                        case["relatedness"], case["va_means"], weights, temperature, eps, **plan)
    assert total.shape == () and total.dtype == torch.float32
    torch.testing.assert_close(total, out[0][0], rtol=0, atol=0, equal_nan=True)
    return out


def reference(case, weights=ONES, temperature=1.0, eps=0.05, dtype=torch.float64):
    """Terms and autograd gradients of the reference objective, inputs taken at ``dtype``."""
    z = [case[n].detach().to(dtype).requires_grad_() for n in ("z_e", "z_a", "v")]
    terms = reference_terms(*z, *(case[n] for n in LABELS), case["relatedness"], case["va_means"], weights,
                            temperature, eps)
    grads = torch.autograd.grad(terms[0], z)
    return [terms.detach(), *grads]


def assert_matches(out, ref, rtol, atol):
    """Terms (float32 by contract) within float32 rounding; gradients within ``rtol`` and ``atol`` × max |ref|."""
    terms, *grads = out
    torch.testing.assert_close(terms.double(), ref[0].double(), rtol=max(rtol, 2e-6), atol=max(atol, 1e-6))
    for name, g, r in zip(("grad z_e", "grad z_a", "grad v"), grads, ref[1:]):
        scale = max(r.abs().max().item(), 1e-30) if r.numel() else 1.0
        torch.testing.assert_close(g.double(), r.double(), rtol=rtol, atol=atol * scale,
                                   msg=lambda m, n=name: f"{n}: {m}")


def edge_cases() -> dict:
    cases = {"B=1": make_case(1, seed=1), "B=37 (not a multiple of the block)": make_case(37, seed=2)}
    cases["B=300 (two blocks, ragged tail)"] = make_case(300, seed=3)
    off = make_case(20, seed=4)
    for n in ("expr_mask", "au_mask", "va_mask"):
        off[n] = torch.zeros_like(off[n])
    cases["all masks off"] = off
    one = make_case(24, seed=5, p_label=0.0)
    one["expr_mask"][3] = True
    one["au_mask"][7, :5] = True
    one["va_mask"] = torch.zeros_like(one["va_mask"])
    one["va_mask"][11] = True
    cases["exactly one labelled row per task"] = one
    big = make_case(33, seed=6)
    g = torch.Generator().manual_seed(7)
    for n in ("z_e", "z_a"):
        big[n] = torch.where(torch.rand(big[n].shape, generator=g) < 0.5, -80.0, 80.0).double()
    cases["logits of +-80"] = big
    cases["no va_means"] = make_case(29, seed=8, mu=False)
    cases["C=K=64"] = make_case(23, 64, 64, seed=9)
    cases["C=1, K=1"] = make_case(12, 1, 1, seed=10)
    cases["C=3, K=5"] = make_case(9, 3, 5, seed=11)
    return cases


EDGES = edge_cases()
TEMPERATURE = {name: (0.6 if i % 2 else 1.0) for i, name in enumerate(EDGES)}
TEMPERATURE["C=K=64"] = 2.5


# --------------------------------------------------------------------------------------------- CPU
@needs_interpreter
@pytest.mark.parametrize("name", list(EDGES))
def test_float64_matches_reference(name):
    case, t = EDGES[name], TEMPERATURE[name]
    out = run_kernel(case, temperature=t)
    assert out[0].dtype == torch.float32 and all(g.dtype == torch.float64 for g in out[1:])
    assert torch.isfinite(out[0]).all()
    assert_matches(out, reference(case, temperature=t), rtol=1e-10, atol=1e-12)
    assert torch.equal(kobj._SYNC[torch.device("cpu")], torch.zeros(2, dtype=torch.int32))  # counters re-armed


@needs_interpreter
@pytest.mark.parametrize("seed", range(4))
def test_float64_random_shapes(seed):
    g = torch.Generator().manual_seed(100 + seed)
    b, c, k = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((1, 90), (1, 65), (1, 65)))
    t = float(torch.empty(1).uniform_(0.3, 3.0, generator=g))
    eps = float(torch.empty(1).uniform_(0.01, 0.2, generator=g))
    case = make_case(b, c, k, seed=seed, p_label=float(torch.rand(1, generator=g)), mu=bool(seed % 2))
    out = run_kernel(case, temperature=t, eps=eps)
    assert_matches(out, reference(case, temperature=t, eps=eps), rtol=1e-10, atol=1e-12)


@needs_interpreter
@pytest.mark.parametrize("zero", range(6))
def test_each_weight_zero_in_turn(zero):
    case = make_case(16, seed=20 + zero)
    weights = tuple(0.0 if i == zero else 0.5 + 0.25 * i for i in range(6))
    out = run_kernel(case, weights, temperature=1.7)
    assert_matches(out, reference(case, weights, temperature=1.7), rtol=1e-10, atol=1e-12)


@needs_interpreter
def test_several_programs_and_blocks_agree_with_one():
    # Eight blocks of 8 rows over three programs (two launches: the interpreter runs programs in turn), and
    # the same blocks in one fused program: the cross-block and cross-program reductions.
    case = make_case(61, seed=30)
    ref = reference(case, temperature=0.8)
    split = run_kernel(case, temperature=0.8, split=True, programs=3, block_b=8)
    fused = run_kernel(case, temperature=0.8, block_b=8)
    for out in (split, fused):
        assert_matches(out, ref, rtol=1e-10, atol=1e-12)
    assert torch.equal(kobj._SYNC[torch.device("cpu")], torch.zeros(2, dtype=torch.int32))


@needs_interpreter
@pytest.mark.parametrize("use_dot", [False, True])
def test_float32_within_float32_rounding_and_deterministic(use_dot):
    # use_dot: the C×K contractions as tl.dot (a launch option on GPUs) instead of one class at a time.
    case = make_case(200, seed=31, dtype=torch.float32)
    out = run_kernel(case, temperature=0.7, use_dot=use_dot)
    assert all(g.dtype == torch.float32 for g in out[1:])
    assert_matches(out, reference(case, temperature=0.7), rtol=2e-5, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(out, run_kernel(case, temperature=0.7, use_dot=use_dot)))


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_error_at_most_twice_the_references(dtype):
    case = make_case(150, seed=32, dtype=dtype)
    truth = reference(case, dtype=torch.float64)  # the exact objective of the rounded inputs
    own = reference(case, dtype=dtype)  # PyTorch's own result at this dtype
    out = run_kernel(case)
    assert all(g.dtype == dtype for g in out[1:])
    for name, got, ref, exact in zip(("terms", "grad z_e", "grad z_a", "grad v"), out, own, truth):
        err = (got.double() - exact).abs().max().item()
        ref_err = (ref.double() - exact).abs().max().item()
        floor = 1e-6 * max(exact.abs().max().item(), 1.0)  # float32 accumulation differs in summation order
        assert err <= 2 * ref_err + floor, f"{name}: error {err:.3g} vs reference's {ref_err:.3g}"


@needs_interpreter
def test_masked_labels_are_ignored_whatever_their_value():
    case = make_case(40, seed=33)
    base = run_kernel(case)
    g = torch.Generator().manual_seed(34)
    other = dict(case)
    other["expr"] = torch.where(case["expr_mask"], case["expr"], torch.randint(-100, 100, (40,), generator=g))
    other["au"] = torch.where(case["au_mask"], case["au"], torch.full_like(case["au"], float("nan")))
    other["va"] = torch.where(case["va_mask"][:, None], case["va"], torch.full_like(case["va"], float("inf")))
    for a, b in zip(base, run_kernel(other)):
        assert torch.equal(a, b)


@needs_interpreter
def test_out_of_range_class_under_the_mask_gives_nan_expression_term():
    case = make_case(10, seed=35)
    case["expr_mask"][2] = True
    case["expr"][2] = 7  # C = 7: not a class
    terms = run_kernel(case)[0]
    assert torch.isnan(terms[1 + TERMS.index("expr")]) and torch.isnan(terms[0])
    assert torch.isfinite(terms[2:]).all()


@needs_interpreter
def test_strided_inputs():
    case = make_case(30, seed=36)
    strided = dict(case)
    for n in ("z_e", "z_a", "v", "au", "va"):
        wide = torch.zeros(case[n].shape[0], 2 * case[n].shape[1] + 1, dtype=case[n].dtype)
        wide[:, 1::2] = case[n]
        strided[n] = wide[:, 1::2]
        assert not strided[n].is_contiguous()
    strided["relatedness"] = case["relatedness"].T.contiguous().T
    out = run_kernel(strided)
    for a, b in zip(out, run_kernel(case)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@needs_interpreter
def test_through_the_op_module_and_autograd():
    case = make_case(25, seed=37)
    z = [case[n].clone().requires_grad_() for n in ("z_e", "z_a", "v")]
    rest = [case[n] for n in (*LABELS, "relatedness", "va_means")]
    total, terms, *_ = objective(*z, *rest, [1.0, 0.5, 1.0, 2.0, 1.0, 0.3], 1.3, 0.05, "triton")
    (3.0 * total).backward()
    ref = reference(case, (1.0, 0.5, 1.0, 2.0, 1.0, 0.3), 1.3)
    torch.testing.assert_close(terms.double(), ref[0], rtol=2e-6, atol=1e-6)
    for got, want in zip(z, ref[1:]):
        torch.testing.assert_close(got.grad, 3.0 * want, rtol=1e-10, atol=1e-12)

    prior = rel_tables.prior()
    module = FaceBehaviorLoss(prior, weights={"dm": 0.5}, temperature=2.0, backend="triton")
    f32 = {n: case[n].float() for n in ("z_e", "z_a", "v")}
    got = module(**f32, **{n: case[n] for n in LABELS})
    want = face_behavior_loss(**f32, **{n: case[n] for n in LABELS}, relatedness=prior.tensor(),
                              weights={"dm": 0.5}, temperature=2.0, backend="torch")
    torch.testing.assert_close(got.total, want.total, rtol=1e-5, atol=1e-6)
    assert set(got.terms) == set(TERMS)


@needs_interpreter
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_compiles_fullgraph(impl):
    case = make_case(20, seed=38, dtype=torch.float32)
    rest = [case[n] for n in (*LABELS, "relatedness", "va_means")]

    def step(z_e, z_a, v):
        total, *_ = objective(z_e, z_a, v, *rest, [1.0] * 6, 0.9, 0.05, impl)
        return total * 2.0

    z = [case[n].clone().requires_grad_() for n in ("z_e", "z_a", "v")]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(*z)
    out.backward()
    ref = reference(case, temperature=0.9, dtype=torch.float32)
    torch.testing.assert_close(out, 2.0 * ref[0][0], rtol=1e-5, atol=1e-6)
    for got, want in zip(z, ref[1:]):
        torch.testing.assert_close(got.grad, 2.0 * want, rtol=1e-4, atol=1e-6)


@needs_interpreter
def test_module_compiles_fullgraph_with_triton_backend():
    torch.manual_seed(1)
    head = torch.nn.Linear(8, 7 + 17 + 2)
    x = torch.randn(32, 8)
    case = make_case(32, seed=39, dtype=torch.float32)
    loss = FaceBehaviorLoss(rel_tables.prior(), backend="triton")
    ref_loss = FaceBehaviorLoss(rel_tables.prior(), backend="torch")

    def step(fn):
        out = head(x)
        return fn(out[:, :7], out[:, 7:24], out[:, 24:].tanh(), **{n: case[n] for n in LABELS}).total

    total = torch.compile(lambda: step(loss), fullgraph=True, backend="aot_eager")()
    total.backward()
    got = head.weight.grad.clone()
    head.zero_grad()
    want = step(ref_loss)
    want.backward()
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, head.weight.grad, rtol=1e-4, atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    case = make_case(4, seed=39)
    with pytest.raises(ValueError, match="au_mask has shape"):
        run_kernel({**case, "au_mask": case["au_mask"][:, :3]})
    with pytest.raises(ValueError, match="relatedness has shape"):
        run_kernel({**case, "relatedness": case["relatedness"].T})
    with pytest.raises(ValueError, match="z_e has dtype"):
        run_kernel({**case, "z_e": case["z_e"].long()})
    with pytest.raises(ValueError, match="batch is empty"):
        run_kernel(make_case(0, seed=1))
    with pytest.raises(ValueError, match="must be in"):
        run_kernel(make_case(2, 300, 3, seed=1))
    with pytest.raises(ValueError, match="expected 6 weights"):
        run_kernel(case, weights=(1.0,) * 5)
    with pytest.raises(ValueError, match="power of two"):
        run_kernel(case, block_b=12)


def test_availability_reports_reasons():
    assert "only the 'triton' backend" in kobj.availability("cuda", torch.device("cpu"))
    if ON_CPU:
        assert available_backends("cpu")["triton"] == "available"
        assert resolve_backend("triton", "cpu") == "triton"
    if not torch.cuda.is_available():
        assert kobj.availability("triton", torch.device("cuda")) is not None
    assert "no Triton path" in kobj.availability("triton", torch.device("meta"))


# --------------------------------------------------------------------------------------------- GPU
def _cuda(case: dict) -> dict:
    return {n: None if t is None else t.cuda() for n, t in case.items()}


def _cpu(out) -> list:
    return [t.cpu() for t in out]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("b,c,k", [(1, 7, 17), (37, 7, 17), (4096, 7, 17), (300_000, 7, 17), (2000, 64, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_reference(b, c, k, dtype):
    case = make_case(b, c, k, seed=b + c, dtype=dtype)
    tol = (1e-10, 1e-12) if dtype == torch.float64 else (2e-5, 2e-6)
    assert_matches(_cpu(run_kernel(_cuda(case), temperature=0.8)), reference(case, temperature=0.8), *tol)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", list(EDGES))
def test_cuda_edge_cases(name):
    case, t = EDGES[name], TEMPERATURE[name]
    assert_matches(_cpu(run_kernel(_cuda(case), temperature=t)), reference(case, temperature=t), 1e-10, 1e-12)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_inputs_error_at_most_twice_the_references(dtype):
    case = make_case(20_000, seed=40, dtype=dtype)
    truth = reference(case, dtype=torch.float64)
    own = reference(_cuda(case), dtype=dtype)
    out = run_kernel(_cuda(case))
    for name, got, ref, exact in zip(("terms", "grad z_e", "grad z_a", "grad v"), out, own, truth):
        err = (got.cpu().double() - exact).abs().max().item()
        ref_err = (ref.cpu().double() - exact).abs().max().item()
        floor = 1e-6 * max(exact.abs().max().item(), 1.0)
        assert err <= 2 * ref_err + floor, f"{name}: error {err:.3g} vs reference's {ref_err:.3g}"


@pytest.mark.gpu
@needs_cuda
def test_cuda_split_launch_and_program_counts_agree():
    case = _cuda(make_case(50_000, seed=41, dtype=torch.float32))
    ref = _cpu(run_kernel(case))
    for plan in ({"split": True}, {"programs": 3}, {"programs": 1}, {"block_b": 32, "num_warps": 2},
                 {"use_dot": True}, {"block_b": 8}):
        assert_matches(_cpu(run_kernel(case, **plan)), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@needs_cuda
def test_cuda_one_launch_deterministic_and_graph_safe():
    case = _cuda(make_case(100_000, seed=42, dtype=torch.float32))
    first = run_kernel(case)
    assert all(torch.equal(a, b) for a, b in zip(first, run_kernel(case)))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run_kernel(case)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    expected = 1 if kobj.cooperative_launch_supported() else 2
    assert len(kernels) == expected, kernels

    # Captured in a CUDA graph and replayed on new inputs: the same as eager.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run_kernel(case)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run_kernel(case)
    other = _cuda(make_case(100_000, seed=43, dtype=torch.float32))
    for n, t in case.items():
        if t is not None:
            t.copy_(other[n])
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, run_kernel(other)):
        assert torch.equal(a, b)


@pytest.mark.gpu
@needs_cuda
def test_cuda_forward_and_backward_through_the_api_are_two_launches():
    # The forward kernel, then one multi-tensor kernel scaling the three stored gradients; the total is an
    # output of its own, so no select-backward scatters the incoming gradient into a zero-filled vector.
    case = _cuda(make_case(4096, seed=46, dtype=torch.float32))
    z = [case[n].detach().requires_grad_() for n in ("z_e", "z_a", "v")]
    labels = {n: case[n] for n in LABELS}
    rel, mu = case["relatedness"], case["va_means"]
    seed = torch.full((), 2.0, device="cuda")  # the incoming gradient, allocated outside the profiled region

    def step():
        out = face_behavior_loss(*z, **labels, relatedness=rel, va_means=mu, eps=0.05, backend="triton")
        return torch.autograd.grad(out.total, z, seed)

    step()  # compile and arm the grid-barrier counters
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        grads = step()
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    expected = (1 if kobj.cooperative_launch_supported() else 2) + 1
    assert len(kernels) == expected, kernels
    ref = reference(case)
    for g, r in zip(grads, ref[1:]):
        torch.testing.assert_close(g.double(), 2.0 * r, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@needs_cuda
def test_cuda_first_call_inside_a_graph_capture():
    # No armed counters for the device yet: the captured graph zero-fills its own pair on every replay.
    case = _cuda(make_case(5000, seed=44, dtype=torch.float32))
    run_kernel(case)  # compile outside the capture
    kobj._SYNC.pop(case["z_e"].device, None)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run_kernel(case)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(captured, run_kernel(case)))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_cuda_compile_fullgraph_and_autocast(mode):
    torch.manual_seed(0)
    case = _cuda(make_case(4096, seed=45, dtype=torch.float32))
    head = torch.nn.Linear(32, 7 + 17 + 2).cuda()
    feats = torch.randn(4096, 32, device="cuda")
    loss = FaceBehaviorLoss(rel_tables.prior(), backend="triton")
    ref_loss = FaceBehaviorLoss(rel_tables.prior(), backend="torch")

    def step(fn, x):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = head(x)
        z_e, z_a, v = out[:, :7], out[:, 7:24], out[:, 24:].tanh()
        return fn(z_e, z_a, v, **{n: case[n] for n in LABELS}).total

    compiled = torch.compile(lambda x: step(loss, x), fullgraph=True, mode=mode)
    for _ in range(3):  # reduce-overhead records its graph after warm-up runs
        head.zero_grad()
        total = compiled(feats)
        total.backward()
    got = head.weight.grad.clone()
    head.zero_grad()
    want_total = step(ref_loss, feats)
    want_total.backward()
    torch.testing.assert_close(total.float(), want_total.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, head.weight.grad, rtol=2e-2, atol=1e-4)
