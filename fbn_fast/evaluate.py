"""Evaluate a checkpoint on a manifest: the per-dataset metrics of method.md §5 and zero-shot compounds.

    python -m fbn_fast.evaluate CHECKPOINT MANIFEST [--root DIR] [--split test] [--json OUT] [--truth FILE]

Each dataset is scored only on the tasks it labels (expression accuracy / macro-F1 / ABAW, per-AU F1 and
mean accuracy, VA CCC). Datasets with compound labels are also scored on zero-shot compound recognition
(method.md §4: accuracy, macro-F1, UAR) from the AU predictions through the compound table, with the
optional β term of the basic-expression log-posteriors.

With a *hidden truth* (the full labels of every image, which SynthFace keeps beside its manifest), every
image is also scored on every task, labelled in its dataset or not, and the result names the AUs that carry
no label at all in the training manifest (read from the checkpoint's config, or ``--train-manifest``) and
their mean F1: how well the model predicts what it was never shown.

:func:`evaluate` is the same as a function (for the trainer to call at the end of a run).

Choices where method.md is silent (our choices):

- Compound classes: by default the softmax runs over the compound classes that occur in the manifest's
  compound column (RAF-DB's eleven for RAF-DB, as the paper scores it); ``compound_classes="all"`` uses all
  15 classes of the table.
- The unlabelled-AU mean F1 pools every evaluated image (all datasets of the split), scored against the hidden
  truth; per-dataset values are reported too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .compound import zero_shot_logits
from .labels import AUS, EXPRESSIONS, MISSING, NUM_AUS, au_index
from .metrics import MultiDatasetMetrics
from .relatedness import Relatedness, compound_prior

__all__ = [
    "CompoundScorer",
    "HiddenTruth",
    "evaluate",
    "format_report",
    "iter_outputs",
    "load_checkpoint",
    "main",
    "present_compounds",
    "unlabelled_aus",
]

#: Name of the pooled group in hidden-truth results.
ALL = "(all)"


# ------------------------------------------------------------------------------------------------ helpers
def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"``: the first CUDA device when there is one, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"--device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: CUDA is not available on this machine")
    return dev


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Autocast dtype for inference: bf16 on CUDA, float32 on the CPU unless asked otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {sorted(_DTYPES)} or auto")
    return _DTYPES[dtype]


def autocast(device: torch.device, dtype: torch.dtype):
    """An autocast context for reduced precision, nothing for float32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def config_get(config: Any, dotted: str, default: Any = None) -> Any:
    """``config["a"]["b"]`` or ``config.a.b`` for ``"a.b"`` (dicts, dataclasses, namespaces); ``default`` if absent."""
    node = config
    for part in dotted.split("."):
        if node is None:
            return default
        if isinstance(node, Mapping):
            if part not in node:
                return default
            node = node[part]
        elif hasattr(node, part):
            node = getattr(node, part)
        else:
            return default
    return default if node is None else node


def _load_manifest(manifest: Any, name: str = "manifest"):
    from .data import Manifest, load_manifest

    if isinstance(manifest, Manifest):
        return manifest
    path = Path(manifest)
    if not path.is_file():
        raise ValueError(f"{name} {str(path)!r} does not exist")
    return load_manifest(path)


def load_checkpoint(path: str | os.PathLike, device: str | torch.device | None = None
                    ) -> tuple[nn.Module, Any, Relatedness | None]:
    """``(model, config, relatedness)`` of a training checkpoint, the model in eval mode on ``device``."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"checkpoint {str(p)!r} does not exist")
    from .checkpoint import load_model

    dev = resolve_device(device)
    model, config, rel = load_model(p, map_location=dev)
    return model.to(dev).eval(), config, rel


def checkpoint_image_size(config: Any, default: int = 64) -> int:
    """The image size the checkpoint was trained at (its config), ``default`` when it does not say."""
    v = config_get(config, "image_size")
    return default if v is None else int(v)


def checkpoint_train_manifest(config: Any, checkpoint: str | os.PathLike | None = None) -> Path | None:
    """The training manifest named by a checkpoint's config (relative paths tried against the run folder too)."""
    v = config_get(config, "manifest")
    if not v and config_get(config, "synth_dir"):  # the default job trains on SynthFace's published manifest
        v = str(Path(config_get(config, "synth_dir")) / "manifest.npz")
    if not v:
        return None
    p = Path(v)
    if p.is_file():
        return p
    if checkpoint is not None and not p.is_absolute():
        for base in (Path(checkpoint).parent, Path(checkpoint).parent.parent, Path(checkpoint).parent.parent.parent):
            if (base / p).is_file():
                return base / p
    return None


