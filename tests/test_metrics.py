"""Streaming metrics (docs/method.md §5) against values computed independently here (by hand or numpy loops)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fbn_fast.labels import AUS, EXPRESSIONS
from fbn_fast.metrics import AUMeter, CompoundMeter, ExpressionMeter, MultiDatasetMetrics, VAMeter, ccc_from_moments

# ---------------------------------------------------------------------------------------------------------------
# Independent references: plain Python / numpy loops over the samples.


def ref_confusion(target, pred, num_classes):
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    for t, p in zip(target, pred):
        cm[t, p] += 1
    return cm


def ref_classification(target, pred, num_classes):
    """Accuracy, macro-F1 over classes present in targets or predictions, UAR over classes present in targets."""
    target, pred = list(target), list(pred)
    acc = sum(t == p for t, p in zip(target, pred)) / len(target)
    f1s, recalls = [], []
    for c in range(num_classes):
        tp = sum(t == c and p == c for t, p in zip(target, pred))
        fp = sum(t != c and p == c for t, p in zip(target, pred))
        fn = sum(t == c and p != c for t, p in zip(target, pred))
        if tp + fp + fn > 0:
            f1s.append(2 * tp / (2 * tp + fp + fn))
        if tp + fn > 0:
            recalls.append(tp / (tp + fn))
    return acc, sum(f1s) / len(f1s), sum(recalls) / len(recalls)


def ref_au(probs, target, mask, threshold=0.5):
    """Per-AU F1/accuracy over annotated entries (NaN when never annotated), means over annotated AUs."""
    n, k = probs.shape
    f1, acc = [], []
    for j in range(k):
        tp = fp = fn = tn = 0
        for i in range(n):
            if not mask[i, j]:
                continue
            p, t = probs[i, j] >= threshold, target[i, j] >= 0.5
            tp += p and t
            fp += p and not t
            fn += (not p) and t
            tn += (not p) and (not t)
        total = tp + fp + fn + tn
        if total == 0:
            f1.append(math.nan)
            acc.append(math.nan)
        else:
            f1.append(2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else 0.0)
            acc.append((tp + tn) / total)
    return np.array(f1), np.array(acc)


def ref_ccc(x, y):
    """Direct formula with numpy's population statistics."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    cov = np.mean((x - x.mean()) * (y - y.mean()))
    return 2 * cov / (x.var() + y.var() + (x.mean() - y.mean()) ** 2)


def close(a, b, tol=1e-12):
    return a == pytest.approx(b, rel=tol, abs=tol)


