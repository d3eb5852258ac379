"""Every backend of the objective against the float64 oracle on the whole kit of tests/objective_cases.py.

Each backend runs on each device type it serves (Triton on CPU tensors through its interpreter); one that
cannot run on this machine is skipped with the reason :func:`fbn_fast.losses.available_backends` gives.
Tests on CUDA tensors are marked ``gpu`` (profiling/gpu_check.sh runs them).
"""

from dataclasses import replace

import pytest
import torch
from objective_cases import (
    CASES,
    INPUT_DTYPES,
    SERVES,
    Case,
    assert_matches,
    backend_targets,
    call_weighted,
    make_inputs,
    reference,
    run,
    with_garbage,
)

from fbn_fast.losses import BACKENDS, TERMS


def _targets() -> list:
    params = []
    for backend, device, why in backend_targets():
        marks = [pytest.mark.skipif(why is not None, reason=f"{backend} on {device}: {why}")]
        if device == "cuda":
            marks.append(pytest.mark.gpu)
        params.append(pytest.param(backend, device, marks=marks, id=f"{backend}-{device}"))
    return params


TARGETS = _targets()
DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in INPUT_DTYPES]


def test_every_backend_has_a_home():
    assert set(SERVES) == set(BACKENDS)


@pytest.mark.parametrize("name", list(CASES))
def test_the_oracle_is_finite(name):
    for t in reference(CASES[name]):
        assert torch.isfinite(t).all(), name


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_terms_and_gradients_match_the_oracle(name, dtype, backend, device):
    case = CASES[name]
    got = run(backend, case, dtype, device)
    assert got.terms.device.type == device and got.terms.shape == (9,)
    assert [g.dtype for g in got[1:]] == [dtype] * 3  # gradients come back in the logits' dtype
    assert_matches(got, case, dtype, what=f"{backend}/{device} {name}")


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_unannotated_labels_change_nothing(dtype, backend, device):
    # The same backend on the same batch is deterministic, so other garbage must give the very same bits.
    case = CASES["face 7x17"]
    base = run(backend, case, dtype, device)
    for i, fill in enumerate((float("nan"), float("inf"), -float("inf"), None)):
        other = replace(case, inputs=with_garbage(case.inputs, seed=100 + i, fill=fill))
        for (name, a), b in zip(base.named(), run(backend, other, dtype, device)):
            assert torch.equal(a, b), f"{name} changed with garbage {fill}"


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_an_empty_batch_gives_zeros(dtype, backend, device):
    got = run(backend, Case(make_inputs(0, seed=1)), dtype, device)
    assert torch.equal(got.terms.cpu(), torch.zeros(9, dtype=got.terms.dtype))
    assert [tuple(g.shape) for g in got[1:]] == [(0, 7), (0, 17), (0, 2)]


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_weight_and_term_gradients_match_the_oracle(dtype, backend, device):
    # Weights as a tensor that requires grad (d total / d w_i = L_i) and every term differentiable: one call,
    # one backward, against the float64 autograd of the reference on the same logits.
    case = CASES["T=0.6"]
    w = torch.linspace(0.25, 2.0, len(TERMS), dtype=torch.float64)
    coef = torch.linspace(-1.0, 1.5, len(TERMS), dtype=torch.float64)
    got = call_weighted(backend, case.at(dtype, device), w, coef, case.temperature, case.eps)
    oracle = case.at(dtype, "cpu")
    for n in ("z_e", "z_a", "v"):
        oracle[n] = oracle[n].double()
    want = call_weighted("torch", oracle, w, coef, case.temperature, case.eps)
    # Relative to each gradient's largest entry: float64 sums in another order, or float32 computation.
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for name, g, r in zip(("z_e", "z_a", "v", "weights"), got, want):
        err = float((g.detach().cpu().double() - r).abs().max())
        assert err <= tol * max(1.0, float(r.abs().max())), f"{backend}/{device} {name}: error {err:.3g}"

