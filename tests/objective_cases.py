"""The loss test kit: case builders, the float64 oracle, the tolerance rule and the edge cases of the objective.

One place for what every backend's tests and ``profiling/bench_loss.py`` share (as Liger-Kernel's tests and
benchmarks share one reference):

- :func:`make_inputs` builds logits, labels with their masks, a relatedness table and VA means; every label
  entry under a false mask holds garbage (out-of-range classes, huge values), which no backend may read.
- :class:`Case` is a batch with the loss's settings (weights, T, eps); :data:`CASES` are the edge cases that
  every available backend runs (``tests/test_objective_backends.py``).
- :func:`run` calls a backend through the public API and returns :class:`Outputs` (``[total, *TERMS]`` and
  the gradients of the total w.r.t. ``z_e``, ``z_a``, ``v``); :func:`reference` is the oracle: backend
  ``torch`` in float64 on the very values (rounded to the input dtype) that the backend under test saw.
- :func:`assert_matches` / :func:`error_ratio` hold a run to the oracle by the one tolerance rule
  (:func:`allowed_error`: the output's rounding plus a multiple of PyTorch's own float32 error on the same
  inputs, :func:`pytorch_float32`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from fbn_fast import LossWeights, face_behavior_loss
from fbn_fast.losses import BACKENDS, TERMS, available_backends
from fbn_fast.losses.reference import DEFAULT_EPS, WEIGHTS

#: The widest C = K of the kit: the ``triton`` backend's limit (``MAX_DIM``), so that every backend runs every
#: case; wider shapes, which it rejects with an error naming the limit, are tested in tests/test_op_contract.py.
WIDE = 32

LOGITS: tuple[str, ...] = ("z_e", "z_a", "v")
LABELS: tuple[str, ...] = ("expr", "expr_mask", "au", "au_mask", "va", "va_mask")
TABLES: tuple[str, ...] = ("relatedness", "va_means", "au_pos_weight")
#: Every input of the objective, in the order of ``reference_terms`` and the fused op.
NAMES: tuple[str, ...] = (*LOGITS, *LABELS, *TABLES)
ONES: tuple[float, ...] = (1.0,) * len(WEIGHTS)
#: Logit dtypes every backend takes; float64 is computed in float64, the others in float32.
INPUT_DTYPES: tuple[torch.dtype, ...] = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
#: The device types each backend serves (``cpu`` and ``cuda`` are the native backends of their own device type).
SERVES: dict[str, tuple[str, ...]] = {"torch": ("cpu", "cuda"), "triton": ("cpu", "cuda"), "cpu": ("cpu",),
                                      "cuda": ("cuda",)}
#: Garbage written into every unannotated label entry: neither a class nor a probability nor a VA value.
GARBAGE_CLASS_RANGE = (-1000, 1000)
GARBAGE_HUGE = 1e30
#: The objective's inputs by name (``va_means`` may be None).
Inputs = dict[str, Tensor | None]


# ------------------------------------------------------------------------------------------- tolerance
#: How many times PyTorch's own float32 error a backend may make, in the units of its compute dtype.
#: Why (the rule of flash-attention's tests, a kernel's error bounded by a multiple of PyTorch's own): every
#: backend computes in float32 (float64 for float64 logits) but sums rows, classes and AUs in its own order, with
#: its own exp/log (the SIMD and Triton bodies), so it legitimately differs from the exact result by roundings
#: amplified by the problem's conditioning (a low temperature, many AUs, saturated logits, a gradient that
#: cancels down to a fraction of its summands). PyTorch's own float32 computation on the same inputs measures
#: that amplification case by case, which a fixed tolerance cannot: its error, scaled to the compute dtype's
#: unit roundoff, is the yardstick. Worst seen on this machine, over the kit and 80 random batches (any B, C, K,
#: T down to 0.25): 13 times the yardstick (cpu, float32, grad z_e), typically under 3; 32 leaves a margin for
#: other instruction sets and GPUs and still fails a real bug (a wrong sign, a lost 1/B, a masked label read:
#: an error of order 1) by orders of magnitude.
YARDSTICK_MULTIPLE = 32.0
#: float64 results: the least yardstick, in float32 roundings of the output's scale (see :func:`allowed_error`);
#: 64 × 32 unit roundoffs of float64 is 2.3e-13 of the scale, still 10 orders below a real bug.
FLOAT64_FLOOR_ROUNDINGS = 64.0


def compute_dtype(input_dtype: torch.dtype) -> torch.dtype:
    """The dtype every backend computes the objective in for logits of ``input_dtype``."""
    return torch.float64 if input_dtype == torch.float64 else torch.float32


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the distance from 1 to the next ``dtype`` number: the relative error of one rounding."""
    return torch.finfo(dtype).eps / 2


