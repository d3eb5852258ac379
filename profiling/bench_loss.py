"""Forward+backward of the co-training objective: the eager reference against torch.compile and the fused backends.

For each batch size B this times one loss step, ``terms = loss(z_e, z_a, v, labels)`` then the gradients of the
total with respect to ``z_e``, ``z_a`` and ``v`` (``torch.autograd.grad``, so nothing accumulates), for:

* ``eager``: the reference (backend ``torch``), plain PyTorch autograd;
* ``compile``, ``compile-ro``: ``torch.compile`` of the reference, modes ``default`` and ``reduce-overhead``
  (CUDA only);
* every fused backend that ``fbn_fast.losses.available_backends(device)`` reports available (``triton``,
  ``cuda``, ``cpu``, ...).

Before timing, each implementation's total and gradients at each B are held to the float64 reference with the
tolerance rule of the loss test kit (``tests/objective_cases.py``, which also builds the batches): a row records
``error_vs_reference`` (the worst error over the allowed one; at most 1 passes), so a fast wrong backend shows.

Timing: CUDA events on a GPU (the stream drained before each step, so a step's time includes its launch and
Python overhead), ``time.perf_counter`` on CPU; warm-up first, then the median of many steps. On a GPU also:
the kernels one step launches (torch.profiler, the incoming gradient made beforehand; for the fused backends
also the forward alone: the op's backward adds one multi-tensor kernel scaling the stored gradients), the peak
memory above the inputs, and the
byte floor: the bytes the op must move (read logits and labels once, write the three gradients once) over the
device-to-device copy bandwidth measured here. ``--triton-sweep`` also times the Triton kernel alone for a few
launch plans (rows per block, warps, stages, tl.dot, fused or split).

Results go to ``profiling/results/bench_loss-<device>-<date>.json`` (or ``--out``) with the card or CPU, the
versions and the date, and a table is printed. Timings of Triton's CPU interpreter are not results: with it
active nothing is written unless ``--out`` is given.

    python profiling/bench_loss.py --device cuda                      # B = 4096, 1048576, 256, 65536
    python profiling/bench_loss.py --device cuda --triton-sweep
    TRITON_INTERPRET=1 python profiling/bench_loss.py --device cpu --batch 64 --out /tmp/loss_cpu_check.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import torch

from fbn_fast import relatedness
from fbn_fast.losses import LossWeights, available_backends, face_behavior_loss
from fbn_fast.machine import cpu_model

# The loss test kit lives with the tests (it is test code, not shipped in the wheel) and this script runs from a
# source checkout: its folder on the path gives both the same builders, reference and tolerance.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from objective_cases import LABELS, LOGITS, Case, Outputs, error_ratio, make_inputs, pytorch_float32, reference  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BASELINES = ("eager", "compile", "compile-ro")


def machine(device: torch.device) -> dict:
    cpu = cpu_model()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {"cpu": cpu, "cpu_count": torch.get_num_threads(), "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version()}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    sm_count=torch.cuda.get_device_properties(device).multi_processor_count)
    return info


def training_batch(b: int, rel: torch.Tensor, seed: int = 0) -> Case:
    """The kit's batch shaped like a mixed training batch (every task partly labelled), with the prior table (no VA
    means, no AU positive weights: the bare drop-in call)."""
    inputs = make_inputs(b, seed=seed, p_expr=0.6, p_au=0.4, p_va=0.4, au_rate=0.3, mu=False, pos_weight=False)
    return Case({**inputs, "relatedness": rel.cpu()})


def step_inputs(case: Case, dtype: torch.dtype, device: torch.device) -> dict:
    """Logits (leaves that require grad) and labels of ``case`` on ``device``."""
    inputs = case.at(dtype, device)
    for n in LOGITS:
        inputs[n].requires_grad_()
    return {n: inputs[n] for n in (*LOGITS, *LABELS)}


def error_vs_reference(fn: Callable, inputs: dict, case: Case, dtype: torch.dtype) -> float:
    """The worst error of ``fn``'s total and gradients over the kit's allowed error against the float64 reference."""
    z = [inputs[n] for n in LOGITS]
    total = fn(*z, *(inputs[n] for n in LABELS))
    got = Outputs(total.detach().float()[None], *torch.autograd.grad(total, z))
    return max(error_ratio(got, case, dtype, str(z[0].device)).values())


def op_bytes(case: dict) -> int:
    """Bytes the objective must move: read logits and labels once, write d/dz_e, d/dz_a, d/dv once."""
    read = sum(t.numel() * t.element_size() for t in case.values())
    written = sum(case[n].numel() * case[n].element_size() for n in ("z_e", "z_a", "v"))
    return read + written


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written), best of a few 512 MiB copies."""
    n = 512 * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    best = float("inf")
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n / best


