"""SynthFace: determinism, label statistics against the relatedness tables, AU locality, end-to-end generation."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
from PIL import Image

from fbn_fast.data import load_manifest
from fbn_fast.data.synthface import (
    AU_THRESHOLD,
    DATASETS,
    SPONTANEOUS,
    active_probability,
    cli,
    ensure_synthface,
    generate,
    parse_size,
    plan,
    region_mask,
    render,
    render_image,
    sample_compounds,
    sample_expressions,
    sample_look,
)
from fbn_fast.data.synthface.dataset import MIN_SIZE
from fbn_fast.data.synthface.sampling import SUBTHRESHOLD, SUBTHRESHOLD_MAX, va_means
from fbn_fast.labels import AU_NUMBERS, AUS, EXPRESSIONS, MISSING, NUM_AUS
from fbn_fast.relatedness import compound_prior, prior


def _within_binomial(hits: np.ndarray, trials: np.ndarray, p: np.ndarray, sigmas: float = 4.0) -> np.ndarray:
    """Whether observed rates are within ``sigmas`` binomial standard errors of ``p`` (exact for p in {0, 1})."""
    rate = hits / np.maximum(trials, 1)
    se = np.sqrt(p * (1 - p) / np.maximum(trials, 1))
    return np.abs(rate - p) <= sigmas * se + 1e-12


# ---------------------------------------------------------------------- labels
def test_expression_au_rates_follow_the_prior_table_plus_spontaneous_aus():
    labels = sample_expressions(np.random.default_rng(11), 21_000)
    expected = active_probability(prior().matrix)
    onehot = np.eye(len(EXPRESSIONS))[labels.expr]
    trials = onehot.sum(0)[:, None].repeat(NUM_AUS, 1)
    hits = onehot.T @ labels.au
    ok = _within_binomial(hits, trials, expected)
    assert ok.all(), [(EXPRESSIONS[c], AUS[k]) for c, k in np.argwhere(~ok)]
    # Expressions are uniform; Neutral has only spontaneous AUs.
    assert _within_binomial(onehot.sum(0), np.full(7, len(labels)), np.full(7, 1 / 7)).all()
    neutral = labels.au[labels.expr == 0]
    assert _within_binomial(neutral.sum(), np.array(neutral.size), np.array(SPONTANEOUS))
    # A table entry of 1 stays (almost) certain and 0 becomes exactly the spontaneous rate.
    assert expected[4, AU_NUMBERS.index(12)] == 1.0 and expected[0, 0] == pytest.approx(SPONTANEOUS)


def test_intensities_sit_on_the_right_side_of_the_threshold():
    labels = sample_expressions(np.random.default_rng(3), 5_000)
    active = labels.au.astype(bool)
    assert (labels.au_intensity[active] >= AU_THRESHOLD).all()
    assert (labels.au_intensity[active] <= 1.0).all()
    assert (labels.au_intensity[~active] <= SUBTHRESHOLD_MAX).all()
    assert (labels.au_intensity[~active] > 0).mean() == pytest.approx(SUBTHRESHOLD, abs=0.02)
    # Stronger faces have stronger AUs (what makes VA learnable from pixels).
    strong = labels.strength > 0.7
    weak = labels.strength < 0.3
    assert labels.au_intensity[strong][active[strong]].mean() > labels.au_intensity[weak][active[weak]].mean() + 0.2


def test_va_follows_the_per_expression_means():
    labels = sample_expressions(np.random.default_rng(5), 14_000)
    assert np.abs(labels.va).max() <= 1.0
    mu = va_means()
    for c in range(len(EXPRESSIONS)):
        va = labels.va[labels.expr == c]
        # E[mu·(0.6 + 0.4 g)] = 0.8·mu with g ~ U(0, 1); clipping is rare at these means.
        se = va.std(0) / np.sqrt(len(va))
        assert (np.abs(va.mean(0) - 0.8 * mu[c]) < 4 * se + 0.01).all(), (EXPRESSIONS[c], va.mean(0), mu[c])


def test_compound_labels_follow_the_compound_table():
    labels = sample_compounds(np.random.default_rng(8), 15_000)
    assert (labels.expr == MISSING).all()
    table = compound_prior().matrix
    onehot = np.eye(len(table))[labels.compound]
    trials = onehot.sum(0)[:, None].repeat(NUM_AUS, 1)
    ok = _within_binomial(onehot.T @ labels.au, trials, active_probability(table))
    assert ok.all(), np.argwhere(~ok)


def test_expression_weights_are_used_and_checked():
    labels = sample_expressions(np.random.default_rng(0), 300, expr_probs=[0, 0, 0, 0, 1, 0, 0])
    assert (labels.expr == EXPRESSIONS.index("Happiness")).all()
    with pytest.raises(ValueError, match="expr_probs"):
        sample_expressions(np.random.default_rng(0), 3, expr_probs=[1, 2])
    with pytest.raises(ValueError, match="expr_probs"):
        sample_expressions(np.random.default_rng(0), 3, expr_probs=[-1, 1, 1, 1, 1, 1, 1])


# ---------------------------------------------------------------------- renderer
def test_render_is_deterministic_and_seed_dependent():
    au = np.linspace(0, 1, NUM_AUS)
    a = render_image(7, 123, 112, au)
    assert a == render_image(7, 123, 112, au)
    assert a != render_image(8, 123, 112, au)
    assert a != render_image(7, 124, 112, au)
    look = sample_look(np.random.default_rng(1), 64)
    assert render(look).shape == (64, 64, 3) and render(look).dtype == np.uint8
    np.testing.assert_array_equal(render(look), render(look, np.zeros(NUM_AUS)))


def test_render_rejects_bad_au_vectors():
    look = sample_look(np.random.default_rng(1), 32)
    with pytest.raises(ValueError, match="shape"):
        render(look, np.zeros(12))
    with pytest.raises(ValueError, match="finite"):
        render(look, np.full(NUM_AUS, np.nan))
    with pytest.raises(ValueError, match="too small"):
        sample_look(np.random.default_rng(1), 8)


@pytest.mark.parametrize("size,min_changed", [(112, 25), (64, 8)])
def test_every_au_changes_the_pixels_in_its_own_region(size, min_changed):
    """Neutral vs. AU k alone at intensity 1 on the same look: a substantial change, almost all inside AU k's region."""
    for seed in range(4):
        look = sample_look(np.random.default_rng([99, seed]), size)
        if seed == 0:  # include one frontal, noise-free face
            look = dataclasses.replace(look, yaw=0.0, roll=0.0, noise=0.0)
        neutral = render(look).astype(np.int16)
        for k, number in enumerate(AU_NUMBERS):
            au = np.zeros(NUM_AUS)
            au[k] = 1.0
            changed = np.abs(render(look, au).astype(np.int16) - neutral).sum(2) > 30
            region = region_mask(look, number)
            # Allow for the box filter's one-pixel spread at the region's edge.
            grown = region.copy()
            grown[1:] |= region[:-1]
            grown[:-1] |= region[1:]
            grown[:, 1:] |= grown[:, :-1].copy()
            grown[:, :-1] |= grown[:, 1:].copy()
            inside = (changed & grown).sum() / max(1, changed.sum())
            assert changed.sum() >= min_changed, (seed, f"AU{number}", int(changed.sum()))
            assert inside >= 0.95, (seed, f"AU{number}", inside)
            assert region.mean() < (0.5 if number == 26 else 0.2), (seed, f"AU{number}", region.mean())


