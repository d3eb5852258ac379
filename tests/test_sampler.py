"""Batch samplers: mixing ratios, determinism, exact resume, rank sharding, reshuffling."""

from __future__ import annotations

import numpy as np
import pytest

from fbn_fast.data.sampler import MixingBatchSampler, ShardedEvalSampler, systematic_counts

SIZES = (700, 250, 50)


def _rows_groups(sizes=SIZES, offset=10):
    groups = np.concatenate([np.full(n, d) for d, n in enumerate(sizes)])
    rows = np.arange(len(groups)) * 3 + offset  # manifest rows need not be 0..N-1
    perm = np.random.default_rng(5).permutation(len(rows))
    return rows[perm], groups[perm]


def _sampler(**kw):
    rows, groups = _rows_groups()
    args = dict(weights={0: 0.5, 1: 0.3, 2: 0.2}, batch_size=32, seed=3)
    args.update(kw)
    return MixingBatchSampler(rows, groups, **args), dict(zip(rows.tolist(), groups.tolist()))


def test_systematic_counts_sum_and_bounds():
    w = np.array([0.55, 0.3, 0.1, 0.05])
    u = np.random.default_rng(0).random(20000)
    c = systematic_counts(w, 64, u)
    assert (c.sum(1) == 64).all()
    target = 64 * w
    assert (c >= np.floor(target)).all() and (c <= np.ceil(target)).all()
    np.testing.assert_allclose(c.mean(0), target, atol=0.02)


def test_mixing_ratios_within_sampling_error():
    s, group_of = _sampler(epoch_size=60)
    counts = np.zeros(3)
    per_batch = []
    for rows in s:
        g = np.array([group_of[r] for r in rows])
        c = np.bincount(g, minlength=3)
        counts += c
        per_batch.append(c)
    frac = counts / counts.sum()
    # systematic sampling: every batch within one row of its target, the epoch within a fraction of a row per batch
    np.testing.assert_allclose(frac, [0.5, 0.3, 0.2], atol=1.0 / 32)
    per_batch = np.array(per_batch)
    assert (np.abs(per_batch - 32 * np.array([0.5, 0.3, 0.2])) < 1 + 1e-9).all()


def test_default_epoch_size_and_len():
    s, _ = _sampler()
    assert len(s) == sum(SIZES) // 32
    s2, _ = _sampler(world_size=2, rank=1)
    assert len(s2) == sum(SIZES) // 64


def test_deterministic_from_seed_and_epoch():
    a, _ = _sampler()
    b, _ = _sampler()
    c, _ = _sampler(seed=4)
    ea = [x.tolist() for x in a]
    assert ea == [x.tolist() for x in b]
    assert ea != [x.tolist() for x in c]
    a.set_epoch(1)
    assert [x.tolist() for x in a] != ea


def test_no_repeats_within_epoch_for_large_dataset_and_reshuffle_without_batch_repeats():
    s, group_of = _sampler(epoch_size=40)
    seen0 = []
    for rows in s:
        assert len(set(rows.tolist())) == len(rows)  # never a row twice in one batch, even across a reshuffle
        seen0 += [r for r in rows.tolist() if group_of[r] == 0]
    # dataset 0 (700 rows) gives 16 per batch: 640 < 700 draws, all distinct within the epoch
    assert len(seen0) == len(set(seen0))
    # dataset 2 (50 rows, ~6.4 per batch) is reshuffled: every row appears, with balanced counts
    seen2 = [r for b in range(40) for r in s.batch(0, b).tolist() if group_of[r] == 2]
    counts = np.bincount(np.unique(seen2, return_inverse=True)[1])
    assert len(counts) == 50 and counts.max() - counts.min() <= 1


def test_stream_continues_across_epochs():
    # dataset 0 drawn at 16 per batch, 20 batches per epoch: 320 of 700 rows per epoch; epochs 0 and 1 together
    # must not repeat a row (the stream carries on instead of restarting each epoch)
    s, group_of = _sampler(epoch_size=20)
    seen = []
    for e in range(2):
        s.set_epoch(e)
        for rows in s:
            seen += [r for r in rows.tolist() if group_of[r] == 0]
    assert len(seen) == 640 and len(set(seen)) == 640


