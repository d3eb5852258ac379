"""Time loading a 5-million-row manifest (``load_manifest``, validation included) on the CPU.

Builds a manifest shaped like the paper's mix of corpora (AffectNet-style hashed file names, Aff-Wild2 and
DISFA/BP4D frame paths, EmotioNet downloads; partial labels per dataset) in a temporary folder, writes it,
then loads it several times with the page cache warm and reports the best and median time, split into
reading the file and validating the rows. Results go to ``profiling/results/manifest_load_cpu.json``.

    python profiling/bench_manifest.py [--rows 5000000] [--repeats 5] [--out profiling/results/manifest_load_cpu.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from fbn_fast.data.manifest import Manifest, _read_npz, load_manifest
from fbn_fast.labels import AU_NUMBERS, NUM_AUS
from fbn_fast.machine import cpu_model

# (dataset, share of rows, expression?, VA?, annotated AU numbers)
MIX = (
    ("affectnet", 0.09, True, True, ()),
    ("affwild2", 0.55, True, True, (1, 2, 4, 6, 12, 15, 20, 25)),
    ("emotionet", 0.20, False, False, (1, 2, 4, 5, 6, 9, 12, 17, 20, 25, 26)),
    ("disfa", 0.03, False, False, (1, 2, 4, 5, 6, 9, 12, 15, 17, 20, 25, 26)),
    ("bp4d", 0.03, False, False, (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24)),
    ("rafdb", 0.10, True, False, ()),
)


def _paths(name: str, n: int, rng: np.random.Generator) -> list[str]:
    ids = rng.integers(0, 2**63, n, dtype=np.int64)
    if name == "affectnet":  # Manually_Annotated_Images/<folder>/<56 hex>.jpg
        return [f"Manually_Annotated_Images/{i % 1200}/{i:016x}{(i * 7) & 0xFFFFFFFFFFFF:012x}"
                f"{(i * 13) & 0xFFFFFFFFFFFF:012x}{(i * 31) & 0xFFFFFFFFFFFF:016x}.jpg" for i in ids.tolist()]
    if name == "affwild2":  # cropped_aligned/<video>/<frame:05d>.jpg
        return [f"cropped_aligned/{i % 548}-30-1920x1080_left/{(i >> 20) % 40000:05d}.jpg" for i in ids.tolist()]
    if name == "emotionet":
        return [f"images/N_{i % 100000:07d}_{(i >> 17) % 10**9:09d}.jpg" for i in ids.tolist()]
    if name == "disfa":
        return [f"frames/LeftCamera/SN{i % 32 + 1:03d}/{(i >> 8) % 4845 + 1:05d}.jpg" for i in ids.tolist()]
    if name == "bp4d":
        return [f"BP4D-training/F{i % 23 + 1:03d}/T{i % 8 + 1}/{(i >> 9) % 3000:04d}.jpg" for i in ids.tolist()]
    return [f"basic/Image/aligned/train_{i % 100000:05d}_aligned.jpg" for i in ids.tolist()]


def build(rows: int, seed: int = 0) -> Manifest:
    rng = np.random.default_rng(seed)
    parts = []
    for name, share, has_expr, has_va, aus in MIX:
        n = int(round(rows * share)) if name != MIX[-1][0] else rows - sum(len(p) for p in parts)
        cols = [AU_NUMBERS.index(a) for a in aus]
        au_mask = np.zeros((n, NUM_AUS), bool)
        au_mask[:, cols] = True
        split = rng.choice(np.array(["train", "val", "test"]), n, p=[0.8, 0.1, 0.1])
        parts.append(Manifest.from_columns(
            _paths(name, n, rng), name, split=split,
            expr=rng.integers(0, 7, n) if has_expr else None,
            va=rng.uniform(-1, 1, (n, 2)) if has_va else None,
            au=rng.integers(0, 2, (n, NUM_AUS)) if aus else None, au_mask=au_mask if aus else None,
            box=np.tile(np.array([[10, 12, 120, 140]], np.float32), (n, 1)) if name == "affectnet" else None))
    return Manifest.concat(parts)



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=5_000_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "manifest_load_cpu.json")
    args = ap.parse_args()

    t0 = time.perf_counter()
    m = build(args.rows)
    build_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "manifest.npz"
        t0 = time.perf_counter()
        m.save(path)
        with open(path, "rb") as f:
            os.fsync(f.fileno())  # the file is on disk before the timed loads
        save_s = time.perf_counter() - t0
        size = path.stat().st_size
        mean_path = len(m.path_blob) / len(m)
        del m
        load, read, validate = [], [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            loaded = load_manifest(path)
            load.append(time.perf_counter() - t0)
            assert len(loaded) == args.rows
            del loaded
            t0 = time.perf_counter()
            data = _read_npz(path)
            read.append(time.perf_counter() - t0)
            del data
        loaded = load_manifest(path)
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            bad = loaded.bad_rows()
            validate.append(time.perf_counter() - t0)
        assert not bad
        summary = loaded.counts()
    result = {
        "benchmark": "load_manifest (read + validation), warm page cache",
        "rows": args.rows,
        "file_bytes": size,
        "mean_path_bytes": round(mean_path, 1),
        "rows_per_dataset": {d: sum(c["rows"] for c in summary if c["dataset"] == d)
                             for d in dict.fromkeys(c["dataset"] for c in summary)},
        "load_s": {"best": round(min(load), 3), "median": round(statistics.median(load), 3),
                   "all": [round(t, 3) for t in load]},
        "read_s_best": round(min(read), 3),
        "validate_s_best": round(min(validate), 3),
        "build_s": round(build_s, 2),
        "save_s": round(save_s, 2),
        "rows_per_s_best": int(args.rows / min(load)),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"load_manifest: {args.rows:,} rows in {min(load):.2f} s best, {statistics.median(load):.2f} s median "
          f"({size / 1e6:.0f} MB file)")


if __name__ == "__main__":
    main()
