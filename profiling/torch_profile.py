"""Profile a few training steps with torch.profiler and export a Chrome/Perfetto trace.

The steps are exactly those of ``python -m fbn_fast.train`` (:class:`fbn_fast.train.TrainStep`), on synthetic
tensors (``--data synthetic``, the trunk and objective alone) or on SynthFace JPEGs through the input pipeline
(``--data synthface``). The NVTX-style phases (data, forward, loss, backward, optimizer) appear as
``record_function`` ranges in the trace. Output: ``profiling/results/torch_profile-<device>-<trunk>-<time>.json``
(open it in https://ui.perfetto.dev or chrome://tracing) and a table of the most expensive operators.

    python profiling/torch_profile.py                                   # CPU, small trunk, 64 px
    python profiling/torch_profile.py --device cuda --trunk resnet50 --image-size 112 --batch-size 256 --amp bf16
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function, schedule

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import AMP, make_step, synthetic_batch  # noqa: E402

from fbn_fast.config import TrainConfig  # noqa: E402
from fbn_fast.distributed import resolve_device  # noqa: E402
from fbn_fast.train import default_synth_dir  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--trunk", default="small")
    p.add_argument("--trunk-kwargs", default="{}")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--amp", default="none", choices=sorted(AMP))
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--data", default="synthetic", choices=["synthetic", "synthface"])
    p.add_argument("--synth-size", default="tiny")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--opt", default="adamw", choices=["adamw", "sgd", "lamb"])
    p.add_argument("--grad-clip", type=float, default=5.0)
    p.add_argument("--loss-backend", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--wait", type=int, default=1, help="steps before the profiler starts")
    p.add_argument("--warmup", type=int, default=3, help="profiled but discarded steps")
    p.add_argument("--active", type=int, default=3, help="recorded steps")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    channels_last = not args.no_channels_last
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    step = make_step(args, device, args.amp, channels_last)
    img_dtype = AMP[args.amp] if (device.type == "cuda" and AMP[args.amp] is not None) else torch.float32
    if args.data == "synthetic":
        batch = synthetic_batch(args.batch_size, args.image_size, device, img_dtype, channels_last,
                                torch.Generator().manual_seed(0))
        batches = iter(lambda: batch, None)
        loader = None
    else:
        from fbn_fast.data import load_manifest
        from fbn_fast.data.pipeline import build_loader
        from fbn_fast.data.synthface import ensure_synthface

        cfg = TrainConfig(synth_size=args.synth_size, synth_image_size=args.image_size)
        path = ensure_synthface(default_synth_dir(cfg), size=args.synth_size, image_size=args.image_size)
        loader = build_loader(load_manifest(path), path.parent, batch_size=args.batch_size,
                              image_size=args.image_size, num_workers=args.num_workers, device=device, dtype=img_dtype)

        def endless():
            while True:
                yield from loader

        batches = endless()

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    total = args.wait + args.warmup + args.active
    out = Path(args.out) if args.out else RESULTS / (
        f"torch_profile-{device.type}-{args.trunk}-{args.image_size}px-{datetime.now():%Y%m%d-%H%M%S}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    with profile(activities=activities, schedule=schedule(wait=args.wait, warmup=args.warmup, active=args.active),
                 record_shapes=False, with_stack=False) as prof:
        for _ in range(total):
            with record_function("data"):
                b = next(batches)
            with record_function("forward+loss+backward"):
                values, bad = step.forward_backward(b)
            with record_function("optimizer"):
                step.apply(bool(bad))
            prof.step()
    if loader is not None:
        loader.close()
    prof.export_chrome_trace(str(out))
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=25))
    meta = out.with_suffix(".meta.json")
    meta.write_text(json.dumps({"settings": vars(args), "device": str(device), "torch": torch.__version__,
                                "trace": out.name}, indent=1))
    print(f"trace: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