def unlabelled_aus(train_manifest: Any, datasets: Sequence[str] | None = None, split: str = "train") -> list[str]:
    """AUs with no annotated entry at all in ``split`` of the training manifest (restricted to ``datasets``)."""
    m = _load_manifest(train_manifest, "training manifest")
    rows = m.split_rows(split)
    if datasets:
        codes = [m.dataset_index(d) for d in datasets]
        rows &= np.isin(m.dataset, codes)
    annotated = m.au_mask[rows].any(0)
    return [a for a, on in zip(m.aus, annotated) if not on]


def present_compounds(manifest: Any) -> list[int]:
    """Compound ids (into :data:`fbn_fast.labels.COMPOUNDS`) that occur in a manifest's compound column."""
    m = _load_manifest(manifest)
    c = m.compound[m.compound != MISSING]
    return sorted(int(x) for x in np.unique(c))


class CompoundScorer:
    """Zero-shot compound logits (method.md §4) over a subset of the compound table's classes.

    ``classes``: compound ids into :data:`~fbn_fast.labels.COMPOUNDS` (the rows of the table kept, in order);
    labels are mapped to positions in it by :meth:`targets` (ids outside it become missing).
    """

    def __init__(self, classes: Sequence[int] | None = None, beta: float = 0.0, temperature: float = 1.0,
                 table: Relatedness | None = None) -> None:
        table = table or compound_prior()
        classes = list(range(len(table.classes))) if classes is None else [int(c) for c in classes]
        if not classes:
            raise ValueError("compound classes: empty list")
        bad = [c for c in classes if not 0 <= c < len(table.classes)]
        if bad:
            raise ValueError(f"compound classes {bad} are outside [0, {len(table.classes)})")
        self.classes = classes
        self.names = [table.classes[c] for c in classes]
        self.table = Relatedness(table.matrix[classes], tuple(self.names), table.aus, source=table.source)
        self.beta, self.temperature = float(beta), float(temperature)
        lookup = np.full(len(table.classes), MISSING, np.int64)
        lookup[classes] = np.arange(len(classes))
        self._lookup = torch.as_tensor(lookup)

    def __len__(self) -> int:
        return len(self.classes)

    def logits(self, expr_logits: Tensor, au_logits: Tensor) -> Tensor:
        """Compound log-scores (B, J) from the model's expression and AU logits."""
        s = torch.sigmoid(au_logits.float())
        lp = torch.log_softmax(expr_logits.float(), dim=1) if self.beta else None
        return zero_shot_logits(s, relatedness=self.table, temperature=self.temperature, expr_log_probs=lp,
                                beta=self.beta)

    def targets(self, compound: Tensor) -> tuple[Tensor, Tensor]:
        """``(positions, mask)`` of compound ids (B,) (``MISSING`` or a class outside the subset → unmasked)."""
        c = compound.long()
        lookup = self._lookup.to(c.device)
        valid = (c >= 0) & (c < len(lookup))
        pos = torch.where(valid, lookup[c.clamp(0, len(lookup) - 1)], torch.full_like(c, MISSING))
        return pos.clamp(min=0), pos >= 0