def test_exact_resume_mid_epoch():
    s, _ = _sampler(epoch_size=25)
    s.set_epoch(2)
    it = iter(s)
    for _ in range(7):
        next(it)
    state = s.state_dict()
    rest = [x.tolist() for x in it]
    fresh, _ = _sampler(epoch_size=25)
    fresh.load_state_dict(state)
    fresh.set_epoch(2)  # a training loop calls this after loading: it must not rewind
    assert [x.tolist() for x in fresh] == rest
    assert fresh.state_dict()["epoch"] == 3 and fresh.state_dict()["batch"] == 0  # a full pass moves on
    with pytest.raises(ValueError, match="batch_size"):
        _sampler(batch_size=16)[0].load_state_dict(state)
    with pytest.raises(ValueError, match="lacks"):
        fresh.load_state_dict({"epoch": 1})


@pytest.mark.parametrize("world", [2, 3])
def test_train_ranks_disjoint_and_cover_global_batch(world):
    samplers = [_sampler(world_size=world, rank=r, epoch_size=12)[0] for r in range(world)]
    group_of = _sampler()[1]
    for b in range(12):
        parts = [s.batch(0, b) for s in samplers]
        joined = np.concatenate(parts)
        assert all(len(p) == 32 for p in parts)
        assert len(set(joined.tolist())) == len(joined)  # disjoint across ranks
        assert sorted(joined.tolist()) == sorted(samplers[0].global_batch_rows(0, b).tolist())
        for p in parts:  # every rank gets its share of each dataset, within one row per dataset and rank
            c = np.bincount([group_of[r] for r in p.tolist()], minlength=3)
            assert (np.abs(c - 32 * np.array([0.5, 0.3, 0.2])) <= 2).all()


@pytest.mark.parametrize("n,world,bs", [(103, 4, 8), (10, 3, 4), (7, 8, 2), (64, 2, 32)])
def test_eval_sampler_covers_each_row_once(n, world, bs):
    rows = np.arange(n) * 2 + 1
    got = []
    sizes = []
    for r in range(world):
        s = ShardedEvalSampler(rows, batch_size=bs, rank=r, world_size=world)
        batches = list(s)
        assert len(batches) == len(s)
        assert all(len(b) == bs for b in batches[:-1])  # only the last batch may be partial
        assert all(len(b) > 0 for b in batches)
        sizes.append(sum(len(b) for b in batches))
        got += [x for b in batches for x in b.tolist()]
    assert sorted(got) == rows.tolist()  # once each, no padding
    assert max(sizes) - min(sizes) <= 1


def test_eval_sampler_resume_and_drop_last():
    s = ShardedEvalSampler(np.arange(50), batch_size=8)
    it = iter(s)
    next(it), next(it)
    state = s.state_dict()
    rest = [b.tolist() for b in it]
    t = ShardedEvalSampler(np.arange(50), batch_size=8)
    t.load_state_dict(state)
    assert [b.tolist() for b in t] == rest
    assert len(ShardedEvalSampler(np.arange(50), batch_size=8, drop_last=True)) == 6


def test_bad_arguments():
    rows, groups = _rows_groups()
    with pytest.raises(ValueError, match="no rows"):
        MixingBatchSampler(rows, groups, {0: 1.0, 7: 1.0}, batch_size=4)
    with pytest.raises(ValueError, match="positive weight"):
        MixingBatchSampler(rows, groups, {0: 0.0}, batch_size=4)
    with pytest.raises(ValueError, match="rank"):
        MixingBatchSampler(rows, groups, {0: 1.0}, batch_size=4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="finite"):
        MixingBatchSampler(rows, groups, {0: 1.0, 1: float("nan")}, batch_size=4)
