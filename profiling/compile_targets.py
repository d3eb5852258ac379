"""Compile every GPU kernel variant for real CUDA targets ahead of time, on a machine without a GPU.

Two parts, each writing one JSON (registers, spill bytes, stack frame and shared memory per compiled kernel) and
printing a table:

* ``triton``: the Triton objective (``kernels/objective.py``) for ``sm_80`` and ``sm_90``, through Triton's own
  compiler with a CUDA ``GPUTarget``. The launcher itself is called on CPU tensors with the kernel's launch
  intercepted, so what is compiled is exactly the argument list, specialisation and constexprs it would launch;
  ptxas's own report (``-v``) gives the resources. ``--table ci`` is the default face plans (every logit dtype,
  with and without VA means, single-launch and split) plus the shapes the tests use (C x K = 1x1, 3x5, 5x9 and
  MAX_DIM x MAX_DIM, every logit dtype); ``--table full`` is what the launcher's choices rest on: the candidate
  face plans that ``default_tile`` was chosen from, C = K = 64 (beyond ``MAX_DIM``, which it was before) and
  ``use_dot``. Another Triton (e.g. the 3.6 of the GPU machine) is used with ``--triton-path DIR``, a folder
  that ``pip install --target DIR --no-deps triton==X`` filled.
* ``nvrtc``: ``csrc/objective_cuda.cu`` through NVRTC (no driver needed) for every template instance the
  run-time path can ask for, with that path's options, to a cubin per architecture; ptxas's report comes back
  in NVRTC's log. NVRTC and the CUDA headers come from the ``nvidia-cuda-nvrtc``, ``nvidia-cuda-runtime`` and
  ``nvidia-cuda-cccl`` wheels (the ``test`` extra) or a CUDA toolkit.

    python profiling/compile_targets.py triton --jobs 2 --out profiling/results/compile_triton-3.7.1.json
    python profiling/compile_targets.py triton --jobs 2 --table full \\
        --out profiling/results/compile_triton-3.7.1-full.json
    python profiling/compile_targets.py triton --jobs 2 --triton-path .cache/triton-3.6.0 \\
        --out profiling/results/compile_triton-3.6.0.json
    python profiling/compile_targets.py nvrtc --out profiling/results/compile_nvrtc.json
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "profiling" / "results"
ARCHS = (80, 90)
FACE = (7, 17)
#: (C, K) of the shapes the tests run besides the face shape; C = K = MAX_DIM is added (:func:`test_shapes`).
KIT_SHAPES = ((1, 1), (3, 5), (5, 9))
TABLES = {"defaults": "the launcher's face plans: every logit dtype, with and without VA means, single-launch "
                      "and split",
          "ci": "defaults + the test shapes C x K = 1x1, 3x5, 5x9 and MAX_DIM x MAX_DIM (every logit dtype, VA "
                "means; split, and single-launch for float32/float64)",
          "full": "what default_tile and MAX_DIM were chosen from: the candidate face plans, C = K = 64 (beyond "
                  "MAX_DIM) and use_dot",
          "candidates": "the candidate face plans alone"}
DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")
#: Plans (rows per block, warps) compiled for the face shape in the full table, to choose ``default_tile`` from.
CANDIDATES = ((8, 1), (8, 2), (16, 1))
#: C = K = 64 in the full table (MAX_DIM was 64 before): per dtype, the plan the launcher used for it (4 or 2
#: rows on one warp), and the C, K <= 32 plan (8 or 2 rows on two warps).
WIDE = 64
WIDE_PLANS = {"float32": ((4, 1), (8, 2)), "float64": ((2, 1), (2, 2))}


def test_shapes() -> tuple[tuple[int, int], ...]:
    """(C, K) of the shapes the tests run besides the face shape: :data:`KIT_SHAPES` and C = K = MAX_DIM."""
    from fbn_fast.kernels.objective import MAX_DIM

    return (*KIT_SHAPES, (MAX_DIM, MAX_DIM))


# ------------------------------------------------------------------------------------------ ptxas report
def parse_ptxas(log: str, kernel: str | None = None) -> dict:
    """Registers, spill bytes, stack frame and shared memory of one entry function from a ``ptxas -v`` log.

    With several entry functions in the log, ``kernel`` (a substring of the mangled name) picks one.
    """
    blocks = re.split(r"ptxas info\s*: Compiling entry function ", log)[1:]
    if kernel is not None:
        blocks = [b for b in blocks if kernel in b.split("\n", 1)[0]]
    if len(blocks) != 1:
        raise ValueError(f"ptxas log: expected one entry function{f' matching {kernel!r}' if kernel else ''}, "
                         f"found {len(blocks)}:\n{log[-2000:]}")
    text = blocks[0]
    props = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    regs = re.search(r"Used (\d+) registers", text)
    if props is None or regs is None:
        raise ValueError(f"ptxas log: no register/spill report in:\n{text[-2000:]}")
    smem = re.search(r"(\d+) bytes smem", text)
    return {"regs": int(regs.group(1)), "stack": int(props.group(1)), "spill_stores": int(props.group(2)),
            "spill_loads": int(props.group(3)), "smem_static": int(smem.group(1)) if smem else 0}


def machine() -> dict:
    from fbn_fast.machine import cpu_model

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "system": f"{platform.system()} {platform.machine()}"}


# ---------------------------------------------------------------------------------------------- Triton
@dataclass(frozen=True)
class Plan:
    """One launch of the Triton objective: shape, dtypes, VA means and AU positive weights (given together, as the
    trainer passes them, or neither, as a bare drop-in call), mode and tile."""

    role: str  # "default" (the launcher's own plan), "test-shape", "candidate", "use_dot"
    c: int
    k: int
    dtype: str
    va_means: bool
    mode: str  # "single" (one launch with the grid barrier) or "split" (two launches)
    block_b: int
    num_warps: int
    num_stages: int = 1
    use_dot: bool = False
    pos_weight: bool = False


def triton_plans(table: str) -> list[Plan]:
    """The launch plans of ``table`` (see :data:`TABLES`), the launcher's defaults first."""
    import torch
    from fbn_fast.kernels.objective import default_tile

    plans: list[Plan] = []

    def add(role: str, c: int, k: int, dtype: str, mu: bool, modes: tuple[str, ...], tile=None, **kw) -> None:
        block, warps, stages = tile or default_tile(c, k, getattr(torch, dtype))
        for mode in modes:
            p = Plan(role, c, k, dtype, mu, mode, block, warps, stages, pos_weight=mu, **kw)
            if all((p.c, p.k, p.dtype, p.va_means, p.mode, p.block_b, p.num_warps, p.num_stages, p.use_dot)
                   != (q.c, q.k, q.dtype, q.va_means, q.mode, q.block_b, q.num_warps, q.num_stages, q.use_dot)
                   for q in plans):
                plans.append(p)

    both = ("single", "split")
    if table in ("defaults", "ci"):
        for dtype in DTYPE_NAMES:
            for mu in (True, False):
                add("default", *FACE, dtype, mu, both)
    if table == "ci":
        # Every dtype in the default (split) mode; the opt-in single launch for float32 and float64, which
        # bound the half types' registers (keeps the CI table within minutes on two cores).
        for c, k in test_shapes():
            for dtype in DTYPE_NAMES:
                add("test-shape", c, k, dtype, True, both if dtype in ("float32", "float64") else ("split",))
    if table in ("full", "candidates"):
        for dtype in DTYPE_NAMES:
            for block, warps in CANDIDATES:
                add("candidate", *FACE, dtype, True, ("single",), (block, warps, 1))
    if table == "full":
        # tl.dot needs 16 rows (the launcher raises its default tile to that)
        add("use_dot", *FACE, "float32", True, both, (16, 2, 1), use_dot=True)
        add("use_dot", 32, 32, "float32", True, ("single",), (16, 2, 1), use_dot=True)
        for dtype, tiles in WIDE_PLANS.items():
            for i, (block, warps) in enumerate(tiles):
                add("beyond-max-dim", WIDE, WIDE, dtype, True, both if i == 0 else ("single",), (block, warps, 1))
    return plans


