"""Take a trained model out of PyTorch: ONNX or ``torch.export``'s ExportedProgram, with a JSON sidecar.

    python -m fbn_fast.export CHECKPOINT --format onnx|exported-program [--out PATH] [--compound-classes all]

The exported module (:class:`FaceBehaviorProbabilities`) takes normalised face crops ``images`` (N, 3, S, S),
float32, any batch size N, and returns four tensors:

- ``expression_probabilities`` (N, C): softmax of the expression logits;
- ``au_probabilities`` (N, K): sigmoid of the AU logits;
- ``va`` (N, 2): valence, arousal in [-1, 1];
- ``compound_probabilities`` (N, J): zero-shot compound posteriors (docs/method.md §4, with the chosen β and T).

The sidecar (``<out>.json``, e.g. ``step_00001000.onnx.json``) names every output column (expressions, AUs,
compounds), and gives the input size, the normalisation (per-channel mean and std on a 0–1 RGB scale:
``x = (rgb / 255 - mean) / std``), the face-crop margin predict uses, and what the checkpoint was trained on.
After writing, the file is loaded back and run (ONNX: with onnxruntime, ``pip install "fbn_fast[export]"``;
ExportedProgram: with ``torch.export.load``) on batches of 1 and 3 face crops and compared with the PyTorch
module: the largest absolute differences are printed and stored in the sidecar, and the command fails when one
exceeds ``--tolerance`` (default 1e-4: float32 kernels of two runtimes sum in different orders; the differences
seen are below 1e-6).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .compound import CompoundScorer, parent_matrix, zero_shot_weights
from .faces import DEFAULT_MARGIN

__all__ = ["FORMATS", "OUTPUTS", "FaceBehaviorProbabilities", "export_model", "main", "sidecar", "verify"]

#: ``--format`` values and the file suffix each writes.
FORMATS: dict[str, str] = {"onnx": ".onnx", "exported-program": ".pt2"}
#: Output names, in order.
OUTPUTS: tuple[str, ...] = ("expression_probabilities", "au_probabilities", "va", "compound_probabilities")
INPUT = "images"
#: Default largest absolute difference allowed between the exported file's outputs and PyTorch's.
TOLERANCE = 1e-4


class FaceBehaviorProbabilities(nn.Module):
    """A FaceBehaviorNet with its outputs as probabilities, and the zero-shot compound posteriors on top.

    ``forward(images)`` → ``(expression probabilities (N, C), AU probabilities (N, K), VA (N, 2), compound
    probabilities (N, J))`` in float32. The compounds are the linear form of :class:`~fbn_fast.compound.
    CompoundScorer` (weight and bias of ``ℓ_comp(s)/T``, plus β times the parents' expression log-posteriors), held
    as buffers so that an exported graph carries them.
    """

    def __init__(self, model: nn.Module, scorer: CompoundScorer | None = None) -> None:
        super().__init__()
        self.model = model.eval()
        self.scorer = scorer or CompoundScorer()
        num_classes = int(getattr(model, "num_classes", 0)) or None
        num_aus = int(getattr(model, "num_aus", 0)) or None
        #: False when the model's AUs are not the compound table's: no compound output then (an empty column set).
        self.has_compounds = num_aus is None or num_aus == len(self.scorer.table.aus)
        weight, bias = zero_shot_weights(self.scorer.table, self.scorer.temperature)
        if not self.has_compounds:
            weight, bias = weight.new_zeros((0, num_aus)), bias.new_zeros(0)
        self.register_buffer("compound_weight", weight)
        self.register_buffer("compound_bias", bias)
        self.register_buffer("compound_parents", None)  # β × the J×C parent matrix, when β ≠ 0
        if self.scorer.beta and self.has_compounds and num_classes is not None:
            parents = torch.as_tensor(parent_matrix(self.scorer.names), dtype=torch.float32)
            if parents.shape[1] != num_classes:
                raise ValueError(f"--beta {self.scorer.beta}: the model has {num_classes} expression classes, the "
                                 f"compound parents are named over {parents.shape[1]}")
            self.register_buffer("compound_parents", self.scorer.beta * parents)

    def probabilities(self, expr: Tensor, au: Tensor, va: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The four outputs from the model's three (logits, logits, VA), in float32 (call it outside autocast)."""
        z_e, z_a = expr.float(), au.float()
        s = torch.sigmoid(z_a)
        comp = s @ self.compound_weight.T + self.compound_bias
        if self.compound_parents is not None:
            comp = comp + torch.log_softmax(z_e, 1) @ self.compound_parents.T
        return torch.softmax(z_e, 1), s, va.float(), torch.softmax(comp, 1)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.probabilities(*self.model(images))


# ------------------------------------------------------------------------------------------------ files
def sidecar(wrapper: FaceBehaviorProbabilities, image_size: int, *, trained_on: Mapping[str, Any] | None = None,
            fmt: str = "onnx") -> dict[str, Any]:
    """The JSON that travels with an exported file: label names, input size and normalisation, what it computes."""
    from .labels import AUS, EXPRESSIONS, label_names

    model = wrapper.model
    c, k = int(getattr(model, "num_classes", len(EXPRESSIONS))), int(getattr(model, "num_aus", len(AUS)))
    mean, std = getattr(model, "normalization", ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    return {
        "format": "fbn_fast.export/1",
        "file_format": fmt,
        "input": {"name": INPUT, "shape": ["N", 3, int(image_size), int(image_size)], "dtype": "float32",
                  "layout": "NCHW, RGB", "image_size": int(image_size),
                  "normalization": {"mean": list(mean), "std": list(std), "scale": "x = (rgb / 255 - mean) / std"},
                  "face_crop": {"margin": DEFAULT_MARGIN, "square": True,
                                "how": "detector box grown by margin × its longer side on each side, made square, "
                                       "resized (bilinear) to image_size"}},
        "outputs": {"expression_probabilities": ["N", c], "au_probabilities": ["N", k], "va": ["N", 2],
                    "compound_probabilities": ["N", len(wrapper.scorer)]},
        "expressions": label_names(c, EXPRESSIONS, "class"),
        "aus": label_names(k, AUS, "AU#"),
        "va": ["valence", "arousal"],
        "compounds": list(wrapper.scorer.names),
        "compound": {"beta": wrapper.scorer.beta, "temperature": wrapper.scorer.temperature,
                     "method": "zero-shot from the AU probabilities (docs/method.md §4)"},
        "au_threshold": 0.5,
        "trained_on": dict(trained_on or {}),
    }


def export_model(wrapper: FaceBehaviorProbabilities, path: str | os.PathLike, image_size: int, fmt: str = "onnx",
                 opset: int = 18) -> Path:
    """Write ``wrapper`` to ``path`` as ONNX or a ``torch.export`` ExportedProgram with a dynamic batch."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: choose one of {list(FORMATS)}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    wrapper = wrapper.cpu().eval()
    example = (torch.randn(2, 3, image_size, image_size),)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with torch.no_grad():
        if fmt == "onnx":
            try:
                import onnxscript  # noqa: F401 - torch's ONNX exporter needs it
            except ImportError:
                raise ValueError('--format onnx needs onnx and onnxscript: pip install "fbn_fast[export]"') from None
            torch.onnx.export(wrapper, example, str(out), input_names=[INPUT], output_names=list(OUTPUTS),
                              dynamic_shapes={"images": {0: batch}}, opset_version=opset, dynamo=True,
                              external_data=False, verbose=False)
        else:
            program = torch.export.export(wrapper, example, dynamic_shapes={"images": {0: batch}})
            torch.export.save(program, str(out))
    return out


def verify(wrapper: FaceBehaviorProbabilities, path: str | os.PathLike, image_size: int, fmt: str = "onnx",
           batches: Sequence[int] = (1, 3), seed: int = 0) -> dict[str, float]:
    """Largest absolute difference per output between the exported file (run by onnxruntime, or loaded back with
    ``torch.export.load``) and ``wrapper`` in PyTorch, over batches of ``batches`` random normalised crops."""
    gen = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(n, 3, image_size, image_size, generator=gen) for n in batches]
    if fmt == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            raise ValueError('verifying an ONNX export needs onnxruntime: pip install "fbn_fast[export]" '
                             "(or --no-verify)") from None
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        run = lambda x: [torch.from_numpy(np.asarray(o)) for o in session.run(list(OUTPUTS), {INPUT: x.numpy()})]
    else:
        loaded = torch.export.load(str(path)).module()
        run = lambda x: list(loaded(x))
    worst = dict.fromkeys(OUTPUTS, 0.0)
    wrapper = wrapper.cpu().eval()
    with torch.no_grad():
        for x in inputs:
            ref = wrapper(x)
            got = run(x)
            for name, a, b in zip(OUTPUTS, ref, got):
                if tuple(a.shape) != tuple(b.shape):
                    raise ValueError(f"{str(path)!r}: output {name} has shape {tuple(b.shape)} for a batch of "
                                     f"{len(x)}, PyTorch gives {tuple(a.shape)}")
                worst[name] = max(worst[name], float((a.float() - b.float()).abs().max()))
    return worst


# ------------------------------------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python -m fbn_fast.export``."""
    from .inference import add_compound_options

    p = argparse.ArgumentParser(prog="python -m fbn_fast.export",
                                description="Export a trained model (probabilities, VA and zero-shot compounds) to "
                                            "ONNX or a torch.export ExportedProgram, with a JSON sidecar.")
    p.add_argument("checkpoint", help="a checkpoint written by python -m fbn_fast.train")
    p.add_argument("--format", choices=list(FORMATS), default="onnx", help="file format (default: onnx)")
    p.add_argument("--out", default=None, help="output file (default: beside the checkpoint, named after it); the "
                                               "sidecar is the same name with .json")
    p.add_argument("--compound-classes", default="all",
                   help="'all' (the 15 compounds of the table, default) or comma-separated compound ids")
    add_compound_options(p, classes=False)
    p.add_argument("--image-size", type=int, default=None,
                   help="input size in pixels (default: the one the checkpoint was trained at)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")
    p.add_argument("--tolerance", type=float, default=TOLERANCE,
                   help=f"largest absolute difference from PyTorch accepted when verifying (default: {TOLERANCE:g})")
    p.add_argument("--no-verify", action="store_true", help="skip running the exported file against PyTorch")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from .inference import load_trained, parse_compound_classes

    args = build_parser().parse_args(argv)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" notes: not ours
    try:
        classes = parse_compound_classes(args.compound_classes)
        if classes == "present":
            raise ValueError("--compound-classes present: an export has no manifest; give 'all' or compound ids")
        trained = load_trained(args.checkpoint, "cpu")
        size = args.image_size or trained.image_size
        if size < 8:
            raise ValueError(f"--image-size must be >= 8, got {size}")
        scorer = CompoundScorer(None if classes == "all" else classes, beta=args.beta, temperature=args.temperature)
        wrapper = FaceBehaviorProbabilities(trained.model.float(), scorer)
        if not wrapper.has_compounds:
            raise ValueError(f"checkpoint {args.checkpoint!r}: its {trained.model.num_aus} AUs are not the compound "
                             f"table's {len(scorer.table.aus)}; zero-shot compounds cannot be exported")
        out = Path(args.out) if args.out else Path(args.checkpoint).with_suffix(FORMATS[args.format])
        export_model(wrapper, out, size, args.format, args.opset)
        info = sidecar(wrapper, size, trained_on=_trained_on(trained), fmt=args.format)
        if not args.no_verify:
            worst = verify(wrapper, out, size, args.format)
            info["verification"] = {"max_abs_diff": worst, "tolerance": args.tolerance, "batches": [1, 3],
                                    "runtime": "onnxruntime" if args.format == "onnx" else "torch.export.load"}
        side = out.with_name(out.name + ".json")
        side.write_text(json.dumps(info, indent=1))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} and {side}")
    if "verification" in info:
        worst = info["verification"]["max_abs_diff"]
        print("largest |exported - PyTorch| (batches of 1 and 3): "
              + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
        if max(worst.values()) > args.tolerance:
            print(f"error: the exported model differs from PyTorch by more than --tolerance {args.tolerance:g}",
                  file=sys.stderr)
            return 1
    return 0


def _trained_on(trained: Any) -> dict[str, Any]:
    """What the checkpoint says it was trained on (see :func:`fbn_fast.checkpoint.trained_on`)."""
    from .checkpoint import read_trained_on

    return read_trained_on(trained.path)


if __name__ == "__main__":
    sys.exit(main())
