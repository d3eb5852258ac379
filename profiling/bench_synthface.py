"""SynthFace generation rate: images/s per core, per stage and end to end, at 112 and 64 px.

Writes ``profiling/results/synthface_cpu.json`` with the CPU, date and versions.

    python profiling/bench_synthface.py                    # 3,000 images per size, 1 worker and all cores
    python profiling/bench_synthface.py --images 10000 --sizes 112

Stages (one process, best of ``--repeats``): ``look`` (drawing the identity/pose/lighting parameters),
``render`` (the face, lighting and noise), ``encode`` (JPEG). ``end_to_end_1_worker`` is :func:`generate`
with one worker: labels, rendering, encoding, writing the files and the manifests: the per-core rate.
``end_to_end_all_cores`` uses ``os.cpu_count()`` workers. Per-core rates are images per CPU-second (this process
plus its joined workers), which stays meaningful on a shared machine; wall-clock rates and the load average at
the start are recorded beside them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
from PIL import features

from fbn_fast.config import add_config_options
from fbn_fast.data.synthface import VERSION, generate, render, sample_expressions, sample_look
from fbn_fast.data.synthface.dataset import encode_jpeg
from fbn_fast.machine import cpu_model


def _best(fn, repeats: int) -> tuple[float, float]:
    """Best wall time and best CPU time (this process) of ``fn`` over ``repeats`` runs."""
    wall = cpu = float("inf")
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall = min(wall, time.perf_counter() - t0)
        cpu = min(cpu, time.process_time() - c0)
    return wall, cpu


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished (joined) children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def bench_size(size: int, n: int, repeats: int, workers: int) -> dict:
    labels = sample_expressions(np.random.default_rng(0), n)
    looks = [sample_look(np.random.default_rng([0, 2, i]), size) for i in range(n)]
    pixels = [render(look, au) for look, au in zip(looks, labels.au_intensity)]
    stages = {
        "look": _best(lambda: [sample_look(np.random.default_rng([0, 2, i]), size) for i in range(n)], repeats),
        "render": _best(lambda: [render(look, au) for look, au in zip(looks, labels.au_intensity)], repeats),
        "encode": _best(lambda: [encode_jpeg(p, look.jpeg_quality) for p, look in zip(pixels, looks)], repeats),
    }
    jpeg_bytes = sum(len(encode_jpeg(p, look.jpeg_quality)) for p, look in zip(pixels, looks))
    out = {
        "image_size": size,
        "images": n,
        "per_image_wall_us": {k: 1e6 * w / n for k, (w, _) in stages.items()},
        "per_image_cpu_us": {k: 1e6 * c / n for k, (_, c) in stages.items()},
        "mean_jpeg_bytes": jpeg_bytes / n,
    }
    for name, w in (("end_to_end_1_worker", 1), ("end_to_end_all_cores", workers)):
        wall = cpu = float("inf")
        for r in range(repeats):
            folder = Path(tempfile.mkdtemp(prefix="synthface_bench_"))
            try:
                c0, t0 = _cpu_seconds(), time.perf_counter()
                generate(folder / "d", size=n, seed=r, image_size=size, workers=w)
                wall = min(wall, time.perf_counter() - t0)
                cpu = min(cpu, _cpu_seconds() - c0)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        # Per core: images per CPU-second, which a busy machine does not distort the way wall time does.
        out[name] = {"workers": w, "wall_seconds": wall, "cpu_seconds": cpu, "images_per_s_wall": n / wall,
                     "images_per_s_per_core": n / cpu}
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--sizes", default="112,64")
    ap.add_argument("--repeats", type=int, default=2)
    # train's --num-workers (the old --workers still works, with a deprecation warning)
    add_config_options(ap, ["num_workers"], aliases={"num_workers": "--workers"},
                       defaults={"num_workers": os.cpu_count() or 1},
                       helps={"num_workers": "workers of the all-cores run"})
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "synthface_cpu.json")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    load_before = os.getloadavg()
    results = [bench_size(int(s), args.images, args.repeats, args.num_workers) for s in args.sizes.split(",")]
    result = {
        "benchmark": "synthface_generation",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "libjpeg_turbo": bool(features.check("libjpeg_turbo")),
        "synthface_version": VERSION,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