def natural_unit(name: str, ref: Tensor) -> float:
    """The least scale of output ``name`` of :class:`Outputs`: 1 for the terms (sums of log-likelihoods of order
    1), 1/B for a gradient (the derivative of means over at most B rows)."""
    return 1.0 if name == "terms" else 1.0 / max(ref.shape[0], 1)


def allowed_error(ref: Tensor, out_dtype: torch.dtype, input_dtype: torch.dtype, float32_error: float,
                  floor: float) -> Tensor:
    """How far, element by element, a result stored in ``out_dtype`` may be from the float64 oracle ``ref``.

    Three parts: the rounding of each value to the output dtype (one unit roundoff of the value, e.g. 2^-9 of a
    bfloat16 gradient); :data:`YARDSTICK_MULTIPLE` times PyTorch's own float32 error on this output
    (``float32_error``, its largest; at least one float32 rounding of the output's scale, ``max(|ref|)`` or
    ``floor``), in the compute dtype's units (a 2^-29 of it for float64); and one subnormal step of the output
    dtype (float16 gradients of a large batch fall among the subnormals, where rounding is absolute).
    """
    out = torch.finfo(out_dtype)
    u32 = unit_roundoff(torch.float32)
    scale = max(float(ref.abs().max()) if ref.numel() else 0.0, floor)
    # In float64 the float32 error is a noisy gauge (it can come out near zero by luck while the float64 sums
    # still round B, C and K times): there its floor is FLOAT64_FLOOR_ROUNDINGS float32 roundings of the scale.
    floor_roundings = FLOAT64_FLOOR_ROUNDINGS if compute_dtype(input_dtype) == torch.float64 else 1.0
    yardstick = max(float32_error, floor_roundings * u32 * scale) * unit_roundoff(compute_dtype(input_dtype)) / u32
    return unit_roundoff(out_dtype) * ref.abs() + YARDSTICK_MULTIPLE * yardstick + out.smallest_normal * out.eps


class Outputs(NamedTuple):
    """What a backend returns for one batch: ``[total, *TERMS]`` and the gradients of the total."""

    terms: Tensor
    grad_z_e: Tensor
    grad_z_a: Tensor
    grad_v: Tensor

    def named(self) -> Iterator[tuple[str, Tensor]]:
        yield from zip(("terms", "grad z_e", "grad z_a", "grad v"), self)

    def cpu(self) -> Outputs:
        return Outputs(*(t.detach().cpu() for t in self))


# ---------------------------------------------------------------------------------------------- builders
def make_inputs(b: int, c: int = 7, k: int = 17, *, seed: int = 0, scale: float = 2.0, p_expr: float = 0.5,
                p_au: float = 0.5, p_va: float = 0.7, au_rate: float = 0.5, mu: bool = True,
                pos_weight: bool = True) -> Inputs:
    """A random batch: logits in float64 (each backend's input dtype is a rounding of these), labels and tables
    in float32 (exact in every compute dtype), garbage in every label entry under a false mask.

    ``p_expr``, ``p_au``, ``p_va``: the share of rows (AU entries) annotated; ``au_rate``: the share of active AUs;
    ``mu``, ``pos_weight``: with VA means and AU positive weights (in [0.2, 5], both sides of plain BCE's 1).
    """
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    rand = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    inputs = {
        "z_e": torch.randn(b, c, generator=g, dtype=f64) * scale,
        "z_a": torch.randn(b, k, generator=g, dtype=f64) * scale,
        "v": torch.randn(b, 2, generator=g, dtype=f64).tanh(),
        "expr": torch.randint(0, c, (b,), generator=g),
        "expr_mask": rand(b) < p_expr,
        "au": (rand(b, k) < au_rate).float(),
        "au_mask": rand(b, k) < p_au,
        "va": rand(b, 2) * 2 - 1,
        "va_mask": rand(b) < p_va,
        "relatedness": rand(c, k),
        "va_means": (rand(c, 2) - 0.5) if mu else None,
    }
    inputs["au_pos_weight"] = 0.2 + 4.8 * rand(k) if pos_weight else None
    return with_garbage(inputs, seed=seed + 1)