def assert_same(got, want, tol=1e-12, abs_tol=None):
    """Nested results (dicts, lists) equal: keys, lengths, counts and names exactly, floats to ``tol`` relative and
    ``abs_tol`` absolute (default ``tol``): float64 sums taken in another order differ in the last bits."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (sorted(got), sorted(want))
        for key in want:
            assert_same(got[key], want[key], tol, abs_tol)
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want)
        for g, w in zip(got, want):
            assert_same(g, w, tol, abs_tol)
    elif isinstance(want, float) or isinstance(got, float):
        assert got == pytest.approx(want, rel=tol, abs=tol if abs_tol is None else abs_tol)
    else:
        assert got == want


# ---------------------------------------------------------------------------------------------------------------
# Expressions


def test_expression_small_example_by_hand():
    # Rows 6 and 7 are unlabelled; their garbage targets must be ignored.
    target = torch.tensor([0, 0, 1, 2, 2, 2, -1, 99])
    pred = torch.tensor([0, 1, 1, 2, 0, 2, 1, 2])
    mask = torch.tensor([1, 1, 1, 1, 1, 1, 0, 0], dtype=torch.bool)
    m = ExpressionMeter(3)
    m.update(pred, target, mask)
    r = m.compute()
    assert r["confusion"] == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    assert r["n"] == 6
    assert close(r["accuracy"], 4 / 6)
    # F1: class 0: 2·1/(2+2); class 1: 2·1/(1+2); class 2: 2·2/(3+2).
    f1 = [0.5, 2 / 3, 0.8]
    assert all(close(a, b) for a, b in zip(r["per_class_f1"], f1))
    assert close(r["macro_f1"], sum(f1) / 3)
    assert close(r["abaw"], 0.67 * sum(f1) / 3 + 0.33 * 4 / 6)


def test_expression_logits_and_ids_agree_and_macro_f1_skips_absent_classes():
    target = torch.tensor([0, 1, 1, 2, 0])
    pred = torch.tensor([0, 1, 2, 2, 1])
    logits = torch.nn.functional.one_hot(pred, 5).float() * 3 - 1  # C = 5; classes 3 and 4 never occur
    a, b = ExpressionMeter(5), ExpressionMeter(5)
    a.update(pred, target)
    b.update(logits, target)
    ra, rb = a.compute(), b.compute()
    assert ra == rb
    acc, f1, _ = ref_classification(target.tolist(), pred.tolist(), 5)
    assert close(ra["macro_f1"], f1) and close(ra["accuracy"], acc)
    assert ra["per_class_f1"][3] is None and ra["per_class_f1"][4] is None


def test_expression_no_labels_gives_none():
    m = ExpressionMeter(4)
    m.update(torch.randn(5, 4), torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.bool))
    assert m.compute() is None


def test_expression_streaming_equals_one_shot():
    g = torch.Generator().manual_seed(0)
    n, c = 5000, 7
    logits = torch.randn(n, c, generator=g)
    target = torch.randint(0, c, (n,), generator=g)
    # Bias predictions toward the truth so that the metrics are not trivial.
    logits[torch.arange(n), target] += 1.0
    mask = torch.rand(n, generator=g) < 0.8
    stream = ExpressionMeter(c)
    for chunk in torch.arange(n).split(337):
        stream.update(logits[chunk], target[chunk], mask[chunk])
    once = ExpressionMeter(c)
    once.update(logits, target, mask)
    assert stream.compute() == once.compute()
    keep = mask.numpy()
    t, p = target.numpy()[keep], logits.argmax(1).numpy()[keep]
    np.testing.assert_array_equal(np.array(stream.compute()["confusion"]), ref_confusion(t, p, c))
    acc, f1, _ = ref_classification(t, p, c)
    r = stream.compute()
    assert close(r["accuracy"], acc) and close(r["macro_f1"], f1)


# ---------------------------------------------------------------------------------------------------------------
# Compounds


def test_compound_uar_by_hand():
    target = torch.tensor([0, 0, 0, 0, 1, 2])
    pred = torch.tensor([0, 0, 0, 1, 1, 0])
    m = CompoundMeter(4)  # class 3 has no support: left out of UAR
    m.update(pred, target)
    r = m.compute()
    assert close(r["uar"], (3 / 4 + 1 / 1 + 0 / 1) / 3)
    assert close(r["accuracy"], 4 / 6)
    # F1: class 0: 2·3/(4+4); class 1: 2·1/(1+2); class 2: 0.
    assert close(r["macro_f1"], (6 / 8 + 2 / 3 + 0.0) / 3)
    assert r["per_class_recall"][3] is None


def test_compound_random_against_loops():
    rng = np.random.default_rng(3)
    t = rng.integers(0, 11, 800)
    p = np.where(rng.random(800) < 0.5, t, rng.integers(0, 11, 800))
    m = CompoundMeter(11)
    for lo in range(0, 800, 150):
        m.update(torch.from_numpy(p[lo : lo + 150]), torch.from_numpy(t[lo : lo + 150]))
    acc, f1, uar = ref_classification(t, p, 11)
    r = m.compute()
    assert close(r["accuracy"], acc) and close(r["macro_f1"], f1) and close(r["uar"], uar)


# ---------------------------------------------------------------------------------------------------------------
# Action units


def test_au_small_example_by_hand():
    probs = torch.tensor(
        [[0.9, 0.2, 0.7], [0.6, 0.8, 0.1], [0.1, 0.4, 0.9], [0.3, 0.9, 0.5], [0.5, 0.1, 0.2]]
    )
    target = torch.tensor([[1, 0, 1], [0, 1, 0], [0, 1, 1], [1, 0, 0], [1, 7, 0]], dtype=torch.float32)
    # AU 0 annotated everywhere, AU 1 on rows 0-3 (row 4 holds a garbage label), AU 2 never.
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    m = AUMeter(3)
    m.update(probs, target, mask)
    r = m.compute()
    # AU 0: pred (≥ 0.5) 1,1,0,0,1 vs target 1,0,0,1,1 -> TP 2, FP 1, FN 1, TN 1.
    f1_0, acc_0 = 2 * 2 / (4 + 1 + 1), 3 / 5
    # AU 1: pred 0,1,0,1 vs target 0,1,1,0 -> TP 1, FP 1, FN 1, TN 1.
    f1_1, acc_1 = 2 / 4, 2 / 4
    assert close(r["per_au_f1"][0], f1_0) and close(r["per_au_f1"][1], f1_1)
    assert close(r["per_au_accuracy"][0], acc_0) and close(r["per_au_accuracy"][1], acc_1)
    assert r["per_au_f1"][2] is None and r["per_au_accuracy"][2] is None
    assert r["n"] == [5, 4, 0] and r["num_annotated_aus"] == 2
    assert close(r["mean_f1"], (f1_0 + f1_1) / 2)
    assert close(r["mean_accuracy"], (acc_0 + acc_1) / 2)
    assert close(r["abaw"], 0.5 * (f1_0 + f1_1) / 2 + 0.5 * (acc_0 + acc_1) / 2)


def test_au_annotated_but_never_active_nor_predicted_scores_zero_f1():
    m = AUMeter(1)
    m.update(torch.tensor([[0.1], [0.2]]), torch.tensor([[0.0], [0.0]]))
    r = m.compute()
    assert r["per_au_f1"] == [0.0] and r["per_au_accuracy"] == [1.0]


def test_au_logits_equal_probabilities():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(400, 5, generator=g) * 3
    target = (torch.rand(400, 5, generator=g) < 0.3).float()
    mask = torch.rand(400, 5, generator=g) < 0.7
    a, b, c = AUMeter(5), AUMeter(5, from_logits=True), AUMeter(5)
    a.update(torch.sigmoid(logits), target, mask)
    b.update(logits, target, mask)
    c.update(logits, target, mask, from_logits=True)
    # The same sigmoid on the same tensor, then integer counts: the scores are equal to the last bit.
    assert a.compute() == b.compute() == c.compute()


def test_au_streaming_equals_loops_and_threshold():
    rng = np.random.default_rng(5)
    n, k = 1500, 6
    probs = rng.random((n, k))
    target = (rng.random((n, k)) < 0.4).astype(np.float64)
    mask = rng.random((n, k)) < 0.6
    mask[:, 4] = False  # one AU never annotated
    target[~mask] = np.nan  # unannotated labels must never matter
    for thr in (0.5, 0.3):
        m = AUMeter(k, threshold=thr)
        for lo in range(0, n, 211):
            sl = slice(lo, lo + 211)
            m.update(torch.from_numpy(probs[sl]), torch.from_numpy(target[sl]), torch.from_numpy(mask[sl]))
        f1, acc = ref_au(probs, np.nan_to_num(target), mask, thr)
        r = m.compute()
        got_f1 = np.array([math.nan if v is None else v for v in r["per_au_f1"]])
        got_acc = np.array([math.nan if v is None else v for v in r["per_au_accuracy"]])
        np.testing.assert_allclose(got_f1, f1, rtol=1e-12, equal_nan=True)
        np.testing.assert_allclose(got_acc, acc, rtol=1e-12, equal_nan=True)
        assert close(r["mean_f1"], np.nanmean(f1)) and close(r["mean_accuracy"], np.nanmean(acc))


# ---------------------------------------------------------------------------------------------------------------
# Valence / arousal


def test_ccc_matches_numpy_formula_streaming_with_nan_under_mask():
    rng = np.random.default_rng(7)
    n = 3000
    y = np.clip(rng.normal(0.1, 0.4, (n, 2)), -1, 1)
    x = np.clip(0.7 * y + rng.normal(0.05, 0.2, (n, 2)), -1, 1)
    mask = rng.random(n) < 0.75
    y_masked = y.copy()
    y_masked[~mask] = np.nan
    m = VAMeter()
    for lo in range(0, n, 256):
        sl = slice(lo, lo + 256)
        m.update(torch.from_numpy(x[sl]).float(), torch.from_numpy(y_masked[sl]), torch.from_numpy(mask[sl]))
    r = m.compute()
    # Predictions passed as float32: the reference sees the same rounded values.
    x32 = x.astype(np.float32).astype(np.float64)
    cv, ca = ref_ccc(x32[mask, 0], y[mask, 0]), ref_ccc(x32[mask, 1], y[mask, 1])
    assert r["n"] == int(mask.sum())
    assert close(r["ccc_valence"], cv, 1e-10) and close(r["ccc_arousal"], ca, 1e-10)
    assert close(r["ccc_mean"], (cv + ca) / 2, 1e-10)


def test_ccc_perfect_and_undefined():
    m = VAMeter()
    v = torch.tensor([[0.1, -0.2], [0.5, 0.3], [-0.4, 0.9]])
    m.update(v, v)
    r = m.compute()
    assert close(r["ccc_valence"], 1.0) and close(r["ccc_arousal"], 1.0)
    one = VAMeter()
    one.update(v[:1], v[:1])
    assert one.compute()["ccc_valence"] is None  # one sample: undefined
    assert math.isnan(ccc_from_moments(1, 0.5, 0.5, 0.25, 0.25, 0.25))


def test_ccc_million_samples_in_chunks():
    # The float64 moments stay accurate over ~10^6 samples (memory: only 12 numbers per group).
    g = torch.Generator().manual_seed(11)
    m = VAMeter()
    xs, ys = [], []
    for _ in range(8):
        y = torch.rand(131072, 2, generator=g) * 2 - 1
        x = (0.8 * y + 0.3 * torch.randn(131072, 2, generator=g)).clamp(-1, 1)
        m.update(x, y)
        xs.append(x.double().numpy())
        ys.append(y.double().numpy())
    x, y = np.concatenate(xs), np.concatenate(ys)
    r = m.compute()
    assert r["n"] == 8 * 131072
    assert close(r["ccc_valence"], ref_ccc(x[:, 0], y[:, 0]), 1e-9)
    assert close(r["ccc_arousal"], ref_ccc(x[:, 1], y[:, 1]), 1e-9)


# ---------------------------------------------------------------------------------------------------------------
# Per-dataset routing


def _random_batch(rng, n, c, k, d, no_expr=(), no_au=(), no_va=()):
    ds = rng.integers(0, d, n)
    b = {
        "ids": torch.from_numpy(ds),
        "z_e": torch.from_numpy(rng.normal(size=(n, c))),
        "expr": torch.from_numpy(rng.integers(0, c, n)),
        "expr_mask": torch.from_numpy((rng.random(n) < 0.7) & ~np.isin(ds, no_expr)),
        "z_a": torch.from_numpy(rng.normal(size=(n, k))),
        "au": torch.from_numpy((rng.random((n, k)) < 0.3).astype(np.float32)),
        "au_mask": torch.from_numpy((rng.random((n, k)) < 0.5) & ~np.isin(ds, no_au)[:, None]),
        "v": torch.from_numpy(rng.uniform(-1, 1, (n, 2))),
        "va": torch.from_numpy(rng.uniform(-1, 1, (n, 2))),
        "va_mask": torch.from_numpy((rng.random(n) < 0.6) & ~np.isin(ds, no_va)),
    }
    return b


def _update(metrics, b):
    metrics.update(
        b["ids"],
        expr_logits=b["z_e"], expr=b["expr"], expr_mask=b["expr_mask"],
        au_logits=b["z_a"], au=b["au"], au_mask=b["au_mask"],
        va_pred=b["v"], va=b["va"], va_mask=b["va_mask"],
    )


def test_multidataset_routes_rows_and_skips_unlabelled_tasks():
    rng = np.random.default_rng(0)
    names = ["affectnet", "disfa", "rafdb", "unused"]
    c, k = 7, 17
    metrics = MultiDatasetMetrics(names, num_classes=c, num_aus=k)
    # disfa has no expression and no VA labels; affectnet and rafdb no AU labels; "unused" gets no rows.
    batches = [_random_batch(rng, 300, c, k, 3, no_expr=(1,), no_au=(0, 2), no_va=(1, 2)) for _ in range(4)]
    for b in batches:
        _update(metrics, b)
    res = metrics.compute()
    assert set(res) == set(names)
    assert set(res["affectnet"]) == {"expression", "va"}
    assert set(res["disfa"]) == {"au"}
    assert set(res["rafdb"]) == {"expression"}
    assert res["unused"] == {}
    cat = {key: torch.cat([b[key] for b in batches]) for key in batches[0]}
    for gi, name in enumerate(names[:3]):
        rows = cat["ids"] == gi
        e, a, v = ExpressionMeter(c), AUMeter(k, from_logits=True), VAMeter()
        e.update(cat["z_e"][rows], cat["expr"][rows], cat["expr_mask"][rows])
        a.update(cat["z_a"][rows], cat["au"][rows], cat["au_mask"][rows])
        v.update(cat["v"][rows], cat["va"][rows], cat["va_mask"][rows])
        expected = {"expression": e.compute(), "au": a.compute(), "va": v.compute()}
        assert_same(res[name], {t: r for t, r in expected.items() if r is not None})
    # And the expression scores of one dataset match the loop reference on its own rows.
    rows = (cat["ids"] == 0) & cat["expr_mask"]
    acc, f1, _ = ref_classification(cat["expr"][rows].tolist(), cat["z_e"][rows].argmax(1).tolist(), c)
    assert close(res["affectnet"]["expression"]["accuracy"], acc)
    assert close(res["affectnet"]["expression"]["macro_f1"], f1)


def test_multidataset_int_dataset_id_and_compound():
    metrics = MultiDatasetMetrics(["a", "rafdb_compound"], num_classes=3, num_aus=2, num_compounds=4)
    pred = torch.tensor([0, 1, 2, 3, 3])
    target = torch.tensor([0, 1, 2, 2, 3])
    metrics.update(1, compound_logits=torch.nn.functional.one_hot(pred, 4).float(), compound=target)
    res = metrics.compute()
    assert res["a"] == {}
    assert set(res["rafdb_compound"]) == {"compound"}
    assert close(res["rafdb_compound"]["compound"]["uar"], (1 + 1 + 0.5 + 1) / 4)


def test_merge_state_dict_and_reduce_equal_a_single_pass():
    rng = np.random.default_rng(4)
    names = ["x", "y"]
    batches = [_random_batch(rng, 200, 4, 5, 2) for _ in range(4)]
    single = MultiDatasetMetrics(names, 4, 5)
    for b in batches:
        _update(single, b)
    shard_a, shard_b = MultiDatasetMetrics(names, 4, 5), MultiDatasetMetrics(names, 4, 5)
    for b in batches[:2]:
        _update(shard_a, b)
    for b in batches[2:]:
        _update(shard_b, b)
    expected = single.compute()

    merged = MultiDatasetMetrics(names, 4, 5)
    merged.load_state_dict(shard_a.state_dict())
    assert_same(merged.merge(shard_b).compute(), expected)

    # A reduction that returns the summed tensor (as a gather-and-sum would) ...
    others = iter(shard_b.state_tensors())
    reduced = MultiDatasetMetrics(names, 4, 5)
    reduced.load_state_dict(shard_a.state_dict())
    reduced.reduce_(lambda t: t + next(others))
    assert_same(reduced.compute(), expected)
    # ... and one that works in place (as all_reduce does): doubling every count keeps the ratios.
    doubled = MultiDatasetMetrics(names, 4, 5)
    doubled.load_state_dict(single.state_dict())
    doubled.reduce_(lambda t: t.mul_(2))
    r = doubled.compute()
    assert r["x"]["expression"]["n"] == 2 * expected["x"]["expression"]["n"]
    assert close(r["x"]["expression"]["macro_f1"], expected["x"]["expression"]["macro_f1"])
    assert close(r["y"]["va"]["ccc_mean"], expected["y"]["va"]["ccc_mean"], 1e-9)

    single.reset()
    assert single.compute() == {"x": {}, "y": {}}


def test_reduce_with_torch_distributed(tmp_path):
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    rng = np.random.default_rng(2)
    b = _random_batch(rng, 100, 3, 4, 2)
    metrics = MultiDatasetMetrics(["p", "q"], 3, 4)
    _update(metrics, b)
    before = metrics.compute()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        metrics.reduce_(dist.all_reduce)  # int64 and float64 statistics both reduce
    finally:
        dist.destroy_process_group()
    assert metrics.compute() == before  # one rank: the all-reduced sums are the local ones, bit for bit


def test_update_reads_no_values_off_the_host():
    # On a non-CPU device an update must not read tensor values (that would be a host sync per batch):
    # meta tensors have no values, so any .item()/bool() inside update would raise.
    metrics = MultiDatasetMetrics(["a", "b"], 3, 4, num_compounds=5, device="meta")
    n = 8
    kw = dict(
        expr_logits=torch.empty(n, 3, device="meta"), expr=torch.empty(n, dtype=torch.long, device="meta"),
        expr_mask=torch.empty(n, dtype=torch.bool, device="meta"),
        au_probs=torch.empty(n, 4, device="meta"), au=torch.empty(n, 4, device="meta"),
        au_mask=torch.empty(n, 4, dtype=torch.bool, device="meta"),
        va_pred=torch.empty(n, 2, device="meta"), va=torch.empty(n, 2, device="meta"),
        va_mask=torch.empty(n, dtype=torch.bool, device="meta"),
        compound_logits=torch.empty(n, 5, device="meta"), compound=torch.empty(n, dtype=torch.long, device="meta"),
    )
    metrics.update(torch.empty(n, dtype=torch.long, device="meta"), **kw)
    assert all(t.device.type == "meta" for t in metrics.state_tensors())


def test_device_adopted_from_first_update():
    m = ExpressionMeter(3)
    m.update(torch.tensor([0, 1]), torch.tensor([0, 2]))
    assert m.device.type == "cpu"
    fixed = VAMeter(device="cpu")
    fixed.update(np.zeros((2, 2)), np.zeros((2, 2)))  # numpy input is accepted too
    assert fixed.compute()["n"] == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(9)
    cpu, gpu = MultiDatasetMetrics(["a", "b", "c"], 7, 17), MultiDatasetMetrics(["a", "b", "c"], 7, 17)
    for _ in range(3):
        b = _random_batch(rng, 4096, 7, 17, 3)
        _update(cpu, b)
        _update(gpu, {k: v.cuda() for k, v in b.items()})
    assert all(t.is_cuda for t in gpu.state_tensors())
    rc, rg = cpu.compute(), gpu.compute()
    for name in rc:
        assert rc[name]["expression"] == rg[name]["expression"] and rc[name]["au"] == rg[name]["au"]
        assert close(rc[name]["va"]["ccc_mean"], rg[name]["va"]["ccc_mean"], 1e-9)


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_raises_clear_errors():
    m = ExpressionMeter(3)
    with pytest.raises(ValueError, match=r"target: row 1 has value 5, outside \[0, 3\)"):
        m.update(torch.tensor([0, 1]), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"pred: shape \(2, 4\), expected \(2, 3\)"):
        m.update(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="target: integer class ids"):
        m.update(torch.tensor([0, 1]), torch.tensor([0.0, 1.0]))
    a = AUMeter(2)
    with pytest.raises(ValueError, match="scores: row 0, column 1 has value 2.0, not a probability"):
        a.update(torch.tensor([[0.5, 2.0]]), torch.tensor([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="target: row 0, column 0 has value 0.5, not 0/1"):
        a.update(torch.tensor([[0.5, 0.2]]), torch.tensor([[0.5, 1.0]]))
    with pytest.raises(ValueError, match=r"mask: shape \(1,\), expected \(1, 2\)"):
        a.update(torch.tensor([[0.5, 0.2]]), torch.tensor([[0.0, 1.0]]), torch.tensor([True]))
    md = MultiDatasetMetrics(["a", "b"], 3, 2)
    with pytest.raises(ValueError, match=r"dataset_ids: row 1 has value 2, outside \[0, 2\)"):
        md.update(torch.tensor([0, 2]), expr_logits=torch.zeros(2, 3), expr=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="expression: expr is missing"):
        md.update(torch.tensor([0, 1]), expr_logits=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="au_probs or au_logits, not both"):
        md.update(0, au_probs=torch.zeros(1, 2), au_logits=torch.zeros(1, 2), au=torch.zeros(1, 2))
    with pytest.raises(ValueError, match="no num_compounds"):
        md.update(0, compound_logits=torch.zeros(1, 3), compound=torch.tensor([0]))
    with pytest.raises(ValueError, match="duplicates"):
        MultiDatasetMetrics(["a", "a"])
    with pytest.raises(ValueError, match="cannot merge"):
        md.merge(MultiDatasetMetrics(["a", "c"], 3, 2))
    with pytest.raises(ValueError, match="group is required"):
        ExpressionMeter(3, num_groups=2).update(torch.tensor([0]), torch.tensor([0]))


def test_results_name_their_classes_and_aus():
    m = MultiDatasetMetrics(["a"], num_compounds=3, compound_names=["x", "y", "z"])
    m.update(0, expr_logits=torch.eye(7), expr=torch.arange(7), au_probs=torch.full((7, 17), 0.7),
             au=torch.ones(7, 17), compound_logits=torch.eye(3), compound=torch.arange(3).long())
    r = m.compute()["a"]
    assert r["expression"]["classes"] == list(EXPRESSIONS)  # per_class_*[i] and confusion row/column i
    assert r["au"]["aus"] == list(AUS) and len(r["au"]["per_au_f1"]) == 17
    assert r["compound"]["classes"] == ["x", "y", "z"]
    # Another model size: positional names; a wrong number of names is an error.
    small = ExpressionMeter(3)
    small.update(torch.eye(3), torch.arange(3))
    assert small.compute()["classes"] == ["class0", "class1", "class2"]
    with pytest.raises(ValueError, match="names: 2 given for 3 outputs"):
        ExpressionMeter(3, names=["a", "b"])
