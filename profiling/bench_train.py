"""Training throughput: images/s of the full training step, trunk-only (synthetic tensors) and end to end.

* ``trunk``: random images and labels already on the device, through the exact step of ``fbn_fast.train``
  (forward under autocast, the fused objective, backward, clipping, fused optimizer): the ceiling the input
  pipeline has to feed.
* ``e2e``: JPEGs of SynthFace's training split through the input pipeline (decode, augment, normalise,
  channels-last) into the same step.

Every combination of ``--amp-dtype`` and ``--channels-last`` is measured, and for each one the ratio e2e / trunk.
Results go to ``profiling/results/bench_train-<device>-<date>.json`` with the machine, versions and settings.

    python profiling/bench_train.py                                    # CPU defaults: small trunk, 64 px
    python profiling/bench_train.py --device cuda --trunk resnet50 --image-size 112 --batch-size 256 \\
        --amp-dtype bf16 --channels-last on --synth-size small --steps 50     # the GPU target configuration
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

from fbn_fast import relatedness
from fbn_fast.config import TrainConfig, add_config_options
from fbn_fast.inference import image_dtype, resolve_amp_dtype, resolve_device
from fbn_fast.labels import NUM_AUS, NUM_EXPRESSIONS
from fbn_fast.losses import FaceBehaviorLoss, resolve_backend
from fbn_fast.model import build_model
from fbn_fast.optim import WarmupCosine, build_optimizer
from fbn_fast.step import TrainStep

RESULTS = Path(__file__).resolve().parent / "results"
#: Train's options this benchmark takes (same names, values and help); ``--amp-dtype`` takes several values here.
TRAIN_OPTIONS = ("device", "trunk", "trunk_kwargs", "image_size", "batch_size", "amp_dtype", "opt", "grad_clip",
                 "loss_backend", "torchcompile", "synth_size", "synth_image_size", "synth_dir", "manifest",
                 "num_workers", "loader_backend", "num_threads")
#: Old spellings, accepted for one release with a deprecation warning.
OLD_SPELLINGS = {"amp_dtype": "--amp", "torchcompile": "--compile"}


def synthetic_batch(n: int, size: int, device: torch.device, dtype: torch.dtype, channels_last: bool,
                    gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A batch shaped like the pipeline's: every task partly labelled, as in a mixed SynthFace batch."""
    image = torch.randn(n, 3, size, size, generator=gen).to(device=device, dtype=dtype)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    g = lambda *s: torch.rand(*s, generator=gen)  # noqa: E731
    return {
        "image": image,
        "expr": torch.randint(0, NUM_EXPRESSIONS, (n,), generator=gen).to(device),
        "expr_mask": (g(n) < 0.6).to(device),
        "au": (g(n, NUM_AUS) < 0.3).float().to(device),
        "au_mask": (g(n, NUM_AUS) < 0.4).to(device),
        "va": (g(n, 2) * 2 - 1).to(device),
        "va_mask": (g(n) < 0.4).to(device),
    }


def make_step(args, device: torch.device, amp: str, channels_last: bool) -> TrainStep:
    torch.manual_seed(0)
    model = build_model(args.trunk, channels_last=channels_last, trunk_kwargs=args.trunk_kwargs).to(device)
    cfg = TrainConfig(opt=args.opt, lr=1e-3, trunk=args.trunk, grad_clip=args.grad_clip)
    opt, impl = build_optimizer(cfg, model, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(10**6, 10, 0.01))
    net = torch.compile(model) if args.torchcompile else model
    loss = FaceBehaviorLoss(relatedness.prior(), backend=args.loss_backend).to(device)
    step = TrainStep(net, loss, opt, sched, device=device, amp_dtype=resolve_amp_dtype(amp, device),
                     grad_clip=args.grad_clip)
    step.optimizer_impl = impl
    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: TrainStep, batches, warmup: int, steps: int, device: torch.device) -> dict[str, float]:
    """Images/s over ``steps`` steps after ``warmup`` (compilation, cudnn autotuning, loader start-up)."""
    it = iter(batches)
    for _ in range(warmup):
        step.step(next(it))
    _sync(device)
    t0 = time.perf_counter()
    images = 0
    for _ in range(steps):
        batch = next(it)
        step.step(batch)
        images += batch["image"].shape[0]
    _sync(device)
    dt = time.perf_counter() - t0
    return {"images_per_s": images / dt, "seconds": dt, "steps": steps, "images": images}


