"""What a multi-task codebase pays for each way of using the loss: forward+backward per step, relative to a plain
step of the same backend (docs/dropin.md).

    python profiling/bench_dropin.py                      # cpu and torch backends, B = 4096
    python profiling/bench_dropin.py --backends cpu --batch 65536

Rows: a plain step (fixed float weights); a weight tensor that changes every step (DWA); learnable weights
(uncertainty weighting); every term differentiable from one call (GradNorm/PCGrad); and, for comparison, what
those methods needed before: one call per term. Writes ``profiling/results/bench_dropin-<device>.json`` with the
CPU, the date, the versions and the load average.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the loss test kit builds the batches (a source checkout only)

from objective_cases import LOGITS, TABLES, make_inputs  # noqa: E402

from fbn_fast import FaceBehaviorLoss  # noqa: E402
from fbn_fast import relatedness as R  # noqa: E402
from fbn_fast.losses import TERMS  # noqa: E402
from fbn_fast.machine import cpu_model  # noqa: E402


def _median_ms(step: Callable[[], None], iters: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def measure(backend: str, batch: int, iters: int, warmup: int) -> dict[str, float | None]:
    """Milliseconds per forward+backward for each way of use on ``backend``."""
    inputs = make_inputs(batch, 7, 17, seed=0)
    logits = [inputs[n].float().requires_grad_() for n in LOGITS]
    labels = {k: v for k, v in inputs.items() if k not in LOGITS and k not in TABLES}
    table = R.prior()
    plain = FaceBehaviorLoss(table, backend=backend)
    dterms = FaceBehaviorLoss(table, backend=backend, differentiable_terms=True)
    weights = torch.ones(len(TERMS))
    learnable = torch.zeros(len(TERMS), requires_grad=True)

    def clear() -> None:
        for t in (*logits, learnable):
            t.grad = None

    def plain_step() -> None:
        clear()
        plain(*logits, **labels).total.backward()

    def dwa_step() -> None:  # new values every step, the same tensor object
        clear()
        weights.uniform_(0.5, 1.5)
        plain(*logits, **labels, weights=weights).total.backward()

    def learnable_step() -> None:
        clear()
        plain(*logits, **labels, weights=torch.exp(-learnable)).total.backward()

    def terms_step() -> None:  # one call, a gradient through every term
        clear()
        out = dterms(*logits, **labels)
        torch.autograd.backward(list(out.terms.values()), [torch.ones(()) for _ in out.terms])

    def separate_step() -> None:  # one call per term, each with only that term's weight
        clear()
        for i in range(len(TERMS)):
            w = torch.zeros(len(TERMS))
            w[i] = 1.0
            plain(*logits, **labels, weights=w).total.backward()

    rows = {"plain": plain_step, "tensor weights, new each step": dwa_step, "learnable weights": learnable_step,
            "every term differentiable, one call": terms_step, f"{len(TERMS)} separate calls": separate_step}
    return {name: _median_ms(fn, iters, warmup) for name, fn in rows.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", nargs="+", default=["cpu", "torch"])
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=str(REPO / "profiling" / "results" / "bench_dropin-cpu.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    results = {}
    for backend in args.backends:
        ms = measure(backend, args.batch, args.iters, args.warmup)
        results[backend] = {name: {"median_ms": round(v, 3), "relative_to_plain": round(v / ms["plain"], 2)}
                            for name, v in ms.items()}
    record = {"benchmark": "bench_dropin", "batch": args.batch, "threads": torch.get_num_threads(),
              "results": results, "load_average_at_start": round(load, 2), "cpu": cpu_model(),
              "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
              "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
