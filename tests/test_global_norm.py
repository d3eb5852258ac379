"""Global normalisation under DDP (``process_group=``) on 2 gloo processes equals the single-process global batch.

The two ranks hold shards of different sizes with labels placed unevenly (rank 0: every expression label and
no VA; rank 1: no expression label and most VA labels), so that per-rank normalisation would be wrong by
tens of percent. Each rank trains a small linear head wrapped in DDP with learnable per-term weights; the
loss, its terms and counts, and the DDP-averaged gradients of every parameter must equal those of the same
head on the whole batch in one process, for the ``torch`` and ``cpu`` backends, with and without
differentiable terms.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torchrun import NO_GLOO, run_ranks

from fbn_fast import FaceBehaviorLoss
from fbn_fast import relatedness as R
from fbn_fast.losses import TERMS, available_backends

REPO = Path(__file__).resolve().parents[1]
B, FEATURES, SHARDS = 9, 6, (slice(0, 6), slice(6, 9))
# the native cpu backend only where it was built (tests/test_native_objective.py covers an install without it)
BACKENDS = [b for b in ("torch", "cpu") if available_backends("cpu")[b] == "available"]
CASES = [(backend, dtype, dterms) for backend in BACKENDS for dtype in ("float64", "float32")
         for dterms in (False, True)]

pytestmark = pytest.mark.skipif(NO_GLOO is not None, reason=str(NO_GLOO))


class Head(nn.Module):
    """Features -> (z_e, z_a, v) and the learnable per-term loss weights (averaged by DDP like any parameter)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(FEATURES, 7 + 17 + 2, dtype=dtype)
        self.weights = nn.Parameter(torch.linspace(0.5, 1.2, len(TERMS), dtype=dtype))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        z = self.linear(x)
        return z[:, :7], z[:, 7:24], torch.tanh(z[:, 24:]), self.weights


def batch(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    on_rank0 = torch.arange(B) < SHARDS[0].stop
    au_mask = torch.rand(B, 17, generator=g) < 0.4
    au_mask[1] = False  # a rank-0 sample with an expression and no AU: the co-annotation term ca_ea
    return {
        "x": torch.randn(B, FEATURES, generator=g, dtype=dtype),
        "expr": torch.randint(0, 7, (B,), generator=g), "expr_mask": on_rank0.clone(),
        "au": (torch.rand(B, 17, generator=g) < 0.5).to(dtype), "au_mask": au_mask,
        "va": (torch.rand(B, 2, generator=g, dtype=dtype) * 2 - 1), "va_mask": torch.arange(B) >= SHARDS[0].stop - 1,
    }


def loss_fn(backend: str, dterms: bool, group=None) -> FaceBehaviorLoss:
    prior = R.prior()
    mu = torch.linspace(-0.5, 0.5, 14).reshape(7, 2)
    return FaceBehaviorLoss(prior, va_means=mu, backend=backend, differentiable_terms=dterms, process_group=group,
                            counts=True)


def step(model: nn.Module, loss: FaceBehaviorLoss, data: dict, dterms: bool) -> dict:
    """One forward and backward; what the test compares."""
    z_e, z_a, v, w = model(data["x"])
    for t in (z_e, z_a, v):
        t.retain_grad()
    labels = {k: val for k, val in data.items() if k != "x"}
    out = loss(z_e, z_a, v, weights=w, **labels)
    res = {"total": out.total.detach(), "terms": torch.stack([out.terms[t].detach() for t in TERMS]),
           "counts": torch.stack([out.counts[t] for t in TERMS])}
    if dterms:  # per-term gradients from the same call (each a collective for "va": every rank calls alike)
        res["grad_expr_z_e"] = torch.autograd.grad(out.terms["expr"], z_e, retain_graph=True)[0]
        res["grad_va_v"] = torch.autograd.grad(out.terms["va"], v, retain_graph=True)[0]
    out.total.backward()
    params = getattr(model, "module", model).named_parameters()  # without the DDP wrapper's prefix
    res.update({f"grad_{n}": p.grad.detach().clone() for n, p in params})
    res.update({"grad_z_e": z_e.grad, "grad_z_a": z_a.grad, "grad_v": v.grad})
    return res


DRIVER = textwrap.dedent("""
    import sys, torch
    from torch.nn.parallel import DistributedDataParallel as DDP
    from fbn_fast import distributed as fdist
    sys.path.insert(0, sys.argv[1])
    from test_global_norm import CASES, SHARDS, Head, batch, loss_fn, step

    env = fdist.init_distributed("cpu")
    results = {}
    try:
        for backend, dtype, dterms in CASES:
            dt = getattr(torch, dtype)
            model = DDP(Head(dt))
            data = {k: v[SHARDS[env.rank]] for k, v in batch(dt).items()}
            loss = loss_fn(backend, dterms, torch.distributed.group.WORLD)
            results[(backend, dtype, dterms)] = step(model, loss, data, dterms)
        torch.save(results, f"{sys.argv[2]}/rank{env.rank}.pt")
    finally:
        fdist.cleanup()
    fdist.exit_process(0)
""")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("global_norm")
    (tmp / "driver.py").write_text(DRIVER)
    run_ranks(tmp / "driver.py", str(Path(__file__).parent), str(tmp), cwd=REPO)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _tolerance(dtype: str) -> dict:
    # Sums over shards then ranks, and the CCC from raw moments instead of centred sums: rounding only. In
    # float64 that is ~1e-15 of values of order 1; in float32 a few units of 1e-7.
    return {"rtol": 1e-10, "atol": 1e-12} if dtype == "float64" else {"rtol": 2e-5, "atol": 2e-6}


@pytest.mark.parametrize("backend, dtype, dterms", CASES)
def test_two_ranks_equal_the_global_batch(ranks, backend, dtype, dterms):
    dt = getattr(torch, dtype)
    model = Head(dt)
    single = step(model, loss_fn(backend, dterms), batch(dt), dterms)
    got = [r[(backend, dtype, dterms)] for r in ranks]
    tol = _tolerance(dtype)
    for rank, res in enumerate(got):
        # Values of the global batch on every rank.
        torch.testing.assert_close(res["total"], single["total"], **tol)
        torch.testing.assert_close(res["terms"], single["terms"], **tol)
        assert torch.equal(res["counts"], single["counts"])
        # DDP's mean of the ranks' gradients is the global-batch gradient, for the head and the weights.
        for name, _ in model.named_parameters():
            torch.testing.assert_close(res[f"grad_{name}"], single[f"grad_{name}"], **tol)
        # Each rank's gradient of its outputs is W times their rows of the global gradient.
        rows = SHARDS[rank]
        for key in ("grad_z_e", "grad_z_a", "grad_v") + (("grad_expr_z_e", "grad_va_v") if dterms else ()):
            torch.testing.assert_close(res[key] / 2, single[key][rows], **tol, msg=lambda m, k=key: f"{k}: {m}")


def test_per_rank_normalisation_would_differ(ranks):
    """The shards are uneven enough that the check above means something: a rank's own batch differs."""
    data = {k: v[SHARDS[0]] for k, v in batch(torch.float64).items()}
    own = step(Head(torch.float64), loss_fn("torch", False), data, False)
    glob = ranks[0][("torch", "float64", False)]
    assert not torch.allclose(own["terms"], glob["terms"], rtol=0.05)
    assert glob["counts"][TERMS.index("expr")] == SHARDS[0].stop  # every expression label sits on rank 0
