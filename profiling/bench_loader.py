"""Input-pipeline throughput: images/s of every available path, decode-only and decode+augment, at 112 and 224 px.

Writes ``profiling/results/loader_<device>.json`` with the machine, date and versions. The images are generated
SynthFace-like JPEGs (smooth face-sized content, ``--src`` pixels square, quality 90, a face box on every other
one), written once under ``--data`` (a temporary folder by default).

    python profiling/bench_loader.py                      # CPU paths (cpu workers, DALI CPU when installed)
    python profiling/bench_loader.py --device cuda        # + DALI mixed / nvJPEG when available

"decode" is the evaluation transform (decode, crop the face box, resize); "decode+augment" adds the training
augmentation (random resized crop, flip, rotation, brightness/contrast). Both include normalisation to the
channels-last batch and the label gather: the numbers are what a training loop receives.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fbn_fast.config import add_config_options
from fbn_fast.data import Manifest
from fbn_fast.data.pipeline import build_loader, dali_available, torchvision_available
from fbn_fast.inference import resolve_amp_dtype, resolve_device
from fbn_fast.machine import cpu_model


def make_images(folder: Path, n: int, src: int, seed: int = 0) -> Manifest:
    """``n`` smooth random JPEGs (low-frequency content compresses and decodes like face crops)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths, boxes = [], np.full((n, 4), np.nan, np.float32)
    for i in range(n):
        rel = f"img/{i // 1000:03d}/{i:06d}.jpg"
        p = folder / rel
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            low = (rng.random((12, 12, 3)) * 255).astype(np.uint8)
            Image.fromarray(low).resize((src, src), Image.BICUBIC).save(p, quality=90)
        paths.append(rel)
        if i % 2:
            boxes[i] = (src * 0.1, src * 0.08, src * 0.9, src * 0.92)
    names = np.where(np.arange(n) % 3 == 0, "B", "A")
    return Manifest.from_columns(paths, names, box=boxes, expr=np.arange(n) % 7)


def tree_cpu_seconds() -> float | None:
    """CPU time (user + system) of this process and all its descendants (DataLoader workers), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    try:
        parent, cpu = {}, {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parent[int(d)] = int(fields[1])
            cpu[int(d)] = (int(fields[11]) + int(fields[12])) / tick
    except OSError:
        return None
    total, todo = 0.0, [os.getpid()]
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0.0)
        todo += [c for c, p in parent.items() if p == pid]
    return total


def time_loader(loader, batches: int, device: torch.device) -> tuple[float, int, float | None]:
    """(images/s wall clock, images, CPU seconds per image over the process tree)."""
    it = iter(loader)
    for _ in range(2):  # warm-up: worker start, pipeline build, first allocations
        next(it)
    if device.type == "cuda":
        torch.cuda.synchronize()
    n, t0, c0 = 0, time.perf_counter(), tree_cpu_seconds()
    for _ in range(batches):
        b = next(it)
        n += b["image"].shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    c1 = tree_cpu_seconds()
    return n / wall, n, (c1 - c0) / n if c0 is not None and c1 is not None else None


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "pillow": Image.__version__}
    for mod in ("simplejpeg", "nvidia.dali", "torchvision"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            out[mod] = getattr(m, "__version__", "?")
        except Exception:  # not installed, or not importable beside this torch
            out[mod] = None
    return out



#: Train's options this benchmark takes (same names and values), and their old spellings (deprecated).
TRAIN_OPTIONS = ("device", "batch_size", "num_workers", "amp_dtype")
OLD_SPELLINGS = {"batch_size": "--batch", "num_workers": "--workers", "amp_dtype": "--dtype"}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_options(ap, TRAIN_OPTIONS, aliases=OLD_SPELLINGS,
                       defaults={"device": "cpu", "batch_size": 256, "amp_dtype": "fp16"},
                       helps={"amp_dtype": "dtype of the delivered images, as train's --amp-dtype (none: float32)"})
    ap.add_argument("--sizes", type=int, nargs="+", default=[112, 224])
    ap.add_argument("--batches", type=int, default=12, help="timed batches per measurement")
    ap.add_argument("--src", type=int, default=128, help="side of the generated JPEGs")
    ap.add_argument("--n", type=int, default=4096, help="images generated")
    ap.add_argument("--paths", nargs="+", default=None, choices=["cpu", "dali", "nvjpeg"],
                    help="loader backends to measure (default: every available one)")
    ap.add_argument("--data", type=Path, default=None, help="image folder (kept; default: a temporary one)")
    ap.add_argument("--out", type=Path, default=None)
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)

    need = (args.batches + 2) * args.batch_size  # two warm-up batches, then the timed ones, within one epoch
    if args.n < need:
        ap.error(f"--n {args.n}: fewer images than --batch-size {args.batch_size} x (--batches {args.batches} + 2 "
                 f"warm-up) = {need}")
    device = resolve_device(args.device)
    paths = ["cpu"]
    if dali_available():
        paths.append("dali")
    if device.type == "cuda" and torchvision_available():
        paths.append("nvjpeg")
    if args.paths:
        paths = [p for p in paths if p in args.paths]
    dtype = resolve_amp_dtype(args.amp_dtype, device) or torch.float32
    tmp = None
    if args.data is None:
        tmp = tempfile.TemporaryDirectory()
        args.data = Path(tmp.name)
    manifest = make_images(args.data, args.n, args.src)
    results = []
    for path in paths:
        # the CPU path always decodes on the host; its batches are moved to the device like the others
        for size in args.sizes:
            for mode, train in (("decode", False), ("decode+augment", True)):
                loader = build_loader(manifest, args.data, batch_size=args.batch_size, image_size=size, train=train,
                                      backend=path, num_workers=args.num_workers, device=device, dtype=dtype,
                                      drop_last=True)
                batches = min(args.batches, len(loader) - 2)
                load0 = os.getloadavg()[0]
                ips, n, cpu = time_loader(loader, batches, device)
                loader.close()
                del loader
                cores = os.cpu_count() or 1
                row = {"path": path, "size": size, "mode": mode, "images_per_s": round(ips, 1), "images": n,
                       "batch_size": args.batch_size, "workers": args.num_workers,
                       "cpu_us_per_image": round(cpu * 1e6, 1) if cpu else None,
                       # what the CPU time spent would give if the machine's cores did nothing else
                       "cpu_bound_images_per_s": round(cores / cpu, 1) if cpu else None,
                       "load_average_1m_before": round(load0, 2)}
                results.append(row)
                extra = f"  cpu {cpu * 1e6:7.1f} us/img -> {cores / cpu:8.1f} img/s on {cores} idle cores" if cpu \
                    else ""
                print(f"{path:7s} {size:4d} px {mode:15s} {ips:9.1f} img/s{extra}  (load {load0:.1f})", flush=True)
    report = {
        "benchmark": "input pipeline images/s (loader output: normalised channels-last batch with labels)",
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "versions": versions(),
        "config": {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "source_jpeg_px": args.src,
                   "images": args.n, "batch_size": args.batch_size, "workers": args.num_workers},
        "note": "images_per_s is wall clock and falls when other processes share the cores (each row records the "
                "load average); cpu_bound_images_per_s divides the cores by the CPU seconds the loader's process tree "
                "spent per image: what idle cores would sustain if the work scaled, an estimate, not a measurement",
        "results": results,
    }
    out = args.out or Path(__file__).parent / "results" / f"loader_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
