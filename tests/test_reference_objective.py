"""The reference objective (backend ``torch``) and its closed-form twin, against hand computations."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from objective_cases import (
    CASES,
    LABELS,
    LOGITS,
    TABLES,
    Case,
    Outputs,
    assert_matches,
    call,
    make_inputs,
    masks_off,
    reference,
    with_garbage,
)

from fbn_fast import FaceBehaviorLoss, LossWeights, available_backends, face_behavior_loss
from fbn_fast import relatedness as R
from fbn_fast.losses import TERMS, resolve_backend
from fbn_fast.losses.analytic import analytic_terms_and_grads
from fbn_fast.losses.op import objective
from fbn_fast.losses.reference import reference_terms

F64 = torch.float64


def terms_of(inputs: dict, **kw) -> dict[str, float]:
    """The reference's terms by name."""
    return dict(zip(("total", *TERMS), call("torch", inputs, **kw).terms.tolist()))


def test_gradcheck_float64():
    batch = make_inputs(5, 4, 6)
    z = [batch.pop(n).requires_grad_() for n in LOGITS]

    def fn(z_e, z_a, v):
        return face_behavior_loss(z_e, z_a, v, **batch, temperature=0.7, backend="torch").total

    assert torch.autograd.gradcheck(fn, z, eps=1e-6, atol=1e-6)


def test_tiny_case_by_hand():
    # B=1, C=2, K=1: p = [1/4, 3/4], s = 1/2, R = [[.5], [.5]] so q_a = 1/2 and ℓ(s) is equal for both classes.
    z_e = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    z_a = torch.zeros(1, 1, dtype=torch.float64)
    v = torch.tensor([[0.2, -0.1]], dtype=torch.float64)
    rel = torch.full((2, 1), 0.5, dtype=torch.float64)
    mu = torch.tensor([[0.4, 0.0], [0.0, 0.4]], dtype=torch.float64)
    out = face_behavior_loss(z_e, z_a, v, rel, expr=torch.tensor([1]), expr_mask=torch.tensor([True]),
                             au=torch.ones(1, 1), au_mask=torch.ones(1, 1, dtype=torch.bool), va_means=mu,
                             backend="torch")
    t = {k: float(x) for k, x in out.terms.items()}
    assert t["expr"] == pytest.approx(-math.log(0.75))
    assert t["au"] == pytest.approx(math.log(2.0))
    assert t["ca_ea"] == 0.0  # every AU is annotated
    assert t["ca_ae"] == 0.0  # the only AU-labelled sample has an expression label
    assert t["dm_ea"] == pytest.approx(0.0, abs=1e-15)
    assert t["dm_ae"] == pytest.approx(0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75))
    pmu = 0.25 * np.array([0.4, 0.0]) + 0.75 * np.array([0.0, 0.4])
    assert t["dm_ev"] == pytest.approx(0.5 * ((0.2 - pmu[0]) ** 2 + (-0.1 - pmu[1]) ** 2))
    assert t["va"] == 0.0  # fewer than two VA labels
    assert float(out.total) == pytest.approx(sum(t.values()))


def test_ccc_by_hand():
    v = np.array([[0.1, 0.3], [0.5, -0.2], [-0.4, 0.0]])
    y = np.array([[0.2, 0.1], [0.4, -0.5], [-0.1, 0.2]])

    def ccc(a, b):
        cov = ((a - a.mean()) * (b - b.mean())).mean()
        return 2 * cov / (a.var() + b.var() + (a.mean() - b.mean()) ** 2 + 1e-8)

    expected = np.mean([1 - ccc(v[:, d], y[:, d]) for d in range(2)])
    b = 4  # a fourth, unlabelled row with garbage labels must not count
    z_e, z_a = torch.zeros(b, 7, dtype=torch.float64), torch.zeros(b, 17, dtype=torch.float64)
    vv = torch.tensor(np.vstack([v, [[0.9, 0.9]]]))
    va = torch.tensor(np.vstack([y, [[np.nan, 5.0]]]))
    mask = torch.tensor([True, True, True, False])
    out = face_behavior_loss(z_e, z_a, vv, R.prior().tensor(dtype=torch.float64), va=va, va_mask=mask,
                             backend="torch")
    assert float(out.terms["va"]) == pytest.approx(expected, rel=1e-9)


