"""The remedies around the objective (fbn_fast.coupling): background rates, scarcity scaling, table refresh,
balanced AU positive weights, and their wiring into the trainer (options, weights, checkpoints, exact resume)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_train import _argv, synth  # noqa: F401 (the tiny SynthFace fixture and its options)

from fbn_fast import coupling, relatedness
from fbn_fast import distributed as fdist
from fbn_fast.checkpoint import latest_checkpoint, load_checkpoint
from fbn_fast.config import parse_args
from fbn_fast.labels import AUS, EXPRESSIONS, MISSING
from fbn_fast.losses import LossWeights
from fbn_fast.train import Trainer, main

C, K = len(EXPRESSIONS), len(AUS)


def _noisy_or_sample(n: int, b: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Expressions uniform over the 7, AUs from the prior table OR'ed with background rates ``b``."""
    rng = np.random.default_rng(seed)
    expr = rng.integers(0, C, n)
    p = 1.0 - (1.0 - relatedness.prior().matrix[expr]) * (1.0 - b[None, :])
    return expr, (rng.random((n, K)) < p).astype(np.float32)


def test_background_rates_recover_the_generating_rates_from_co_annotated_and_from_au_only_labels():
    b = np.linspace(0.02, 0.2, K)
    expr, au = _noisy_or_sample(60_000, b)
    mask = np.ones_like(au, bool)
    mask[:, AUS.index("AU26")] = False
    mask[:10, AUS.index("AU26")] = True  # too few to estimate
    rates, how = coupling.background_rates(expr, au, mask, relatedness.prior())
    keep = [k for k in range(K) if AUS[k] != "AU26"]
    np.testing.assert_allclose(rates[keep], b[keep], atol=0.01)
    assert set(np.array(how)[keep]) == {"co-annotated"}
    assert rates[AUS.index("AU26")] == 0.0 and how[AUS.index("AU26")] == "none"

    # No expression label on the AU-labelled faces: the marginal rate is inverted through the prior (the faces
    # show the expressions uniformly, as the estimate assumes without expression labels).
    rates, how = coupling.background_rates(np.full(len(expr), MISSING), au, np.ones_like(au, bool),
                                           relatedness.prior())
    assert set(how) == {"marginal"}
    np.testing.assert_allclose(rates, b, atol=0.015)


def test_with_background_is_the_noisy_or_table():
    prior = relatedness.prior()
    rates = np.full(K, 0.1)
    rates[0] = 0.0
    table = coupling.with_background(prior, rates)
    np.testing.assert_allclose(table.matrix, 1 - (1 - prior.matrix) * (1 - rates), rtol=0, atol=1e-15)
    assert np.all(table.matrix[EXPRESSIONS.index("Neutral"), 1:] == pytest.approx(0.1))
    assert table.meta["background"]["AU2"] == pytest.approx(0.1) and table.source == "prior+background"
    with pytest.raises(ValueError, match="background rates"):
        coupling.with_background(prior, np.full(K, 1.0))


def test_scarcity_scales_and_scaled_weights_by_hand():
    scales = coupling.scarcity_scales(np.array([0, 1000]), np.array([3000, 1000, 0]), au=1000.0, expr=1000.0)
    assert scales["expression"] == pytest.approx((1.0 + 0.5) / 2)
    assert scales["au"] == pytest.approx((0.25 + 0.5 + 1.0) / 3)
    w = coupling.scaled_weights({"ca": 0.5, "dm": 1.0, "ev": 1.0, "ca_ea": None, "ca_ae": None, "dm_ea": 2.0,
                                 "dm_ae": None}, {"au": 0.25, "expression": 0.75})
    assert w["ca_ea"] == pytest.approx(0.125) and w["dm_ea"] == pytest.approx(0.5)
    assert w["ca_ae"] == pytest.approx(0.375) and w["dm_ae"] == pytest.approx(0.75)
    assert LossWeights(**w).vector() == pytest.approx((1, 1, 1, 0.125, 0.375, 0.5, 0.75, 1))
    assert coupling.scarcity_scales(np.array([5]), np.array([0]), au=10.0, expr=0.0) == {"expression": 1.0,
                                                                                         "au": 1.0}
    with pytest.raises(ValueError, match="half-point expr"):
        coupling.scarcity_scales(np.zeros(1), np.zeros(1), au=1.0, expr=-1.0)


