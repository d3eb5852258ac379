"""Few-shot compound expressions (docs/method.md §4): fine-tune the zero-shot compound head on k images per class.

    python -m fbn_fast.fewshot CHECKPOINT MANIFEST --shots K [--finetune-trunk] [--split test] [--json OUT]

From the compound-labelled rows of a manifest split, ``K`` images per compound class (drawn with ``--seed``)
form the support set and the rest the query set. A :class:`~fbn_fast.compound.FewShotCompoundHead`,
initialised to exactly the zero-shot weights, is fine-tuned on the support set's AU probabilities (the trunk
frozen), or with ``--finetune-trunk`` together with the whole network; both are then scored on the query
set beside the zero-shot head: accuracy, macro-F1 and UAR.

Choices where the papers are silent (ours, documented in docs/method.md):

- Classes: those that occur in the manifest's compound column (``--compound-classes all`` for all 15).
- With ``--finetune-trunk`` the network stays in eval mode (batch-norm statistics frozen: k images per
  class are too few to re-estimate them), the trunk learns at ``--trunk-lr`` (a tenth of the head's by
  default) with AdamW, the head at ``--lr``; the support images are fed without augmentation.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .compound import FewShotCompoundHead, fit_few_shot
from .config import renamed_keywords
from .inference import (
    TrainedModel,
    add_compound_options,
    add_inference_options,
    as_manifest,
    autocast,
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
from .labels import MISSING
from .metrics import CompoundMeter

__all__ = ["build_parser", "few_shot", "format_report", "main", "split_support_query"]


def split_support_query(compound: np.ndarray, shots: int, classes: Sequence[int], seed: int = 0
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Row indices ``(support, query)``: ``shots`` random rows of every class in ``classes``, and the rest.

    ``compound`` holds the candidate rows' compound ids (``MISSING`` rows are in neither set). A class with
    fewer than ``shots`` rows is an error naming it.
    """
    if int(shots) < 1:
        raise ValueError(f"--shots must be >= 1, got {shots}")
    rng = np.random.default_rng(seed)
    compound = np.asarray(compound)
    support = []
    for c in classes:
        rows = np.flatnonzero(compound == c)
        if len(rows) < shots:
            raise ValueError(f"compound class {c} has {len(rows)} labelled rows, fewer than --shots {shots}")
        support.append(rng.choice(rows, size=shots, replace=False))
    support_rows = np.sort(np.concatenate(support)) if support else np.zeros(0, np.int64)
    candidates = np.flatnonzero(np.isin(compound, list(classes)))
    query_rows = np.setdiff1d(candidates, support_rows)
    return support_rows, query_rows


class _Source:
    """Batches of a sub-manifest: the evaluation pipeline, or a caller's ``batches(manifest)`` function."""

    def __init__(self, root: Any, *, split: str, batch_size: int, image_size: int, device: torch.device,
                 amp_dtype: torch.dtype | None, loader_backend: str, num_workers: int, batches: Any = None,
                 normalization: Any = None) -> None:
        self.root, self.batches = root, batches
        self.opts = dict(split=split, batch_size=batch_size, image_size=image_size, device=device,
                         amp_dtype=amp_dtype, loader_backend=loader_backend, num_workers=num_workers,
                         normalization=normalization)

    def __call__(self, sub: Any) -> Iterator[Any]:
        if self.batches is not None:
            yield from self.batches(sub)
            return
        loader = open_loader(sub, self.root, **self.opts)
        try:
            yield from loader
        finally:
            loader.close()