def _case(plan: Plan, b: int = 64) -> list:
    """CPU inputs of the launcher for ``plan``, laid out as the loss passes them (contiguous)."""
    import torch

    dt = getattr(torch, plan.dtype)
    g = torch.Generator().manual_seed(0)
    c, k = plan.c, plan.k
    return [torch.randn(b, c, generator=g).to(dt), torch.randn(b, k, generator=g).to(dt),
            torch.randn(b, 2, generator=g).to(dt), torch.randint(0, c, (b,), generator=g),
            torch.rand(b, generator=g) < 0.5, (torch.rand(b, k, generator=g) < 0.5).float(),
            torch.rand(b, k, generator=g) < 0.5, torch.rand(b, 2, generator=g), torch.rand(b, generator=g) < 0.5,
            torch.rand(c, k, generator=g), torch.rand(c, 2, generator=g) if plan.va_means else None,
            torch.rand(k, generator=g) * 4 + 0.5 if plan.pos_weight else None]


def capture_launches(plan: Plan) -> list[tuple[str, tuple, dict]]:
    """``(kernel, args, kwargs)`` of every launch the launcher makes for ``plan``: it runs on CPU tensors with
    the kernel's ``run`` intercepted, so nothing executes but the launcher's own argument building."""
    kobj = importlib.import_module("fbn_fast.kernels.objective")
    fn = kobj._objective_kernel
    if type(fn).__name__ != "JITFunction":
        raise RuntimeError(f"the Triton kernel is a {type(fn).__name__}: unset TRITON_INTERPRET to compile it")
    calls: list[tuple[tuple, dict]] = []
    fn.run = lambda *args, grid, warmup, **kwargs: calls.append((args, kwargs))
    try:
        kobj.triton_objective(*_case(plan), (1.0,) * 6, 1.0, 0.05, split=plan.mode == "split",
                              block_b=plan.block_b, num_warps=plan.num_warps, num_stages=plan.num_stages,
                              programs=1, use_dot=plan.use_dot, check=plan.role != "beyond-max-dim")
    finally:
        del fn.run
    out = []
    for args, kwargs in calls:
        stats, main, sync = (bool(kwargs.get(n)) for n in ("DO_STATS", "DO_MAIN", "SYNC"))
        kernel = "single" if sync else ("stats" if stats and not main else "main" if main and not stats else "?")
        kwargs = dict(kwargs)
        if sync:  # what the GPU launch adds for the grid barrier (a launch option; no effect on the code)
            kwargs["launch_cooperative_grid"] = True
        out.append((kernel, args, kwargs))
    want = ["single"] if plan.mode == "single" else ["stats", "main"]
    if [k for k, _, _ in out] != want:
        raise RuntimeError(f"{plan}: the launcher made launches {[k for k, _, _ in out]}, expected {want}")
    return out