def test_balanced_pos_weight_counts_only_annotated_labels():
    au = np.array([[1, 0, 1, 1, 1], [0, 0, 1, 0, 1], [0, 1, 1, 9, 1], [0, 0, 1, 9, 0], [9, 0, 1, 9, 9]], np.float32)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 1], [1, 1, 1, 0, 1], [0, 1, 1, 0, 0]], bool)
    w = coupling.balanced_pos_weight(au, mask)
    # AU 0: 1 positive, 3 negatives (row 4 unannotated, its 9 unread); AU 1: 1 of 5; AU 2: no negative (nothing
    # to balance); AU 3: 1 of 2 (balanced already); AU 4: 3 of 4, a common AU's positives count less
    np.testing.assert_allclose(w, [3.0, 4.0, 1.0, 1.0, 1 / 3])
    rare = np.zeros((51, 1), np.float32)
    rare[0] = 1
    assert coupling.balanced_pos_weight(rare, np.ones_like(rare, bool))[0] == 50.0
    rarer = np.zeros((10_000, 1), np.float32)  # 9,999 negatives per positive: clipped
    rarer[0] = 1
    assert coupling.balanced_pos_weight(rarer, np.ones_like(rarer, bool))[0] == coupling.POS_WEIGHT_RANGE[1]
    with pytest.raises(ValueError, match="shapes"):
        coupling.balanced_pos_weight(au, mask[:, :3])


