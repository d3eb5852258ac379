"""Backend ``triton``: the fused Triton objective against the reference (CPU through the Triton interpreter).

Without a CUDA device, tests/conftest.py switches Triton's interpreter on before anything imports triton, and
the kernels run on CPU tensors. GPU tests are marked ``gpu`` and skipped without a CUDA device
(profiling/gpu_check.sh runs them).
"""

import importlib
from dataclasses import replace

import pytest
import torch
from objective_cases import CASES, LABELS, LOGITS, TABLES, Case, Outputs, assert_matches, cuda_launches, make_inputs

from fbn_fast import FaceBehaviorLoss, face_behavior_loss
from fbn_fast import relatedness as rel_tables
from fbn_fast.losses import TERMS, available_backends, resolve_backend
from fbn_fast.losses.op import objective

kobj = importlib.import_module("fbn_fast.kernels.objective")  # installed from kernels/ (setup.py's package_dir)
ON_CPU = kobj.availability("triton", torch.device("cpu")) is None
needs_interpreter = pytest.mark.skipif(not ON_CPU, reason="Triton interpreter not active (TRITON_INTERPRET=1)")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
F64, F32 = torch.float64, torch.float32


def run_kernel(case: Case, dtype: torch.dtype = F64, device: str = "cpu", inputs: dict | None = None,
               **plan) -> Outputs:
    """One launch of the kernel with a launch ``plan``, after checking its separate total against ``terms[0]``."""
    inputs = case.at(dtype, device) if inputs is None else inputs
    total, *out = kobj.triton_objective(*(inputs[n] for n in (*LOGITS, *LABELS, *TABLES)), case.weights,
                                        case.temperature, case.eps, **plan)
    assert total.shape == () and total.dtype == out[0].dtype
    torch.testing.assert_close(total, out[0][0], rtol=0, atol=0, equal_nan=True)
    return Outputs(*out)


# --------------------------------------------------------------------------------------------- CPU
# Every edge case on every dtype through the public API: tests/test_objective_backends.py. Here what is the
# kernel's own: launch plans, padding of odd shapes, tl.dot, strides, the op and torch.compile.
@needs_interpreter
@pytest.mark.parametrize("seed", range(4))
def test_float64_random_shapes(seed):
    # C and K padded to powers of two, rows to the block: random sizes exercise every mask of the padding.
    g = torch.Generator().manual_seed(100 + seed)
    wide = kobj.MAX_DIM + 1
    b, c, k = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((1, 90), (1, wide), (1, wide)))
    t = float(torch.empty(1).uniform_(0.3, 3.0, generator=g))
    eps = float(torch.empty(1).uniform_(0.01, 0.2, generator=g))
    p = float(torch.rand(1, generator=g))
    case = Case(make_inputs(b, c, k, seed=seed, p_expr=p, p_au=p, mu=bool(seed % 2)), temperature=t, eps=eps)
    assert_matches(run_kernel(case), case, F64, what=f"B={b}, C={c}, K={k}")


@needs_interpreter
def test_several_programs_and_blocks_agree_with_one():
    # Eight blocks of 8 rows over three programs (two launches: the interpreter runs programs in turn), and
    # the same blocks in one fused program: the cross-block and cross-program reductions.
    case = Case(make_inputs(61, seed=30), temperature=0.8)
    for plan in ({"split": True, "programs": 3, "block_b": 8}, {"block_b": 8}):
        assert_matches(run_kernel(case, **plan), case, F64, what=str(plan))
    assert torch.equal(kobj._SYNC[torch.device("cpu")], torch.zeros(2, dtype=torch.int32))


@needs_interpreter
@pytest.mark.parametrize("use_dot", [False, True])
def test_float32_within_float32_rounding_and_deterministic(use_dot):
    # use_dot: the C×K contractions as tl.dot (a launch option on GPUs) instead of one class at a time.
    case = Case(make_inputs(200, seed=31), temperature=0.7)
    out = run_kernel(case, F32, use_dot=use_dot)
    assert all(g.dtype == F32 for g in out[1:])
    assert_matches(out, case, F32)
    assert all(torch.equal(a, b) for a, b in zip(out, run_kernel(case, F32, use_dot=use_dot)))


@needs_interpreter
def test_out_of_range_class_under_the_mask_gives_nan_expression_term():
    inputs = CASES["face 7x17"].at(F64)
    inputs["expr_mask"][2] = True
    inputs["expr"][2] = 7  # C = 7: not a class
    terms = run_kernel(CASES["face 7x17"], inputs=inputs).terms
    assert torch.isnan(terms[1 + TERMS.index("expr")]) and torch.isnan(terms[0])
    assert torch.isfinite(terms[2:]).all()