def compile_triton_kernel(args: tuple, kwargs: dict, arch: int) -> dict:
    """Compile one launch of the objective kernel for ``sm_<arch>`` the way ``JITFunction.run`` would, without
    a driver; returns ptxas's report and Triton's shared memory."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.compiler import compile as triton_compile
    from triton.runtime.jit import create_function_from_signature

    fn = importlib.import_module("fbn_fast.kernels.objective")._objective_kernel
    kwargs = dict(kwargs)
    kwargs.setdefault("debug", bool(fn.debug) or bool(knobs.runtime.debug))
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    knobs.nvidia.dump_ptxas_log = True  # ptxas runs with -v; this prints its report to stdout
    log = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(log):
        kernel = triton_compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    seconds = time.perf_counter() - t0
    report = parse_ptxas(log.getvalue())
    return {**report, "shared": int(kernel.metadata.shared), "compile_s": round(seconds, 2)}


def run_triton(plans: list[tuple[int, Plan]], archs: tuple[int, ...]) -> list[dict]:
    """Compile every launch of each ``(number, plan)`` for each architecture: one row per kernel and arch."""
    rows = []
    for number, plan in plans:
        for kernel, args, kwargs in capture_launches(plan):
            for arch in archs:
                row = {"plan": number, **asdict(plan), "kernel": kernel, "arch": arch}
                try:
                    row.update(compile_triton_kernel(args, kwargs, arch))
                except Exception as exc:  # recorded; the caller fails on any row with an error
                    row["error"] = f"{type(exc).__name__}: {str(exc)[-1500:]}"
                rows.append(row)
                print(_fmt_row(row), flush=True)
    return rows


def _fmt_row(r: dict) -> str:
    what = (f"{r.get('triton', '')} sm_{r['arch']} {r['c']}x{r['k']} {r['dtype']:<8} mu={int(r['va_means'])} "
            f"pw={int(r.get('pos_weight', 0))} {r['mode']:<6} {r['kernel']:<6} b{r['block_b']} w{r['num_warps']}"
            f"{' dot' if r['use_dot'] else ''}")
    if "error" in r:
        return f"{what}  ERROR {r['error'][:200]}"
    return (f"{what}  regs {r['regs']:3d} spill {r['spill_stores']:5d}/{r['spill_loads']:5d} B "
            f"stack {r['stack']:5d} B shared {r['shared']:5d} B  ({r['compile_s']:.1f} s)")


# ----------------------------------------------------------------------------------------------- NVRTC
def _cuda_module():
    """The ``cuda`` backend's launch code: the NVRTC source, type names, include folders and shape rule."""
    return importlib.import_module("fbn_fast.losses.cuda")


