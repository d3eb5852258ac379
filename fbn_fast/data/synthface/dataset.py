"""Writing a SynthFace benchmark to disk: dataset plan, parallel rendering, manifests, resumable runs, CLI."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ...labels import AU_NUMBERS, AUS, COMPOUNDS, EXPRESSIONS, MISSING, NUM_AUS, au_columns
from ..manifest import Manifest
from .renderer import VERSION as RENDER_VERSION
from .renderer import Look, render, sample_look
from .sampling import (
    AU_THRESHOLD,
    SPONTANEOUS,
    SUBTHRESHOLD,
    SUBTHRESHOLD_MAX,
    VA_MEANS,
    VA_NOISE,
    Labels,
    normalise_probs,
    sample_compounds,
    sample_expressions,
)

FORMAT = "fbn_fast.synthface/1"
#: Size presets (total images over all datasets and splits).
SIZES: dict[str, int] = {"tiny": 2_000, "small": 25_000, "medium": 250_000, "large": 1_500_000}
#: Fewest images a benchmark may have: every dataset needs a train and a test image.
MIN_SIZE = 40
#: Share of each dataset's images per split (the compound set is test only).
SPLIT_SHARES: dict[str, float] = {"train": 0.85, "val": 0.05, "test": 0.10}
#: Most files per image folder.
SHARD = 10_000

# Which labels each dataset publishes, after the corpora they stand in for (docs/method.md §6).
_AU_A = (1, 2, 4, 5, 6, 9, 12, 15, 17, 20, 25, 26)  # DISFA's 12
_AU_B = (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24)  # BP4D's 12


@dataclass(frozen=True)
class DatasetSpec:
    """One SynthFace dataset: its share of the images and the tasks it labels."""

    name: str
    share: float
    like: str
    expr: bool = False
    va: bool = False
    aus: tuple[int, ...] = ()
    compound: bool = False

    @property
    def splits(self) -> tuple[str, ...]:
        return ("test",) if self.compound else tuple(SPLIT_SHARES)


#: The six datasets, in manifest order. The names are a contract other modules rely on.
DATASETS: tuple[DatasetSpec, ...] = (
    DatasetSpec("synth_expr_va", 0.30, "AffectNet", expr=True, va=True),
    DatasetSpec("synth_expr", 0.20, "RAF-DB", expr=True),
    DatasetSpec("synth_au_a", 0.175, "DISFA", aus=_AU_A),
    DatasetSpec("synth_au_b", 0.175, "BP4D", aus=_AU_B),
    DatasetSpec("synth_all", 0.10, "Aff-Wild2", expr=True, va=True, aus=AU_NUMBERS),
    DatasetSpec("synth_compound", 0.05, "RAF-DB compound", compound=True),
)


@dataclass(frozen=True)
class Block:
    """The images of one dataset split: global indices ``start .. start + count``."""

    dataset: int
    split: str
    start: int
    count: int

    def path(self, local: int) -> str:
        """Relative path of the block's ``local``-th image."""
        spec = DATASETS[self.dataset]
        width = max(6, len(str(self.count - 1)))
        return f"images/{spec.name}/{self.split}/{local // SHARD:03d}/{local:0{width}d}.jpg"


def parse_size(size: str | int) -> int:
    """A preset name (``tiny``, ``small``, ``medium``, ``large``) or a count (``30000``, ``25k``, ``1.5M``)."""
    if isinstance(size, (int, np.integer)):
        n = int(size)
    else:
        text = str(size).strip().lower()
        if text in SIZES:
            return SIZES[text]
        mult = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
        try:
            n = int(round(float(text[:-1] if mult > 1 else text) * mult))
        except ValueError:
            raise ValueError(f"--size {size!r}: expected one of {sorted(SIZES)} or an image count") from None
    if n < MIN_SIZE:
        raise ValueError(f"--size {size!r}: SynthFace needs at least {MIN_SIZE} images")
    return n


def plan(total: int) -> list[Block]:
    """Split ``total`` images over datasets (largest remainder on the shares) and then splits."""
    shares = np.array([d.share for d in DATASETS])
    raw = shares / shares.sum() * total
    counts = np.floor(raw).astype(int)
    counts[np.argsort(-(raw - counts), kind="stable")[: total - counts.sum()]] += 1
    blocks, start = [], 0
    for d, (spec, n) in enumerate(zip(DATASETS, counts.tolist())):
        if spec.compound:
            per_split = {"test": n}
        else:
            test = max(1, int(math.floor(n * SPLIT_SHARES["test"] + 0.5)))
            val = int(math.floor(n * SPLIT_SHARES["val"] + 0.5))
            per_split = {"train": n - test - val, "val": val, "test": test}
        for split in spec.splits:
            if per_split[split] > 0:
                blocks.append(Block(d, split, start, per_split[split]))
                start += per_split[split]
    return blocks


