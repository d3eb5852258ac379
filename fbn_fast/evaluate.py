"""Evaluate a model on a manifest: the per-dataset metrics of docs/method.md §5 and zero-shot compounds.

    python -m fbn_fast.evaluate CHECKPOINT MANIFEST [--data-root DIR] [--split test] [--json OUT] [--truth FILE]

Each dataset is scored only on the tasks it labels (expression accuracy / macro-F1 / ABAW, per-AU F1 and
mean accuracy, VA CCC). Datasets with compound labels are also scored on zero-shot compound recognition
(docs/method.md §4: accuracy, macro-F1, UAR) from the AU predictions through the compound table, with the
optional β term of the basic-expression log-posteriors.

With a *hidden truth* (the full labels of every image, which SynthFace keeps beside its manifest), every
image is also scored on every task, labelled in its dataset or not, and the result names the AUs that carry
no label at all in the training manifest (read from the checkpoint's config, or ``--train-manifest``) and
their mean F1: how well the model predicts what it was never shown.

:func:`evaluate` is the one evaluation loop: this command and the trainer (under DDP too: each rank scores
its shard of a prebuilt loader and the statistics are summed across ranks) call it; :func:`format_report`
is the one way its result is printed.

Choices where the papers are silent (ours, documented in docs/method.md):

- Compound classes: by default the softmax runs over the compound classes that occur in the manifest's
  compound column (RAF-DB's eleven for RAF-DB, as the paper scores it); ``compound_classes="all"`` uses all
  15 classes of the table.
- The unlabelled-AU mean F1 pools every evaluated image (all datasets of the split), scored against the hidden
  truth; per-dataset values are reported too.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from .checkpoint import unwrap_model
from .config import renamed_keywords
from .inference import (
    HiddenTruth,
    TrainedModel,
    add_compound_options,
    add_inference_options,
    as_manifest,
    command_parser,
    compound_scorer,
    image_root,
    iter_outputs,
    model_normalization,
    open_loader,
    resolve_amp_dtype,
    resolve_device,
    run_manifest_command,
)
from .labels import AUS, NUM_AUS, NUM_EXPRESSIONS, au_index
from .metrics import MultiDatasetMetrics
from .preflight import datasets_with_split, split_summary

if TYPE_CHECKING:
    from .data import Manifest

__all__ = ["ALL", "build_parser", "evaluate", "format_report", "main", "unlabelled_aus"]

#: Name of the pooled group (every evaluated image) in hidden-truth results.
ALL = "(all)"


def unlabelled_aus(train_manifest: Manifest | str | os.PathLike, datasets: Sequence[str] | None = None,
                   split: str = "train") -> list[str]:
    """AUs with no annotated entry at all in ``split`` of the training manifest (restricted to ``datasets``)."""
    m = as_manifest(train_manifest, "training manifest")
    rows = m.split_rows(split)
    if datasets:
        rows &= np.isin(m.dataset, [m.dataset_index(d) for d in datasets])
    annotated = m.au_mask[rows].any(0)
    return [a for a, on in zip(m.aus, annotated) if not on]


def _on(x: Any, device: torch.device) -> Tensor:
    return torch.as_tensor(x).to(device, non_blocking=True)


@renamed_keywords(root="data_root", dtype="amp_dtype", backend="loader_backend")
def evaluate(
    model: nn.Module,
    manifest: Manifest | str | os.PathLike,
    data_root: str | os.PathLike | None = None,
    *,
    batches: Iterable[Mapping[str, Any]] | None = None,
    split: str = "test",
    datasets: Sequence[str] | None = None,
    batch_size: int = 256,
    image_size: int = 64,
    device: str | torch.device | None = "auto",
    amp_dtype: str | torch.dtype | None = "auto",
    loader_backend: str = "auto",
    num_workers: int = 2,
    truth: HiddenTruth | str | os.PathLike | None = None,
    train_manifest: Manifest | str | os.PathLike | None = None,
    train_datasets: Sequence[str] | None = None,
    no_label_aus: Sequence[str] | None = None,
    truth_pools: Mapping[str, Sequence[str]] | None = None,
    compound_classes: str | Sequence[int] = "present",
    beta: float = 0.0,
    temperature: float = 1.0,
    au_threshold: float = 0.5,
    distributed: bool = False,
    nvtx: str | None = None,
) -> dict[str, Any]:
    """Score ``model`` on ``split`` of ``manifest`` (a path or a loaded manifest); returns a JSON-able dict.

    Data: by default the evaluation pipeline over ``split`` (and ``datasets``) of the images under
    ``data_root`` (default: the root the manifest records, else its folder), ``batch_size`` images of
    ``image_size`` pixels per batch, normalised as the model's trunk expects.
    ``batches`` replaces it: any iterable of batch dicts of the pipeline's contract (``image``, ``dataset``,
    ``index`` = manifest row, and the labels), e.g. the trainer's DDP-sharded loader; ``split`` is then only
    recorded. ``distributed=True`` sums the statistics (and the row count) across the ranks of the default
    process group before computing the metrics; ``nvtx`` names an NVTX range around each forward pass.

    Result keys: ``split``, ``rows`` (images scored: stand-ins for bad images are not), ``image_size``,
    ``seconds``, ``compound_classes`` and ``compound_beta``, ``bad_images`` (per dataset) and ``bad_image_files``
    (path and reason of each), ``no_split`` (``{dataset: "no <split> split"}`` for datasets without rows in ``split``;
    absent when every dataset has some), ``datasets`` (``{dataset: {task: metrics}}``, each dataset scored on
    the tasks it labels, plus ``compound`` where it has compound labels), and with a hidden truth (``truth``: a
    :class:`~fbn_fast.inference.HiddenTruth`, a full-label manifest, or by default ``manifest_full.npz``
    beside a manifest path) ``truth`` (``{dataset, "(all)" or pool: {task: metrics}}`` on every task;
    ``truth_pools`` names groups of datasets scored together) and ``unlabelled_aus`` (the AUs with no label in
    the training manifest — ``train_manifest`` / ``train_datasets``, or ``no_label_aus`` — their per-AU F1
    and mean F1 over all images, per dataset and per pool). The model's train/eval mode is restored.
    """
    m = as_manifest(manifest)
    manifest_path = None if m is manifest else Path(manifest)
    dev = resolve_device(device)
    amp = resolve_amp_dtype(amp_dtype, dev)
    # A dataset without the split (AffectNet and Aff-Wild2 publish no test labels) is reported, not an error.
    no_split: dict[str, str] = {}
    if split in m.splits:
        present, absent = datasets_with_split(m, split, datasets)
        no_split = {d: f"no {split} split" for d in absent}
    if batches is None:
        if split not in m.splits:
            raise ValueError(f"--split {split!r} is not among the manifest's splits {list(m.splits)}")
        if not present:
            raise ValueError(f"--split {split!r}: no dataset{' of ' + str(list(datasets)) if datasets else ''} "
                             f"of manifest {manifest_path or m!s} has rows in it ({split_summary(m)})")
        datasets = present
    scorer = compound_scorer(compound_classes, m, beta=beta, temperature=temperature)

    if truth is None and manifest_path is not None:
        truth = HiddenTruth.beside(manifest_path, m)
    elif truth is not None and not isinstance(truth, HiddenTruth):
        truth = HiddenTruth.for_manifest(m, truth)
    if truth is not None and len(truth) != len(m):
        raise ValueError(f"hidden truth has {len(truth)} rows, the manifest {len(m)}")

    names = list(m.datasets)
    pools = {str(k): [m.dataset_index(d) for d in v] for k, v in (truth_pools or {}).items()}
    clash = (set(pools) & set(names)) | ({ALL} & set(pools))
    if clash:
        raise ValueError(f"truth_pools: names {sorted(clash)} clash with dataset names or {ALL!r}")
    net = unwrap_model(model)
    sizes = dict(num_classes=int(getattr(net, "num_classes", NUM_EXPRESSIONS)),
                 num_aus=int(getattr(net, "num_aus", NUM_AUS)), au_threshold=au_threshold, device=dev)
    metrics = MultiDatasetMetrics(names, num_compounds=len(scorer), compound_names=scorer.names, **sizes)
    truth_metrics = None
    if truth is not None:
        truth_metrics = MultiDatasetMetrics(names + [ALL, *pools], **sizes, compound_names=scorer.names,
                                            num_compounds=len(scorer) if truth.compound is not None else None)
        pool_members = [torch.as_tensor(np.isin(np.arange(len(names)), v), device=dev) for v in pools.values()]

    loader = None
    if batches is None:
        rank, world = ((torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed
                       else (0, 1))
        batches = loader = open_loader(m, image_root(m, manifest_path, data_root), split=split, datasets=datasets,
                                       batch_size=batch_size, image_size=image_size, device=dev, amp_dtype=amp,
                                       loader_backend=loader_backend, num_workers=num_workers, rank=rank,
                                       world_size=world, normalization=model_normalization(model))
    was_training = model.training
    seen, size = 0, None
    start = time.perf_counter()
    try:
        for batch, z_e, z_a, v in iter_outputs(model.to(dev), batches, dev, amp, nvtx):
            if "substitute" in batch:  # stand-ins for bad images: counted in bad_images, never scored
                keep = ~_on(batch["substitute"], dev).bool()
                if not bool(keep.all()):
                    batch = {k: t[keep.to(t.device)] if isinstance(t, Tensor) and t.ndim else t
                             for k, t in batch.items()}
                    z_e, z_a, v = z_e[keep], z_a[keep], v[keep]
                    if not z_e.shape[0]:
                        continue
            ds = _on(batch["dataset"], dev).long()
            z_c = scorer.logits(z_e, z_a)
            c_pos, c_mask = scorer.targets(_on(batch["compound"], dev))
            metrics.update(
                ds,
                expr_logits=z_e, expr=_on(batch["expr"], dev).long(), expr_mask=_on(batch["expr_mask"], dev).bool(),
                au_logits=z_a, au=_on(batch["au"], dev).float(), au_mask=_on(batch["au_mask"], dev).bool(),
                va_pred=v, va=_on(batch["va"], dev).float(), va_mask=_on(batch["va_mask"], dev).bool(),
                compound_logits=z_c, compound=c_pos, compound_mask=c_mask,
            )
            if truth_metrics is not None:
                labels = truth.labels(batch["index"], dev)
                outputs: dict[str, Tensor] = dict(expr_logits=z_e, au_logits=z_a, va_pred=v)
                if "compound" in labels:
                    labels["compound"], labels["compound_mask"] = scorer.targets(labels["compound"])
                    outputs["compound_logits"] = z_c
                for group in (ds, len(names)):
                    truth_metrics.update(group, **outputs, **labels)
                for gi, member in enumerate(pool_members, start=len(names) + 1):
                    inside = member[ds]  # rows of this batch whose dataset is in the pool
                    pooled = {k: (t & inside[:, None] if t.ndim == 2 else t & inside) if k.endswith("_mask") else t
                              for k, t in labels.items()}
                    truth_metrics.update(gi, **outputs, **pooled)
            seen += int(z_e.shape[0])
            size = size or int(batch["image"].shape[-1])
    finally:
        model.train(was_training)
        if loader is not None:
            loader.close()
    if distributed:
        metrics.reduce_(torch.distributed.all_reduce)
        if truth_metrics is not None:
            truth_metrics.reduce_(torch.distributed.all_reduce)
        count = torch.tensor([seen], dtype=torch.float64, device=dev)
        torch.distributed.all_reduce(count)
        seen = int(count.item())

    result: dict[str, Any] = {
        "split": split,
        "rows": seen,
        "image_size": size or int(image_size),
        "seconds": time.perf_counter() - start,
        "compound_classes": scorer.names,
        "compound_beta": scorer.beta,
        "datasets": {name: res for name, res in metrics.compute().items() if res},
        "bad_images": dict(getattr(batches, "bad_images", {}) or {}),
        "bad_image_files": [{"path": p, "reason": why} for p, why in getattr(batches, "bad_image_log", [])],
        **({"no_split": no_split} if no_split else {}),
    }
    if truth_metrics is not None:
        result["truth"] = {name: res for name, res in truth_metrics.compute().items() if res}
        if no_label_aus is None and train_manifest is not None:
            no_label_aus = unlabelled_aus(train_manifest, train_datasets)
        if no_label_aus is not None:
            result["unlabelled_aus"] = _unlabelled_scores(result["truth"], no_label_aus, set(pools))
    return result


def _unlabelled_scores(truth: Mapping[str, Any], aus: Sequence[str], pools: set[str] = frozenset()
                       ) -> dict[str, Any]:
    """Per-AU and mean F1 of ``aus`` on the hidden truth: over all images, per dataset and per pool."""
    cols = [au_index(a) for a in aus]
    names = [AUS[c] for c in cols]
    out: dict[str, Any] = {"aus": names}
    for group, res in truth.items():
        au = res.get("au")
        if au is None or not cols:
            continue
        f1 = [au["per_au_f1"][c] for c in cols]
        valid = [x for x in f1 if x is not None]
        entry = {"per_au_f1": dict(zip(names, f1)), "mean_f1": float(np.mean(valid)) if valid else None}
        if group == ALL:
            out.update(entry)
        else:
            out.setdefault("per_pool" if group in pools else "per_dataset", {})[group] = entry
    return out


# ------------------------------------------------------------------------------------------------ report
def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def format_report(result: Mapping[str, Any]) -> str:
    """A readable table of :func:`evaluate`'s result (printed by this command, logged by the trainer)."""
    head = (f"{'dataset':<18} {'n':>6} | {'expr acc':>8} {'F1':>6} {'ABAW':>6} | {'AU F1':>6} {'acc':>6} {'#AU':>4} | "
            f"{'CCC-V':>6} {'CCC-A':>6} | {'cmp acc':>7} {'F1':>6} {'UAR':>6}")

    def rows(table: Mapping[str, Any]) -> list[str]:
        lines = [head, "-" * len(head)]
        for name, res in table.items():
            e, a, v, c = (res.get(k) for k in ("expression", "au", "va", "compound"))
            n = max([int(np.sum(e["confusion"])) if e else 0, max(a["n"]) if a else 0, v["n"] if v else 0,
                     int(np.sum(c["confusion"])) if c else 0])
            lines.append(
                f"{name:<18} {n:>6} | {_fmt(e and e['accuracy']):>8} {_fmt(e and e['macro_f1']):>6} "
                f"{_fmt(e and e['abaw']):>6} | {_fmt(a and a['mean_f1']):>6} {_fmt(a and a['mean_accuracy']):>6} "
                f"{(a['num_annotated_aus'] if a else '-'):>4} | {_fmt(v and v['ccc_valence']):>6} "
                f"{_fmt(v and v['ccc_arousal']):>6} | {_fmt(c and c['accuracy']):>7} {_fmt(c and c['macro_f1']):>6} "
                f"{_fmt(c and c['uar']):>6}"
            )
        return lines

    at_step = f"step {result['step']}, " if "step" in result else ""
    out = [f"{at_step}split {result['split']}: {result['rows']} images at {result['image_size']} px "
           f"({result['seconds']:.1f} s); each dataset scored on the tasks it labels"]
    out += rows(result["datasets"])
    out += [f"{name:<18} {why}" for name, why in result.get("no_split", {}).items()]
    if any("compound" in r for r in result["datasets"].values()):
        out.append(f"compound: zero-shot over {len(result['compound_classes'])} classes, β = {result['compound_beta']}")
    if "truth" in result:
        out += ["", "hidden truth: every image scored on every task"]
        out += rows(result["truth"])
    un = result.get("unlabelled_aus")
    if un is not None:
        if un["aus"]:
            def per_au(f1: Mapping[str, Any]) -> str:
                return ", ".join(f"{a} {_fmt(f1.get(a))}" for a in un["aus"])

            per = per_au(un["per_au_f1"]) if "per_au_f1" in un else ""
            out += ["", f"AUs with no training label ({len(un['aus'])}): mean F1 {_fmt(un.get('mean_f1'))}  [{per}]"]
            for pool, entry in un.get("per_pool", {}).items():
                out.append(f"  on {pool}: mean F1 {_fmt(entry['mean_f1'])}  [{per_au(entry['per_au_f1'])}]")
        else:
            out += ["", "every AU carries labels in the training manifest"]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ CLI
