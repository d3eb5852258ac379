"""The README's default job, timed and scored: ``python -m fbn_fast.train`` from an empty SynthFace cache.

Writes ``profiling/results/default_job_cpu.json`` with the wall time of the whole job, the training time and
rate it logged, the headline test metrics of its ``eval.json``, the CPU, the date, the versions and the load
average at the start (a shared machine stretches the times, not the metrics).

    python profiling/bench_default_job.py                       # fresh cache in a temporary folder
    python profiling/bench_default_job.py --keep runs/default   # also keep the run folder
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fbn_fast.evaluate import ALL
from fbn_fast.machine import cpu_model

REPO = Path(__file__).resolve().parent.parent


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The README's numbers from an ``eval.json``: per-dataset expression accuracy, AU mean F1, VA CCC and the
    zero-shot compound UAR, on the labelled tasks of each test set."""
    out: dict[str, Any] = {}
    for name, tasks in result.get("datasets", {}).items():
        row = {}
        if "expression" in tasks:
            row["expression_accuracy"] = tasks["expression"]["accuracy"]
        if "au" in tasks:
            row["au_mean_f1"] = tasks["au"]["mean_f1"]
        if "va" in tasks and tasks["va"].get("ccc_mean") is not None:
            row["va_ccc"] = tasks["va"]["ccc_mean"]
        if "compound" in tasks:
            row["compound_uar"] = tasks["compound"]["uar"]
            row["compound_classes"] = len(result.get("compound_classes") or [])
        out[name] = row
    truth = result.get("truth", {}).get(ALL, {})
    if truth:
        out[ALL] = {"expression_accuracy": truth.get("expression", {}).get("accuracy"),
                    "au_mean_f1": truth.get("au", {}).get("mean_f1")}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "profiling" / "results" / "default_job_cpu.json"))
    p.add_argument("--keep", default=None, metavar="DIR", help="copy the run folder here")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="fbn-default-job-") as tmp:
        env = {**os.environ, "FBN_FAST_DATA": str(Path(tmp) / "cache")}  # an empty SynthFace cache
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "fbn_fast.train", "--out-dir", str(Path(tmp) / "runs"),
                               "--name", "default", "--no-progress"], env=env, cwd=tmp, capture_output=True,
                              text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            print(f"error: the default job exited with status {proc.returncode}", file=sys.stderr)
            return 1
        run = Path(tmp) / "runs" / "default"
        result = json.loads((run / "eval.json").read_text())
        log = proc.stderr
        gen = re.search(r"SynthFace ready after ([\d.]+) s", log)
        trained = re.search(r"training done at step (\d+)/\d+ after ([\d.]+) s", log)
        rates = [json.loads(line)["images_per_s"] for line in (run / "metrics.jsonl").read_text().splitlines()
                 if '"kind": "train"' in line]
        if args.keep:
            shutil.copytree(run, args.keep, dirs_exist_ok=True)

    record = {
        "benchmark": "default job: python -m fbn_fast.train from an empty SynthFace cache (generation, training, "
                     "validation, test evaluation, plots)",
        "wall_s": round(wall, 1),
        "synthface_generation_s": float(gen.group(1)) if gen else None,
        "training_steps": int(trained.group(1)) if trained else None,
        "training_s": float(trained.group(2)) if trained else None,
        "training_images_per_s_median": sorted(rates)[len(rates) // 2] if rates else None,
        "test_metrics": headline(result),
        "no_split": result.get("no_split"),
        "load_average_at_start": round(load, 2),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