# ------------------------------------------------------------------------------------------------ hidden truth
@dataclass
class HiddenTruth:
    """The full labels of every image of a manifest, aligned to its rows: expression, all AUs, VA.

    SynthFace writes them as ``manifest_full.npz`` beside its ``manifest.npz`` (the same rows with every label);
    :meth:`for_manifest` finds that file and aligns it by image path, so any subset or reordering of the
    published manifest can be scored.
    """

    expr: np.ndarray  # (N,) int, MISSING where the image has no basic expression (compound faces)
    au: np.ndarray  # (N, K) 0/1
    va: np.ndarray  # (N, 2) float
    au_mask: np.ndarray | None = None  # (N, K) bool; None: every AU known
    va_mask: np.ndarray | None = None  # (N,) bool; None: where VA is finite

    def __post_init__(self) -> None:
        self.expr = np.asarray(self.expr, np.int64)
        self.au = np.asarray(self.au)
        self.va = np.asarray(self.va, np.float32)
        n = len(self.expr)
        if self.au.ndim != 2 or self.au.shape[0] != n or self.va.shape != (n, 2):
            raise ValueError(f"hidden truth: shapes expr {self.expr.shape}, au {self.au.shape}, va {self.va.shape} "
                             f"do not describe {n} rows of K AUs and 2 VA values")
        self.au_mask = np.ones(self.au.shape, bool) if self.au_mask is None else np.asarray(self.au_mask, bool)
        self.va_mask = np.isfinite(self.va).all(1) if self.va_mask is None else np.asarray(self.va_mask, bool)
        if self.au_mask.shape != self.au.shape or self.va_mask.shape != (n,):
            raise ValueError("hidden truth: au_mask / va_mask do not match au / va")

    def __len__(self) -> int:
        return len(self.expr)

    @staticmethod
    def default_path(manifest_path: str | os.PathLike) -> Path | None:
        """``manifest_full.npz`` beside a manifest (SynthFace's layout), when it exists and is another file."""
        p = Path(manifest_path)
        full = p.with_name("manifest_full.npz")
        return full if full.is_file() and full.resolve() != p.resolve() else None

    @classmethod
    def for_manifest(cls, manifest: Any, path: str | os.PathLike) -> HiddenTruth:
        """The truth of ``manifest``'s rows from a full-label manifest at ``path``, matched by image path."""
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"hidden truth {str(p)!r} does not exist")
        m = _load_manifest(manifest)
        full = _load_manifest(p, "hidden truth")
        if np.array_equal(full.path_offsets, m.path_offsets) and np.array_equal(full.path_blob, m.path_blob):
            rows = np.arange(len(m))
        else:
            where = {full.path(i): i for i in range(len(full))}
            missing = [i for i in range(len(m)) if m.path(i) not in where]
            if missing:
                raise ValueError(f"hidden truth {str(p)!r} has no row for manifest row {missing[0]} "
                                 f"({m.path(missing[0])!r}) and {len(missing) - 1} others")
            rows = np.array([where[m.path(i)] for i in range(len(m))], np.int64)
        return cls(full.expr[rows], full.au[rows], full.va[rows], full.au_mask[rows], full.va_mask[rows])


# ------------------------------------------------------------------------------------------------ inference
def _batches(manifest: Any, root: str | os.PathLike, *, split: str | None, datasets: Sequence[str] | None,
             batch_size: int, image_size: int, device: torch.device, dtype: torch.dtype, backend: str,
             num_workers: int | None) -> Iterable[dict[str, Any]]:
    from .data.pipeline import build_loader

    extra = {} if num_workers is None else {"num_workers": int(num_workers)}
    return build_loader(manifest, root, batch_size=batch_size, image_size=image_size, train=False, split=split,
                        datasets=list(datasets) if datasets else None, backend=backend, device=device, dtype=dtype,
                        **extra)


@torch.no_grad()
def iter_outputs(model: nn.Module, batches: Iterable[dict[str, Any]], device: torch.device,
                 dtype: torch.dtype = torch.float32) -> Iterator[tuple[dict[str, Any], Tensor, Tensor, Tensor]]:
    """``(batch, expr_logits, au_logits, va)`` for every batch, outputs in float32 on ``device``."""
    model.eval()
    for batch in batches:
        images = batch["image"].to(device, non_blocking=True)
        with autocast(device, dtype):
            out = model(images)
        yield batch, out[0].float(), out[1].float(), out[2].float()


def _on(x: Any, device: torch.device) -> Tensor:
    return torch.as_tensor(x).to(device, non_blocking=True)


