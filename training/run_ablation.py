"""The coupling grid: which co-training couplings help, in which label regime, and by how much.

    python training/run_ablation.py [--grid training/coupling_grid.toml] [--jobs 2] [--only REGEX] ...

A grid file (``training/coupling_grid.toml``) names the training recipe, the regimes, the seeds and the
variants: each variant is a set of ``python -m fbn_fast.train`` options (the coupling weights, per direction
or per group, and the remedies of docs/method.md §7), optionally with its own seeds and regimes. Every
(regime, variant, seed) cell is one run of the recipe; the runs differ only in those options.

Regimes:

``low``        the low-label regime (:func:`low_label_manifest`): every training image of ``synth_expr_va``
               and ``synth_expr`` (expression labels), ``--au-images`` (300) training images of
               ``synth_au_a`` with AU labels, and no training label at all for AUs 7, 10, 14, 23 and 24.
``published``  the published SynthFace manifest: every dataset with a train split, every label it publishes
               (heterogeneous: each dataset labels some tasks; ``synth_all`` labels all of them).

Each final checkpoint is scored by :func:`fbn_fast.evaluate.evaluate` on the test split of the *published*
manifest, against SynthFace's hidden full truth: expression accuracy / macro-F1, VA CCC, AU F1 per dataset,
F1 per AU against the true AUs of every basic-expression test face, the mean F1 over the five AUs the low
regime never labels, and zero-shot compound accuracy / UAR on ``synth_compound`` (all 15 classes, and RAF-DB's
11 apart). The table (means over seeds, with their standard deviation) goes to ``<out>/<grid>_<tag>.md`` and
``.json`` with the machine and the date, and the targets of the grid file are checked on it. Finished runs
(and their scores) are reused: rerunning after an interruption continues where it stopped.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from fbn_fast.data import Manifest, load_manifest  # noqa: E402
from fbn_fast.labels import AUS, MISSING, RAFDB_COMPOUNDS, au_index  # noqa: E402
from fbn_fast.machine import cpu_model  # noqa: E402

REGIMES: tuple[str, ...] = ("low", "published")
#: The targets a grid file may set, and what each bounds (see :func:`check_targets`).
TARGETS: dict[str, str] = {
    "published_compound_uar": "zero-shot compound UAR (15 classes) of the chosen variant, published labels",
    "low_five_au_gain": "mean F1 gain on the never-labelled AUs over the baseline, low regime",
    "low_expr_drop_points": "expression accuracy lost at most, in points, low regime",
}
#: Datasets of the low-label regime: all expression images, a few AU images.
EXPRESSION_DATASETS = ("synth_expr_va", "synth_expr")
AU_DATASET = "synth_au_a"
COMPOUND_DATASET = "synth_compound"
#: The pool the per-AU F1 is scored on: the test images of every basic-expression dataset (the faces the
#: model was trained on: compound faces are a held-out kind of face, reported apart).
BASIC = "basic expressions"
#: The same on the compound-expression test faces (a kind of face no run trains on).
COMPOUND_FACES = "compound faces"
#: AUs reported on their own: the two that the prior table barely relates to any expression.
WATCHED_AUS = ("AU14", "AU23")


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


# ---------------------------------------------------------------------------------------------------- the grid
@dataclass(frozen=True)
class Variant:
    """One row of the grid: training options (``TrainConfig`` field names) and where it runs."""

    name: str
    options: dict[str, Any]
    seeds: dict[str, tuple[int, ...]]  # per regime
    regimes: tuple[str, ...]
    about: str = ""
    own: dict[str, Any] = field(default_factory=dict)  # the options the variant itself sets (the table shows them)


@dataclass(frozen=True)
class Grid:
    """A grid file: the recipe, the variants (in file order), the baselines and the chosen coupling."""

    path: Path
    recipe: Path
    variants: dict[str, Variant]
    baseline: tuple[str, ...] = ("none",)  # the chosen variant is held to each
    chosen: str | None = None
    targets: dict[str, float] = field(default_factory=dict)

    def cells(self) -> list[tuple[str, Variant, int]]:
        return [(regime, v, seed) for regime in REGIMES for v in self.variants.values() if regime in v.regimes
                for seed in v.seeds[regime]]


def load_grid(path: str | os.PathLike) -> Grid:
    """Read a grid file; every error names the file and the key."""
    from fbn_fast.config import TrainConfig

    path = Path(path).resolve()
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: {exc}") from exc
    known = TrainConfig.fields()
    unknown = sorted(set(raw) - {"recipe", "regimes", "seeds", "baseline", "chosen", "options", "targets",
                                 "variants"})
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}")
    unknown = sorted(set(raw.get("targets", {})) - set(TARGETS))
    if unknown:
        raise ValueError(f"{path}: [targets] has unknown key(s) {unknown}; known: {list(TARGETS)}")
    base = dict(raw.get("options", {}))  # under every variant's own options
    wrong = sorted(set(base) - set(known))
    if wrong:
        raise ValueError(f"{path}: options {wrong} are not training options")
    seeds = tuple(int(s) for s in raw.get("seeds", [0]))
    regimes = tuple(raw.get("regimes", REGIMES))
    bad = [r for r in regimes if r not in REGIMES]
    if bad:
        raise ValueError(f"{path}: regimes {bad} unknown; choose from {list(REGIMES)}")
    variants: dict[str, Variant] = {}
    for name, spec in raw.get("variants", {}).items():
        where = f"{path}: [variants.{name}]"
        unknown = sorted(set(spec) - {"options", "seeds", "regimes", "about"})
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}")
        options = dict(spec.get("options", {}))
        wrong = sorted(set(options) - set(known))
        if wrong:
            raise ValueError(f"{where}: options {wrong} are not training options")
        v_regimes = tuple(spec.get("regimes", regimes))
        if any(r not in REGIMES for r in v_regimes):
            raise ValueError(f"{where}: regimes {list(v_regimes)}: choose from {list(REGIMES)}")
        variants[name] = Variant(name, {**base, **options}, _seeds(spec.get("seeds", seeds), v_regimes, where),
                                 v_regimes, spec.get("about", ""), own=options)
    if not variants:
        raise ValueError(f"{path}: no [variants.<name>] table")
    baseline = raw.get("baseline", "none")
    baseline = (baseline,) if isinstance(baseline, str) else tuple(baseline)
    chosen = raw.get("chosen")
    for key, name in (*(("baseline", b) for b in baseline), ("chosen", chosen)):
        if name is not None and name not in variants:
            raise ValueError(f"{path}: {key} = {name!r} is not a variant ({list(variants)})")
    recipe = (path.parent / raw.get("recipe", "ablation.toml")).resolve()
    for v in variants.values():  # a bad value fails here, not in the middle of the grid
        try:
            _recipe_config(recipe, v.options)
        except ValueError as exc:
            raise ValueError(f"{path}: [variants.{v.name}]: {exc}") from None
    return Grid(path, recipe, variants, baseline, chosen, {k: float(v) for k, v in raw.get("targets", {}).items()})


def trained_options(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> dict[str, Any]:
    """The options a cached cell trained with: those it saved, plus the values of options it predates
    (:data:`fbn_fast.config.SAVED_BEFORE`) where the grid now pins them."""
    from fbn_fast.config import saved_values

    return {k: v for k, v in saved_values(saved).items() if k in saved or k in wanted}


def _seeds(value: Any, regimes: Sequence[str], where: str) -> dict[str, tuple[int, ...]]:
    """A variant's seeds per regime: one list for every regime, or a table ``{regime = [seeds]}``."""
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(regimes))
        if unknown:
            raise ValueError(f"{where}: seeds for regimes {unknown} it does not run in ({list(regimes)})")
        return {r: tuple(int(x) for x in value.get(r, ())) for r in regimes}
    return {r: tuple(int(x) for x in value) for r in regimes}


