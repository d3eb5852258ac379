"""Zero- and few-shot compound expressions (docs/method.md §4) against independent numpy computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fbn_fast.compound import (
    FewShotCompoundHead,
    fit_few_shot,
    parent_matrix,
    zero_shot_logits,
    zero_shot_posteriors,
    zero_shot_weights,
)
from fbn_fast.labels import COMPOUND_PARENTS, COMPOUNDS, EXPRESSIONS
from fbn_fast.relatedness import Relatedness, compound_prior


def np_zero_shot(s, table, temperature=1.0, eps=0.05, log_p=None, beta=0.0, parents=None):
    """softmax_j( Σ_k [s_k log Rs[j,k] + (1 − s_k) log(1 − Rs[j,k])] / T + β Σ_{c ∈ parents(j)} log p_c ), by loops."""
    rs = np.clip(table, eps, 1 - eps)
    n, (j_count, k_count) = s.shape[0], rs.shape
    scores = np.zeros((n, j_count))
    for b in range(n):
        for j in range(j_count):
            ll = sum(s[b, k] * np.log(rs[j, k]) + (1 - s[b, k]) * np.log(1 - rs[j, k]) for k in range(k_count))
            scores[b, j] = ll / temperature
            if beta:
                scores[b, j] += beta * sum(log_p[b, EXPRESSIONS.index(c)] for c in parents[j])
    scores -= scores.max(1, keepdims=True)
    e = np.exp(scores)
    return e / e.sum(1, keepdims=True)


def test_parent_matrix_matches_compound_parents():
    p = parent_matrix()
    assert p.shape == (len(COMPOUNDS), len(EXPRESSIONS))
    np.testing.assert_array_equal(p.sum(1), 2.0)
    for j, (a, b) in enumerate(COMPOUND_PARENTS):
        assert p[j, EXPRESSIONS.index(a)] == 1 and p[j, EXPRESSIONS.index(b)] == 1
    # Looked up by name: a reordered subset gets the right rows.
    sub = parent_matrix(["Awed", "Happily surprised"])
    np.testing.assert_array_equal(sub, p[[14, 0]])
    with pytest.raises(ValueError, match="no known parents"):
        parent_matrix(["Bored"])


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_zero_shot_equals_numpy(temperature):
    rng = np.random.default_rng(0)
    s = rng.random((6, 17))
    table = compound_prior().matrix
    got = zero_shot_posteriors(torch.from_numpy(s), temperature=temperature)
    np.testing.assert_allclose(got.numpy(), np_zero_shot(s, table, temperature), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(got.sum(1).numpy(), 1.0, rtol=1e-12)


def test_zero_shot_with_beta_equals_numpy():
    rng = np.random.default_rng(1)
    s = rng.random((5, 17))
    z = rng.normal(size=(5, 7))
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    table = compound_prior().matrix
    got = zero_shot_posteriors(torch.from_numpy(s), expr_log_probs=torch.from_numpy(log_p), beta=0.7, temperature=1.5)
    want = np_zero_shot(s, table, 1.5, log_p=log_p, beta=0.7, parents=COMPOUND_PARENTS)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-14)
    # β changes the answer (so the term is really applied).
    plain = zero_shot_posteriors(torch.from_numpy(s), temperature=1.5)
    assert not torch.allclose(got, plain)


def test_rafdb_subset_table_looks_parents_up_by_name():
    full = compound_prior()
    rafdb = Relatedness(full.matrix[:11], full.classes[:11], full.aus, source="compound-prior")
    rng = np.random.default_rng(2)
    s, z = rng.random((4, 17)), rng.normal(size=(4, 7))
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    got = zero_shot_posteriors(torch.from_numpy(s), relatedness=rafdb, expr_log_probs=torch.from_numpy(log_p), beta=1)
    want = np_zero_shot(s, full.matrix[:11], log_p=log_p, beta=1.0, parents=COMPOUND_PARENTS[:11])
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-14)


def test_perfect_weight_one_au_vector_ranks_its_compound_high():
    table = compound_prior().matrix
    s = torch.from_numpy((table == 1.0).astype(np.float64))  # row j: exactly the weight-1 AUs of compound j
    post = zero_shot_posteriors(s)
    rank = (post > post.diag()[:, None]).sum(1)  # 0 = the compound comes first
    # Compounds whose weight-1 set is contained in another's (e.g. {4, 10}: Sadly disgusted, Appalled, Hatred)
    # may tie-break to a sibling, but every compound is among the top three and most come first.
    assert int(rank.max()) <= 2
    assert int((rank == 0).sum()) >= 11
    assert post.diag()[0] > 0.99  # Happily surprised: AUs 1, 2, 12, 25 leave little doubt


def test_generic_sizes_plain_tensor_table():
    g = torch.Generator().manual_seed(3)
    table = torch.rand(4, 9, generator=g)
    s = torch.rand(5, 9, generator=g, dtype=torch.float64)
    got = zero_shot_posteriors(s, relatedness=table.double(), temperature=0.5)
    np.testing.assert_allclose(got.numpy(), np_zero_shot(s.numpy(), table.double().numpy(), 0.5), rtol=1e-10)
    # With β a plain tensor needs an explicit parent matrix (4 compounds × 3 expressions).
    log_p = torch.log_softmax(torch.randn(5, 3, generator=g, dtype=torch.float64), 1)
    with pytest.raises(ValueError, match="pass parents"):
        zero_shot_logits(s, relatedness=table, expr_log_probs=log_p, beta=1.0)
    par = torch.tensor([[1.0, 1, 0], [0, 1, 1], [1, 0, 1], [2, 0, 0]], dtype=torch.float64)
    got_b = zero_shot_logits(s, relatedness=table.double(), expr_log_probs=log_p, beta=0.3, parents=par)
    base = zero_shot_logits(s, relatedness=table.double())
    torch.testing.assert_close(got_b, base + 0.3 * log_p @ par.T, rtol=0, atol=1e-12)


def test_zero_shot_weights_are_the_linear_form():
    w, b = zero_shot_weights(temperature=2.0, dtype=torch.float64)
    rs = np.clip(compound_prior().matrix, 0.05, 0.95)
    np.testing.assert_allclose(w.numpy(), (np.log(rs) - np.log1p(-rs)) / 2.0, rtol=1e-14)
    np.testing.assert_allclose(b.numpy(), np.log1p(-rs).sum(1) / 2.0, rtol=1e-14)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_few_shot_head_at_init_equals_zero_shot(temperature):
    g = torch.Generator().manual_seed(4)
    s = torch.rand(32, 17, generator=g, dtype=torch.float64)
    head = FewShotCompoundHead(temperature=temperature, dtype=torch.float64)
    torch.testing.assert_close(head(s), zero_shot_logits(s, temperature=temperature), rtol=0, atol=1e-12)
    # float32 (the default parameters) too: the head's BLAS matmul and the zero-shot sum add the 17 AU terms in
    # different orders, which costs a few float32 ulps of logits up to ~50 in size (rtol 1e-5 ≈ 80 ulps).
    head32 = FewShotCompoundHead(temperature=temperature)
    torch.testing.assert_close(head32(s.float()), zero_shot_logits(s.float(), temperature=temperature),
                               rtol=1e-5, atol=1e-5)


def test_few_shot_head_with_expressions_at_init_equals_zero_shot_with_beta():
    g = torch.Generator().manual_seed(5)
    s = torch.rand(16, 17, generator=g, dtype=torch.float64)
    log_p = torch.log_softmax(torch.randn(16, 7, generator=g, dtype=torch.float64), 1)
    head = FewShotCompoundHead(use_expressions=True, beta=0.4, temperature=1.3, dtype=torch.float64)
    want = zero_shot_logits(s, temperature=1.3, expr_log_probs=log_p, beta=0.4)
    torch.testing.assert_close(head(s, log_p), want, rtol=0, atol=1e-12)
    # β = 0 with expressions: the expression columns start at zero and the head equals the AU-only zero-shot.
    head0 = FewShotCompoundHead(use_expressions=True, dtype=torch.float64)
    torch.testing.assert_close(head0(s, log_p), zero_shot_logits(s), rtol=0, atol=1e-12)
    assert torch.count_nonzero(head.linear.weight[:, 17:]) == 30  # two parents per compound


def _synthetic_problem(seed, n_per_class):
    """AU vectors drawn around prototypes that the zero-shot table does NOT match (rows shuffled)."""
    g = torch.Generator().manual_seed(seed)
    table = compound_prior().matrix
    perm = [3, 7, 0, 11, 5, 14, 1, 9, 12, 2, 6, 4, 13, 10, 8]  # class j looks like compound perm[j]
    protos = torch.from_numpy(np.clip(table[perm], 0.05, 0.95)).float()
    labels = torch.arange(len(perm)).repeat_interleave(n_per_class)
    s = (protos[labels] + 0.08 * torch.randn(len(labels), 17, generator=g)).clamp(0, 1)
    return s, labels


def test_fit_few_shot_improves_accuracy():
    train_s, train_y = _synthetic_problem(0, 5)  # 5-shot
    test_s, test_y = _synthetic_problem(1, 40)
    head = FewShotCompoundHead()
    before = (head(test_s).argmax(1) == test_y).float().mean().item()
    losses = fit_few_shot(head, train_s, train_y, steps=150, lr=0.05)
    after = (head(test_s).argmax(1) == test_y).float().mean().item()
    assert len(losses) == 150 and losses[-1] < losses[0]
    assert before < 0.3 and after > 0.9


def test_fit_few_shot_with_expression_features():
    train_s, train_y = _synthetic_problem(2, 5)
    log_p = torch.log_softmax(torch.randn(len(train_y), 7, generator=torch.Generator().manual_seed(0)), 1)
    head = FewShotCompoundHead(use_expressions=True, beta=0.5)
    losses = fit_few_shot(head, (train_s, log_p), train_y, steps=50, lr=0.05)
    assert losses[-1] < losses[0]


def test_bad_input():
    head = FewShotCompoundHead()
    with pytest.raises(ValueError, match=r"au_probs: shape \(2, 5\), expected \(B, 17\)"):
        head(torch.rand(2, 5))
    with pytest.raises(ValueError, match="labels: row 1 has value 15, outside"):
        fit_few_shot(head, torch.rand(2, 17), torch.tensor([0, 15]))
    with pytest.raises(ValueError, match="beta != 0 needs expr_log_probs"):
        zero_shot_logits(torch.rand(2, 17), beta=1.0)
    with pytest.raises(ValueError, match="beta != 0 needs use_expressions"):
        FewShotCompoundHead(beta=1.0)
    with pytest.raises(ValueError, match="pass expr_log_probs"):
        FewShotCompoundHead(use_expressions=True)(torch.rand(2, 17))
    with pytest.raises(ValueError, match="has 5 AUs but the compound table has 17"):
        zero_shot_logits(torch.rand(2, 5))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        zero_shot_logits(torch.rand(2, 17), temperature=0.0)
    with pytest.raises(ValueError, match="compound relatedness"):
        zero_shot_logits(torch.rand(2, 3), relatedness=torch.tensor([[0.5, 1.5, 0.1]]))