def evaluate(
    model: nn.Module,
    manifest: Any,
    root: str | os.PathLike,
    *,
    split: str = "test",
    datasets: Sequence[str] | None = None,
    batch_size: int = 256,
    image_size: int = 64,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    backend: str = "auto",
    num_workers: int | None = None,
    truth: HiddenTruth | str | os.PathLike | None = None,
    train_manifest: Any = None,
    train_datasets: Sequence[str] | None = None,
    no_label_aus: Sequence[str] | None = None,
    truth_pools: Mapping[str, Sequence[str]] | None = None,
    compound_classes: str | Sequence[int] = "present",
    beta: float = 0.0,
    temperature: float = 1.0,
    au_threshold: float = 0.5,
    batches: Iterable[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Score ``model`` on ``split`` of ``manifest`` (a path or a loaded manifest); returns a JSON-able dict.

    Keys: ``datasets`` (``{dataset: {task: metrics}}``, each dataset scored on the tasks it labels, plus
    ``compound`` where it has compound labels), and with a hidden truth ``truth`` (``{dataset or "(all)":
    {task: metrics}}`` on every task; ``truth_pools`` adds named groups of datasets scored together) and
    ``unlabelled_aus`` (the AUs with no label in the training manifest — ``train_manifest`` /
    ``train_datasets`` or ``no_label_aus`` — their per-AU F1 and mean F1 over all images, per dataset and per
    pool).
    ``batches`` replaces the data pipeline (any iterable of batch dicts of the pipeline's contract).
    """
    manifest_path = None if hasattr(manifest, "au_mask") else Path(manifest)
    m = _load_manifest(manifest)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if split not in m.splits:
        raise ValueError(f"--split {split!r} is not among the manifest's splits {list(m.splits)}")
    rows = m.split_rows(split)
    if datasets:
        rows &= np.isin(m.dataset, [m.dataset_index(d) for d in datasets])
    n_rows = int(rows.sum())
    if n_rows == 0:
        raise ValueError(f"manifest {manifest_path or m!s}: no rows in split {split!r}"
                         f"{' for datasets ' + str(list(datasets)) if datasets else ''}")

    if isinstance(compound_classes, str):
        if compound_classes == "present":
            classes: list[int] | None = present_compounds(m) or None
        elif compound_classes == "all":
            classes = None
        else:
            raise ValueError(f"compound_classes must be 'present', 'all' or a list of ids, got {compound_classes!r}")
    else:
        classes = list(compound_classes)
    scorer = CompoundScorer(classes, beta=beta, temperature=temperature)

    if truth is None and manifest_path is not None:
        truth = HiddenTruth.default_path(manifest_path)
    if truth is not None and not isinstance(truth, HiddenTruth):
        truth = HiddenTruth.for_manifest(m, truth)
    if truth is not None and len(truth) != len(m):
        raise ValueError(f"hidden truth has {len(truth)} rows, the manifest {len(m)}")

    model = model.to(dev).eval()
    num_classes = int(getattr(model, "num_classes", len(EXPRESSIONS)))
    num_aus = int(getattr(model, "num_aus", NUM_AUS))
    names = list(m.datasets)
    metrics = MultiDatasetMetrics(names, num_classes, num_aus, num_compounds=len(scorer),
                                  au_threshold=au_threshold, device=dev)
    pools = {str(k): [m.dataset_index(d) for d in v] for k, v in (truth_pools or {}).items()}
    clash = (set(pools) & set(names)) | ({ALL} & set(pools))
    if clash:
        raise ValueError(f"truth_pools: names {sorted(clash)} clash with dataset names or {ALL!r}")
    pool_members = {k: torch.as_tensor(np.isin(np.arange(len(names)), v), device=dev) for k, v in pools.items()}
    truth_metrics = MultiDatasetMetrics(names + [ALL, *pools], num_classes, num_aus, au_threshold=au_threshold,
                                        device=dev) if truth is not None else None
    if truth is not None:
        t_expr = torch.as_tensor(truth.expr)
        t_au = torch.as_tensor(truth.au.astype(np.float32))
        t_au_mask = torch.as_tensor(truth.au_mask)
        t_va = torch.as_tensor(truth.va)
        t_va_mask = torch.as_tensor(truth.va_mask)

    loader = None
    if batches is None:
        batches = loader = _batches(m, root, split=split, datasets=datasets, batch_size=batch_size,
                                    image_size=image_size, device=dev, dtype=dt, backend=backend,
                                    num_workers=num_workers)
    seen = 0
    start = time.perf_counter()
    try:
        for batch, z_e, z_a, v in iter_outputs(model, batches, dev, dt):
            ds = _on(batch["dataset"], dev).long()
            c_pos, c_mask = scorer.targets(_on(batch["compound"], dev))
            metrics.update(
                ds,
                expr_logits=z_e, expr=_on(batch["expr"], dev).long(), expr_mask=_on(batch["expr_mask"], dev).bool(),
                au_logits=z_a, au=_on(batch["au"], dev).float(), au_mask=_on(batch["au_mask"], dev).bool(),
                va_pred=v, va=_on(batch["va"], dev).float(), va_mask=_on(batch["va_mask"], dev).bool(),
                compound_logits=scorer.logits(z_e, z_a), compound=c_pos, compound_mask=c_mask,
            )
            if truth_metrics is not None:
                idx = torch.as_tensor(batch["index"]).long().cpu()
                te = t_expr[idx].to(dev)
                labels = dict(expr=te.clamp(min=0), expr_mask=te >= 0, au=t_au[idx].to(dev),
                              au_mask=t_au_mask[idx].to(dev), va=t_va[idx].to(dev), va_mask=t_va_mask[idx].to(dev))
                for group in (ds, len(names)):
                    truth_metrics.update(group, expr_logits=z_e, au_logits=z_a, va_pred=v, **labels)
                for gi, member in enumerate(pool_members.values(), start=len(names) + 1):
                    inside = member[ds]  # rows of this batch whose dataset is in the pool
                    pooled = dict(labels, expr_mask=labels["expr_mask"] & inside,
                                  au_mask=labels["au_mask"] & inside[:, None], va_mask=labels["va_mask"] & inside)
                    truth_metrics.update(gi, expr_logits=z_e, au_logits=z_a, va_pred=v, **pooled)
            seen += int(z_e.shape[0])
    finally:
        if loader is not None and hasattr(loader, "close"):
            loader.close()
    elapsed = time.perf_counter() - start
    bad_images = dict(getattr(loader, "bad_images", {}) or {})

    per_dataset = {name: res for name, res in metrics.compute().items() if res}
    result: dict[str, Any] = {
        "split": split,
        "rows": seen,
        "image_size": int(image_size),
        "seconds": elapsed,
        "compound_classes": scorer.names,
        "compound_beta": scorer.beta,
        "datasets": per_dataset,
        "bad_images": bad_images,
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
    """A readable table of :func:`evaluate`'s result."""
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

    out = [f"split {result['split']}: {result['rows']} images at {result['image_size']} px "
           f"({result['seconds']:.1f} s); each dataset scored on the tasks it labels"]
    out += rows(result["datasets"])
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
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fbn_fast.evaluate",
        description="Per-dataset metrics (method.md §5) of a checkpoint on a manifest, zero-shot compounds, and "
                    "scores on unlabelled tasks when the hidden truth is available.",
    )
    p.add_argument("checkpoint", help="a checkpoint written by python -m fbn_fast.train")
    p.add_argument("manifest", help="the manifest (.npz) to evaluate on")
    p.add_argument("--root", default=None, help="image root (default: the manifest's folder)")
    p.add_argument("--split", default="test", help="manifest split to score (default: test)")
    p.add_argument("--datasets", default=None, help="comma-separated datasets to score (default: all)")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (default: 256)")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: the checkpoint's)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", default="auto", help="autocast dtype: float32, bfloat16, float16 or auto (default)")
    p.add_argument("--backend", default="auto", help="data pipeline backend (default: auto)")
    p.add_argument("--workers", type=int, default=None, help="data loader workers (default: the pipeline's)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the result as JSON to OUT")
    p.add_argument("--truth", default=None, metavar="FILE",
                   help="hidden full ground truth: a manifest with every label, matched by image path (default: "
                        "manifest_full.npz beside the manifest, as SynthFace writes it, if present)")
    p.add_argument("--train-manifest", default=None,
                   help="training manifest, to find the AUs with no training label (default: the checkpoint's)")
    p.add_argument("--compound-classes", default="present",
                   help="'present' (classes in the manifest, default), 'all' (15), or comma-separated ids")
    p.add_argument("--beta", type=float, default=0.0,
                   help="weight of the basic-expression log-posteriors in zero-shot compounds (method.md §4)")
    p.add_argument("--temperature", type=float, default=1.0, help="temperature T of the compound softmax")
    p.add_argument("--threshold", type=float, default=0.5, help="AU decision threshold (default: 0.5)")
    return p


def _int_list(text: str, option: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{option} {text!r}: expected comma-separated integers") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        if not 0 < args.threshold < 1:
            raise ValueError(f"--threshold must lie in (0, 1), got {args.threshold}")
        if not args.temperature > 0:
            raise ValueError(f"--temperature must be > 0, got {args.temperature}")
        cc: str | list[int] = args.compound_classes
        if cc not in ("present", "all"):
            cc = _int_list(cc, "--compound-classes")
        model, config, _ = load_checkpoint(args.checkpoint, args.device)
        train_manifest = args.train_manifest or checkpoint_train_manifest(config, args.checkpoint)
        train_datasets = config_get(config, "datasets")
        if isinstance(train_datasets, str):
            train_datasets = [d for d in train_datasets.split(",") if d]
        manifest = Path(args.manifest)
        result = evaluate(
            model, manifest, args.root or manifest.parent, split=args.split,
            datasets=[d for d in args.datasets.split(",") if d] if args.datasets else None,
            batch_size=args.batch_size, image_size=args.image_size or checkpoint_image_size(config),
            device=args.device, dtype=args.dtype, backend=args.backend, num_workers=args.workers,
            truth=args.truth, train_manifest=train_manifest,
            train_datasets=list(train_datasets) if train_datasets else None,
            compound_classes=cc, beta=args.beta, temperature=args.temperature, au_threshold=args.threshold,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_report(finish_cli_result(result, args)))
    return 0


def finish_cli_result(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Record the checkpoint and manifest a CLI scored in ``result`` and write it to ``--json`` if given."""
    result["checkpoint"] = str(args.checkpoint)
    result["manifest"] = str(args.manifest)
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    sys.exit(main())