def option_flags(options: Mapping[str, Any]) -> list[str]:
    """``python -m fbn_fast.train`` flags of a variant's options."""
    from fbn_fast.config import TrainConfig

    flags: list[str] = []
    for key, value in options.items():
        opt = TrainConfig.option(key)
        if isinstance(value, bool):
            flags.append(opt if value else "--no-" + opt[2:])
        elif isinstance(value, (list, tuple)):
            flags += [opt, *map(str, value)]
        elif isinstance(value, dict):
            flags += [opt, json.dumps(value)]
        else:
            flags += [opt, str(value)]
    return flags


def _recipe_config(recipe: Path, overrides: Mapping[str, Any]):
    from fbn_fast.config import TrainConfig, load_recipe

    values = load_recipe(recipe)
    values.update(overrides)
    cfg = TrainConfig.from_dict(values, where=str(recipe))
    if cfg.steps <= 0:
        raise ValueError(f"{recipe}: the grid's recipe must fix --steps (every cell trains equally long)")
    return cfg


@dataclass(frozen=True)
class Job:
    """One cell of the grid, as a picklable job for a worker process."""

    run: str
    regime: str
    options: dict[str, Any]
    seed: int
    recipe: Path
    manifest: Path
    published: Path
    synth_dir: Path
    runs_dir: Path
    steps: int
    image_size: int
    eval_batch_size: int
    threads: int
    five: tuple[str, ...]
    basic_datasets: tuple[str, ...]
    extra: tuple[str, ...]
    eval_device: str
    train: bool


