"""The loss as a drop-in for other multi-task projects, at the op level: per-term weights as data (a tensor that
may require grad or change every step without recompiling), differentiable terms from one call, per-term
label counts, strict inputs on every backend, and one precision contract (fp32 under autocast, float64 in and
out, gradcheck, a clear error for second-order gradients through the fused backends)."""

from __future__ import annotations

import pytest
import torch
from objective_cases import LABELS, LOGITS, make_inputs

from fbn_fast.losses import (
    TERM_WEIGHTS,
    TERMS,
    WEIGHTS,
    FaceBehaviorLoss,
    LossWeights,
    available_backends,
    face_behavior_loss,
)
from fbn_fast.losses.reference import reference_terms

F64 = torch.float64
#: Backends that run on CPU tensors here (triton through its interpreter).
CPU_BACKENDS = [n for n, why in available_backends("cpu").items() if why == "available"]
FUSED = [n for n in CPU_BACKENDS if n != "torch"]
#: Absolute tolerance of float64 results against the float64 reference: both sum the same float64 values in
#: different orders, a few hundred roundings of values of order 1.
TOL64 = 1e-10


def batch(b: int = 12, c: int = 7, k: int = 17, seed: int = 0, dtype: torch.dtype = F64) -> dict:
    inputs = make_inputs(b, c, k, seed=seed)
    out = {n: inputs[n] for n in (*LABELS, "relatedness", "va_means")}
    for n in ("au", "va", "relatedness", "va_means"):
        out[n] = out[n].to(dtype)
    out.update({n: inputs[n].to(dtype).detach().requires_grad_() for n in LOGITS})
    return out


def loss(inputs: dict, backend: str, **kw):
    labels = {n: inputs[n] for n in (*LABELS, "relatedness", "va_means")}
    return face_behavior_loss(*(inputs[n] for n in LOGITS), **labels, backend=backend, **kw)


def reference_vector(inputs: dict, weights) -> torch.Tensor:
    return reference_terms(*(inputs[n] for n in LOGITS), *(inputs[n] for n in LABELS), inputs["relatedness"],
                           inputs["va_means"], weights=weights)


