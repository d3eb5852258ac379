"""The co-training ablation on a SynthFace low-label regime: no coupling, co-annotation, distribution matching, both.

    python training/run_ablation.py [--variants none,ca,dm,both] [--seeds 0,1] [--out training/results] ...

The regime (:func:`low_label_manifest`, recipe ``training/ablation.toml``): expression labels are plentiful
(every training image of ``synth_expr_va`` and ``synth_expr``), AU labels are few — ``--au-images`` (300)
training images of ``synth_au_a`` (a DISFA-like set annotating AUs 1 2 4 5 6 9 12 15 17 20 25 26) — and no
training image carries any label for AUs 7, 10, 14, 23 and 24. No image carries both expression and AU labels,
so the relatedness is the prior table (a data-driven estimate would have nothing to estimate from).

The runs of ``python -m fbn_fast.train`` (one per variant and seed) differ only in the coupling weights, as
multiples of the recipe's λ_ca and λ_dm:

=========  ==========  ==========
variant    λ_ca        λ_dm
=========  ==========  ==========
none       0           0
ca         λ_ca        0
dm         0           λ_dm
both       λ_ca        λ_dm
full       λ_ca        λ_dm       (a reference outside the regime: every training image with all its labels)
=========  ==========  ==========

Each final checkpoint is scored by :func:`fbn_fast.evaluate.evaluate` on the test split of the *published*
SynthFace manifest, against its hidden full truth (``manifest_full.npz``): expression accuracy / macro-F1,
VA CCC, AU F1 per dataset, the mean F1 over the AUs that carry no training label — on the test images of the
five basic-expression datasets, each scored on its true AUs, and apart on the compound-expression faces (a kind
of face no run trains on) — and zero-shot compound accuracy / UAR on ``synth_compound``. The table (means over
seeds, with their spread) goes to ``<out>/ablation_<tag>.md`` and ``.json`` with the machine and the date.
Finished runs are reused (rerunning after an interruption continues where it stopped).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from fbn_fast.data import Manifest, load_manifest  # noqa: E402
from fbn_fast.labels import AUS, MISSING, RAFDB_COMPOUNDS, au_index  # noqa: E402
from fbn_fast.machine import cpu_model  # noqa: E402

#: The four variants: name -> (λ_ca, λ_dm) as multiples of the recipe's λ_ca / λ_dm. ``full`` is a reference
#: outside the regime: both couplings, trained on every SynthFace training image with all its labels.
VARIANTS: dict[str, tuple[float, float]] = {"none": (0.0, 0.0), "ca": (1.0, 0.0), "dm": (0.0, 1.0),
                                            "both": (1.0, 1.0), "full": (1.0, 1.0)}
#: Datasets of the low-label regime: all expression images, a few AU images.
EXPRESSION_DATASETS = ("synth_expr_va", "synth_expr")
AU_DATASET = "synth_au_a"
COMPOUND_DATASET = "synth_compound"
#: The pool the unlabelled AUs are scored on: the test images of every basic-expression dataset (the faces the
#: model was trained on: compound faces are a held-out kind of face, reported apart).
BASIC = "basic expressions"


def low_label_manifest(
    manifest: Manifest,
    *,
    keep_datasets: Sequence[str],
    au_rows: Mapping[str, int],
    labelled_aus: Sequence[str | int] | None = None,
    split: str = "train",
    seed: int = 0,
    drop_unlabelled: bool = True,
) -> Manifest:
    """A low-label copy of ``manifest``'s ``split``; rows of the other splits are kept unchanged.

    In ``split``: rows of datasets outside ``keep_datasets`` are dropped; AU labels survive only on
    ``au_rows[dataset]`` rows of each named dataset (drawn at random with ``seed`` among its rows that carry
    AU labels) and, there, only in the columns ``labelled_aus`` (AU numbers or names; ``None`` keeps every
    annotated column); every other AU annotation of the split is removed (mask cleared, value zeroed).
    Expression, VA and compound labels are untouched. With ``drop_unlabelled``, rows of ``split`` left with no
    label at all are dropped. The result records its recipe in ``meta["low_label"]``.
    """
    if split not in manifest.splits:
        raise ValueError(f"split {split!r} is not among the manifest's splits {list(manifest.splits)}")
    codes = [manifest.dataset_index(d) for d in keep_datasets]
    for d in au_rows:
        if d not in keep_datasets:
            raise ValueError(f"au_rows names dataset {d!r}, which is not in keep_datasets {list(keep_datasets)}")
    cols = np.zeros(len(manifest.aus), bool)
    if labelled_aus is None:
        cols[:] = True
    else:
        cols[[au_index(a) for a in labelled_aus]] = True
    in_split = manifest.split_rows(split)
    keep = ~in_split | np.isin(manifest.dataset, codes)
    chosen = np.zeros(len(manifest), bool)
    rng = np.random.default_rng(seed)
    for d, n in au_rows.items():
        if int(n) < 0:
            raise ValueError(f"au_rows[{d!r}] must be >= 0, got {n}")
        cand = np.flatnonzero(in_split & (manifest.dataset == manifest.dataset_index(d)) & manifest.au_mask.any(1))
        if int(n) > len(cand):
            raise ValueError(f"au_rows[{d!r}] = {n}, but dataset {d!r} has only {len(cand)} AU-labelled rows in "
                             f"split {split!r}")
        chosen[rng.choice(cand, size=int(n), replace=False)] = True
    out = manifest.select(np.arange(len(manifest)))  # a copy
    new_mask = np.where(in_split[:, None], manifest.au_mask & chosen[:, None] & cols[None, :], manifest.au_mask)
    out.au_mask = new_mask
    out.au = np.where(in_split[:, None] & ~new_mask, 0, manifest.au).astype(manifest.au.dtype)
    if drop_unlabelled:
        labelled = out.expr_mask | out.au_mask.any(1) | out.va_mask | (out.compound != MISSING)
        keep &= ~in_split | labelled
    result = out.select(keep)
    result.meta = dict(manifest.meta)
    result.meta["low_label"] = {
        "split": split, "keep_datasets": list(keep_datasets), "au_rows": {k: int(v) for k, v in au_rows.items()},
        "labelled_aus": None if labelled_aus is None else [AUS[i] for i in np.flatnonzero(cols)],
        "seed": int(seed), "drop_unlabelled": bool(drop_unlabelled),
    }
    return result


# ---------------------------------------------------------------------------------------------------- runs
def _recipe_config(recipe: Path, overrides: Mapping[str, Any]):
    from fbn_fast.config import TrainConfig, load_recipe

    values = load_recipe(recipe)
    values.update(overrides)
    cfg = TrainConfig.from_dict(values, where=str(recipe))
    if cfg.steps <= 0:
        raise ValueError(f"{recipe}: the ablation recipe must fix --steps (every variant trains equally long)")
    return cfg


def _train_variant(name: str, lambdas: tuple[float, float], *, recipe: Path, manifest: Path, synth_dir: Path,
                   runs_dir: Path, steps: int, seed: int, extra: Sequence[str], log_file: Path) -> dict[str, Any]:
    """Train one run with ``python -m fbn_fast.train`` (resuming an unfinished one); returns its timing."""
    from fbn_fast.checkpoint import checkpoint_path, latest_checkpoint

    run_dir = runs_dir / name
    final = checkpoint_path(run_dir, steps)
    timing_file = run_dir / "ablation_timing.json"
    if final.is_file():
        print(f"[ablation] {name}: already trained ({final})", flush=True)
        return json.loads(timing_file.read_text()) if timing_file.is_file() else {}
    cmd = [sys.executable, "-m", "fbn_fast.train", "--config", str(recipe), "--manifest", str(manifest),
           "--data-root", str(synth_dir), "--out-dir", str(runs_dir), "--name", name, "--seed", str(seed),
           "--lambda-ca", repr(lambdas[0]), "--lambda-dm", repr(lambdas[1]), "--steps", str(steps), *extra]
    if latest_checkpoint(run_dir) is not None:
        cmd += ["--resume", str(run_dir)]
    print(f"[ablation] {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    with open(log_file, "a") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    seconds = time.perf_counter() - t0
    if rc != 0 or not final.is_file():
        raise RuntimeError(f"training variant {name!r} failed (exit status {rc}); see {log_file}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["images_per_s"] for r in records if r.get("kind") == "train" and r.get("images_per_s")]
    timing = {"train_seconds": round(seconds, 1),
              "images_per_s": round(float(np.median(rates)), 1) if rates else None}
    timing_file.write_text(json.dumps(timing))
    return timing


def _pooled_classification(results: Mapping[str, Any], task: str) -> dict[str, float] | None:
    """Accuracy and macro-F1 of the summed confusion matrices of every dataset scored on ``task``."""
    cms = [np.asarray(r[task]["confusion"], np.float64) for r in results.values() if task in r]
    if not cms:
        return None
    cm = sum(cms)
    tp = np.diag(cm)
    denom = cm.sum(0) + cm.sum(1)
    seen = denom > 0
    return {"accuracy": float(tp.sum() / cm.sum()), "macro_f1": float(np.mean(2 * tp[seen] / denom[seen])),
            "n": int(cm.sum())}


def summarise(result: Mapping[str, Any], rafdb: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The table row of one run from :func:`fbn_fast.evaluate.evaluate`'s result (with the ``basic`` pool) and,
    optionally, the result of the same checkpoint scored over RAF-DB's eleven compound classes only."""
    ds = result["datasets"]
    truth = result.get("truth", {}).get(BASIC, {})
    expr = _pooled_classification(ds, "expression")
    un = result.get("unlabelled_aus", {})
    basic = un.get("per_pool", {}).get(BASIC, {})
    faces = un.get("per_dataset", {}).get(COMPOUND_DATASET, {})
    aus_truth = truth.get("au", {}).get("per_au_f1")
    labelled = [i for i, a in enumerate(AUS) if a not in set(un.get("aus", []))]
    row = {
        "expr_accuracy": expr and expr["accuracy"],
        "expr_macro_f1": expr and expr["macro_f1"],
        "expr_n": expr and expr["n"],
        "va_ccc": ds.get("synth_expr_va", {}).get("va", {}).get("ccc_mean"),
        "au_a_mean_f1": ds.get(AU_DATASET, {}).get("au", {}).get("mean_f1"),
        "au_b_mean_f1": ds.get("synth_au_b", {}).get("au", {}).get("mean_f1"),
        "unlabelled_aus": un.get("aus"),
        "unlabelled_mean_f1": basic.get("mean_f1"),
        "unlabelled_per_au_f1": basic.get("per_au_f1"),
        "unlabelled_mean_f1_compound_faces": faces.get("mean_f1"),
        "unlabelled_mean_f1_all_images": un.get("mean_f1"),
        "labelled_aus_mean_f1_truth": (float(np.mean([aus_truth[i] for i in labelled]))
                                       if aus_truth and labelled else None),
        "compound": _compound(result),
        "compound_rafdb": _compound(rafdb or {}),
    }
    return row