def time_step(step: Callable[[], object], device: torch.device, iters: int, warmup: int) -> list[float]:
    """Milliseconds of each of ``iters`` steps after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()  # drained: the next step starts on an idle stream
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def count_kernels(step: Callable[[], object], device: torch.device) -> int:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize(device)
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(1 for n in names if not n.lower().startswith(("memcpy", "memset")))


def peak_memory_mib(step: Callable[[], object], device: torch.device) -> float:
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def loss_fn(backend: str, rel: torch.Tensor) -> Callable:
    weights = LossWeights()  # built outside: the traced function then holds no numpy checks

    def fn(z_e, z_a, v, expr, expr_mask, au, au_mask, va, va_mask):
        return face_behavior_loss(z_e, z_a, v, rel, expr, expr_mask, au, au_mask, va, va_mask, weights=weights,
                                  backend=backend).total

    return fn


def make_step(fn: Callable, case: dict, mark_step: bool = False, backward: bool = True) -> Callable[[], object]:
    z = [case[n] for n in LOGITS]
    labels = [case[n] for n in LABELS]
    # The incoming gradient of the total, made once: in training it comes from the caller (a scaler, a sum of
    # losses), so its fill kernel is not the loss's.
    seed = torch.ones((), device=z[0].device)

    def step():
        if mark_step:  # reduce-overhead: each call is a new step for the CUDA-graph tree
            torch.compiler.cudagraph_mark_step_begin()
        total = fn(*z, *labels)
        return torch.autograd.grad(total, z, seed.to(total.dtype)) if backward else total

    return step


def candidates(device: torch.device, rel: torch.Tensor, skip_compile: bool) -> dict[str, Callable]:
    impls: dict[str, Callable] = {"eager": loss_fn("torch", rel)}
    if device.type == "cuda" and not skip_compile:
        impls["compile"] = torch.compile(loss_fn("torch", rel), mode="default", fullgraph=True, dynamic=False)
        impls["compile-ro"] = torch.compile(loss_fn("torch", rel), mode="reduce-overhead", fullgraph=True,
                                            dynamic=False)
    for name, why in available_backends(device).items():
        if name != "torch" and why.startswith("available"):  # on CUDA: "available (<launch mode>)"
            impls[name] = loss_fn(name, rel)
    return impls


def triton_sweep(batches: list[int], dtype: torch.dtype, device: torch.device, rel: torch.Tensor, iters: int,
                 warmup: int) -> list[dict]:
    """The Triton kernel alone (no autograd) for a few launch plans."""
    from fbn_fast.kernels import objective as kobj

    plans = [{}, dict(block_b=8), dict(block_b=32), dict(block_b=32, num_warps=2), dict(block_b=64, num_warps=4),
             dict(num_stages=2), dict(use_dot=True), dict(split=True)]
    out = []
    for b in batches:
        case = step_inputs(training_batch(b, rel), dtype, device)
        args = [case[n].detach() for n in LOGITS] + [case[n] for n in LABELS]
        for plan in plans:
            step = lambda plan=plan, args=args: kobj.triton_objective(  # noqa: E731
                *args, rel, None, None, (1.0,) * 6, 1.0, 0.05, **plan)
            try:
                times = time_step(step, device, iters, warmup)
            except Exception as exc:  # a plan the card cannot run is reported, not fatal
                out.append({"batch": b, **plan, "error": f"{type(exc).__name__}: {exc}"[:300]})
                continue
            out.append({"batch": b, **plan, "median_ms": statistics.median(times),
                        "programs": kobj.last_plan.get("programs")})
            print(f"  sweep B={b:>8} {plan}: {statistics.median(times):.4f} ms", flush=True)
    return out


def triton_launch_info() -> dict | None:
    """Registers, spills, shared memory and programs per SM of each compiled Triton variant, if any ran."""
    mod = sys.modules.get("fbn_fast.kernels.objective")
    return dict(mod.LAUNCH_INFO) if mod is not None else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, nargs="+", help="batch sizes (default: 256 4096 65536 1048576 on "
                    "cuda, 4096 65536 on cpu)")
    ap.add_argument("--dtype", choices=tuple(DTYPES), help="logit dtype (default: bfloat16 on cuda, as under "
                    "autocast; float32 on cpu)")
    ap.add_argument("--iters", type=int, default=50, help="timed steps per measurement (median reported)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile baselines")
    ap.add_argument("--triton-sweep", action="store_true", help="also time the Triton kernel's launch plans")
    ap.add_argument("--out", type=Path, help="JSON path (default: profiling/results/bench_loss-<device>-<date>.json)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    # The issue's targets first (B = 4096, then 1,048,576), so that a run cut short keeps them.
    batches = args.batch or ([4096, 1048576, 256, 65536] if device.type == "cuda" else [4096, 65536])
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    rel = relatedness.prior().tensor().to(device)
    impls = candidates(device, rel, args.skip_compile)
    interpreted = False
    if "triton" in impls:
        from fbn_fast.kernels import objective as kobj

        interpreted = kobj.INTERPRET
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else None
    print(f"device {device} ({machine(device).get('gpu') or machine(device)['cpu']}), logits {dtype}, "
          f"implementations: {', '.join(impls)}" + (" [Triton interpreter: timings are not results]"
                                                    if interpreted else ""), flush=True)
    if bandwidth:
        print(f"device copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)", flush=True)

    date = datetime.now().astimezone()
    out = args.out
    if out is None and not interpreted:
        out = RESULTS / f"bench_loss-{device.type}-{date.strftime('%Y%m%d-%H%M%S')}.json"
    result = {"benchmark": "bench_loss", "date": date.isoformat(timespec="seconds"), "device": str(device),
              "machine": machine(device), "dtype": str(dtype).removeprefix("torch."), "batches": batches,
              "triton_interpreted": interpreted, "copy_bandwidth_GBps": bandwidth / 1e9 if bandwidth else None,
              "rows": [], "triton_sweep": None, "triton_launch_info": None,
              "note": "median of CUDA-event (GPU) or perf_counter (CPU) times of forward + backward of the loss"}
    rows = result["rows"]

    def save() -> None:  # after every measurement, so that a run cut short keeps what it measured
        if out is not None:
            add_ratios(rows)
            result["triton_launch_info"] = triton_launch_info()
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1))

    for b in batches:
        batch = training_batch(b, rel)
        case = step_inputs(batch, dtype, device)
        floor_ms = op_bytes(case) / bandwidth * 1e3 if bandwidth else None
        for name, fn in impls.items():
            step = make_step(fn, case, mark_step=name == "compile-ro")
            iters = args.iters if device.type == "cuda" or b * 24 < 5e7 else max(3, args.iters // 10)
            row = {"batch": b, "impl": name}
            try:
                t0 = time.perf_counter()
                step()  # compiles what needs compiling
                row["first_call_s"] = round(time.perf_counter() - t0, 3)
                if name == "compile-ro":
                    torch.compiler.cudagraph_mark_step_begin()
                row["error_vs_reference"] = round(error_vs_reference(fn, case, batch, dtype), 4)
                times = time_step(step, device, iters, args.warmup)
                row.update(median_ms=statistics.median(times), min_ms=min(times),
                           p90_ms=sorted(times)[int(0.9 * (len(times) - 1))], iters=len(times))
                if device.type == "cuda":
                    row["kernels"] = count_kernels(step, device)
                    if name not in BASELINES:  # the loss's own forward, without autograd's plumbing
                        row["fwd_kernels"] = count_kernels(make_step(fn, case, backward=False), device)
                    row["peak_mib"] = round(peak_memory_mib(step, device), 2)
                if name == "triton":
                    row["plan"] = dict(sys.modules["fbn_fast.kernels.objective"].last_plan)
            except Exception as exc:  # one failing implementation must not hide the others' figures
                row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            if floor_ms is not None:
                row["floor_ms"] = floor_ms
            rows.append(row)
            save()
            shown = f"{row['median_ms']:.4f} ms" if "median_ms" in row else row["error"]
            if "error_vs_reference" in row:
                shown += f" (error/allowed vs float64 reference {row['error_vs_reference']:.3g})"
            print(f"B={b:>8} {name:>11}: {shown}", flush=True)
        reference.cache_clear()
        pytorch_float32.cache_clear()
        del case, batch

    print_table(rows)
    if args.triton_sweep and "triton" in impls:
        result["triton_sweep"] = triton_sweep([4096, 1048576] if device.type == "cuda" else batches[:1], dtype,
                                              device, rel, args.iters, args.warmup)
    save()
    if out is None:
        print("\nTriton ran in its CPU interpreter: nothing saved (give --out to keep this check)")
    else:
        print(f"\nwrote {out}")
    return 0


def add_ratios(rows: list[dict]) -> None:
    """Speed-up of each fused backend over each baseline at the same B, and its multiple of the byte floor."""
    for b in {r["batch"] for r in rows}:
        by = {r["impl"]: r for r in rows if r["batch"] == b and "median_ms" in r}
        for r in by.values():
            if r["impl"] in BASELINES:
                continue
            for base in BASELINES:
                if base in by:
                    r[f"speedup_vs_{base}"] = by[base]["median_ms"] / r["median_ms"]
            if r.get("floor_ms"):
                r["x_byte_floor"] = r["median_ms"] / r["floor_ms"]


def print_table(rows: list[dict]) -> None:
    add_ratios(rows)
    head = f"{'B':>8} {'impl':>11} {'median ms':>10} {'kernels':>7} {'fwd':>4} {'peak MiB':>9} {'vs eager':>8} " \
           f"{'vs comp':>8} {'vs c-ro':>8} {'x floor':>8}"
    print("\n" + head + "\n" + "-" * len(head))
    fmt = lambda r, k, f: (f"{r[k]:{f}}" if k in r else "-")  # noqa: E731
    for r in sorted(rows, key=lambda r: r["batch"]):
        if "median_ms" not in r:
            print(f"{r['batch']:>8} {r['impl']:>11} error: {r['error'][:80]}")
            continue
        print(f"{r['batch']:>8} {r['impl']:>11} {r['median_ms']:>10.4f} {fmt(r, 'kernels', 'd'):>7} "
              f"{fmt(r, 'fwd_kernels', 'd'):>4} {fmt(r, 'peak_mib', '.1f'):>9} {fmt(r, 'speedup_vs_eager', '.1f'):>8} "
              f"{fmt(r, 'speedup_vs_compile', '.1f'):>8} {fmt(r, 'speedup_vs_compile-ro', '.1f'):>8} "
              f"{fmt(r, 'x_byte_floor', '.2f'):>8}")


if __name__ == "__main__":
    sys.exit(main())