# ------------------------------------------------------------------------------------------- weights as data
def test_term_weight_mapping_is_exported_and_the_six_weights_map_onto_it():
    assert TERM_WEIGHTS == TERMS == LossWeights.TERMS
    assert len(TERMS) == 8 and WEIGHTS == ("expr", "au", "va", "ca", "dm", "ev")
    assert LossWeights(1, 2, 3, 4, 5, 6).vector() == (1, 2, 3, 4, 4, 5, 5, 6)
    assert LossWeights(ca=2.0, dm_ae=0.5).vector() == (1, 1, 1, 2, 2, 1, 0.5, 1)
    assert LossWeights.coerce((1, 2, 3, 4, 5, 6, 7, 8)).vector() == (1, 2, 3, 4, 5, 6, 7, 8)
    assert LossWeights.coerce({"ca_ea": 0.0}).vector()[3] == 0.0
    with pytest.raises(ValueError, match="unknown loss weight"):
        LossWeights.coerce({"lambda_dm": 1.0})
    with pytest.raises(ValueError, match="finite float >= 0"):
        LossWeights(dm_ev=-1.0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float_and_tensor_weights_give_the_weighted_sum_of_the_terms(backend):
    inputs = batch(seed=1)
    w = (0.5, 1.5, 0.25, 2.0, 0.0, 1.25, 0.75, 3.0)
    want = reference_vector(inputs, w)
    assert torch.allclose(want[0], (torch.tensor(w, dtype=F64) * want[1:]).sum(), atol=TOL64, rtol=0)
    for weights in (LossWeights.coerce(w), torch.tensor(w, dtype=F64)):
        out = loss(inputs, backend, weights=weights)
        assert out.total.dtype == F64
        assert torch.allclose(out.total, want[0], atol=TOL64, rtol=0), (backend, weights)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_weight_tensor_gradient_is_the_terms_from_one_call(backend):
    inputs = batch(seed=2)
    w = torch.tensor([0.5, 1.5, 0.25, 2.0, 0.3, 1.25, 0.75, 3.0], dtype=F64, requires_grad=True)
    out = loss(inputs, backend, weights=w)
    (g_w,) = torch.autograd.grad(2.0 * out.total, w)
    want = reference_vector(inputs, w.detach())[1:]
    assert torch.allclose(g_w, 2.0 * want, atol=TOL64, rtol=0), backend


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_differentiable_terms_match_the_reference_per_term(backend):
    # A LibMTL-style combination of the terms and the total: one call, one backward.
    inputs = batch(seed=3)
    w = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.25, 1.5, 1.0, 0.5], dtype=F64, requires_grad=True)
    coef = torch.linspace(-1.0, 2.0, len(TERMS), dtype=F64)
    out = loss(inputs, backend, weights=w, differentiable_terms=True)
    got = torch.autograd.grad(0.7 * out.total + sum(c * out.terms[t] for c, t in zip(coef, TERMS)),
                              [*(inputs[n] for n in LOGITS), w])
    ref = reference_vector(inputs, w)
    want = torch.autograd.grad(0.7 * ref[0] + (coef * ref[1:]).sum(), [*(inputs[n] for n in LOGITS), w])
    for name, g, r in zip((*LOGITS, "weights"), got, want):
        assert torch.allclose(g, r, atol=TOL64, rtol=0), (backend, name, (g - r).abs().max())
    # One term alone (the total unused): its own gradient, not the total's.
    out = loss(inputs, backend, weights=w, differentiable_terms=True)
    (g,) = torch.autograd.grad(out.terms["dm_ae"], inputs["z_a"])
    (r,) = torch.autograd.grad(reference_vector(inputs, w)[1 + TERMS.index("dm_ae")], inputs["z_a"])
    assert torch.allclose(g, r, atol=TOL64, rtol=0), backend


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_terms_are_detached_by_default(backend):
    out = loss(batch(b=4, seed=4), backend)
    assert out.total.requires_grad and not any(t.requires_grad for t in out.terms.values())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiled_step_with_weights_changing_every_step_compiles_once(backend):
    from torch._dynamo.testing import CompileCounter

    inputs = batch(b=8, seed=5, dtype=torch.float32)
    labels = {n: inputs[n] for n in (*LABELS, "relatedness", "va_means")}
    counter = CompileCounter()

    @torch.compile(backend=counter, fullgraph=True)
    def step(z_e, z_a, v, w):
        return face_behavior_loss(z_e, z_a, v, **labels, weights=w, backend=backend).total

    z = [inputs[n].detach() for n in LOGITS]
    for i in range(5):  # DWA-like: new values every step, in a new tensor
        w = torch.rand(8, generator=torch.Generator().manual_seed(i))
        got = step(*z, w)
        want = reference_vector({**inputs, **dict(zip(LOGITS, z))}, w)[0]
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)  # float32 sums in different orders
    assert counter.frame_count == 1, f"{backend}: {counter.frame_count} compilations"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_differentiable_terms_compile_fullgraph(backend):
    # The backward's relaunch goes through the op, so a compiled backward traces it like the forward.
    inputs = batch(b=8, seed=21)
    labels = {n: inputs[n] for n in (*LABELS, "relatedness", "va_means")}

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(z_e, z_a, v, w):
        out = face_behavior_loss(z_e, z_a, v, **labels, weights=w, backend=backend, differentiable_terms=True)
        return out.total + 0.5 * out.terms["dm_ae"] - out.terms["au"]

    w = torch.rand(8, dtype=F64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    z = [inputs[n] for n in LOGITS]
    got = torch.autograd.grad(step(*z, w), [*z, w])
    ref = reference_vector(inputs, w)
    want = torch.autograd.grad(ref[0] + 0.5 * ref[1 + TERMS.index("dm_ae")] - ref[1 + TERMS.index("au")], [*z, w])
    for name, g, r in zip((*LOGITS, "weights"), got, want):
        assert torch.allclose(g, r, atol=TOL64, rtol=0), (backend, name)


def test_module_takes_a_learnable_weight_tensor():
    inputs = batch(b=6, seed=6, dtype=torch.float32)
    log_w = torch.nn.Parameter(torch.zeros(8))
    module = FaceBehaviorLoss(inputs["relatedness"], inputs["va_means"], weights=log_w, backend="torch")
    out = module(*(inputs[n] for n in LOGITS), *(inputs[n] for n in LABELS), weights=log_w.exp())
    out.total.backward()
    assert log_w.grad is not None and torch.allclose(log_w.grad, torch.stack([out.terms[t] for t in TERMS]))


# -------------------------------------------------------------------------------------------------- counts
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_counts_say_which_tasks_a_batch_carries(backend):
    inputs = batch(b=10, seed=7)
    assert loss(inputs, backend).counts is None  # only when asked for (a few kernels more per call)
    out = loss(inputs, backend, counts=True)
    me, ma, mv = inputs["expr_mask"], inputs["au_mask"], inputs["va_mask"]
    want = {"expr": me.sum(), "au": ma.sum(), "va": mv.sum(), "ca_ea": (me[:, None] & ~ma).sum(),
            "ca_ae": (ma.any(1) & ~me).sum(), "dm_ea": 10 * 17, "dm_ae": 10, "dm_ev": 10}
    assert set(out.counts) == set(TERMS)
    assert {t: int(c) for t, c in out.counts.items()} == {t: int(c) for t, c in want.items()}


# ------------------------------------------------------------------------------------------- strict inputs
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("given,message", [
    (("au",), "au is given without au_mask"), (("au_mask",), "au_mask is given without au"),
    (("va",), "va is given without va_mask"), (("va_mask",), "va_mask is given without va"),
    (("expr_mask",), "expr_mask is given without expr"),
])
def test_a_label_without_its_mask_is_an_error(backend, given, message):
    inputs = batch(b=4, seed=8)
    with pytest.raises(ValueError, match=message):
        face_behavior_loss(*(inputs[n] for n in LOGITS), inputs["relatedness"], **{n: inputs[n] for n in given},
                           backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_minus_one_marks_a_missing_expression_without_a_mask(backend):
    inputs = batch(b=8, seed=9)
    with_mask = loss(inputs, backend).total
    alone = {**inputs, "expr": torch.where(inputs["expr_mask"], inputs["expr"], -1), "expr_mask": None}
    got = face_behavior_loss(*(alone[n] for n in LOGITS), **{n: alone[n] for n in (*LABELS, "relatedness",
                                                                                 "va_means")}, backend=backend,
                             counts=True)
    assert torch.allclose(got.total, with_mask, atol=TOL64, rtol=0)
    assert int(got.counts["expr"]) == int(inputs["expr_mask"].sum())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mask", ["expr_mask", "au_mask", "va_mask"])
def test_float_masks_are_rejected_not_thresholded(backend, mask):
    inputs = batch(b=4, seed=10)
    inputs[mask] = inputs[mask].to(F64) * 0.5
    with pytest.raises(ValueError, match=rf"{mask}: dtype torch.float64, expected bool"):
        loss(inputs, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_two_column_va_mask_is_rejected(backend):
    inputs = batch(b=4, seed=11)
    inputs["va_mask"] = inputs["va_mask"][:, None].expand(4, 2)
    with pytest.raises(ValueError, match=r"va_mask: shape \(4, 2\)"):
        loss(inputs, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ["au", "va_mask", "relatedness"])
def test_inputs_on_another_device_are_an_error_naming_the_tensor(backend, name):
    inputs = batch(b=4, seed=12)
    inputs[name] = inputs[name].to("meta")
    with pytest.raises(ValueError, match=rf"{name} is on meta, z_e on cpu"):
        loss(inputs, backend)
    with pytest.raises(ValueError, match="weights is on meta"):
        loss(batch(b=4, seed=12), backend, weights=torch.ones(8, device="meta"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_an_empty_batch_gives_zeros_and_zero_gradients(backend):
    inputs = batch(b=0, seed=13)
    w = torch.ones(8, dtype=F64, requires_grad=True)
    out = loss(inputs, backend, weights=w, differentiable_terms=True, counts=True)
    assert out.total.item() == 0.0 and all(t.item() == 0.0 for t in out.terms.values())
    grads = torch.autograd.grad(out.total + out.terms["au"], [*(inputs[n] for n in LOGITS), w])
    assert all(g.shape == t.shape and not g.any() for g, t in zip(grads, [*(inputs[n] for n in LOGITS), w]))
    assert all(int(c) == 0 for c in out.counts.values())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cls", [-1, 7])
def test_an_invalid_class_under_a_true_mask_is_one_clear_error(backend, cls):
    inputs = batch(b=6, seed=14)
    inputs["expr_mask"][2] = True
    inputs["expr"][2] = cls
    with pytest.raises(ValueError, match=rf"expr: row 2 has class {cls} outside \[0, 7\) under a true expr_mask"):
        loss(inputs, backend)


def test_an_invalid_class_unchecked_is_nan_not_an_index_error():
    # What runs where the classes are not read on the host (a GPU, or a compiled step): NaN, never garbage.
    inputs = batch(b=6, seed=15)
    inputs["expr_mask"][2] = True
    inputs["expr"][2] = 9
    terms = reference_vector(inputs, (1.0,) * 8)
    assert torch.isnan(terms[0]) and torch.isnan(terms[1]) and torch.isfinite(terms[2:]).all()


# --------------------------------------------------------------------------------------------- precision
def test_the_reference_computes_in_float32_under_autocast():
    inputs = batch(b=16, seed=16, dtype=torch.float32)
    plain = reference_vector(inputs, (1.0,) * 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = reference_vector(inputs, (1.0,) * 8)
        out = loss(inputs, "torch")
    assert auto.dtype == torch.float32 and torch.equal(auto, plain)
    assert torch.equal(out.total, plain[0])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float64_inputs_give_float64_outputs(backend):
    out = loss(batch(b=5, seed=17), backend)
    assert out.total.dtype == F64 and all(t.dtype == F64 for t in out.terms.values())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_in_float64(backend):
    # A small label space keeps the interpreter's many evaluations short.
    inputs = batch(b=5, c=3, k=4, seed=18)
    labels = {n: inputs[n] for n in (*LABELS, "relatedness", "va_means")}
    w = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.25, 1.5, 1.0, 0.5], dtype=F64, requires_grad=True)

    def f(z_e, z_a, v, w):
        out = face_behavior_loss(z_e, z_a, v, **labels, weights=w, backend=backend, differentiable_terms=True)
        return out.total, out.terms["ca_ae"], out.terms["dm_ea"], out.terms["va"]

    assert torch.autograd.gradcheck(f, (*(inputs[n] for n in LOGITS), w), atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("backend", FUSED)
def test_second_order_gradients_through_the_fused_backends_raise(backend):
    inputs = batch(b=5, seed=19)
    out = loss(inputs, backend)
    (g,) = torch.autograd.grad(out.total, inputs["z_e"], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once.*backend='torch'"):
        g.square().sum().backward()
    w = torch.ones(8, dtype=F64, requires_grad=True)
    out = loss(inputs, backend, weights=w)
    (g,) = torch.autograd.grad(out.total, inputs["z_a"], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(g.norm(), w)


def test_the_torch_backend_is_differentiable_twice():
    inputs = batch(b=4, c=3, k=4, seed=20)
    labels = {n: inputs[n] for n in (*LABELS, "relatedness", "va_means")}
    w = torch.ones(8, dtype=F64, requires_grad=True)

    def f(z_e, z_a, w):
        return face_behavior_loss(z_e, z_a, inputs["v"], **labels, weights=w, backend="torch").total

    assert torch.autograd.gradgradcheck(f, (inputs["z_e"], inputs["z_a"], w))


# ---------------------------------------------------------------------------------- hot path of one call
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_values_are_the_term_vector_and_positional_fields_stay(backend):
    inputs = batch(b=6, seed=20)
    total, terms, counts, values = loss(inputs, backend)
    assert counts is None and values.shape == (1 + len(TERMS),) and not values.requires_grad
    assert torch.equal(values, torch.stack([total.detach(), *(terms[t] for t in TERMS)]))


def test_module_weights_are_a_float64_buffer_that_follows_the_module():
    inputs = batch(b=6, seed=21, dtype=torch.float32)
    module = FaceBehaviorLoss(inputs["relatedness"], inputs["va_means"], weights=LossWeights(ca=0.1), backend="cpu")
    assert module.term_weights.dtype == F64 and "term_weights" not in module.state_dict()
    assert module.term_weights.tolist() == list(LossWeights(ca=0.1).vector())  # exact, not float32-rounded
    module.half()
    assert module.term_weights.dtype == F64
    module.float()
    out = module(*(inputs[n] for n in LOGITS), *(inputs[n] for n in LABELS))
    want = face_behavior_loss(*(inputs[n] for n in LOGITS), **{n: inputs[n] for n in (*LABELS, "relatedness",
                                                                                       "va_means")},
                              weights=LossWeights(ca=0.1), backend="cpu")
    assert torch.equal(out.total, want.total)  # the same kernel on the same float64 weights
    module.weights = LossWeights(ca=0.0)  # new floats bypass the buffer, never a stale weight
    again = module(*(inputs[n] for n in LOGITS), *(inputs[n] for n in LABELS))
    assert again.terms["ca_ea"] > 0 and torch.allclose(again.total, out.total - 0.1 * (out.terms["ca_ea"] +
                                                                                          out.terms["ca_ae"]),
                                                       atol=1e-5, rtol=0)  # float32 terms: a few ulps


def test_functional_weight_cache_is_bounded_and_in_kernel_dtype():
    from fbn_fast import losses

    inputs = batch(b=4, seed=22, dtype=torch.float32)
    for i in range(losses._WEIGHT_CACHE_SIZE + 4):
        loss(inputs, "torch", weights=LossWeights(ca=float(i)))
    assert len(losses._WEIGHT_TENSORS) <= losses._WEIGHT_CACHE_SIZE
    assert all(t.dtype == F64 for t in losses._WEIGHT_TENSORS.values())


@pytest.mark.skipif("cpu" not in FUSED, reason="the native cpu backend is not built")
@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("dterms", [False, True])
def test_kernel_launches_per_forward_and_backward(monkeypatch, mode, dterms):
    from fbn_fast.losses import op

    launches = []
    impl = op._IMPLS["cpu"]
    monkeypatch.setitem(op._IMPLS, "cpu", lambda *a: launches.append(1) or impl(*a))
    inputs = batch(b=6, seed=23, dtype=torch.float32)
    module = FaceBehaviorLoss(inputs["relatedness"], inputs["va_means"], backend="cpu", differentiable_terms=dterms)

    def run(*args):
        return module(*args)

    fn = run if mode == "eager" else torch.compile(run, fullgraph=True, backend="aot_eager")
    out = fn(*(inputs[n] for n in LOGITS), *(inputs[n] for n in LABELS))
    assert len(launches) == 1
    out.total.backward(retain_graph=dterms)
    # Backward of the total: the stored gradients scaled, no relaunch; except compiled with differentiable
    # terms, where the compiled backward gets zero-filled (not absent) term gradients and cannot tell them
    # from used ones without a host sync, so it relaunches (mathematically the same gradient).
    assert len(launches) == (2 if dterms and mode == "compiled" else 1)
    if dterms:  # a term's gradient is the one relaunch
        before = len(launches)
        out.terms["au"].backward()
        assert len(launches) == before + 1


# ------------------------------------------------------------------------------------------- on a card
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_module_step_has_no_host_sync_on_the_card(backend):
    # docs/method.md: every term without a host synchronisation. The module's float64 weight buffer and its
    # tables live on the device, so a forward + backward of the module raises nothing under "error" mode.
    why = available_backends("cuda")[backend]
    assert why.startswith("available"), why
    inputs = {n: t.cuda() if torch.is_tensor(t) else t for n, t in batch(b=4096, dtype=torch.float32).items()}
    inputs.update({n: inputs[n].detach().requires_grad_() for n in LOGITS})
    module = FaceBehaviorLoss(inputs["relatedness"].cpu(), inputs["va_means"].cpu(), backend=backend).cuda()
    labels = {n: inputs[n] for n in LABELS}
    module(*(inputs[n] for n in LOGITS), **labels).total.backward()  # warm-up: compile, first allocations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = module(*(inputs[n] for n in LOGITS), **labels)
        out.total.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.total).item()