def test_refresh_blends_labels_and_confident_predictions_with_the_start_table():
    start = torch.full((C, K), 0.3, dtype=torch.float64)
    table = start.clone()
    refresh = coupling.RelatednessRefresh(table, every=2, confidence=0.9, strength=4.0)
    z_e = torch.zeros(4, C, dtype=torch.float64)
    z_e[1, 2] = 20.0   # confident class 2, unlabelled
    z_e[3, 5] = 0.5    # not confident, unlabelled: ignored
    z_a = torch.full((4, K), 2.0, dtype=torch.float64)
    z_a[2] = float("nan")  # a non-finite row counts for nothing, even labelled
    expr = torch.tensor([1, 0, 4, 0])
    expr_mask = torch.tensor([True, False, True, False])
    au = torch.zeros(4, K, dtype=torch.float64)
    au[0, :3] = 1.0
    au_mask = torch.zeros(4, K, dtype=torch.bool)
    au_mask[0, :5] = True
    refresh.observe(z_e, z_a, expr, expr_mask, au, au_mask)
    assert torch.equal(table, start)  # no update before `every` steps
    refresh.observe(z_e, z_a, expr, expr_mask, au, au_mask)
    sig = torch.sigmoid(torch.tensor(2.0, dtype=torch.float64))
    row1 = torch.cat([torch.ones(3, dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
                      sig.expand(K - 5)])
    want = start.clone()
    want[1] = (2 * row1 + 4 * 0.3) / (2 + 4)  # two batches, one labelled sample each
    want[2] = (2 * sig + 4 * 0.3) / (2 + 4)
    torch.testing.assert_close(table, want, rtol=0, atol=1e-12)
    state = refresh.state_dict()
    other = coupling.RelatednessRefresh(start.clone(), every=2, strength=4.0)
    other.load_state_dict(state)
    torch.testing.assert_close(other.table, table, rtol=0, atol=0)
    with pytest.raises(ValueError, match="every"):
        coupling.RelatednessRefresh(table, every=0)


# ------------------------------------------------------------------------------------------------- the trainer
def test_per_direction_weights_reach_the_objective(synth, tmp_path):  # noqa: F811 (the fixture)
    cfg = parse_args(_argv(synth, tmp_path, "dir", lambda_ca=0.0, lambda_dm=0.0, lambda_dm_ea=0.7,
                           coupling_scarcity_au=0.0, coupling_scarcity_expr=0.0))
    trainer = Trainer(cfg, fdist.init_distributed("cpu"))
    try:
        trainer.setup()
        assert trainer.loss_fn.weights.vector() == pytest.approx((1, 1, 1, 0, 0, 0.7, 0, 1))
    finally:
        trainer.close()


def test_balanced_au_positive_weights_reach_the_objective_and_the_run_record(synth, tmp_path):  # noqa: F811
    assert main(_argv(synth, tmp_path, "pw", au_pos_weight="balanced")) == 0
    cfg = parse_args(_argv(synth, tmp_path, "pw2", au_pos_weight="balanced"))
    trainer = Trainer(cfg, fdist.init_distributed("cpu"))
    try:
        trainer.setup()
        got = trainer.loss_fn.au_pos_weight
        m = trainer.manifest
    finally:
        trainer.close()
    rows = m.split_rows("train")
    want = coupling.balanced_pos_weight(m.au[rows], m.au_mask[rows])
    assert got is not None and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    assert not np.allclose(want, 1.0)  # the tiny corpus has unbalanced AUs: something to weight
    recorded = json.loads((tmp_path / "pw" / "run.json").read_text())["au_pos_weight"]
    assert list(recorded) == list(AUS) and list(recorded.values()) == pytest.approx(want.tolist(), rel=1e-6)
    assert main(_argv(synth, tmp_path, "plain", au_pos_weight="off")) == 0
    assert json.loads((tmp_path / "plain" / "run.json").read_text())["au_pos_weight"] is None


def test_remedies_in_a_run_and_an_exact_resume(synth, tmp_path):  # noqa: F811 (the fixture)
    opts = {"relatedness_background": "data", "coupling_scarcity_au": 500.0, "coupling_scarcity_expr": 200.0,
            "relatedness_refresh": 4}
    assert main(_argv(synth, tmp_path, "straight", **opts)) == 0
    run = tmp_path / "straight"
    table = json.loads((run / "relatedness.json").read_text())
    assert table["source"] == "prior+background" and len(table["meta"]["background"]) == K
    # the table of the run is the noisy-OR of the prior with those rates
    rates = np.array([table["meta"]["background"][a] for a in AUS])
    np.testing.assert_allclose(table["matrix"], 1 - (1 - relatedness.prior().matrix) * (1 - rates), atol=1e-12)
    ckpt = load_checkpoint(latest_checkpoint(run))
    assert len(ckpt["refresh"]) == 1 and ckpt["refresh"][0]["steps"] == 12
    refreshed = ckpt["refresh"][0]["table"].double().numpy()
    assert np.abs(refreshed - np.asarray(table["matrix"])).max() > 1e-4  # it moved away from the start table

    cfg = parse_args(_argv(synth, tmp_path, "weights", **opts))
    trainer = Trainer(cfg, fdist.init_distributed("cpu"))
    try:
        trainer.setup()
        w = trainer.loss_fn.weights.vector()
        m = trainer.manifest
    finally:
        trainer.close()
    assert 0 < w[3] < 0.5 and 0 < w[5] < 1.0 and 0 < w[4] < 0.5 and 0 < w[6] < 1.0  # scaled down, not off
    rows = m.split_rows("train")
    counts = coupling.label_counts(m.expr[rows], m.expr_mask[rows], m.au_mask[rows], C)
    scales = coupling.scarcity_scales(*counts, au=500.0, expr=200.0)
    assert w[3] == pytest.approx(0.5 * scales["au"]) and w[6] == pytest.approx(1.0 * scales["expression"])
    assert w[5] == pytest.approx(1.0 * scales["au"]) and w[4] == pytest.approx(0.5 * scales["expression"])
    assert json.loads((run / "run.json").read_text())["loss_weights"]["dm_ea"] == pytest.approx(w[5])

    # Stopped at step 6 (mid-window: the sums of steps 5 and 6 are pending) and resumed: the re-estimated table
    # and the pending sums come back with the checkpoint, so the run is bit for bit the uninterrupted one.
    assert main(_argv(synth, tmp_path, "split", max_steps_per_run=6, **opts)) == 0
    mid = load_checkpoint(latest_checkpoint(tmp_path / "split"))["refresh"][0]
    assert mid["steps"] == 6 and mid["counts"].sum() > 0  # the restore has pending sums to bring back
    assert main(_argv(synth, tmp_path, "split", resume="auto", **opts)) == 0
    a = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    la = [r["loss"] for r in a if r["kind"] == "train"]
    lb = [r["loss"] for r in b if r["kind"] == "train"]
    assert len(la) == len(lb) == 12 and la == lb
    resumed = load_checkpoint(latest_checkpoint(tmp_path / "split"))["refresh"][0]["table"]
    torch.testing.assert_close(resumed, ckpt["refresh"][0]["table"], rtol=0, atol=0)


def test_refresh_ignores_a_skipped_step_and_keeps_a_float32_table():
    table = torch.full((C, K), 0.2)  # float32, as the objective holds it
    refresh = coupling.RelatednessRefresh(table, every=1, strength=1.0)
    z_e, z_a = torch.zeros(2, C), torch.zeros(2, K)
    expr, expr_mask = torch.tensor([3, 3]), torch.tensor([True, True])
    au, au_mask = torch.ones(2, K), torch.ones(2, K, dtype=torch.bool)
    refresh.observe(z_e, z_a, expr, expr_mask, au, au_mask, skipped=torch.tensor(True))
    assert torch.equal(table, torch.full((C, K), 0.2))  # nothing counted: the start table again
    refresh.observe(z_e, z_a, expr, expr_mask, au, au_mask, skipped=torch.tensor(False))
    assert table.dtype == torch.float32
    assert table[3].tolist() == pytest.approx([(2 * 1.0 + 0.2) / 3] * K)
    assert table[0].tolist() == pytest.approx([0.2] * K)


def test_background_is_never_applied_twice():
    once = coupling.with_background(relatedness.prior(), np.full(K, 0.05))
    with pytest.raises(ValueError, match="already has background"):
        coupling.with_background(once, np.full(K, 0.05))


def test_a_configuration_saved_before_scarcity_scaling_keeps_it_off():
    from fbn_fast.config import TrainConfig

    old = TrainConfig().to_dict()
    for key in ("coupling_scarcity_au", "coupling_scarcity_expr", "au_pos_weight"):
        del old[key]
    cfg = TrainConfig.from_saved(old)
    assert cfg.coupling_scarcity_au == 0.0 and cfg.coupling_scarcity_expr == 0.0 and cfg.au_pos_weight == "off"
    assert TrainConfig().au_pos_weight == "balanced"
    assert TrainConfig.from_saved(TrainConfig().to_dict()).coupling_scarcity_au == TrainConfig().coupling_scarcity_au