def _wheel_dirs(sub: str) -> list[Path]:
    """``nvidia/cu*/<sub>`` folders of the installed NVIDIA wheels (newest CUDA first)."""
    out: list[Path] = []
    for entry in sys.path:
        base = Path(entry or ".") / "nvidia"
        if base.is_dir():
            out += sorted((d / sub for d in base.glob("cu*") if (d / sub).is_dir()), reverse=True)
    return out


def load_nvrtc() -> tuple[ctypes.CDLL, str]:
    """libnvrtc from the ``nvidia-cuda-nvrtc`` wheel, else a CUDA toolkit's; its builtins are loaded first so
    that NVRTC finds them without LD_LIBRARY_PATH."""
    roots = [*_wheel_dirs("lib")]
    for r in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if r:
            roots += [Path(r) / "lib64", Path(r) / "lib"]
    for d in roots:
        libs = sorted(d.glob("libnvrtc.so.*"))
        libs = [p for p in libs if ".alt." not in p.name]
        if not libs:
            continue
        for builtins in sorted(d.glob("libnvrtc-builtins.so.*")):
            if ".alt." not in builtins.name:
                ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
        return ctypes.CDLL(str(libs[0])), str(libs[0])
    raise FileNotFoundError("libnvrtc not found: install the test extra (nvidia-cuda-nvrtc) or a CUDA toolkit "
                            "(CUDA_HOME)")


def nvrtc_options() -> list[str]:
    """The run-time path's NVRTC options (:func:`fbn_fast.losses.cuda.nvrtc_options`); without a CUDA toolkit
    there, the header folders (cooperative_groups.h, libcu++) come from the wheels instead."""
    opts = list(_cuda_module().nvrtc_options())
    if any(o.startswith("-I") for o in opts):
        return opts
    for inc in _wheel_dirs("include"):
        if (inc / "cooperative_groups.h").is_file():
            return [*opts, *("-I" + str(d) for d in (inc, inc / "cccl") if d.is_dir())]
    raise FileNotFoundError("cooperative_groups.h not found: install the test extra (nvidia-cuda-runtime, "
                            "nvidia-cuda-cccl) or a CUDA toolkit (CUDA_HOME)")