def _repeat(batch):
    while True:
        yield batch


def _endless(loader):
    while True:
        yield from loader


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_options(
        p, TRAIN_OPTIONS, aliases=OLD_SPELLINGS,
        defaults={"synth_size": "tiny", "amp_dtype": None},
        helps={"amp_dtype": "autocast dtypes to measure, as train's --amp-dtype (default: none and bf16)",
               "synth_size": "SynthFace preset or count for e2e",
               "synth_image_size": "SynthFace rendering size (default: --image-size)",
               "manifest": "use this manifest for e2e instead of SynthFace"},
        overrides={"amp_dtype": {"nargs": "+"}})
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--channels-last", nargs="+", default=["on", "off"], choices=["on", "off"],
                   help="memory formats to measure (default: on off)")
    p.add_argument("--modes", nargs="+", default=["trunk", "e2e"], choices=["trunk", "e2e"])
    p.add_argument("--out", default=None, help="JSON path (default: profiling/results/bench_train-...json)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amps = args.amp_dtype or ["none", "bf16"]

    manifest = root = None
    if "e2e" in args.modes:
        from fbn_fast.data import load_manifest

        if args.manifest:
            manifest_path = Path(args.manifest)
        else:
            from fbn_fast.data.synthface import default_synth_dir, ensure_synthface

            px = args.synth_image_size or args.image_size
            cfg = TrainConfig(synth_size=args.synth_size, synth_image_size=px, synth_dir=args.synth_dir)
            t0 = time.perf_counter()
            manifest_path = ensure_synthface(default_synth_dir(cfg), size=args.synth_size, image_size=px)
            print(f"SynthFace ready in {time.perf_counter() - t0:.1f} s: {manifest_path}", file=sys.stderr)
        manifest, root = load_manifest(manifest_path), manifest_path.parent

    results = []
    gen = torch.Generator().manual_seed(0)
    for amp in amps:
        for cl in args.channels_last:
            channels_last = cl == "on"
            row = {"amp": amp, "channels_last": channels_last}
            img_dtype = image_dtype(device, resolve_amp_dtype(amp, device))
            for mode in args.modes:
                step = make_step(args, device, amp, channels_last)
                row["optimizer"] = step.optimizer_impl
                if mode == "trunk":
                    batch = synthetic_batch(args.batch_size, args.image_size, device, img_dtype, channels_last, gen)
                    r = time_steps(step, _repeat(batch), args.warmup, args.steps, device)
                else:
                    from fbn_fast.data.pipeline import build_loader

                    # One epoch spans the whole measurement: no pipeline restart at an epoch boundary inside it
                    # (the sampler draws from endless reshuffled streams, so a small set is fine).
                    loader = build_loader(manifest, root, batch_size=args.batch_size, image_size=args.image_size,
                                          train=True, epoch_size=args.warmup + args.steps + 1,
                                          backend=args.loader_backend, num_workers=args.num_workers,
                                          device=device, dtype=img_dtype)
                    row["loader_backend"] = loader.backend
                    try:
                        r = time_steps(step, _endless(loader), args.warmup, args.steps, device)
                    finally:
                        loader.close()
                row[mode] = r
                print(f"{mode:>5}  amp={amp:<4} channels_last={cl:<3}  {r['images_per_s']:8.1f} img/s",
                      file=sys.stderr, flush=True)
            if "trunk" in row and "e2e" in row:
                row["e2e_over_trunk"] = row["e2e"]["images_per_s"] / row["trunk"]["images_per_s"]
                print(f"       e2e / trunk = {row['e2e_over_trunk']:.3f}", file=sys.stderr)
            results.append(row)

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    report = {
        "benchmark": "bench_train",
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": str(device), "device_name": dev_name, "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "loss_backend": resolve_backend(args.loss_backend, device),
        "results": results,
    }
    out = Path(args.out) if args.out else RESULTS / (
        f"bench_train-{device.type}-{args.trunk}-{args.image_size}px-{datetime.now():%Y%m%d-%H%M%S}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