#: The options this command shares with ``python -m fbn_fast.train`` (same names, values and help).
SHARED_OPTIONS = ("data_root", "datasets", "batch_size", "image_size", "device", "amp_dtype", "loader_backend",
                  "num_workers")


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python -m fbn_fast.evaluate``."""
    p = command_parser("evaluate", "Per-dataset metrics (docs/method.md §5) of a checkpoint on a manifest, zero-shot "
                       "compounds, and scores on unlabelled tasks when the hidden truth is available.")
    p.add_argument("manifest", help="the manifest (.npz) to evaluate on")
    p.add_argument("--split", default="test", help="manifest split to score (default: test)")
    add_inference_options(p, SHARED_OPTIONS)
    p.add_argument("--json", default=None, metavar="OUT", help="also write the result as JSON to OUT")
    p.add_argument("--truth", default=None, metavar="FILE",
                   help="hidden full ground truth: a manifest with every label, matched by image path (default: "
                        "manifest_full.npz beside the manifest, as SynthFace writes it, if present)")
    p.add_argument("--train-manifest", default=None,
                   help="training manifest, to find the AUs with no training label (default: the checkpoint's)")
    add_compound_options(p)
    p.add_argument("--threshold", type=float, default=0.5, help="AU decision threshold (default: 0.5)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def check() -> None:
        if not 0 < args.threshold < 1:
            raise ValueError(f"--threshold must lie in (0, 1), got {args.threshold}")
        if not args.temperature > 0:
            raise ValueError(f"--temperature must be > 0, got {args.temperature}")

    def score(trained: TrainedModel) -> dict[str, Any]:
        return evaluate(
            trained.model, Path(args.manifest), args.data_root, split=args.split,
            datasets=[d for arg in args.datasets for d in arg.split(",") if d] or None,
            batch_size=args.batch_size, image_size=args.image_size or trained.image_size, device=trained.device,
            amp_dtype=args.amp_dtype, loader_backend=args.loader_backend, num_workers=args.num_workers,
            truth=args.truth, train_manifest=args.train_manifest or trained.train_manifest,
            train_datasets=trained.train_datasets, compound_classes=args.compound_classes, beta=args.beta,
            temperature=args.temperature, au_threshold=args.threshold,
        )

    return run_manifest_command(args, SHARED_OPTIONS, check, score, format_report)


if __name__ == "__main__":
    sys.exit(main())