def block_labels(seed: int, block: Block, expr_probs=None) -> Labels:
    """Ground truth of a block; its random stream depends only on the seed, dataset and split."""
    rng = np.random.default_rng([seed, 1, block.dataset, ("train", "val", "test").index(block.split)])
    if DATASETS[block.dataset].compound:
        return sample_compounds(rng, block.count)
    return sample_expressions(rng, block.count, expr_probs)


def image_look(seed: int, index: int, image_size: int) -> Look:
    """The look (identity, pose, ...) of image ``index``: a function of (seed, index) alone."""
    return sample_look(np.random.default_rng([seed, 2, index]), image_size)


def encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def render_image(seed: int, index: int, image_size: int, au_intensity: np.ndarray) -> bytes:
    """JPEG bytes of image ``index`` of a benchmark made with ``seed``."""
    look = image_look(seed, index, image_size)
    return encode_jpeg(render(look, au_intensity), look.jpeg_quality)


def _complete_jpeg(path: str) -> bool:
    """A file that ends with the JPEG end-of-image marker (an interrupted write leaves a shorter file)."""
    try:
        with open(path, "rb") as f:
            f.seek(-2, os.SEEK_END)
            return f.read(2) == b"\xff\xd9"
    except OSError:  # absent, or shorter than two bytes
        return False


def _render_chunk(job: tuple) -> int:
    """Worker: render and write one chunk of images; when resuming, complete files already there are kept."""
    root, seed, image_size, indices, paths, intensity, resume = job
    written = 0
    for index, rel, au in zip(indices, paths, intensity):
        path = os.path.join(root, rel)
        if resume and _complete_jpeg(path):
            continue
        data = render_image(seed, int(index), image_size, au)
        # Written in place (no temporary + rename: file creation dominates the cost); resuming re-renders
        # any file an interruption left truncated.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:  # os.write may write less than asked
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        written += 1
    return written


def _pool_context() -> mp.context.BaseContext:
    # Workers run numpy and PIL only, so forking is safe and avoids re-importing the package per worker.
    return mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")


# ---------------------------------------------------------------------- manifests
def _manifest(blocks: list[Block], labels: list[Labels], paths: list[str], full: bool, meta: dict) -> Manifest:
    names, splits, expr, au, au_mask, va, va_mask, comp = [], [], [], [], [], [], [], []
    for block, lab in zip(blocks, labels):
        spec = DATASETS[block.dataset]
        n = block.count
        names += [spec.name] * n
        splits += [block.split] * n
        mask = np.zeros((n, NUM_AUS), bool)
        if full:
            mask[:] = True
        elif spec.aus:
            mask[:, au_columns(spec.aus)] = True
        has_expr = full or spec.expr
        has_va = full or spec.va
        expr.append(lab.expr if has_expr else np.full(n, MISSING, np.int8))
        au.append(lab.au * mask)
        au_mask.append(mask)
        va.append(lab.va if has_va else np.zeros((n, 2), np.float32))
        va_mask.append(np.full(n, has_va))
        comp.append(lab.compound if (full or spec.compound) else np.full(n, MISSING, np.int8))
    cat = np.concatenate
    return Manifest.from_columns(
        paths, np.array(names, dtype=object), datasets=tuple(d.name for d in DATASETS),
        split=np.array(splits, dtype=object), expr=cat(expr), au=cat(au), au_mask=cat(au_mask), va=cat(va),
        va_mask=cat(va_mask), compound=cat(comp), meta=meta,
    )


def _params(total: int, seed: int, image_size: int, expr_probs) -> dict:
    return {"size": total, "seed": int(seed), "image_size": int(image_size),
            "expr_probs": None if expr_probs is None else [float(p) for p in expr_probs],
            "version": RENDER_VERSION}