def test_stronger_aus_change_more():
    look = dataclasses.replace(sample_look(np.random.default_rng(4), 112), noise=0.0)
    neutral = render(look).astype(np.int16)
    for k, number in enumerate(AU_NUMBERS):
        diffs = []
        for a in (0.25, 1.0):
            au = np.zeros(NUM_AUS)
            au[k] = a
            diffs.append(np.abs(render(look, au).astype(np.int16) - neutral).sum())
        assert 0 < diffs[0] < diffs[1], (f"AU{number}", diffs)


# ---------------------------------------------------------------------- benchmark on disk
def test_plan_covers_every_image_and_dataset():
    for total in (MIN_SIZE, 100, 25_000, 1_500_000):
        blocks = plan(total)
        assert sum(b.count for b in blocks) == total
        assert [b.start for b in blocks] == list(np.cumsum([0] + [b.count for b in blocks])[:-1])
        for d, spec in enumerate(DATASETS):
            splits = {b.split for b in blocks if b.dataset == d}
            if spec.compound:
                assert splits == {"test"}
            else:
                assert {"train", "test"} <= splits <= {"train", "val", "test"}
    assert parse_size("small") == 25_000 and parse_size("25k") == 25_000 and parse_size("1.5M") == 1_500_000
    for bad in ("huge", "10", 0):
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)