def _compound(result: Mapping[str, Any]) -> dict[str, Any]:
    scores = result.get("datasets", {}).get(COMPOUND_DATASET, {}).get("compound", {})
    return {k: scores.get(k) for k in ("accuracy", "macro_f1", "uar")}


_HEADLINE = ("expr_accuracy", "expr_macro_f1", "va_ccc", "au_a_mean_f1", "au_b_mean_f1", "unlabelled_mean_f1",
             "unlabelled_mean_f1_compound_faces", "unlabelled_mean_f1_all_images", "labelled_aus_mean_f1_truth",
             "train_seconds", "images_per_s")


def aggregate(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean (and standard deviation over seeds, ``<key>_sd``) of the rows of one variant's runs."""
    out: dict[str, Any] = {"seeds": len(runs)}

    def stats(values: list[Any]) -> tuple[float | None, float | None]:
        vals = [float(v) for v in values if v is not None]
        if not vals:
            return None, None
        return float(np.mean(vals)), (float(np.std(vals, ddof=1)) if len(vals) > 1 else None)

    for key in _HEADLINE:
        out[key], out[f"{key}_sd"] = stats([r.get(key) for r in runs])
    aus = runs[0].get("unlabelled_aus") or []
    out["unlabelled_aus"] = aus
    out["unlabelled_per_au_f1"] = {a: stats([(r.get("unlabelled_per_au_f1") or {}).get(a) for r in runs])[0]
                                   for a in aus}
    for part in ("compound", "compound_rafdb"):
        out[part] = {}
        for k in ("accuracy", "macro_f1", "uar"):
            out[part][k], out[part][f"{k}_sd"] = stats([(r.get(part) or {}).get(k) for r in runs])
    return out


def _f(x: Any, d: int = 3) -> str:
    return "–" if x is None else f"{x:.{d}f}"


def _pm(mean: Any, sd: Any, d: int = 3) -> str:
    return _f(mean, d) if sd is None else f"{_f(mean, d)} ± {_f(sd, d)}"


def to_markdown(report: Mapping[str, Any]) -> str:
    """The ablation table (and the targets) as Markdown."""
    rows = report["variants"]
    lam_ca, lam_dm = report["lambdas"]
    un = next((r["unlabelled_aus"] for r in rows.values() if r.get("unlabelled_aus")), []) or []
    head = ["variant", "λ_ca", "λ_dm", "expr acc", "expr F1", "VA CCC", "AU F1 (au_a)", "AU F1 (au_b)",
            "**F1, unlabelled AUs**", *[a.replace("AU", "AU ") for a in un], "same, compound faces",
            "compound acc", "compound UAR", "compound UAR (RAF-DB 11)", "train s"]
    seeds = report["seeds"]
    lines = [f"# Co-training ablation on a SynthFace low-label regime ({report['machine']['label']})", "",
             f"Measured {report['date']} on {report['machine']['description']}; torch {report['machine']['torch']}; "
             f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''} per variant ({', '.join(map(str, seeds))})"
             f"{', mean ± standard deviation' if len(seeds) > 1 else ''}.",
             "", report["regime"], "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        a, b = VARIANTS[name]
        cells = [name if name != "full" else "full labels (reference)", _f(a * lam_ca, 1), _f(b * lam_dm, 1),
                 _pm(r["expr_accuracy"], r["expr_accuracy_sd"]), _f(r["expr_macro_f1"]), _f(r["va_ccc"]),
                 _f(r["au_a_mean_f1"]), _f(r["au_b_mean_f1"]),
                 f"**{_pm(r['unlabelled_mean_f1'], r['unlabelled_mean_f1_sd'])}**",
                 *[_f(r["unlabelled_per_au_f1"].get(a)) for a in un], _f(r["unlabelled_mean_f1_compound_faces"]),
                 _f(r["compound"]["accuracy"]), _pm(r["compound"]["uar"], r["compound"]["uar_sd"]),
                 _pm(r["compound_rafdb"]["uar"], r["compound_rafdb"]["uar_sd"]), _f(r.get("train_seconds"), 0)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Columns: expression accuracy / macro-F1 over the expression-labelled test sets (synth_expr_va and "
              "synth_expr pooled); VA CCC on synth_expr_va; mean AU F1 on the test sets of synth_au_a (its 12 AUs, "
              "all labelled in training) and synth_au_b (BP4D-like AUs, five of them never labelled in training); "
              "mean F1 on the AUs with no training label over the test images of the five basic-expression "
              "datasets, each scored on its hidden true AUs (the columns after it: per AU, then the same mean on "
              "the compound-expression faces, a kind of face never trained on); zero-shot compound accuracy / UAR "
              "on synth_compound "
              f"({report['compound_classes']} classes, β = 0), and its UAR over RAF-DB's {len(RAFDB_COMPOUNDS)} "
              "compound classes only (the paper's protocol: their faces, a softmax over those classes); training "
              "wall time per run in seconds (times vary with the other jobs the machine had)."]
    if "full" in rows:
        lines.append("The reference row is outside the regime: both couplings, every SynthFace training image with "
                     "all its labels (no AU is unlabelled there; its unlabelled-AU columns score the same AUs).")
    lines.append("")
    t = report.get("targets")
    if t:
        lines.append("Targets:")
        for item in t:
            lines.append(f"- {item['what']}: {item['value']} (target {item['target']}) — "
                         f"{'met' if item['met'] else 'missed'}")
    return "\n".join(lines) + "\n"


def targets(rows: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, evaluated on the measured rows (means over seeds)."""
    out = []
    if "both" in rows and "none" in rows:
        b, n = rows["both"], rows["none"]
        if b["unlabelled_mean_f1"] is not None and n["unlabelled_mean_f1"] is not None:
            gain = b["unlabelled_mean_f1"] - n["unlabelled_mean_f1"]
            out.append({"what": "both vs none, mean F1 on the unlabelled AUs", "value": f"{gain:+.3f}",
                        "target": ">= +0.15", "met": gain >= 0.15 - 1e-9})
        if b["expr_accuracy"] is not None and n["expr_accuracy"] is not None:
            diff = 100 * (b["expr_accuracy"] - n["expr_accuracy"])
            out.append({"what": "both vs none, expression accuracy", "value": f"{diff:+.2f} points",
                        "target": ">= -1 point", "met": diff >= -1.0 - 1e-9})
    for name in ("both", "full"):
        for part, classes in (("compound", "all classes"), ("compound_rafdb", "RAF-DB's 11 classes")):
            uar = rows[name][part]["uar"] if name in rows and rows[name].get(part) else None
            if uar is not None:
                out.append({"what": f"zero-shot compound UAR, {classes} ({name})", "value": f"{uar:.3f}",
                            "target": ">= 0.48", "met": uar >= 0.48 - 1e-9})
    return out


def machine_info(label: str) -> dict[str, Any]:
    import torch

    return {"label": label, "description": f"{os.cpu_count()} CPU cores ({cpu_model()}), no GPU used",
            "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python training/run_ablation.py",
        description="Co-training ablation on a SynthFace low-label regime: trains none / ca / dm / both (and "
                    "optionally the full-label reference) and writes the results table (JSON + Markdown). Options "
                    "after '--' go to python -m fbn_fast.train.")
    p.add_argument("--config", default=str(REPO / "training" / "ablation.toml"), help="training recipe")
    p.add_argument("--out", default=str(REPO / "training" / "results"), help="folder of the results table")
    p.add_argument("--tag", default="cpu", help="results are written to <out>/ablation_<tag>.json/.md")
    p.add_argument("--runs-dir", default=None, help="run folders (default: the recipe's out_dir)")
    p.add_argument("--synth-dir", default=None, help="SynthFace folder (default: the trainer's cache)")
    p.add_argument("--variants", default="none,ca,dm,both",
                   help="comma-separated subset of none,ca,dm,both,full (full: the full-label reference)")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds; each variant runs once per seed")
    p.add_argument("--au-images", type=int, default=300, help=f"training images of {AU_DATASET} keeping AU labels")
    p.add_argument("--labelled-aus", default=None,
                   help=f"comma-separated AUs kept on those images (default: all that {AU_DATASET} annotates)")
    p.add_argument("--regime-seed", type=int, default=0, help="seed of the draw of the AU-labelled images")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: the recipe's)")
    p.add_argument("--device", default="cpu", help="device for the final evaluation (default: cpu)")
    p.add_argument("--skip-train", action="store_true", help="only evaluate runs that are already trained")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    from fbn_fast.checkpoint import checkpoint_path, load_model
    from fbn_fast.data.synthface import default_synth_dir, ensure_synthface
    from fbn_fast.evaluate import evaluate, format_report, unlabelled_aus

    try:
        names = [v for v in args.variants.split(",") if v]
        unknown = [v for v in names if v not in VARIANTS]
        if unknown or not names:
            raise ValueError(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
        try:
            seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--seeds {args.seeds!r}: expected comma-separated integers") from None
        if not seeds:
            raise ValueError("--seeds: give at least one seed")
        if args.au_images < 1:
            raise ValueError(f"--au-images must be >= 1, got {args.au_images}")
        recipe = Path(args.config)
        cfg = _recipe_config(recipe, {"steps": args.steps} if args.steps else {})
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    synth_dir = Path(args.synth_dir) if args.synth_dir else default_synth_dir(cfg)
    runs_dir = Path(args.runs_dir or cfg.out_dir)
    if not runs_dir.is_absolute():
        runs_dir = REPO / runs_dir
    runs_dir.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    published = ensure_synthface(synth_dir, size=cfg.synth_size, seed=cfg.synth_seed,
                                 image_size=cfg.synth_image_size)
    print(f"[ablation] SynthFace in {synth_dir} ({time.perf_counter() - t0:.0f} s)", flush=True)
    labelled = None if args.labelled_aus is None else [a.strip() for a in args.labelled_aus.split(",") if a.strip()]
    low = low_label_manifest(load_manifest(published), keep_datasets=[*EXPRESSION_DATASETS, AU_DATASET],
                             au_rows={AU_DATASET: args.au_images}, labelled_aus=labelled, seed=args.regime_seed)
    low_path = runs_dir / "lowlabel_manifest.npz"
    low.save(low_path)
    no_label = unlabelled_aus(low)
    basic_datasets = [d for d in low.datasets if d != COMPOUND_DATASET]
    shown = recipe.resolve().relative_to(REPO) if recipe.resolve().is_relative_to(REPO) else recipe
    trunk_opts = f" {json.dumps(cfg.trunk_kwargs)}" if cfg.trunk_kwargs else ""
    regime = (f"Regime: training split = every image of {', '.join(EXPRESSION_DATASETS)} (expression labels; VA "
              f"on synth_expr_va) + {args.au_images} images of {AU_DATASET} with AU labels "
              f"({'all its AUs' if labelled is None else ', '.join(labelled)}); no training label at all for "
              f"{', '.join(no_label)}. SynthFace {cfg.synth_size} (seed {cfg.synth_seed}, {cfg.synth_image_size} px), "
              f"trunk {cfg.trunk}{trunk_opts} at {cfg.image_size} px, {cfg.steps} steps of "
              f"{cfg.batch_size} images, relatedness {cfg.relatedness}, T = {cfg.temperature}, recipe {shown}.")
    print(f"[ablation] {regime}", flush=True)

    rows: dict[str, Any] = {}
    runs: dict[str, Any] = {}
    for name in names:
        per_seed = []
        for seed in seeds:
            run = f"{name}-s{seed}"
            lambdas = (VARIANTS[name][0] * cfg.lambda_ca, VARIANTS[name][1] * cfg.lambda_dm)
            # the reference trains on the published manifest: every dataset with a train split, every label
            manifest, more = (published, ["--datasets", "--ratios"]) if name == "full" else (low_path, [])
            timing_file = runs_dir / run / "ablation_timing.json"
            timing = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
            if not args.skip_train:
                timing = _train_variant(run, lambdas, recipe=recipe, manifest=manifest, synth_dir=synth_dir,
                                        runs_dir=runs_dir, steps=cfg.steps, seed=seed, extra=[*more, *extra],
                                        log_file=runs_dir / f"{run}.log")
            ckpt = checkpoint_path(runs_dir / run, cfg.steps)
            if not ckpt.is_file():
                print(f"error: run {run!r} has no final checkpoint {ckpt}", file=sys.stderr)
                return 1
            model, _, _ = load_model(ckpt, map_location=args.device)
            result = evaluate(model, published, synth_dir, split="test", batch_size=cfg.eval_batch_size,
                              image_size=cfg.image_size, device=args.device, num_workers=cfg.num_workers,
                              no_label_aus=no_label, truth_pools={BASIC: basic_datasets})
            print(f"[ablation] {run}:\n{format_report(result)}", flush=True)
            # The paper's zero-shot figure is a UAR over RAF-DB's eleven compound classes: score those apart.
            rafdb = evaluate(model, published, synth_dir, split="test", batch_size=cfg.eval_batch_size,
                             image_size=cfg.image_size, device=args.device, num_workers=cfg.num_workers,
                             datasets=[COMPOUND_DATASET], compound_classes=list(range(len(RAFDB_COMPOUNDS))))
            row = {**summarise(result, rafdb), **timing}
            per_seed.append(row)
            runs[run] = {"row": row, "evaluation": result}
        rows[name] = aggregate(per_seed)
    report = {
        "date": _dt.date.today().isoformat(),
        "machine": machine_info(args.tag),
        "regime": regime,
        "seeds": seeds,
        "lambdas": [cfg.lambda_ca, cfg.lambda_dm],
        "recipe": cfg.to_dict(),
        "low_label": low.meta["low_label"],
        "compound_classes": len(next(iter(runs.values()))["evaluation"]["compound_classes"]),
        "variants": rows,
        "targets": targets(rows),
        "runs": runs,
    }
    (out_dir / f"ablation_{args.tag}.json").write_text(json.dumps(report, indent=1))
    (out_dir / f"ablation_{args.tag}.md").write_text(to_markdown(report))
    print(to_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