def test_co_annotation_by_hand():
    # One sample with expression Happiness and no AU labels; one with AU labels only.
    rel = R.prior()
    k12 = rel.aus.index("AU12")
    z_e = torch.zeros(2, 7, dtype=torch.float64)
    z_a = torch.zeros(2, 17, dtype=torch.float64)
    au = torch.zeros(2, 17)
    au_mask = torch.zeros(2, 17, dtype=torch.bool)
    au[1, k12] = 1
    au_mask[1, k12] = True
    out = face_behavior_loss(z_e, z_a, torch.zeros(2, 2, dtype=torch.float64), rel.tensor(dtype=torch.float64),
                             expr=torch.tensor([4, 0]), expr_mask=torch.tensor([True, False]), au=au,
                             au_mask=au_mask, backend="torch")
    # s = 1/2 everywhere, so BCE against any target t is log 2 whatever t.
    assert float(out.terms["ca_ea"]) == pytest.approx(math.log(2))
    # AU12 active only: ℓ[c] = log Rs[c, AU12]; target softmax of it; p uniform -> soft CE = log 7.
    assert float(out.terms["ca_ae"]) == pytest.approx(math.log(7))
    rs = np.clip(rel.matrix[:, k12], 0.05, 0.95)
    t = rs / rs.sum()
    z_e2 = torch.zeros(2, 7, dtype=torch.float64)
    z_e2[1, 4] = 2.0
    out2 = face_behavior_loss(z_e2, z_a, torch.zeros(2, 2, dtype=torch.float64), rel.tensor(dtype=torch.float64),
                              expr=torch.tensor([4, 0]), expr_mask=torch.tensor([True, False]), au=au,
                              au_mask=au_mask, backend="torch")
    logp = torch.log_softmax(z_e2[1], 0).numpy()
    assert float(out2.terms["ca_ae"]) == pytest.approx(-(t * logp).sum())


def test_matching_terms_zero_exactly_when_distributions_agree():
    batch = make_inputs(8, 5, 9, seed=3)
    rs = batch["relatedness"].double().clamp(0.05, 0.95)
    p = torch.softmax(batch["z_e"], 1)
    # s = p·Rs  ->  dm_ea = 0
    batch["z_a"] = torch.logit(p @ rs)
    assert terms_of(batch)["dm_ea"] == pytest.approx(0.0, abs=1e-12)
    # p = softmax(ℓ(s)) -> dm_ae = 0
    s = torch.sigmoid(batch["z_a"])
    ell = s @ (rs.log() - torch.log1p(-rs)).T + torch.log1p(-rs).sum(1)
    batch["z_e"] = ell
    t = terms_of(batch)
    assert t["dm_ae"] == pytest.approx(0.0, abs=1e-12)
    assert t["dm_ea"] > 1e-4  # p moved, so the other matching term no longer vanishes
    # v = p·μ -> dm_ev = 0
    batch["v"] = torch.softmax(batch["z_e"], 1) @ batch["va_means"].double()
    assert terms_of(batch)["dm_ev"] == pytest.approx(0.0, abs=1e-15)
    batch["v"] = batch["v"] + 0.1
    assert terms_of(batch)["dm_ev"] == pytest.approx(0.5 * 2 * 0.01)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), b=st.integers(1, 9), c=st.integers(2, 8), k=st.integers(1, 12))
def test_masked_labels_change_nothing(seed, b, c, k):
    batch = make_inputs(b, c, k, seed=seed)
    base = terms_of(batch)
    for i, fill in enumerate((float("nan"), 7.0, None)):
        assert terms_of(with_garbage(batch, seed=seed + 1 + i, fill=fill)) == base, fill


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), b=st.integers(1, 9))
def test_batch_permutation_changes_nothing(seed, b):
    batch = make_inputs(b, seed=seed)
    perm = torch.randperm(b, generator=torch.Generator().manual_seed(seed))
    permuted = {k: (v if k in TABLES else v[perm]) for k, v in batch.items()}
    t1, t2 = terms_of(batch), terms_of(permuted)
    for name in TERMS:  # sums in another order: float64 rounding
        assert t2[name] == pytest.approx(t1[name], rel=1e-10, abs=1e-12), name


@pytest.mark.parametrize("weight", ["expr", "au", "va", "ca", "dm", "ev"])
def test_zero_weight_removes_term_and_its_gradient(weight):
    batch = make_inputs(7, seed=11)
    owned = {"expr": ["expr"], "au": ["au"], "va": ["va"], "ca": ["ca_ea", "ca_ae"], "dm": ["dm_ea", "dm_ae"],
             "ev": ["dm_ev"]}[weight]
    z = [batch.pop(n).requires_grad_() for n in LOGITS]
    full = face_behavior_loss(*z, **batch, backend="torch")
    off = face_behavior_loss(*z, **batch, weights={weight: 0.0}, backend="torch")
    removed = sum(float(full.terms[t]) for t in owned)
    assert float(full.total.detach() - off.total.detach()) == pytest.approx(removed, rel=1e-12)
    # The gradient of the weighted-off loss equals the gradient of the other terms alone.
    g_off = torch.autograd.grad(off.total, z, allow_unused=True)
    rest = reference_terms(*z, *(batch[n] for n in (*LABELS, *TABLES)))
    others = sum(rest[1 + TERMS.index(t)] for t in TERMS if t not in owned)
    g_rest = torch.autograd.grad(others, z, allow_unused=True)
    for a, b in zip(g_off, g_rest):
        torch.testing.assert_close(a, b)