def nvrtc_instances() -> list[tuple[str, str, int, int]]:
    """``(dtype, name expression, C, K)`` of the template instances the run-time path can ask for: the face
    shape and the generic kernel (the built extension's two) and the specialised shapes of the tests."""
    import torch

    mod = _cuda_module()
    out = []
    for name in DTYPE_NAMES:
        dtype = getattr(torch, name)
        acc = "double" if dtype == torch.float64 else "float"
        shapes = [FACE, (0, 0), *((c, k) for c, k in test_shapes() if mod._Nvrtc.specialise(c, k))]
        for c, k in dict.fromkeys(shapes):
            out.append((name, f"fbn::objective_kernel<{mod._NVRTC_TYPE[dtype]}, {acc}, {c}, {k}>", c, k))
    return out


#: What cupy's RawModule adds to the options the run-time path passes: flush-to-zero always, and relocatable
#: device code for ``enable_cooperative_groups=True`` (then it links against cudadevrt).
CUPY_ADDED_OPTIONS = ("-ftz=true", "--device-c")


def nvrtc_compile(lib: ctypes.CDLL, source: bytes, name: str, options: list[str]) -> tuple[str, int]:
    """Compile ``name`` (a template instance) from ``source``; returns NVRTC's log and the cubin's size."""
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p

    def check(rc: int, what: str, log: str = "") -> None:
        if rc != 0:
            raise RuntimeError(f"{what}: {lib.nvrtcGetErrorString(rc).decode()}\n{log[-4000:]}")

    prog = ctypes.c_void_p()
    check(lib.nvrtcCreateProgram(ctypes.byref(prog), source, b"objective_cuda.cu", 0, None, None),
          "nvrtcCreateProgram")
    try:
        check(lib.nvrtcAddNameExpression(prog, name.encode()), "nvrtcAddNameExpression")
        opts = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
        rc = lib.nvrtcCompileProgram(prog, len(options), opts)
        size = ctypes.c_size_t()
        check(lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "nvrtcGetProgramLogSize")
        buf = ctypes.create_string_buffer(size.value)
        check(lib.nvrtcGetProgramLog(prog, buf), "nvrtcGetProgramLog")
        log = buf.value.decode(errors="replace")
        check(rc, f"nvrtcCompileProgram({name}, {' '.join(options)})", log)
        check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
        if size.value == 0:
            raise RuntimeError(f"{name}: NVRTC produced no cubin")
        return log, size.value
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def run_nvrtc(archs: tuple[int, ...]) -> tuple[list[dict], dict]:
    lib, path = load_nvrtc()
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    mod = _cuda_module()
    source = mod.nvrtc_source().encode()
    base = [*nvrtc_options(), *CUPY_ADDED_OPTIONS]
    rows = []
    for dtype, name, c, k in nvrtc_instances():
        for arch in archs:
            row = {"instance": name, "dtype": dtype, "c": c, "k": k, "arch": arch}
            t0 = time.perf_counter()
            try:
                log, size = nvrtc_compile(lib, source, name, [*base, f"-arch=sm_{arch}", "--ptxas-options=-v"])
                row.update(parse_ptxas(log, "objective_kernel"), cubin_bytes=size)
            except Exception as exc:  # recorded; the caller fails on any row with an error
                row["error"] = f"{type(exc).__name__}: {str(exc)[-1500:]}"
            row["compile_s"] = round(time.perf_counter() - t0, 2)
            rows.append(row)
            what = f"sm_{arch} {name:<50}"
            print(f"{what} ERROR {row['error'][:300]}" if "error" in row else
                  f"{what} regs {row['regs']:3d} spill {row['spill_stores']:5d}/{row['spill_loads']:5d} B "
                  f"stack {row['stack']:5d} B  ({row['compile_s']:.1f} s)", flush=True)
    info = {"nvrtc_version": f"{major.value}.{minor.value}", "nvrtc_library": path, "source_module": mod.__name__,
            "options": [o for o in base if not o.startswith("-I")] + ["-arch=sm_<arch>", "--ptxas-options=-v"]}
    return rows, info


