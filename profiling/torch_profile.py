"""Profile a few training steps with torch.profiler and export a Chrome/Perfetto trace.

The steps are exactly those of ``python -m fbn_fast.train`` (:class:`fbn_fast.train.TrainStep`), on synthetic
tensors (``--data synthetic``, the trunk and objective alone) or on SynthFace JPEGs through the input pipeline
(``--data synthface``). The NVTX-style phases (data, forward, loss, backward, optimizer) appear as
``record_function`` ranges in the trace. Output: ``profiling/results/torch_profile-<device>-<trunk>-<time>.json``
(open it in https://ui.perfetto.dev or chrome://tracing) and a table of the most expensive operators.

    python profiling/torch_profile.py                                   # CPU, small trunk, 64 px
    python profiling/torch_profile.py --device cuda --trunk resnet50 --image-size 112 --batch-size 256 \\
        --amp-dtype bf16
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
from bench_train import make_step, synthetic_batch  # noqa: E402

from fbn_fast.config import TrainConfig, add_config_options  # noqa: E402
from fbn_fast.inference import image_dtype, resolve_amp_dtype, resolve_device  # noqa: E402
from fbn_fast.train import default_synth_dir  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


#: Train's options this tool takes (same names, values and help), and their old spellings (deprecated).
TRAIN_OPTIONS = ("device", "trunk", "trunk_kwargs", "image_size", "batch_size", "amp_dtype", "channels_last",
                 "synth_size", "num_workers", "opt", "grad_clip", "loss_backend", "torchcompile")
OLD_SPELLINGS = {"amp_dtype": "--amp", "torchcompile": "--compile"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_options(p, TRAIN_OPTIONS, aliases=OLD_SPELLINGS, defaults={"synth_size": "tiny", "amp_dtype": "none"})
    p.add_argument("--data", default="synthetic", choices=["synthetic", "synthface"])
    p.add_argument("--wait", type=int, default=1, help="steps before the profiler starts")
    p.add_argument("--warmup", type=int, default=3, help="profiled but discarded steps")
    p.add_argument("--active", type=int, default=3, help="recorded steps")
    p.add_argument("--out", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    channels_last = args.channels_last
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    step = make_step(args, device, args.amp_dtype, channels_last)
    img_dtype = image_dtype(device, resolve_amp_dtype(args.amp_dtype, device))
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