def test_empty_terms_are_zero_not_nan():
    out = reference(CASES["all masked"])  # every label garbage under a false mask
    for name in ("expr", "au", "va", "ca_ea", "ca_ae"):
        assert float(out.terms[1 + TERMS.index(name)]) == 0.0
    assert all(torch.isfinite(g).all() for g in out[1:])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_float32(dtype):
    # Accuracy against float64 is the kit's (tests/test_objective_backends.py); here the dtypes of the results.
    out = call("torch", CASES["face 7x17"].at(dtype))
    assert out.terms.dtype == torch.float32 and all(g.dtype == dtype for g in out[1:])


@pytest.mark.parametrize("case", range(6))
def test_closed_form_gradients_match_autograd(case):
    b, c, k = [(1, 7, 17), (5, 7, 17), (33, 3, 5), (8, 12, 40), (4, 2, 1), (9, 64, 64)][case]
    inputs = make_inputs(b, c, k, seed=case, scale=[2, 2, 2, 2, 2, 40][case])
    if case == 2:
        inputs = masks_off(inputs, seed=case)
    w = (1.0, 0.5, 2.0, 1.3, 0.7, 1.1)
    probe = Case(inputs, weights=w, temperature=1.7)
    total, terms, *grads = analytic_terms_and_grads(*probe.args(F64), w, 1.7, probe.eps)
    assert torch.equal(total, terms[0]) and total.data_ptr() != terms.data_ptr()
    assert_matches(Outputs(terms, *grads), probe, F64)


def test_fused_op_torch_impl_backward_scales_stored_gradient():
    case = CASES["face 7x17"]
    args = case.args(F64)
    z, rest = [t.requires_grad_() for t in args[:3]], args[3:]
    total, terms, *_ = objective(*z, *rest, [1.0] * 6, 1.0, case.eps, "torch")
    assert torch.equal(total, terms[0])
    (3.0 * total).backward()
    assert_matches(Outputs(terms[:1], *(t.grad / 3.0 for t in z)), case, F64)


def test_fused_op_compiles_fullgraph_on_cpu():
    case = CASES["T=0.6"]
    inputs = case.at(torch.float32)
    rest = [inputs[n] for n in (*LABELS, *TABLES)]

    def step(z_e, z_a, v):
        return objective(z_e, z_a, v, *rest, list(case.weights), case.temperature, case.eps, "torch")[0]

    z = [inputs[n].requires_grad_() for n in LOGITS]
    out = torch.compile(step, fullgraph=True, backend="aot_eager")(*z)
    out.backward()
    assert_matches(Outputs(out[None], *(t.grad for t in z)), case, torch.float32)


def test_module_matches_functional_and_reports_backends():
    rel = R.prior()
    batch = CASES["face 7x17"].at(torch.float32)
    batch.pop("relatedness")
    batch.pop("va_means")
    pos = batch.pop("au_pos_weight")
    loss = FaceBehaviorLoss(rel, weights=LossWeights(dm=0.5), temperature=2.0, backend="torch", au_pos_weight=pos)
    a = loss(**batch)
    b = face_behavior_loss(**batch, relatedness=rel.tensor(), weights={"dm": 0.5}, temperature=2.0, backend="torch",
                           au_pos_weight=pos)
    torch.testing.assert_close(a.total, b.total, rtol=0, atol=0)  # the same computation
    plain = face_behavior_loss(**batch, relatedness=rel.tensor(), weights={"dm": 0.5}, temperature=2.0)
    assert not torch.equal(plain.terms["au"], a.terms["au"])  # the module applied its positive weights
    report = available_backends("cpu")
    assert report["torch"] == "available" and set(report) == {"torch", "triton", "cpu", "cuda"}
    assert resolve_backend("auto", "cpu") in {"cpu", "torch"}
    with pytest.raises(ValueError, match="backend must be one of"):
        FaceBehaviorLoss(rel, backend="tpu")
    with pytest.raises(ValueError, match="unknown loss weight"):
        FaceBehaviorLoss(rel, weights={"lambda_dm": 1.0})
    with pytest.raises(ValueError, match="rows are"):
        FaceBehaviorLoss(rel, classes=tuple(reversed(rel.classes)))
    if report["cuda"] != "available":
        with pytest.raises(ValueError, match="not available on cpu"):
            resolve_backend("cuda", "cpu")


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_public_api_compiles_fullgraph(backend):
    case = replace(CASES["face 7x17"], weights=(1.0,) * 6)
    batch = case.at(torch.float32)
    z = [batch.pop(n).requires_grad_() for n in LOGITS]
    compiled = torch.compile(lambda *zz: face_behavior_loss(*zz, **batch, backend=backend).total,
                             fullgraph=True, backend="aot_eager")
    out = compiled(*z)
    out.backward()
    assert_matches(Outputs(out.detach()[None], *(t.grad for t in z)), case, torch.float32)