def with_garbage(inputs: Inputs, seed: int, fill: float | None = None) -> Inputs:
    """``inputs`` with every unannotated label entry replaced: classes out of range, and ``fill`` (by default a
    random mix of ±:data:`GARBAGE_HUGE` and large random numbers) in the AU and VA labels."""
    g = torch.Generator().manual_seed(seed)
    out = dict(inputs)

    def junk(like: Tensor) -> Tensor:
        if fill is not None:
            return torch.full_like(like, fill)
        wild = torch.randn(like.shape, generator=g) * 1e4
        huge = torch.where(torch.rand(like.shape, generator=g) < 0.5, -GARBAGE_HUGE, GARBAGE_HUGE)
        return torch.where(torch.rand(like.shape, generator=g) < 0.5, huge, wild).to(like.dtype)

    lo, hi = GARBAGE_CLASS_RANGE
    expr = inputs["expr"]
    classes = inputs["z_e"].shape[1]
    other = torch.randint(lo, hi, expr.shape, generator=g)
    other = torch.where((other >= 0) & (other < classes), other + classes, other)  # never a real class
    out["expr"] = torch.where(inputs["expr_mask"], expr, other)
    out["au"] = torch.where(inputs["au_mask"], inputs["au"], junk(inputs["au"]))
    out["va"] = torch.where(inputs["va_mask"][:, None], inputs["va"], junk(inputs["va"]))
    return out


@dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, so references cache per case
class Case:
    """A batch and the loss settings it is run with."""

    inputs: Inputs
    weights: tuple[float, ...] = ONES
    temperature: float = 1.0
    eps: float = DEFAULT_EPS
    notes: str = field(default="", compare=False)

    def at(self, dtype: torch.dtype, device: str | torch.device = "cpu") -> Inputs:
        """The inputs on ``device`` with the logits rounded to ``dtype``: fresh tensors, the logits leaves."""
        # Copies throughout: a test may edit what it gets without touching the shared case.
        out = {n: None if t is None else t.to(device, copy=True) for n, t in self.inputs.items()}
        for n in LOGITS:
            out[n] = self.inputs[n].to(device=device, dtype=dtype, copy=True)
        return out

    def args(self, dtype: torch.dtype, device: str | torch.device = "cpu") -> list[Tensor | None]:
        """The inputs as positional arguments, in :data:`NAMES` order (for calling a backend function directly)."""
        inputs = self.at(dtype, device)
        return [inputs[n] for n in NAMES]

    def loss(self) -> dict:
        """The loss settings as keywords of :func:`fbn_fast.face_behavior_loss`."""
        return {"weights": LossWeights(*self.weights), "temperature": self.temperature, "eps": self.eps}


def masks_off(inputs: Inputs, seed: int) -> Inputs:
    """``inputs`` with no label at all (every entry garbage)."""
    off = dict(inputs)
    for m in ("expr_mask", "au_mask", "va_mask"):
        off[m] = torch.zeros_like(inputs[m])
    return with_garbage(off, seed)


def extreme_logits(inputs: Inputs, seed: int, value: float = 80.0) -> Inputs:
    """``inputs`` with logits of ±``value`` (saturated softmax and sigmoids: log-space paths must hold)."""
    g = torch.Generator().manual_seed(seed)
    out = dict(inputs)
    for n in ("z_e", "z_a"):
        out[n] = torch.where(torch.rand(inputs[n].shape, generator=g) < 0.5, -value, value).double()
    return out


def one_label_per_task(b: int, seed: int) -> Inputs:
    """One labelled row per task (a single VA label: CCC needs two, so that term is 0 with its gradient)."""
    inputs = make_inputs(b, seed=seed, p_expr=0.0, p_au=0.0, p_va=0.0)  # nothing labelled: all garbage
    inputs = {n: None if t is None else t.clone() for n, t in inputs.items()}
    inputs["expr_mask"][3], inputs["expr"][3] = True, 2
    inputs["au_mask"][5, :5] = True
    inputs["au"][5, :5] = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    inputs["va_mask"][6] = True
    inputs["va"][6] = torch.tensor([0.3, -0.2])
    return inputs