def _features(model: nn.Module, manifest: Any, rows: np.ndarray, source: _Source, device: torch.device,
              amp_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """AU probabilities (N, K) and expression log-posteriors (N, C) of ``rows``, in the order of ``rows``."""
    au, lp, idx = [], [], []
    for batch, z_e, z_a, _ in iter_outputs(model, source(manifest.select(rows)), device, amp_dtype):
        au.append(torch.sigmoid(z_a))
        lp.append(torch.log_softmax(z_e, dim=1))
        idx.append(torch.as_tensor(batch["index"]).long().cpu())
    order = torch.cat(idx).numpy()
    if sorted(order.tolist()) != list(range(len(rows))):
        raise ValueError(f"the data pipeline returned {len(order)} rows for {len(rows)} requested")
    inv = np.argsort(order)
    return torch.cat(au)[inv], torch.cat(lp)[inv]


def _scores(logits: torch.Tensor, labels: torch.Tensor, names: Sequence[str]) -> dict[str, Any]:
    meter = CompoundMeter(len(names), names=names)
    meter.update(logits, labels)
    res = meter.compute()
    assert res is not None
    return {k: res[k] for k in ("accuracy", "macro_f1", "uar", "classes", "per_class_recall", "confusion")}


def _finetune_trunk(model: nn.Module, head: FewShotCompoundHead, sub: Any, source: _Source, labels: torch.Tensor,
                    *, epochs: int, lr: float, trunk_lr: float, device: torch.device,
                    amp_dtype: torch.dtype | None) -> list[float]:
    """Fine-tune the network and the head together on the support images; returns the loss of every step."""
    params = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": trunk_lr},
              {"params": list(head.parameters()), "lr": lr}]
    opt = torch.optim.AdamW(params, weight_decay=0.0)
    model.eval()  # frozen batch-norm statistics (see the module docstring)
    head.train()
    losses = []
    for _ in range(int(epochs)):
        for batch in source(sub):
            idx = torch.as_tensor(batch["index"]).long().to(device)
            with autocast(device, amp_dtype):
                out = model(batch["image"].to(device, non_blocking=True))
            s = torch.sigmoid(out[1].float())
            lp = torch.log_softmax(out[0].float(), dim=1) if head.use_expressions else None
            loss = F.cross_entropy(head(s, lp), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
    head.eval()
    return torch.stack(losses).tolist() if losses else []


@renamed_keywords(root="data_root", dtype="amp_dtype", backend="loader_backend")
def few_shot(
    model: nn.Module,
    manifest: Any,
    data_root: str | os.PathLike | None,
    shots: int,
    *,
    split: str = "test",
    seed: int = 0,
    finetune_trunk: bool = False,
    steps: int = 300,
    lr: float = 1e-2,
    weight_decay: float = 0.0,
    epochs: int = 10,
    trunk_lr: float | None = None,
    use_expressions: bool = False,
    beta: float = 0.0,
    temperature: float = 1.0,
    compound_classes: str | Sequence[int] = "present",
    batch_size: int = 256,
    image_size: int = 64,
    device: str | torch.device | None = "auto",
    amp_dtype: str | torch.dtype | None = "auto",
    loader_backend: str = "auto",
    num_workers: int = 2,
    batches: Any = None,
) -> dict[str, Any]:
    """Zero-shot vs few-shot compound scores on the query rows of ``split``; see the module docstring.

    Returns a JSON-able dict: ``zero_shot`` and ``few_shot`` (accuracy, macro-F1, UAR, per-class recall,
    confusion over ``classes``), the support and query sizes and the fine-tuning losses. ``model`` is not
    modified (``--finetune-trunk`` trains a copy). ``data_root``: ``None`` reads the images under the root the
    manifest records, else its folder. ``batches``, a function of a manifest returning batch
    dicts, replaces the data pipeline. ``device``, ``amp_dtype``, ``loader_backend`` and ``num_workers`` take
    the values of train's options of the same names.
    """
    m = as_manifest(manifest)
    dev = resolve_device(device)
    amp = resolve_amp_dtype(amp_dtype, dev)
    if split not in m.splits:
        raise ValueError(f"--split {split!r} is not among the manifest's splits {list(m.splits)}")
    scorer = compound_scorer(compound_classes, m, beta=beta, temperature=temperature)
    in_split = np.flatnonzero(m.split_rows(split) & (m.compound != MISSING))
    if len(in_split) == 0:
        raise ValueError(f"manifest {m!s}: no compound-labelled rows in split {split!r}")
    sup_local, qry_local = split_support_query(m.compound[in_split], shots, scorer.classes, seed)
    support, query = in_split[sup_local], in_split[qry_local]
    if len(query) == 0:
        raise ValueError(f"no query rows left after taking {shots} shots per class: lower --shots")
    pos, _ = scorer.targets(torch.as_tensor(m.compound.astype(np.int64)))
    y_sup, y_qry = pos[support].to(dev), pos[query].to(dev)

    root = None if batches is not None else image_root(m, None if m is manifest else manifest, data_root)
    source = _Source(root, split=split, batch_size=batch_size, image_size=image_size, device=dev,
                     amp_dtype=amp, loader_backend=loader_backend, num_workers=num_workers, batches=batches,
                     normalization=model_normalization(model))
    model = model.to(dev).eval()
    s_sup, lp_sup = _features(model, m, support, source, dev, amp)
    s_qry, lp_qry = _features(model, m, query, source, dev, amp)

    def make_head() -> FewShotCompoundHead:
        return FewShotCompoundHead(scorer.table, temperature=temperature, use_expressions=use_expressions or beta != 0,
                                   beta=beta).to(dev)

    def feats(s: torch.Tensor, lp: torch.Tensor) -> Any:
        return (s, lp) if (use_expressions or beta != 0) else s

    zero = make_head()
    with torch.no_grad():
        zero_logits = zero(*([s_qry, lp_qry] if zero.use_expressions else [s_qry]))
    result: dict[str, Any] = {
        "split": split,
        "shots": int(shots),
        "seed": int(seed),
        "classes": scorer.names,
        "support": len(support),
        "query": len(query),
        "finetune_trunk": bool(finetune_trunk),
        "zero_shot": _scores(zero_logits, y_qry, scorer.names),
    }
    head = make_head()
    if finetune_trunk:
        net = copy.deepcopy(model)
        sub = m.select(support)
        labels_local = y_sup  # index i of the sub-manifest is support[i]
        losses = _finetune_trunk(net, head, sub, source, labels_local, epochs=epochs, lr=lr,
                                 trunk_lr=trunk_lr if trunk_lr is not None else lr / 10, device=dev, amp_dtype=amp)
        s_qry, lp_qry = _features(net, m, query, source, dev, amp)
    else:
        losses = fit_few_shot(head, feats(s_sup, lp_sup), y_sup, steps=steps, lr=lr, weight_decay=weight_decay)
    with torch.no_grad():
        few_logits = head(*([s_qry, lp_qry] if head.use_expressions else [s_qry]))
    result["few_shot"] = _scores(few_logits, y_qry, scorer.names)
    result["losses"] = {"first": losses[0] if losses else None, "last": losses[-1] if losses else None,
                        "steps": len(losses)}
    return result


def format_report(result: dict[str, Any]) -> str:
    """Zero-shot vs few-shot on the query set, as a small table."""
    lines = [f"{result['shots']}-shot compound expressions over {len(result['classes'])} classes "
             f"(split {result['split']}: {result['support']} support, {result['query']} query images"
             f"{', trunk fine-tuned' if result['finetune_trunk'] else ''})",
             f"{'':<10} {'accuracy':>9} {'macro-F1':>9} {'UAR':>7}"]
    for key, label in (("zero_shot", "zero-shot"), ("few_shot", "few-shot")):
        r = result[key]
        lines.append(f"{label:<10} {r['accuracy']:>9.3f} {r['macro_f1']:>9.3f} {r['uar']:>7.3f}")
    return "\n".join(lines)


#: The options this command shares with ``python -m fbn_fast.train`` (same names, values and help).
SHARED_OPTIONS = ("data_root", "batch_size", "image_size", "device", "amp_dtype", "loader_backend", "num_workers")


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python -m fbn_fast.fewshot``."""
    p = command_parser("fewshot", "Few-shot compound expressions (docs/method.md §4): fine-tune the "
                       "zero-shot-initialised compound head on K images per class and compare with zero-shot on the "
                       "remaining images.")
    p.add_argument("manifest", help="a manifest with compound labels (.npz)")
    p.add_argument("--shots", type=int, required=True, help="labelled images per compound class (K)")
    p.add_argument("--finetune-trunk", action="store_true", help="fine-tune the whole network with the head")
    p.add_argument("--split", default="test", help="split holding the compound-labelled images (default: test)")
    p.add_argument("--seed", type=int, default=0, help="seed of the support-set draw (default: 0)")
    p.add_argument("--steps", type=int, default=300, help="full-batch Adam steps for the head alone (default: 300)")
    p.add_argument("--epochs", type=int, default=10, help="epochs over the support set with --finetune-trunk")
    p.add_argument("--lr", type=float, default=1e-2, help="head learning rate (default: 0.01)")
    p.add_argument("--trunk-lr", type=float, default=None, help="network learning rate (default: --lr / 10)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="head weight decay (default: 0)")
    p.add_argument("--use-expressions", action="store_true",
                   help="feed the expression log-posteriors to the head too (initialised at --beta)")
    add_compound_options(p)
    add_inference_options(p, SHARED_OPTIONS)
    p.add_argument("--json", default=None, metavar="OUT", help="also write the result as JSON to OUT")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def check() -> None:
        for name in ("steps", "epochs"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
        if not args.lr > 0:
            raise ValueError(f"--lr must be > 0, got {args.lr}")

    def score(trained: TrainedModel) -> dict[str, Any]:
        return few_shot(
            trained.model, Path(args.manifest), args.data_root, args.shots, split=args.split,
            seed=args.seed, finetune_trunk=args.finetune_trunk, steps=args.steps, lr=args.lr,
            weight_decay=args.weight_decay, epochs=args.epochs, trunk_lr=args.trunk_lr,
            use_expressions=args.use_expressions, beta=args.beta, temperature=args.temperature,
            compound_classes=args.compound_classes, batch_size=args.batch_size,
            image_size=args.image_size or trained.image_size, device=trained.device, amp_dtype=args.amp_dtype,
            loader_backend=args.loader_backend, num_workers=args.num_workers,
        )

    return run_manifest_command(args, SHARED_OPTIONS, check, score, format_report)


if __name__ == "__main__":
    sys.exit(main())