@needs_interpreter
def test_strided_inputs():
    case = CASES["T=0.6"]
    strided = case.at(F64)
    for n in ("z_e", "z_a", "v", "au", "va"):
        wide = torch.zeros(strided[n].shape[0], 2 * strided[n].shape[1] + 1, dtype=strided[n].dtype)
        wide[:, 1::2] = strided[n]
        strided[n] = wide[:, 1::2]
        assert not strided[n].is_contiguous()
    strided["relatedness"] = strided["relatedness"].T.contiguous().T
    # The same arithmetic on the same values, only addressed differently: the same bits.
    for a, b in zip(run_kernel(case, inputs=strided), run_kernel(case)):
        assert torch.equal(a, b)


@needs_interpreter
def test_through_the_op_module_and_autograd():
    case = Case(make_inputs(25, seed=37), weights=(1.0, 0.5, 1.0, 2.0, 1.0, 0.3), temperature=1.3)
    args = case.args(F64)
    z, rest = [t.requires_grad_() for t in args[:3]], args[3:]
    total, terms, *_ = objective(*z, *rest, list(case.weights), case.temperature, case.eps, "triton")
    (3.0 * total).backward()  # the op's backward scales the stored gradients by the incoming one
    assert_matches(Outputs(terms, *(t.grad / 3.0 for t in z)), case, F64)

    prior = rel_tables.prior()
    inputs = case.at(F32)
    module = FaceBehaviorLoss(prior, weights={"dm": 0.5}, temperature=2.0, backend="triton",
                              au_pos_weight=inputs["au_pos_weight"])
    z = [inputs[n].requires_grad_() for n in LOGITS]
    got = module(*z, **{n: inputs[n] for n in LABELS})
    assert set(got.terms) == set(TERMS)
    terms = torch.stack([got.total, *(got.terms[t] for t in TERMS)]).detach()
    want = Case({**inputs, "relatedness": prior.tensor(), "va_means": None}, weights=(1.0,) * 4 + (0.5, 1.0),
                temperature=2.0)
    assert_matches(Outputs(terms, *torch.autograd.grad(got.total, z)), want, F32)


@needs_interpreter
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_compiles_fullgraph(impl):
    case = replace(CASES["T=0.6"], weights=(1.0,) * 6)
    inputs = case.at(F32)
    rest = [inputs[n] for n in (*LABELS, *TABLES)]

    def step(z_e, z_a, v):
        total, *_ = objective(z_e, z_a, v, *rest, list(case.weights), case.temperature, case.eps, impl)
        return total * 2.0

    z = [inputs[n].requires_grad_() for n in LOGITS]
    out = torch.compile(step, fullgraph=True, backend="aot_eager")(*z)
    out.backward()
    assert_matches(Outputs(out.detach()[None] / 2.0, *(t.grad / 2.0 for t in z)), case, F32)


@needs_interpreter
def test_module_compiles_fullgraph_with_triton_backend():
    torch.manual_seed(1)
    head = torch.nn.Linear(8, 7 + 17 + 2)
    x = torch.randn(32, 8)
    labels = {n: t for n, t in make_inputs(32, seed=39).items() if n in LABELS}
    loss = FaceBehaviorLoss(rel_tables.prior(), backend="triton")
    ref_loss = FaceBehaviorLoss(rel_tables.prior(), backend="torch")

    def step(fn):
        out = head(x)
        return fn(out[:, :7], out[:, 7:24], out[:, 24:].tanh(), **labels).total

    total = torch.compile(lambda: step(loss), fullgraph=True, backend="aot_eager")()
    total.backward()
    got = head.weight.grad.clone()
    head.zero_grad()
    want = step(ref_loss)
    want.backward()
    # float32 both, summed in other orders, then through the head's matmul: float32 rounding.
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, head.weight.grad, rtol=1e-4, atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    # Each error names the tensor, argument or launch option at fault.
    case = CASES["face 7x17"]
    inputs = case.at(F32)
    with pytest.raises(ValueError, match="au_mask"):
        run_kernel(case, inputs={**inputs, "au_mask": inputs["au_mask"][:, :3]})
    with pytest.raises(ValueError, match="relatedness"):
        run_kernel(case, inputs={**inputs, "relatedness": inputs["relatedness"].T})
    with pytest.raises(ValueError, match="z_e"):
        run_kernel(case, inputs={**inputs, "z_e": inputs["z_e"].long()})
    with pytest.raises(ValueError, match="C = 300"):
        run_kernel(Case(make_inputs(2, 300, 3, seed=1)))
    with pytest.raises(ValueError, match="weights"):
        run_kernel(replace(case, weights=(1.0,) * 5))
    with pytest.raises(ValueError, match="block_b"):
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
# The edge cases on every dtype run on CUDA tensors in tests/test_objective_backends.py; here large batches,
# launch plans, launch counts, CUDA graphs and torch.compile.
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("b,c,k", [(1, 7, 17), (37, 7, 17), (4096, 7, 17), (300_000, 7, 17), (2000, 32, 32)])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_cuda_matches_reference(b, c, k, dtype):
    case = Case(make_inputs(b, c, k, seed=b + c), temperature=0.8)
    assert_matches(run_kernel(case, dtype, "cuda"), case, dtype)


