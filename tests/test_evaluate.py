"""Evaluation (docs/method.md §5) of a tiny model on a tiny manifest, against an independent computation.

The reference runs the model on every test image through the single-image path of ``fbn_fast.predict`` (not
the data pipeline) and computes every metric with plain Python loops here.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_metrics import assert_same
from tiny_model import tiny_model

from fbn_fast.compound import CompoundScorer
from fbn_fast.data import Manifest
from fbn_fast.data.decode import normalize_nhwc
from fbn_fast.evaluate import ALL, evaluate, format_report, main, unlabelled_aus
from fbn_fast.inference import HiddenTruth
from fbn_fast.labels import AUS, COMPOUNDS, EXPRESSIONS, MISSING
from fbn_fast.predict import load_image
from fbn_fast.relatedness import compound_prior

SIZE = 32
DATASETS = ("expr_va", "au_a", "cmp")
# AU columns annotated by dataset au_a (train and test); AU 12 / 17 / 26 never carry labels in training.
AU_A = [0, 1, 2, 4, 8]
NO_LABEL_TRAIN = [i for i in range(len(AUS)) if i not in (0, 1, 2, 3, 4)]


def _tiny_model(seed: int = 0) -> torch.nn.Module:
    return tiny_model(seed, bias_std=0.5)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A manifest of 3 datasets × (train, test) with partial labels, JPEGs on disk, and a full hidden truth."""
    root = tmp_path_factory.mktemp("evalset")
    rng = np.random.default_rng(0)
    paths, dataset, split = [], [], []
    n_per = {"expr_va": 14, "au_a": 13, "cmp": 11}
    for d in DATASETS:
        for s in ("train", "test"):
            for i in range(n_per[d]):
                rel = f"{d}/{s}_{i}.jpg"
                (root / d).mkdir(exist_ok=True)
                base = rng.uniform(0, 255, 3)
                img = np.clip(base + rng.normal(0, 60, (40, 36, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(root / rel, quality=92)
                paths.append(rel)
                dataset.append(d)
                split.append(s)
    n = len(paths)
    truth_expr = rng.integers(0, 7, n)
    truth_au = (rng.random((n, len(AUS))) < 0.4).astype(np.uint8)
    truth_va = rng.uniform(-1, 1, (n, 2)).astype(np.float32)
    ds = np.array(dataset)
    expr = np.where(ds == "expr_va", truth_expr, MISSING)
    expr[np.flatnonzero(ds == "expr_va")[::5]] = MISSING  # some unlabelled rows inside a labelled dataset
    au_mask = np.zeros((n, len(AUS)), bool)
    au_mask[np.ix_(ds == "au_a", AU_A)] = True
    au_mask[np.flatnonzero(ds == "au_a")[::4], 8] = False
    # training rows of au_a annotate AUs 0..4 only (AU index 8 appears in test labels only)
    train_au = (ds == "au_a") & (np.array(split) == "train")
    au_mask[train_au] = False
    au_mask[np.ix_(train_au, [0, 1, 2, 3, 4])] = True
    va_mask = ds == "expr_va"
    compound = np.full(n, MISSING)
    cmp_rows = np.flatnonzero(ds == "cmp")
    compound[cmp_rows] = rng.choice([0, 2, 5, 9], len(cmp_rows))
    compound[cmp_rows[::6]] = MISSING
    m = Manifest.from_columns(paths, np.array(dataset, dtype=object), datasets=DATASETS,
                              split=np.array(split, dtype=object), expr=expr, au=truth_au, au_mask=au_mask,
                              va=truth_va, va_mask=va_mask, compound=compound)
    path = root / "manifest.npz"
    m.save(path)
    truth = HiddenTruth(truth_expr, truth_au, truth_va)
    # the hidden truth as SynthFace publishes it: the same rows with every label, beside the manifest
    Manifest.from_columns(paths, np.array(dataset, dtype=object), datasets=DATASETS,
                          split=np.array(split, dtype=object), expr=truth_expr, au=truth_au,
                          au_mask=np.ones_like(au_mask), va=truth_va, va_mask=np.ones(n, bool),
                          compound=compound).save(root / "manifest_full.npz")
    return {"root": root, "manifest": m, "path": path, "truth": truth}


def _reference_outputs(model, root, manifest, rows):
    """Model outputs of ``rows`` through predict's single-image loading (independent of the data pipeline)."""
    u8 = torch.from_numpy(np.stack([load_image(root / manifest.path(int(r)), SIZE) for r in rows]))
    with torch.no_grad():
        out = model(normalize_nhwc(u8, None, None, torch.float32))
    return out[0].double().numpy(), torch.sigmoid(out[1].double()).numpy(), out[2].double().numpy()


def _ref_class(target, pred):
    acc = sum(t == p for t, p in zip(target, pred)) / len(target)
    f1s, recalls = [], []
    for c in sorted(set(target) | set(pred)):
        tp = sum(t == c and p == c for t, p in zip(target, pred))
        fp = sum(t != c and p == c for t, p in zip(target, pred))
        fn = sum(t == c and p != c for t, p in zip(target, pred))
        f1s.append(2 * tp / (2 * tp + fp + fn))
        if tp + fn:
            recalls.append(tp / (tp + fn))
    return acc, sum(f1s) / len(f1s), sum(recalls) / len(recalls)


def _ref_au_f1(probs, target, mask):
    f1 = []
    for j in range(probs.shape[1]):
        tp = fp = fn = 0
        total = 0
        for i in range(probs.shape[0]):
            if mask[i, j]:
                total += 1
                p, t = probs[i, j] >= 0.5, target[i, j] == 1
                tp, fp, fn = tp + (p and t), fp + (p and not t), fn + (t and not p)
        f1.append(math.nan if total == 0 else (2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else 0.0))
    return np.array(f1)


def _ref_ccc(x, y):
    cov = np.mean((x - x.mean()) * (y - y.mean()))
    return 2 * cov / (x.var() + y.var() + (x.mean() - y.mean()) ** 2)


def _ref_compound(s, classes):
    """argmax_j Σ_k s_k log Rs[j,k] + (1 − s_k) log(1 − Rs[j,k]) over the compound ids ``classes``."""
    rs = np.clip(compound_prior().matrix[classes], 0.05, 0.95)
    ll = s @ np.log(rs).T + (1 - s) @ np.log(1 - rs).T
    return [classes[j] for j in ll.argmax(1)]


def test_evaluate_matches_independent_computation(data):
    model = _tiny_model()
    m, root = data["manifest"], data["root"]
    res = evaluate(model, data["path"], root, split="test", batch_size=5, image_size=SIZE, device="cpu",
                   num_workers=0, train_manifest=data["path"], truth_pools={"no_cmp": ["expr_va", "au_a"]})
    # (truth: manifest_full.npz beside the manifest)
    test = np.flatnonzero(m.split_rows("test"))
    z_e, s, v = _reference_outputs(model, root, m, test)
    pred_e = z_e.argmax(1)
    ds = m.dataset[test]
    assert res["rows"] == len(test)
    # each dataset is scored only on the tasks it labels
    assert set(res["datasets"]["expr_va"]) == {"expression", "va"}
    assert set(res["datasets"]["au_a"]) == {"au"}
    assert set(res["datasets"]["cmp"]) == {"compound"}

    sel = (ds == 0) & (m.expr[test] != MISSING)
    acc, f1, uar = _ref_class(m.expr[test][sel].tolist(), pred_e[sel].tolist())
    e = res["datasets"]["expr_va"]["expression"]
    assert e["accuracy"] == pytest.approx(acc) and e["macro_f1"] == pytest.approx(f1)
    assert e["abaw"] == pytest.approx(0.67 * f1 + 0.33 * acc)

    sel = ds == 0
    va = res["datasets"]["expr_va"]["va"]
    assert va["ccc_valence"] == pytest.approx(_ref_ccc(v[sel, 0], m.va[test][sel, 0].astype(np.float64)), abs=1e-6)
    assert va["ccc_arousal"] == pytest.approx(_ref_ccc(v[sel, 1], m.va[test][sel, 1].astype(np.float64)), abs=1e-6)

    sel = ds == 1
    f1 = _ref_au_f1(s[sel], m.au[test][sel], m.au_mask[test][sel])
    au = res["datasets"]["au_a"]["au"]
    got = np.array([np.nan if x is None else x for x in au["per_au_f1"]])
    np.testing.assert_allclose(got, f1, equal_nan=True)
    assert au["mean_f1"] == pytest.approx(np.nanmean(f1))
    assert au["num_annotated_aus"] == len(AU_A)

    classes = [0, 2, 5, 9]  # the compound classes present in the manifest
    assert res["compound_classes"] == [COMPOUNDS[c] for c in classes]
    sel = (ds == 2) & (m.compound[test] != MISSING)
    acc, f1, uar = _ref_class(m.compound[test][sel].tolist(), _ref_compound(s[sel], classes))
    c = res["datasets"]["cmp"]["compound"]
    assert (c["accuracy"], c["macro_f1"], c["uar"]) == pytest.approx((acc, f1, uar))

    # hidden truth: every image on every task; the AUs with no training label
    t = data["truth"]
    acc, f1, _ = _ref_class(t.expr[test].tolist(), pred_e.tolist())
    assert res["truth"][ALL]["expression"]["accuracy"] == pytest.approx(acc)
    full = _ref_au_f1(s, t.au[test], np.ones_like(t.au[test], bool))
    np.testing.assert_allclose(res["truth"][ALL]["au"]["per_au_f1"], full)
    un = res["unlabelled_aus"]
    assert un["aus"] == [AUS[i] for i in NO_LABEL_TRAIN]
    assert un["mean_f1"] == pytest.approx(full[NO_LABEL_TRAIN].mean())
    sel = ds == 1
    part = _ref_au_f1(s[sel], t.au[test][sel], np.ones((sel.sum(), len(AUS)), bool))
    assert un["per_dataset"]["au_a"]["mean_f1"] == pytest.approx(part[NO_LABEL_TRAIN].mean())
    sel = ds != 2  # the pool: every dataset but cmp
    pool = _ref_au_f1(s[sel], t.au[test][sel], np.ones((sel.sum(), len(AUS)), bool))
    assert un["per_pool"]["no_cmp"]["mean_f1"] == pytest.approx(pool[NO_LABEL_TRAIN].mean())
    acc, _, _ = _ref_class(t.expr[test][sel].tolist(), pred_e[sel].tolist())
    assert res["truth"]["no_cmp"]["expression"]["accuracy"] == pytest.approx(acc)
    text = format_report(res)
    assert "expr_va" in text and "no training label" in text
    assert f"on no_cmp: mean F1 {pool[NO_LABEL_TRAIN].mean():.3f}" in text  # the pool's line in the report
    json.dumps(res)  # JSON-able


def test_cli_writes_the_same_result_and_finds_the_training_manifest(data, tmp_path, capsys):
    from fbn_fast.checkpoint import save_checkpoint
    from fbn_fast.config import TrainConfig

    model = _tiny_model()
    ckpt = tmp_path / "step_00000010.pt"
    save_checkpoint(ckpt, model=model, step=10, config=TrainConfig(image_size=SIZE, manifest=str(data["path"]),
                                                                   datasets=["expr_va", "au_a"]).to_dict())
    out = tmp_path / "eval.json"
    assert main([str(ckpt), str(data["path"]), "--json", str(out), "--device", "cpu", "--num-workers", "0",
                 "--batch-size", "8"]) == 0
    printed = capsys.readouterr().out
    got = json.loads(out.read_text())
    ref = evaluate(model, data["path"], data["root"], image_size=SIZE, device="cpu", num_workers=0,
                   train_manifest=data["path"], train_datasets=["expr_va", "au_a"])
    # Batches of 8 (CLI) vs 256 (API): the convolutions and the metric sums see other shapes and run in another
    # order, so floats agree to float32 rounding only (rel 1e-5, abs 1e-6 near 0); counts and decisions exactly.
    assert_same(got["datasets"], json.loads(json.dumps(ref["datasets"])), 1e-5, 1e-6)
    assert_same(got["truth"], json.loads(json.dumps(ref["truth"])), 1e-5, 1e-6)
    assert got["unlabelled_aus"]["aus"] == [AUS[i] for i in NO_LABEL_TRAIN]
    assert got["unlabelled_aus"]["mean_f1"] == pytest.approx(ref["unlabelled_aus"]["mean_f1"], rel=1e-5)
    assert "hidden truth" in printed and "AUs with no training label (12)" in printed
    # eval.json names what its lists hold: classes beside per-class lists and confusions, AUs beside per-AU lists.
    blocks = [tasks for tasks in (*got["datasets"].values(), *got["truth"].values())]
    assert any("expression" in t for t in blocks) and any("au" in t for t in blocks)
    for tasks in blocks:
        if "expression" in tasks:
            assert tasks["expression"]["classes"] == list(EXPRESSIONS)
        if "au" in tasks:
            assert tasks["au"]["aus"] == list(AUS) and len(tasks["au"]["per_au_f1"]) == len(AUS)
        if "compound" in tasks:
            comp = tasks["compound"]
            assert set(comp["classes"]) <= set(COMPOUNDS) and len(comp["classes"]) == len(comp["confusion"])


def test_truth_is_matched_by_path(data, tmp_path):
    """A reordered subset of the published manifest is scored against the right rows of the full truth."""
    m, root = data["manifest"], data["root"]
    rows = np.flatnonzero(m.split_rows("test"))[::-1][::2]
    m.select(rows).save(tmp_path / "subset.npz")
    model = _tiny_model(2)
    res = evaluate(model, tmp_path / "subset.npz", root, image_size=SIZE, device="cpu", num_workers=0,
                   truth=root / "manifest_full.npz", no_label_aus=["AU12", "AU26"])
    z_e, s, _ = _reference_outputs(model, root, m, rows)
    t = data["truth"]
    acc, _, _ = _ref_class(t.expr[rows].tolist(), z_e.argmax(1).tolist())
    assert res["truth"][ALL]["expression"]["accuracy"] == pytest.approx(acc)
    full = _ref_au_f1(s, t.au[rows], np.ones((len(rows), len(AUS)), bool))
    cols = [AUS.index("AU12"), AUS.index("AU26")]
    assert res["unlabelled_aus"]["mean_f1"] == pytest.approx(full[cols].mean())
    other = m.select(rows)
    other.path_blob = other.path_blob.copy()
    other.path_blob[other.path_offsets[0]] = ord("X")  # a path the truth does not know
    with pytest.raises(ValueError, match="no row for manifest row 0"):
        HiddenTruth.for_manifest(other, root / "manifest_full.npz")


def test_unlabelled_aus_reads_train_split_of_chosen_datasets(data):
    assert unlabelled_aus(data["path"]) == [AUS[i] for i in NO_LABEL_TRAIN]
    assert unlabelled_aus(data["path"], split="test") == [a for i, a in enumerate(AUS) if i not in AU_A]
    assert unlabelled_aus(data["path"], datasets=["expr_va"]) == list(AUS)


def test_compound_beta_and_all_classes(data):
    """β adds the parents' log-posteriors; 'all' scores over the 15 classes."""
    model = _tiny_model(1)
    m, root = data["manifest"], data["root"]
    res = evaluate(model, m, root, split="test", datasets=["cmp"], batch_size=64, image_size=SIZE, device="cpu",
                   num_workers=0, compound_classes="all", beta=2.0)
    test = np.flatnonzero(m.split_rows("test") & (m.dataset == 2) & (m.compound != MISSING))
    z_e, s, _ = _reference_outputs(model, root, m, test)
    scorer = CompoundScorer(None, beta=2.0)
    logits = scorer.logits(torch.as_tensor(z_e), torch.logit(torch.as_tensor(s)))
    rs = np.clip(compound_prior().matrix, 0.05, 0.95)
    lp = z_e - np.log(np.exp(z_e).sum(1, keepdims=True))
    from fbn_fast.compound import parent_matrix

    ref = s @ np.log(rs).T + (1 - s) @ np.log(1 - rs).T + 2.0 * lp @ parent_matrix().T
    np.testing.assert_allclose(logits.numpy(), ref, rtol=1e-4, atol=1e-4)
    acc, f1, uar = _ref_class(m.compound[test].tolist(), ref.argmax(1).tolist())
    c = res["datasets"]["cmp"]["compound"]
    assert len(res["compound_classes"]) == 15
    assert (c["accuracy"], c["macro_f1"], c["uar"]) == pytest.approx((acc, f1, uar))


def test_bad_options_name_themselves(data, tmp_path, capsys):
    model = _tiny_model()
    with pytest.raises(ValueError, match="split 'nope'"):
        evaluate(model, data["path"], data["root"], split="nope", device="cpu")
    with pytest.raises(ValueError, match="--compound-classes 'some'"):
        evaluate(model, data["path"], data["root"], compound_classes="some", device="cpu")
    with pytest.raises(ValueError, match="truth_pools"):
        evaluate(model, data["path"], data["root"], truth_pools={"au_a": ["expr_va"]}, device="cpu")
    assert main([str(tmp_path / "missing.pt"), str(data["path"])]) == 2
    assert "checkpoint" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.pt"), str(data["path"]), "--threshold", "1.5"]) == 2
    assert "--threshold" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # parsed where the option is read: argparse names it
        main([str(tmp_path / "missing.pt"), str(data["path"]), "--compound-classes", "1,x"])
    assert "--compound-classes" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.pt"), str(data["path"]), "--batch-size", "0"]) == 2
    assert "--batch-size: must be >= 1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# The ablation's low-label regime (training/run_ablation.py)
RECIPE = Path(__file__).resolve().parent.parent / "training" / "ablation.toml"


def _run_ablation_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "training" / "run_ablation.py"
    spec = importlib.util.spec_from_file_location("run_ablation", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_low_label_manifest_removes_exactly_the_requested_labels(data):
    low_label_manifest = _run_ablation_module().low_label_manifest
    m = data["manifest"]
    # au_a train rows annotate AU indices 0..4 = AUs 1, 2, 4, 5, 6; keep AUs 2 and 5 on 4 of them
    out = low_label_manifest(m, keep_datasets=["expr_va", "au_a"], au_rows={"au_a": 4}, labelled_aus=[2, "AU5"],
                             seed=1)
    train = m.split_rows("train")
    paths = [m.path(i) for i in range(len(m))]
    index = {p: i for i, p in enumerate(paths)}
    src = np.array([index[out.path(i)] for i in range(len(out))])  # the original row of every output row
    # rows: every non-train row is kept unchanged; train rows of dropped datasets are gone; au_a train rows
    # that lost their AU labels had no other label and are gone too
    keep_other = np.flatnonzero(~train)
    assert set(keep_other) <= set(src)
    kept_train = src[train[src]]
    assert set(m.dataset[kept_train]) <= {0, 1}
    assert set(np.flatnonzero(train & (m.dataset == 0))) <= set(kept_train)  # expression rows all kept
    au_train = kept_train[m.dataset[kept_train] == 1]
    assert len(au_train) == 4
    for i, r in enumerate(src):
        for col in ("expr", "va", "va_mask", "compound", "dataset", "split"):
            np.testing.assert_array_equal(getattr(out, col)[i], getattr(m, col)[r])
        if not train[r]:
            np.testing.assert_array_equal(out.au_mask[i], m.au_mask[r])
            np.testing.assert_array_equal(out.au[i], m.au[r])
        elif m.dataset[r] == 1:
            want = np.zeros(len(AUS), bool)
            want[[AUS.index("AU2"), AUS.index("AU5")]] = True
            np.testing.assert_array_equal(out.au_mask[i], m.au_mask[r] & want)
            np.testing.assert_array_equal(out.au[i][want], m.au[r][want])
            assert not out.au[i][~want].any()
        else:
            assert not out.au_mask[i].any()
    assert unlabelled_aus(out) == [a for a in AUS if a not in ("AU2", "AU5")]
    assert out.meta["low_label"]["labelled_aus"] == ["AU2", "AU5"]
    # the same seed draws the same rows; keeping unlabelled rows keeps every train row of the kept datasets
    again = low_label_manifest(m, keep_datasets=["expr_va", "au_a"], au_rows={"au_a": 4}, labelled_aus=[2, 5],
                               seed=1)
    np.testing.assert_array_equal(again.au_mask, out.au_mask)
    full = low_label_manifest(m, keep_datasets=["expr_va", "au_a"], au_rows={"au_a": 4}, drop_unlabelled=False)
    assert int((full.split_rows("train") & (full.dataset == 1)).sum()) == int((train & (m.dataset == 1)).sum())
    assert int(full.au_mask[full.split_rows("train")].any(1).sum()) == 4


def test_low_label_manifest_rejects_bad_requests(data):
    low_label_manifest = _run_ablation_module().low_label_manifest
    m = data["manifest"]
    with pytest.raises(ValueError, match="only 13 AU-labelled rows"):
        low_label_manifest(m, keep_datasets=["au_a"], au_rows={"au_a": 14})
    with pytest.raises(ValueError, match="not in keep_datasets"):
        low_label_manifest(m, keep_datasets=["expr_va"], au_rows={"au_a": 1})
    with pytest.raises(ValueError, match="AU 3"):
        low_label_manifest(m, keep_datasets=["au_a"], au_rows={"au_a": 1}, labelled_aus=[3])
    with pytest.raises(ValueError, match="nope"):
        low_label_manifest(m, keep_datasets=["nope"], au_rows={})


def test_grid_aggregates_seeds_and_checks_targets(tmp_path):
    mod = _run_ablation_module()

    def row(expr, five, uar, au14=0.2, seed=0):
        per_au = dict.fromkeys(AUS, 0.5) | {"AU14": au14, "AU23": 0.3}
        return {"seed": seed, "expr_accuracy": expr, "expr_macro_f1": expr, "va_ccc": 0.9, "au_a_mean_f1": 0.8,
                "au_b_mean_f1": 0.7, "five_aus_mean_f1": five, "all_aus_mean_f1": 0.6, "per_au_f1": per_au,
                "compound": {"accuracy": uar, "macro_f1": uar, "uar": uar},
                "compound_rafdb": {"accuracy": uar + 0.1, "macro_f1": uar + 0.1, "uar": uar + 0.1}}

    chosen = mod.aggregate([row(0.90, 0.40, 0.50, seed=0), row(0.88, 0.44, 0.46, seed=1)])
    none = mod.aggregate([row(0.90, 0.20, 0.30), row(0.90, 0.30, 0.34, seed=1)])
    assert chosen["expr_accuracy"] == pytest.approx(0.89) and chosen["seeds"] == [0, 1]
    assert chosen["five_aus_mean_f1_sd"] == pytest.approx(np.std([0.40, 0.44], ddof=1))
    assert chosen["compound_rafdb_uar"] == pytest.approx(0.58) and chosen["AU14"] == pytest.approx(0.2)
    grid_file = tmp_path / "g.toml"
    grid_file.write_text(f'recipe = "{RECIPE}"\nchosen = "c"\n[targets]\npublished_compound_uar = 0.48\n'
                         '[variants.none]\noptions = { lambda_ca = 0.0 }\n[variants.c]\noptions = {}\n')
    grid = mod.load_grid(grid_file)
    assert [(r, v.name, s) for r, v, s in grid.cells()] == [("low", "none", 0), ("low", "c", 0),
                                                            ("published", "none", 0), ("published", "c", 0)]
    per_regime = tmp_path / "p.toml"
    per_regime.write_text(f'recipe = "{RECIPE}"\n' + 'seeds = [4]\noptions = { lambda_dm = 0.5 }\n[variants.none]\n'
                          'seeds = { published = [0, 1] }\noptions = { lambda_ca = 0.0 }\n[variants.x]\n')
    cells = [(r, v.name, s) for r, v, s in mod.load_grid(per_regime).cells()]
    assert cells == [("low", "x", 4), ("published", "none", 0), ("published", "none", 1), ("published", "x", 4)]
    # the grid's options lie under every variant's own
    assert mod.load_grid(per_regime).variants["none"].options == {"lambda_dm": 0.5, "lambda_ca": 0.0}
    checks = {t["what"]: t["met"] for t in mod.check_targets(grid, {"low": {"c": chosen, "none": none},
                                                                     "published": {"c": chosen, "none": none}})}
    assert checks == {"published labels, c vs none: every metric within one sd or better": True,
                      "published labels, c: zero-shot compound UAR (15 classes)": True,  # 0.48
                      "published labels, c: F1 of AU14": True, "published labels, c: F1 of AU23": True,
                      "low-label, c vs none: mean F1 on the never-labelled AUs": True,  # +0.17
                      "low-label, c vs none: expression accuracy": True}  # -1.0 point exactly
    worse = mod.aggregate([row(0.87, 0.30, 0.30, au14=0.0)])
    checks = {t["what"]: t["met"] for t in mod.check_targets(grid, {"low": {"c": worse, "none": none},
                                                                     "published": {"c": worse, "none": none}})}
    assert [k for k, met in checks.items() if met] == ["published labels, c: F1 of AU23"]
    md = mod.to_markdown({"machine": {"label": "cpu", "description": "2 cores", "torch": "2"}, "date": "d",
                          "grid": "g.toml", "recipe_file": "r.toml", "regimes": {"published": "every label"},
                          "rows": {"published": {"none": none, "c": chosen}}, "chosen": "c",
                          "variants": {"none": {"options": {"lambda_ca": 0.0}}, "c": {"options": {}}},
                          "targets": mod.check_targets(grid, {"published": {"c": chosen, "none": none}})})
    assert "| **c** | recipe | 0,1 | 0.890 ± 0.014 |" in md and "| none | ca=0.0 |" in md and "— met" in md


@pytest.mark.parametrize("text, needle", [
    ("[variants.a]\noptions = { lambda_nope = 1 }\n", "lambda_nope"),
    ("[variants.a]\nregimes = ['huge']\n", "huge"),
    ("baseline = 'a'\nchosen = 'b'\n[variants.a]\n", "chosen = 'b'"),
    ("[variants.a]\n", "baseline = 'none'"),
    ("[variants.a]\nwhat = 1\n", "'what'"),
    ("seeds = [0]\n", "no [variants"),
    ("nonsense = 1\n[variants.none]\n", "'nonsense'"),
    ("[targets]\nuar = 1\n[variants.none]\n", "'uar'"),
    ("[variants.none]\noptions = { lambda_ca = -1.0 }\n", "--lambda-ca"),
    ("[variants.none]\nregimes = ['low']\nseeds = { published = [1] }\n", "seeds for regimes ['published']"),
])
def test_grid_file_errors_name_the_key(tmp_path, text, needle):
    mod = _run_ablation_module()
    path = tmp_path / "bad.toml"
    path.write_text(f'recipe = "{RECIPE}"\n' + text)
    with pytest.raises(ValueError, match="bad.toml") as exc:
        mod.load_grid(path)
    assert needle in str(exc.value)


def test_grid_option_flags_are_train_options():
    mod = _run_ablation_module()
    flags = mod.option_flags({"lambda_dm_ea": 1.0, "relatedness": "data", "channels_last": False, "datasets": ["a"]})
    assert flags == ["--lambda-dm-ea", "1.0", "--relatedness", "data", "--no-channels-last", "--datasets", "a"]
    from fbn_fast.config import parse_args

    cfg = parse_args(flags)
    assert cfg.lambda_dm_ea == 1.0 and cfg.relatedness == "data" and not cfg.channels_last
    # the grid in the repository reads, and every one of its variants is a valid set of options
    grid = mod.load_grid(Path(__file__).resolve().parent.parent / "training" / "coupling_grid.toml")
    for v in grid.variants.values():
        parse_args(mod.option_flags(v.options))


def test_a_cached_cell_counts_options_it_predates_at_their_old_value():
    mod = _run_ablation_module()
    saved = {"lambda_ca": 0.0, "coupling_scarcity_au": 0.0}  # scored before --au-pos-weight existed
    assert mod.trained_options(saved, {**saved, "au_pos_weight": "off"}) == {**saved, "au_pos_weight": "off"}
    assert mod.trained_options(saved, {**saved, "au_pos_weight": "balanced"}) != {**saved, "au_pos_weight": "balanced"}
    assert mod.trained_options(saved, saved) == saved  # an option the grid does not pin is not added