def _edge_cases() -> dict[str, Case]:
    """The set every backend runs: named so that a failure says which."""
    weighted = tuple(0.5 + 0.25 * i for i in range(len(WEIGHTS)))
    cases = {
        "face 7x17": Case(make_inputs(64, seed=1)),
        f"C=K={WIDE}, T=2.5": Case(make_inputs(48, WIDE, WIDE, seed=2), temperature=2.5),
        # Not a multiple of any row block (Triton blocks, SIMD packs, CPU chunks): several blocks, a ragged tail.
        "B=777 ragged tail": Case(make_inputs(777, seed=3), temperature=0.8),
        "B=1": Case(make_inputs(1, seed=4)),
        "all masked": Case(masks_off(make_inputs(20, seed=5), seed=6)),
        "one label per task": Case(one_label_per_task(24, seed=7), temperature=0.6),
        "logits +-80": Case(extreme_logits(make_inputs(33, seed=8), seed=9)),
        "T=0.6": Case(make_inputs(40, seed=10), weights=weighted, temperature=0.6),
        "no VA means": Case(make_inputs(29, seed=11, mu=False)),
        "plain BCE (no AU positive weights)": Case(make_inputs(31, seed=14, pos_weight=False)),
        "C=1, K=1": Case(make_inputs(12, 1, 1, seed=12), temperature=1.3),
        "C=3, K=5, eps=0.1": Case(make_inputs(9, 3, 5, seed=13), eps=0.1),
    }
    for i, name in enumerate(WEIGHTS):
        w = tuple(0.0 if j == i else x for j, x in enumerate(weighted))
        cases[f"{name} weight 0"] = Case(make_inputs(40, seed=20 + i), weights=w, temperature=1.7)
    return cases


CASES: dict[str, Case] = _edge_cases()


# ------------------------------------------------------------------------------------------------- calls
def call(backend: str, inputs: Inputs, weights: tuple[float, ...] = ONES,
         temperature: float = 1.0, eps: float = DEFAULT_EPS) -> Outputs:
    """``backend`` through :func:`fbn_fast.face_behavior_loss`: terms, total and autograd gradients."""
    z = [inputs[n].detach().requires_grad_() for n in LOGITS]
    out = face_behavior_loss(*z, **{n: inputs[n] for n in (*LABELS, *TABLES)}, weights=LossWeights(*weights),
                             temperature=temperature, eps=eps, backend=backend)
    grads = torch.autograd.grad(out.total, z)
    terms = torch.stack([out.total.detach(), *(out.terms[t] for t in TERMS)])
    return Outputs(terms, *grads)


def call_weighted(backend: str, inputs: Inputs, weights: Tensor, coef: Tensor, temperature: float = 1.0,
                  eps: float = DEFAULT_EPS) -> tuple[Tensor, ...]:
    """``backend`` with per-term weights as a tensor that requires grad and differentiable terms: the gradients
    of ``total + Σ_i coef_i L_i`` with respect to ``z_e``, ``z_a``, ``v`` and the weights, from one call."""
    z = [inputs[n].detach().requires_grad_() for n in LOGITS]
    w = weights.detach().to(inputs["z_e"].device).requires_grad_()
    out = face_behavior_loss(*z, **{n: inputs[n] for n in (*LABELS, *TABLES)}, weights=w, temperature=temperature,
                             eps=eps, backend=backend, differentiable_terms=True)
    mixed = out.total + sum(c * out.terms[t] for c, t in zip(coef.tolist(), TERMS))
    return torch.autograd.grad(mixed, [*z, w])


def run(backend: str, case: Case, dtype: torch.dtype, device: str | torch.device = "cpu") -> Outputs:
    """``case`` with logits of ``dtype`` on ``device`` through ``backend``."""
    return call(backend, case.at(dtype, device), case.weights, case.temperature, case.eps)