def test_ensure_synthface_end_to_end(tmp_path):
    out = tmp_path / "synth"
    path = ensure_synthface(out, size=100, seed=3, image_size=48, workers=2)
    m = load_manifest(path)
    assert len(m) == 100
    assert m.datasets == tuple(d.name for d in DATASETS) == (
        "synth_expr_va", "synth_expr", "synth_au_a", "synth_au_b", "synth_all", "synth_compound")
    for spec in DATASETS:
        tasks = m.tasks(spec.name)
        assert tasks["expr"] == spec.expr and tasks["va"] == spec.va and tasks["compound"] == spec.compound
        assert tasks["au"] == [f"AU{a}" for a in spec.aus]
        rows = m.dataset == m.dataset_index(spec.name)
        splits = {m.splits[s] for s in np.unique(m.split[rows])}
        assert splits == ({"test"} if spec.compound else {"train", "val", "test"}), spec.name
    for i in range(len(m)):
        with Image.open(out / m.path(i)) as im:
            assert im.size == (48, 48) and im.format == "JPEG"

    # The hidden truth is complete and agrees with every published label.
    full = load_manifest(out / "manifest_full.npz")
    truth = np.load(out / "truth.npz")
    assert full.paths.tolist() == m.paths.tolist()
    assert full.au_mask.all() and full.va_mask.all()
    basic = truth["compound"] == MISSING
    np.testing.assert_array_equal(full.expr, truth["expr"])
    assert (full.expr[basic] >= 0).all() and (full.compound[~basic] >= 0).all()
    np.testing.assert_array_equal(full.au, (truth["au_intensity"] >= AU_THRESHOLD).astype(np.uint8))
    np.testing.assert_array_equal(m.au[m.au_mask], full.au[m.au_mask])
    np.testing.assert_array_equal(m.expr[m.expr_mask], full.expr[m.expr_mask])
    np.testing.assert_allclose(m.va[m.va_mask], full.va[m.va_mask])
    assert (m.au[~m.au_mask] == 0).all()

    info = json.loads((out / "synthface.json").read_text())
    assert info["complete"] and info["params"]["size"] == 100
    assert sum(sum(d["splits"].values()) for d in info["datasets"].values()) == 100

    # A second call with the same parameters does nothing.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert ensure_synthface(out, size=100, seed=3, image_size=48, workers=2) == path
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps
    # A deleted image sends the next call into resume mode, which also re-renders a truncated one.
    victim, cut = out / m.path(17), out / m.path(60)
    original, original_cut = victim.read_bytes(), cut.read_bytes()
    victim.unlink()
    cut.write_bytes(original_cut[: len(original_cut) // 2])
    ensure_synthface(out, size=100, seed=3, image_size=48, workers=1)
    assert victim.read_bytes() == original and cut.read_bytes() == original_cut


def test_same_seed_gives_the_same_bytes_whatever_the_worker_count(tmp_path):
    a = generate(tmp_path / "a", size=MIN_SIZE, seed=5, image_size=40, workers=1).parent
    b = generate(tmp_path / "b", size=MIN_SIZE, seed=5, image_size=40, workers=2).parent
    files_a = sorted(p.relative_to(a) for p in (a / "images").rglob("*.jpg"))
    assert len(files_a) == MIN_SIZE
    assert files_a == sorted(p.relative_to(b) for p in (b / "images").rglob("*.jpg"))
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    for name in ("manifest.npz", "manifest_full.npz", "truth.npz"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _ensure_in_child(path: str) -> None:
    ensure_synthface(path, size=MIN_SIZE, seed=4, image_size=32, workers=1)


def test_concurrent_callers_share_one_generation(tmp_path):
    """Every rank of a distributed job may call ensure_synthface on the same folder at once."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_ensure_in_child, args=(str(tmp_path / "s"),)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    m = load_manifest(tmp_path / "s" / "manifest.npz")
    assert len(m) == MIN_SIZE
    assert all((tmp_path / "s" / m.path(i)).stat().st_size > 0 for i in range(len(m)))


def test_changed_parameters_regenerate_and_foreign_folders_are_refused(tmp_path):
    out = tmp_path / "s"
    generate(out, size=MIN_SIZE, seed=1, image_size=32, workers=1)
    first = load_manifest(out / "manifest.npz")
    old = (out / first.path(0)).read_bytes()
    generate(out, size=MIN_SIZE, seed=2, image_size=32, workers=1)
    assert json.loads((out / "synthface.json").read_text())["params"]["seed"] == 2
    assert (out / first.path(0)).read_bytes() != old
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        generate(foreign, size=MIN_SIZE, image_size=32, workers=1)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_cli(tmp_path, capsys):
    sheet = tmp_path / "sheet.png"
    assert cli(["--contact-sheet", str(sheet), "--image-size", "32", "--quiet"]) == 0
    with Image.open(sheet) as im:
        assert im.format == "PNG" and im.width > 5 * 32 and im.height > (7 + 9) * 32
    assert cli(["--out", str(tmp_path / "d"), "--size", "nonsense"]) == 2
    assert "size" in capsys.readouterr().err
    assert cli(["--out", str(tmp_path / "d"), "--size", "40", "--image-size", "32", "--workers", "1", "--quiet"]) == 0
    assert os.path.isfile(tmp_path / "d" / "manifest.npz")
    assert cli(["--out", str(tmp_path / "e"), "--size", "40", "--expr-probs", "1,2"]) == 2
    assert not (tmp_path / "e").exists()