# ------------------------------------------------------------------------------------------------ main
def _triton_in_subprocess(argv: list[str], triton_path: str) -> int:
    """Run this script again with ``triton_path`` first on the import path (another Triton version)."""
    if not (Path(triton_path) / "triton" / "__init__.py").is_file():
        raise SystemExit(f"--triton-path {triton_path}: no triton package there (install one with "
                         f"`pip install --target {triton_path} --no-deps triton==X`)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(triton_path).resolve()), env.get("PYTHONPATH")) if p)
    rest = [a for i, a in enumerate(argv) if a != "--triton-path" and (i == 0 or argv[i - 1] != "--triton-path")]
    return subprocess.call([sys.executable, __file__, *rest], env=env)


def _run_shards(argv: list[str], jobs: int, tmp: Path) -> list[dict]:
    """Compile in ``jobs`` processes of this script, each a share of the plans; their rows, in plan order."""
    base = []
    skip = False
    for a in argv:  # this call's arguments less --jobs/--out
        if skip:
            skip = False
        elif a in ("--jobs", "--out"):
            skip = True
        elif not a.startswith(("--jobs=", "--out=")):
            base.append(a)
    outs = [tmp / f"shard{i}.json" for i in range(jobs)]
    procs = [subprocess.Popen([sys.executable, __file__, *base, "--shard", f"{i}/{jobs}", "--out", str(o)])
             for i, o in enumerate(outs)]
    codes = [p.wait() for p in procs]
    if any(c not in (0, 1) for c in codes) or not all(o.is_file() for o in outs):
        raise SystemExit(f"a compile process failed (exit codes {codes})")
    rows = [r for o in outs for r in json.loads(o.read_text())["rows"]]
    return sorted(rows, key=lambda r: r["plan"])  # stable: each plan's kernels and archs stay in order


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("part", choices=("triton", "nvrtc"))
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities (default 80 90)")
    ap.add_argument("--table", choices=tuple(TABLES), default="ci",
                    help="triton: which plans; " + "; ".join(f"{k}: {v}" for k, v in TABLES.items()))
    ap.add_argument("--triton-path", help="triton: a folder holding another Triton to compile with")
    ap.add_argument("--jobs", type=int, default=1, help="triton: compile in this many processes")
    ap.add_argument("--shard", help=argparse.SUPPRESS)  # "i/n": this process compiles plans i, i + n, ...
    ap.add_argument("--out", type=Path, required=True, help="JSON to write")
    opts = ap.parse_args(argv)
    if opts.part == "triton" and opts.triton_path:
        return _triton_in_subprocess(argv, opts.triton_path)
    # Triton reads TRITON_INTERPRET when the kernels are defined: compile them for real here.
    os.environ.pop("TRITON_INTERPRET", None)
    t0 = time.perf_counter()
    head = {"part": opts.part, "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine(), "archs": opts.arch}
    with tempfile.TemporaryDirectory() as cache:
        if opts.part == "triton":
            os.environ["TRITON_CACHE_DIR"] = cache  # a fresh cache: every kernel really compiles (ptxas report)
            import torch
            import triton

            head.update(triton=triton.__version__, torch=torch.__version__, table=opts.table)
            plans = triton_plans(opts.table)
            if opts.jobs > 1:
                rows = _run_shards(argv, opts.jobs, Path(cache))
            else:
                numbered = list(enumerate(plans))
                if opts.shard:
                    i, n = map(int, opts.shard.split("/"))
                    numbered = numbered[i::n]
                rows = [{"triton": triton.__version__, **r} for r in run_triton(numbered, tuple(opts.arch))]
        else:
            rows, info = run_nvrtc(tuple(opts.arch))
            head.update(info)
    head["seconds"] = round(time.perf_counter() - t0, 1)
    head["rows"] = rows
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(head, indent=1) + "\n")
    errors = [r for r in rows if "error" in r]
    print(f"{len(rows)} kernels, {len(errors)} failed, {head['seconds']} s; wrote {opts.out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