@functools.lru_cache(maxsize=256)
def reference(case: Case, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> Outputs:
    """The oracle: backend ``torch`` in float64 on the logits rounded to ``dtype`` (the values a backend fed
    ``dtype`` logits sees), so that it carries no rounding of the inputs, only of the float64 computation."""
    inputs = case.at(dtype, device)
    for n in LOGITS:
        inputs[n] = inputs[n].double()
    return call("torch", inputs, case.weights, case.temperature, case.eps)


@functools.lru_cache(maxsize=256)
def pytorch_float32(case: Case, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> Outputs:
    """The yardstick: backend ``torch`` in float32 on the logits rounded to ``dtype``, its outputs unrounded."""
    inputs = case.at(dtype, device)
    for n in LOGITS:
        inputs[n] = inputs[n].float()
    return call("torch", inputs, case.weights, case.temperature, case.eps)


def cuda_launches(step: Callable[[], object]) -> list[str]:
    """Names of the CUDA kernels one call of ``step`` launches (torch.profiler; the device drained around it)."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def backend_targets() -> list[tuple[str, str, str | None]]:
    """``(backend, device type, why it cannot run here or None)`` for every backend on each device it serves."""
    targets = []
    for device in ("cpu", "cuda"):
        no_device = None if device == "cpu" or torch.cuda.is_available() else "no CUDA device"
        report = {} if no_device else available_backends(device)
        for name in BACKENDS:
            if device in SERVES[name]:
                why = no_device or (None if report[name].startswith("available") else report[name])
                targets.append((name, device, why))
    return targets


# -------------------------------------------------------------------------------------------- comparison
def _errors(got: Outputs, case: Case, input_dtype: torch.dtype,
            device: str = "cpu") -> Iterator[tuple[str, Tensor, Tensor, Tensor, Tensor]]:
    """``(name, got, oracle, error, allowed)`` of each output, on the CPU in float64; as many terms as ``got`` has
    (a benchmark may keep only the total). The oracle and the yardstick run on ``device``."""
    ref, own = reference(case, input_dtype, device), pytorch_float32(case, input_dtype, device)
    for (name, g), r, f in zip(got.named(), ref, own):
        if name == "terms":
            r, f = r[: g.shape[0]], f[: g.shape[0]]
        r, f, g = r.detach().cpu().double(), f.detach().cpu().double(), g.detach().cpu()
        assert g.shape == r.shape, f"{name}: shape {tuple(g.shape)}, expected {tuple(r.shape)}"
        f32_err = float((f - r).abs().max()) if r.numel() else 0.0
        allowed = allowed_error(r, g.dtype, input_dtype, f32_err, floor=natural_unit(name, r))
        yield name, g, r, (g.double() - r).abs(), allowed


def error_ratio(got: Outputs, case: Case, input_dtype: torch.dtype, device: str = "cpu") -> dict[str, float]:
    """The worst ``error / allowed_error`` of each output of ``got`` (a run of ``case`` with logits of
    ``input_dtype``): at most 1 passes; NaN (or inf) is a failure."""
    return {name: float((err / allowed).nan_to_num(nan=torch.inf).max()) if err.numel() else 0.0
            for name, _, _, err, allowed in _errors(got, case, input_dtype, device)}


def assert_matches(got: Outputs, case: Case, input_dtype: torch.dtype, what: str = "") -> None:
    """Each output of ``got`` (a run of ``case`` with logits of ``input_dtype``) within :func:`allowed_error` of
    the oracle; a failure names the worst entry."""
    for name, g, r, err, allowed in _errors(got, case, input_dtype):
        ratio = (err / allowed).nan_to_num(nan=torch.inf).flatten()
        if not ratio.numel() or ratio.max() <= 1:
            continue
        i = int(ratio.argmax())
        at = [int(x) for x in torch.unravel_index(torch.tensor(i), err.shape)]
        label = ("total", *TERMS)[at[0]] if name == "terms" else f"{name}{at}"
        value, oracle, e, a = (float(t.flatten()[i]) for t in (g, r, err, allowed))
        raise AssertionError(f"{what} {label}: got {value:.9g}, oracle {oracle:.9g}, error {e:.3g} > allowed {a:.3g} "
                             f"({int((ratio > 1).sum())} of {ratio.numel()} entries of {name} outside)")