@pytest.mark.gpu
@needs_cuda
def test_cuda_split_launch_and_program_counts_agree():
    case = Case(make_inputs(50_000, seed=41))
    for plan in ({}, {"split": True}, {"programs": 3}, {"programs": 1}, {"block_b": 32, "num_warps": 2},
                 {"use_dot": True}, {"block_b": 8}):
        assert_matches(run_kernel(case, F32, "cuda", **plan), case, F32, what=str(plan))


@pytest.mark.gpu
@needs_cuda
def test_cuda_one_launch_deterministic_and_graph_safe():
    case = Case(make_inputs(100_000, seed=42))
    inputs = case.at(F32, "cuda")
    first = run_kernel(case, inputs=inputs)
    assert all(torch.equal(a, b) for a, b in zip(first, run_kernel(case, inputs=inputs)))
    kernels = cuda_launches(lambda: run_kernel(case, inputs=inputs))
    assert len(kernels) == (1 if kobj.last_plan["fused"] else 2), kernels  # the grid barrier, or the split plan

    # Captured in a CUDA graph and replayed on new inputs: the same as eager.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run_kernel(case, inputs=inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run_kernel(case, inputs=inputs)
    other = Case(make_inputs(100_000, seed=43)).at(F32, "cuda")
    for n, t in inputs.items():
        if t is not None:
            t.copy_(other[n])
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, run_kernel(case, inputs=other)):
        assert torch.equal(a, b)


@pytest.mark.gpu
@needs_cuda
def test_cuda_forward_and_backward_through_the_api_are_two_launches():
    # The forward kernel(s), then one multi-tensor kernel scaling the three stored gradients; the total is an
    # output of its own, so no select-backward scatters the incoming gradient into a zero-filled vector.
    case = Case(make_inputs(4096, seed=46))
    inputs = case.at(F32, "cuda")
    z = [inputs[n].requires_grad_() for n in LOGITS]
    rest = {n: inputs[n] for n in (*LABELS, *TABLES)}
    seed = torch.full((), 2.0, device="cuda")  # the incoming gradient, allocated outside the profiled region
    grads = []

    def step():
        out = face_behavior_loss(*z, **rest, eps=case.eps, backend="triton")
        grads[:] = [out.total.detach(), *torch.autograd.grad(out.total, z, seed)]

    step()  # compile and arm the grid-barrier counters
    kernels = cuda_launches(step)
    assert len(kernels) == (1 if kobj.last_plan["fused"] else 2) + 1, kernels
    total, *g = grads
    assert_matches(Outputs(total[None], *(t / 2.0 for t in g)), case, F32)


@pytest.mark.gpu
@needs_cuda
def test_cuda_first_call_inside_a_graph_capture():
    # No armed counters for the device yet: the captured graph zero-fills its own pair on every replay.
    case = Case(make_inputs(5000, seed=44))
    inputs = case.at(F32, "cuda")
    run_kernel(case, inputs=inputs)  # compile outside the capture
    kobj._SYNC.pop(inputs["z_e"].device, None)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run_kernel(case, inputs=inputs)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(captured, run_kernel(case, inputs=inputs)))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_cuda_compile_fullgraph_and_autocast(mode):
    torch.manual_seed(0)
    labels = {n: t.cuda() for n, t in make_inputs(4096, seed=45).items() if n in LABELS}
    head = torch.nn.Linear(32, 7 + 17 + 2).cuda()
    feats = torch.randn(4096, 32, device="cuda")
    loss = FaceBehaviorLoss(rel_tables.prior(), backend="triton")
    ref_loss = FaceBehaviorLoss(rel_tables.prior(), backend="torch")

    def step(fn, x):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = head(x)
        z_e, z_a, v = out[:, :7], out[:, 7:24], out[:, 24:].tanh()
        return fn(z_e, z_a, v, **labels).total

    compiled = torch.compile(lambda x: step(loss, x), fullgraph=True, mode=mode)
    for _ in range(3):  # reduce-overhead records its graph after warm-up runs
        head.zero_grad()
        total = compiled(feats)
        total.backward()
    got = head.weight.grad.clone()
    head.zero_grad()
    want_total = step(ref_loss, feats)
    want_total.backward()
    # bfloat16 logits from autocast, then the loss in float32 in another order and back through the head.
    torch.testing.assert_close(total.float(), want_total.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, head.weight.grad, rtol=2e-2, atol=1e-4)