def _description(blocks: list[Block]) -> dict:
    counts: dict[str, dict[str, int]] = {}
    for b in blocks:
        counts.setdefault(DATASETS[b.dataset].name, {})[b.split] = b.count
    return {
        "datasets": {d.name: {"like": d.like, "share": d.share, "expr": d.expr, "va": d.va,
                              "aus": [f"AU{a}" for a in d.aus], "compound": d.compound,
                              "splits": counts.get(d.name, {})} for d in DATASETS},
        "labels": {"expressions": list(EXPRESSIONS), "aus": list(AUS), "compounds": list(COMPOUNDS),
                   "au_threshold": AU_THRESHOLD, "spontaneous": SPONTANEOUS, "subthreshold": SUBTHRESHOLD,
                   "subthreshold_max": SUBTHRESHOLD_MAX, "va_means": VA_MEANS, "va_noise": VA_NOISE},
        "files": {"manifest": "manifest.npz", "manifest_full": "manifest_full.npz", "truth": "truth.npz",
                  "images": "images/<dataset>/<split>/<shard>/<index>.jpg"},
    }


def _files_complete(out: Path, blocks: list[Block]) -> bool:
    """Every image of the plan is on disk (counted per folder, which is far cheaper than a stat per file)."""
    for b in blocks:
        folder = out / "images" / DATASETS[b.dataset].name / b.split
        for shard in range((b.count + SHARD - 1) // SHARD):
            expected = min(SHARD, b.count - shard * SHARD)
            try:
                found = sum(1 for e in os.scandir(folder / f"{shard:03d}") if e.name.endswith(".jpg"))
            except FileNotFoundError:
                return False
            if found < expected:
                return False
    return all((out / f).is_file() for f in ("manifest.npz", "manifest_full.npz", "truth.npz"))


_LOCK = ".synthface.lock"


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Serialise the generators of one folder: every rank of a distributed job may call ensure_synthface."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform: callers must not race
        yield
        return
    with open(out / _LOCK, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_info(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def generate(out_dir: str | os.PathLike, size: str | int = "small", seed: int = 0, image_size: int = 112,
             workers: int | None = None, expr_probs=None, verbose: bool = False) -> Path:
    """Write a SynthFace benchmark to ``out_dir`` (or keep the one there); returns the manifest path.

    Idempotent: when ``out_dir/synthface.json`` records the same parameters, says the run completed and
    every image is present, nothing is done. A run with the same parameters that was interrupted resumes
    (images already written are kept). A folder holding a SynthFace run with other parameters has its images
    removed and is regenerated; any other non-empty folder is refused.
    """
    out = Path(out_dir)
    total = parse_size(size)
    if image_size < 16:
        raise ValueError(f"--image-size {image_size}: SynthFace needs at least 16 px")
    workers = (os.cpu_count() or 1) if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"--workers {workers}: need at least 1")
    if expr_probs is not None:
        normalise_probs(expr_probs, len(EXPRESSIONS), "expr_probs")  # refuse bad weights before touching the folder
    params = _params(total, seed, image_size, expr_probs)
    info_path = out / "synthface.json"
    # A folder is ours when it holds our record or our lock (another process may be generating into it now).
    if out.exists() and not (info_path.exists() or (out / _LOCK).exists()) and any(out.iterdir()):
        raise ValueError(f"{out}: exists, is not empty and holds no synthface.json; refusing to write into it")
    with _locked(out):
        return _generate(out, params, workers, verbose)


def _generate(out: Path, params: dict, workers: int, verbose: bool) -> Path:
    total, seed, image_size, expr_probs = params["size"], params["seed"], params["image_size"], params["expr_probs"]
    blocks = plan(total)
    info_path = out / "synthface.json"
    info = _read_info(info_path)
    if info is not None and info.get("params") == params and info.get("complete") and _files_complete(out, blocks):
        return out / "manifest.npz"
    if info is not None and info.get("params") != params and (out / "images").exists():
        shutil.rmtree(out / "images")  # images of other parameters would be stale
    _write_json(info_path, {"format": FORMAT, "params": params, "complete": False})

    t0 = time.perf_counter()
    resume = (out / "images").exists()  # a fresh run need not look for existing files
    labels = [block_labels(seed, b, expr_probs) for b in blocks]
    paths = [b.path(i) for b in blocks for i in range(b.count)]
    for b in blocks:
        for shard in range((b.count + SHARD - 1) // SHARD):
            (out / "images" / DATASETS[b.dataset].name / b.split / f"{shard:03d}").mkdir(parents=True, exist_ok=True)
    intensity = np.concatenate([lab.au_intensity for lab in labels])
    chunk = 256
    jobs = [(str(out), int(seed), int(image_size), range(i, min(i + chunk, total)), paths[i:i + chunk],
             intensity[i:i + chunk], resume) for i in range(0, total, chunk)]
    done = 0
    if workers == 1:
        results = map(_render_chunk, jobs)
        pool = None
    else:
        pool = _pool_context().Pool(workers)
        results = pool.imap_unordered(_render_chunk, jobs)
    try:
        for k, written in enumerate(results):
            done += written
            if verbose and (k + 1) % max(1, len(jobs) // 20) == 0:
                print(f"synthface: {min((k + 1) * chunk, total)}/{total} images", file=sys.stderr, flush=True)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    seconds = time.perf_counter() - t0

    meta = {"synthface": {"version": RENDER_VERSION, "seed": int(seed), "image_size": int(image_size),
                          "au_threshold": AU_THRESHOLD, "root": "."}}
    _manifest(blocks, labels, paths, full=False, meta=meta).save(out / "manifest.npz")
    _manifest(blocks, labels, paths, full=True, meta={**meta, "full_truth": True}).save(out / "manifest_full.npz")
    tmp = out / "truth.npz.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, au_intensity=intensity, strength=np.concatenate([lab.strength for lab in labels]),
                 expr=np.concatenate([lab.expr for lab in labels]),
                 compound=np.concatenate([lab.compound for lab in labels]),
                 va=np.concatenate([lab.va for lab in labels]), au=np.concatenate([lab.au for lab in labels]),
                 index=np.arange(total, dtype=np.int64))
    os.replace(tmp, out / "truth.npz")
    info = {"format": FORMAT, "params": params, "complete": True, **_description(blocks),
            "generation": {"images_written": done, "seconds": round(seconds, 3), "workers": workers,
                           "images_per_second": round(done / seconds, 1) if seconds > 0 else None}}
    _write_json(info_path, info)
    if verbose:
        print(f"synthface: wrote {done} images in {seconds:.1f} s with {workers} workers "
              f"({done / max(seconds, 1e-9):.0f} images/s) to {out}", file=sys.stderr)
    return out / "manifest.npz"


def ensure_synthface(out_dir: str | os.PathLike, size: str | int = "small", seed: int = 0, image_size: int = 112,
                     workers: int | None = None) -> Path:
    """Generate the benchmark in ``out_dir`` unless it is already there; returns the path of its manifest."""
    return generate(out_dir, size=size, seed=seed, image_size=image_size, workers=workers)


# ---------------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fbn_fast.data synth",
        description="Generate SynthFace, the procedural labelled face benchmark, and/or its contact sheet.")
    p.add_argument("--out", help="output folder (images/, manifest.npz, manifest_full.npz, truth.npz, synthface.json)")
    p.add_argument("--size", default="small",
                   help=f"preset ({', '.join(f'{k}={v}' for k, v in SIZES.items())}) or an image count, e.g. 30000")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=112, help="side of the square images in pixels")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--expr-probs", default=None,
                   help=f"comma-separated weights of the 7 expressions ({', '.join(EXPRESSIONS)}); default uniform")
    p.add_argument("--contact-sheet", metavar="PNG", help="also write a contact sheet of expressions and AUs")
    p.add_argument("--quiet", action="store_true")
    return p


def cli(argv: list[str] | None = None) -> int:
    """``synth --out DIR [--size ...] [--seed S] [--image-size 112] [--workers W] [--contact-sheet PNG]``."""
    args = _parser().parse_args(argv)
    if args.out is None and args.contact_sheet is None:
        _parser().error("give --out DIR, --contact-sheet PNG or both")
    try:
        if args.contact_sheet:
            from .sheet import contact_sheet

            path = contact_sheet(args.contact_sheet, image_size=args.image_size, seed=args.seed)
            if not args.quiet:
                print(f"synthface: contact sheet written to {path}", file=sys.stderr)
        if args.out:
            probs = None if args.expr_probs is None else [float(x) for x in args.expr_probs.split(",")]
            manifest = generate(args.out, size=args.size, seed=args.seed, image_size=args.image_size,
                                workers=args.workers, expr_probs=probs, verbose=not args.quiet)
            print(manifest)
    except ValueError as exc:
        print(f"synthface: error: {exc}", file=sys.stderr)
        return 2
    return 0