def run_cell(job: Job) -> dict[str, Any]:
    """Train one cell with ``python -m fbn_fast.train`` (resuming an unfinished run), score its final
    checkpoint, cache the row in the run folder and return it."""
    import torch

    from fbn_fast.checkpoint import checkpoint_path, latest_checkpoint, load_model
    from fbn_fast.evaluate import evaluate

    torch.set_num_threads(job.threads)
    run_dir = job.runs_dir / job.run
    row_file = run_dir / "grid_row.json"
    final = checkpoint_path(run_dir, job.steps)
    if row_file.is_file() and final.is_file():
        row = json.loads(row_file.read_text())
        if trained_options(row.get("options", job.options), job.options) == job.options:
            return row
        print(f"[grid] {job.run}: its options changed since it was scored; scoring it again is not enough: "
              f"remove {run_dir} to retrain it", file=sys.stderr, flush=True)
        raise RuntimeError(f"{job.run}: trained with {row.get('options')}, the grid now says {job.options}")
    timing: dict[str, Any] = {}
    if not final.is_file():
        if not job.train:
            raise RuntimeError(f"run {job.run!r} has no final checkpoint {final} (and --skip-train was given)")
        more = ["--datasets", "--ratios"] if job.regime == "published" else []  # every dataset, by size
        cmd = [sys.executable, "-m", "fbn_fast.train", "--config", str(job.recipe), "--manifest", str(job.manifest),
               "--data-root", str(job.synth_dir), "--out-dir", str(job.runs_dir), "--name", job.run,
               "--seed", str(job.seed), "--steps", str(job.steps), "--num-threads", str(job.threads), *more,
               *option_flags(job.options), *job.extra]
        if latest_checkpoint(run_dir) is not None:
            cmd += ["--resume", str(run_dir)]
        print(f"[grid] {job.run}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        with open(job.runs_dir / f"{job.run}.log", "a") as log:
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        if rc != 0 or not final.is_file():
            raise RuntimeError(f"training {job.run!r} failed (exit status {rc}); see {job.runs_dir / job.run}.log")
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        rates = [r["images_per_s"] for r in records if r.get("kind") == "train" and r.get("images_per_s")]
        timing = {"train_seconds": round(time.perf_counter() - t0, 1),
                  "images_per_s": round(float(np.median(rates)), 1) if rates else None}
    model, _, _ = load_model(final, map_location=job.eval_device)
    common = dict(split="test", batch_size=job.eval_batch_size, image_size=job.image_size, device=job.eval_device,
                  num_workers=1)
    result = evaluate(model, job.published, job.synth_dir, no_label_aus=list(job.five),
                      truth_pools={BASIC: list(job.basic_datasets), COMPOUND_FACES: [COMPOUND_DATASET]}, **common)
    # The paper's zero-shot figure is a UAR over RAF-DB's eleven compound classes: score those apart.
    rafdb = evaluate(model, job.published, job.synth_dir, datasets=[COMPOUND_DATASET],
                     compound_classes=list(range(len(RAFDB_COMPOUNDS))), **common)
    row = {**summarise(result, rafdb), **timing, "run": job.run, "seed": job.seed, "options": job.options}
    row_file.write_text(json.dumps(row, indent=1))
    print(f"[grid] {job.run}: expr {row['expr_accuracy']:.3f}  five-AU F1 {row['five_aus_mean_f1']:.3f}  "
          f"compound UAR {row['compound']['uar']:.3f}", flush=True)
    return row


# ---------------------------------------------------------------------------------------------------- scores
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
    """The table row of one run from :func:`fbn_fast.evaluate.evaluate`'s result (with the ``basic`` pool and
    the five AUs as ``no_label_aus``) and, optionally, the same checkpoint scored over RAF-DB's eleven compound
    classes only."""
    ds = result["datasets"]
    truth = result.get("truth", {}).get(BASIC, {})
    expr = _pooled_classification(ds, "expression")
    un = result.get("unlabelled_aus", {})
    basic = un.get("per_pool", {}).get(BASIC, {})
    faces = un.get("per_dataset", {}).get(COMPOUND_DATASET, {})
    per_au = truth.get("au", {}).get("per_au_f1")
    on_compound = result.get("truth", {}).get(COMPOUND_FACES, {}).get("au", {}).get("per_au_f1")
    return {
        "expr_accuracy": expr and expr["accuracy"],
        "expr_macro_f1": expr and expr["macro_f1"],
        "va_ccc": ds.get("synth_expr_va", {}).get("va", {}).get("ccc_mean"),
        "au_a_mean_f1": ds.get(AU_DATASET, {}).get("au", {}).get("mean_f1"),
        "au_b_mean_f1": ds.get("synth_au_b", {}).get("au", {}).get("mean_f1"),
        "five_aus": un.get("aus"),
        "five_aus_mean_f1": basic.get("mean_f1"),
        "five_aus_mean_f1_compound_faces": faces.get("mean_f1"),
        "all_aus_mean_f1": float(np.mean(per_au)) if per_au else None,
        "per_au_f1": dict(zip(AUS, per_au)) if per_au else {},
        "all_aus_mean_f1_compound_faces": float(np.mean(on_compound)) if on_compound else None,
        "compound": _compound(result),
        "compound_rafdb": _compound(rafdb or {}),
    }


def _compound(result: Mapping[str, Any]) -> dict[str, Any]:
    scores = result.get("datasets", {}).get(COMPOUND_DATASET, {}).get("compound", {})
    return {k: scores.get(k) for k in ("accuracy", "macro_f1", "uar")}


#: The reported metrics of a row: key -> (column, how to read it from a row).
METRICS: dict[str, str] = {
    "expr_accuracy": "expr acc", "expr_macro_f1": "expr F1", "va_ccc": "VA CCC", "au_a_mean_f1": "AU F1 (au_a)",
    "au_b_mean_f1": "AU F1 (au_b)", "five_aus_mean_f1": "F1, AUs 7 10 14 23 24", "AU14": "AU 14", "AU23": "AU 23",
    "all_aus_mean_f1": "F1, all 17 AUs", "all_aus_mean_f1_compound_faces": "same, compound faces",
    "compound_uar": "compound UAR (15)", "compound_rafdb_uar": "UAR (RAF-DB 11)",
}


def metric(row: Mapping[str, Any], key: str) -> float | None:
    if key in WATCHED_AUS:
        return (row.get("per_au_f1") or {}).get(key)
    if key.startswith("compound"):
        part = "compound_rafdb" if key.startswith("compound_rafdb") else "compound"
        return (row.get(part) or {}).get("uar")
    return row.get(key)


def aggregate(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation over seeds (``<key>_sd``, ``None`` with one seed) of every metric."""
    out: dict[str, Any] = {"seeds": [r.get("seed") for r in runs]}
    for key in (*METRICS, "train_seconds"):
        vals = [float(v) for v in (metric(r, key) for r in runs) if v is not None]
        out[key] = float(np.mean(vals)) if vals else None
        out[f"{key}_sd"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
    return out


def _f(x: Any, d: int = 3) -> str:
    return "–" if x is None else f"{x:.{d}f}"


def _pm(mean: Any, sd: Any, d: int = 3) -> str:
    return _f(mean, d) if sd is None else f"{_f(mean, d)} ± {_f(sd, d)}"


def _describe(options: Mapping[str, Any]) -> str:
    return ", ".join(f"{k.removeprefix('lambda_')}={v}" for k, v in options.items()) or "recipe"


def check_targets(grid: Grid, rows: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """The grid's targets for its chosen variant against each baseline, on the measured rows (means over seeds).

    Published labels: no reported metric below the baseline's by more than one standard deviation (the larger
    of the two), compound UAR (15 classes) >= ``published_compound_uar``, every watched AU above F1 0.
    Low-label regime: mean F1 on the five AUs up by >= ``low_five_au_gain``, expression accuracy down by at
    most ``low_expr_drop_points``.
    """
    out: list[dict[str, Any]] = []
    name = grid.chosen
    if name is None:
        return out
    t = grid.targets

    def add(what: str, value: str, target: str, met: bool) -> None:
        out.append({"what": what, "value": value, "target": target, "met": bool(met)})

    pub = rows.get("published", {})
    for base in grid.baseline:
        if name not in pub or base not in pub:
            continue
        c, b = pub[name], pub[base]
        worse = []
        for key, col in METRICS.items():
            if c[key] is None or b[key] is None:
                continue
            sd = max(c[f"{key}_sd"] or 0.0, b[f"{key}_sd"] or 0.0)
            if c[key] < b[key] - sd - 1e-12:
                worse.append(f"{col} {c[key]:.3f} < {b[key]:.3f} - {sd:.3f}")
        add(f"published labels, {name} vs {base}: every metric within one sd or better",
            "; ".join(worse) or "no metric worse", "none worse", not worse)
    if name in pub:
        c = pub[name]
        if "published_compound_uar" in t and c["compound_uar"] is not None:
            add(f"published labels, {name}: zero-shot compound UAR (15 classes)", f"{c['compound_uar']:.3f}",
                f">= {t['published_compound_uar']}", c["compound_uar"] >= t["published_compound_uar"] - 1e-12)
        for au in WATCHED_AUS:
            if c[au] is not None:
                add(f"published labels, {name}: F1 of {au}", f"{c[au]:.3f}", "> 0", c[au] > 0)
    low = rows.get("low", {})
    for base in grid.baseline:
        if name not in low or base not in low:
            continue
        c, b = low[name], low[base]
        if c["five_aus_mean_f1"] is not None and b["five_aus_mean_f1"] is not None:
            gain = c["five_aus_mean_f1"] - b["five_aus_mean_f1"]
            want = t.get("low_five_au_gain", 0.15)
            add(f"low-label, {name} vs {base}: mean F1 on the never-labelled AUs", f"{gain:+.3f}", f">= +{want}",
                gain >= want - 1e-12)
        if c["expr_accuracy"] is not None and b["expr_accuracy"] is not None:
            drop = 100 * (c["expr_accuracy"] - b["expr_accuracy"])
            want = t.get("low_expr_drop_points", 1.0)
            add(f"low-label, {name} vs {base}: expression accuracy", f"{drop:+.2f} points", f">= -{want} point",
                drop >= -want - 1e-9)
    return out


def to_markdown(report: Mapping[str, Any]) -> str:
    """The grid tables (one per regime) and the targets as Markdown."""
    lines = [f"# Coupling grid on SynthFace ({report['machine']['label']})", "",
             f"Measured {report['date']} on {report['machine']['description']}; torch {report['machine']['torch']}; "
             f"grid `{report['grid']}`, recipe `{report['recipe_file']}`. Cells: mean ± standard deviation over "
             "the seeds listed (no ± with one seed).", ""]
    for regime, about in report["regimes"].items():
        rows = report["rows"].get(regime)
        if not rows:
            continue
        lines += [f"## {regime}", "", about, "",
                  "| variant | options | seeds | " + " | ".join(METRICS.values()) + " | train s |",
                  "|" + "---|" * (len(METRICS) + 4)]
        for name, r in rows.items():
            opts = report["variants"][name]["options"]
            cells = [f"**{name}**" if name == report.get("chosen") else name, _describe(opts),
                     ",".join(map(str, r["seeds"])),
                     *[_pm(r[k], r[f"{k}_sd"]) for k in METRICS], _f(r.get("train_seconds"), 0)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Columns: expression accuracy / macro-F1 over the expression-labelled test sets (synth_expr_va and "
              "synth_expr pooled); VA CCC on synth_expr_va; mean AU F1 on the test sets of synth_au_a and "
              "synth_au_b (their own labels); F1 against the hidden true AUs of every basic-expression test face: "
              "mean over AUs 7, 10, 14, 23 and 24 (never labelled in the low regime), AU 14, AU 23, mean over all "
              "17, and the same mean on the compound-expression test faces (never trained on); zero-shot "
              "compound UAR on synth_compound, all 15 classes (β = 0) and RAF-DB's 11 (the paper's protocol); "
              "training wall time per run in seconds (it varies with the other jobs the machine ran).",
              ""]
    scales = report.get("chosen_scales")
    if scales:
        lines += [f"The chosen coupling `{report['chosen']}` scales the couplings into the AUs / into the "
                  "expressions by " + ", ".join(f"{v['scales']['au']:.3f} / {v['scales']['expression']:.3f} "
                                                 f"({r})" for r, v in scales.items())
                  + " (label counts in the JSON).", ""]
    variants = report["variants"]
    notes = [f"- `{n}`: {v['about']}" for n, v in variants.items() if v.get("about")]
    if notes:
        lines += ["Variants:", *notes, ""]
    if report.get("targets"):
        lines.append("Targets:")
        for item in report["targets"]:
            lines.append(f"- {item['what']}: {item['value']} (target {item['target']}) — "
                         f"{'met' if item['met'] else 'missed'}")
    return "\n".join(lines) + "\n"


def chosen_scales(options: Mapping[str, Any], cfg: Any, manifests: Mapping[str, Manifest]) -> dict[str, Any]:
    """Per regime: the training images per label and the factors ``--coupling-scarcity-*`` gives the couplings."""
    from fbn_fast import coupling
    from fbn_fast.data.pipeline import select_rows
    from fbn_fast.labels import EXPRESSIONS

    au_half = float(options.get("coupling_scarcity_au", cfg.coupling_scarcity_au))
    expr_half = float(options.get("coupling_scarcity_expr", cfg.coupling_scarcity_expr))
    out = {}
    for regime, m in manifests.items():
        rows = select_rows(m, "train", [*EXPRESSION_DATASETS, AU_DATASET] if regime == "low" else None)[0]
        expr_n, au_n = coupling.label_counts(m.expr[rows], m.expr_mask[rows], m.au_mask[rows], len(EXPRESSIONS))
        out[regime] = {"expression_images": expr_n.tolist(), "au_images": au_n.tolist(),
                       "scales": coupling.scarcity_scales(expr_n, au_n, au=au_half, expr=expr_half)}
    return out


def machine_info(label: str) -> dict[str, Any]:
    import torch

    where = f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "no GPU"
    return {"label": label, "description": f"{os.cpu_count()} CPU cores ({cpu_model()}), {where}",
            "torch": torch.__version__, "python": platform.python_version()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python training/run_ablation.py",
        description="The coupling grid: trains every (regime, variant, seed) cell of a grid file on SynthFace and "
                    "writes the results tables (JSON + Markdown). Options after '--' go to every training run.")
    p.add_argument("--grid", default=str(REPO / "training" / "coupling_grid.toml"), help="grid file")
    p.add_argument("--out", default=str(REPO / "training" / "results"), help="folder of the results table")
    p.add_argument("--tag", default="cpu", help="results go to <out>/<grid name>_<tag>.json/.md")
    p.add_argument("--runs-dir", default=None, help="run folders (default: <recipe's out_dir>/<grid name>)")
    p.add_argument("--synth-dir", default=None, help="SynthFace folder (default: the trainer's cache)")
    p.add_argument("--only", default=None, help="regular expression: run only the cells <regime>-<variant>-s<seed> "
                   "it matches (the table still shows every finished cell)")
    p.add_argument("--jobs", type=int, default=1, help="cells trained at once (each gets cores / jobs threads)")
    p.add_argument("--au-images", type=int, default=300, help=f"training images of {AU_DATASET} keeping AU labels "
                   "in the low regime")
    p.add_argument("--regime-seed", type=int, default=0, help="seed of the draw of the AU-labelled images")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: the recipe's)")
    p.add_argument("--device", default="cpu", help="device of the final evaluation (default: cpu)")
    p.add_argument("--skip-train", action="store_true", help="only tabulate runs that are already trained")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    from fbn_fast.data.synthface import default_synth_dir, ensure_synthface
    from fbn_fast.evaluate import unlabelled_aus

    try:
        grid = load_grid(args.grid)
        cfg = _recipe_config(grid.recipe, {"steps": args.steps} if args.steps else {})
        only = re.compile(args.only) if args.only else None
        if args.jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
        if args.au_images < 1:
            raise ValueError(f"--au-images must be >= 1, got {args.au_images}")
    except (ValueError, re.error) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    synth_dir = Path(args.synth_dir) if args.synth_dir else default_synth_dir(cfg)
    runs_dir = Path(args.runs_dir) if args.runs_dir else Path(cfg.out_dir) / grid.path.stem
    if not runs_dir.is_absolute():
        runs_dir = REPO / runs_dir
    runs_dir.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    published = Path(ensure_synthface(synth_dir, size=cfg.synth_size, seed=cfg.synth_seed,
                                      image_size=cfg.synth_image_size))  # the manifest
    low = low_label_manifest(load_manifest(published), keep_datasets=[*EXPRESSION_DATASETS, AU_DATASET],
                             au_rows={AU_DATASET: args.au_images}, seed=args.regime_seed)
    low_path = runs_dir / "lowlabel_manifest.npz"
    low.save(low_path)
    five = tuple(unlabelled_aus(low))
    basic = tuple(d for d in low.datasets if d != COMPOUND_DATASET)
    recipe_shown = grid.recipe.relative_to(REPO) if grid.recipe.is_relative_to(REPO) else grid.recipe
    setup = (f"SynthFace {cfg.synth_size} (seed {cfg.synth_seed}, {cfg.synth_image_size} px), trunk {cfg.trunk} at "
             f"{cfg.image_size} px, {cfg.steps} steps of {cfg.batch_size} images, relatedness {cfg.relatedness} "
             f"unless a variant says otherwise, T = {cfg.temperature}, λ_ca = {cfg.lambda_ca}, λ_dm = "
             f"{cfg.lambda_dm}.")
    regimes = {
        "low": (f"Low-label regime: training split = every image of {', '.join(EXPRESSION_DATASETS)} (expression "
                f"labels; VA on synth_expr_va) + {args.au_images} images of {AU_DATASET} with AU labels; no "
                f"training label at all for {', '.join(five)}. {setup}"),
        "published": ("Published labels: the published SynthFace manifest, every dataset with a train split "
                      f"sampled in proportion to its size, every label it publishes (all 17 AUs are labelled "
                      f"somewhere; synth_all images carry every task). {setup}"),
    }
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    jobs = [Job(f"{regime}-{v.name}-s{seed}", regime, v.options, seed, grid.recipe,
                low_path if regime == "low" else published, published,
                synth_dir, runs_dir, cfg.steps, cfg.image_size, cfg.eval_batch_size, threads, five, basic,
                tuple(extra), args.device,
                not args.skip_train)
            for regime, v, seed in grid.cells()]
    todo = [j for j in jobs if only is None or only.search(j.run)]
    finished = [j for j in jobs if j not in todo and (runs_dir / j.run / "grid_row.json").is_file()]
    print(f"[grid] {len(todo)} cell(s) to run or score, {len(finished)} more already scored; {args.jobs} at once, "
          f"{threads} thread(s) each; runs in {runs_dir}", flush=True)
    results: dict[str, dict[str, Any]] = {}
    failed: list[str] = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {j.run: pool.submit(run_cell, j) for j in todo}
        for run, fut in futures.items():
            try:
                results[run] = fut.result()
            except Exception as exc:  # one failed cell must not lose the others' table
                print(f"[grid] {run}: {exc}", file=sys.stderr, flush=True)
                failed.append(run)
    for j in finished:
        results[j.run] = json.loads((runs_dir / j.run / "grid_row.json").read_text())

    rows: dict[str, dict[str, Any]] = {}
    for regime in REGIMES:
        for v in grid.variants.values():
            cells = [f"{regime}-{v.name}-s{s}" for s in v.seeds.get(regime, ())]
            per_seed = [results[c] for c in cells if c in results]
            if per_seed:
                rows.setdefault(regime, {})[v.name] = aggregate(per_seed)
    report = {
        "date": _dt.date.today().isoformat(),
        "machine": machine_info(args.tag),
        "grid": str(grid.path.relative_to(REPO) if grid.path.resolve().is_relative_to(REPO) else grid.path),
        "recipe_file": str(recipe_shown),
        "recipe": cfg.to_dict(),
        "regimes": {r: regimes[r] for r in REGIMES if r in rows},
        "low_label": low.meta["low_label"],
        "variants": {n: {"options": v.own, "all_options": v.options, "seeds": {r: list(x) for r, x in v.seeds.items()},
                         "regimes": list(v.regimes), "about": v.about} for n, v in grid.variants.items()},
        "baseline": list(grid.baseline),
        "chosen": grid.chosen,
        "rows": rows,
        "targets": check_targets(grid, rows),
        "runs": results,
    }
    if grid.chosen is not None:  # what the chosen variant's scarcity scaling does in each regime
        report["chosen_scales"] = chosen_scales(grid.variants[grid.chosen].options, cfg,
                                                {"low": low, "published": load_manifest(published)})
    stem = f"{grid.path.stem}_{args.tag}"
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (out_dir / f"{stem}.md").write_text(to_markdown(report))
    print(to_markdown(report))
    if failed:
        print(f"error: {len(failed)} cell(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
