"""The GPU code compiled for real CUDA targets on a machine without a GPU, and the GPU check's CPU dry run.

``profiling/compile_targets.py`` compiles the Triton objective for sm_80 and sm_90 through Triton's own compiler
(the pinned Triton, and the 3.6 of the GPU machine from ``.cache/triton-3.6.0``, which the README's test command
installs) and ``csrc/objective_cuda.cu`` through NVRTC; these tests run it in subprocesses (Triton's interpreter,
which the suite switches on, must be off there) and read its JSON.
"""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "profiling" / "compile_targets.py"
TRITON_36 = Path(os.environ.get("FBN_FAST_TRITON36", ROOT / ".cache" / "triton-3.6.0"))
DTYPES = ("float32", "float16", "bfloat16", "float64")


def compile_table(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "table.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT), *args, "--out", str(out)], env=env, capture_output=True,
                          text=True, timeout=1500)
    assert proc.returncode == 0, (f"compile_targets.py {' '.join(args)} failed:\n{proc.stdout[-6000:]}"
                                  f"{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def check_default_plans(table: dict) -> None:
    rows = table["rows"]
    assert not [r for r in rows if "error" in r]
    defaults = [r for r in rows if r["role"] == "default"]
    # Every launch the launcher can make for the face shape, for both targets.
    kernels = {(r["dtype"], r["va_means"], r["mode"], r["kernel"], r["arch"]) for r in defaults}
    want = {(d, mu, mode, kern, arch) for d in DTYPES for mu in (True, False) for arch in (80, 90)
            for mode, kern in (("single", "single"), ("split", "stats"), ("split", "main"))}
    assert kernels == want
    for r in rows:
        assert 0 < r["regs"] <= 255 and r["shared"] >= 0, r
    spills = [f"{r['dtype']} mu={r['va_means']} {r['kernel']}: {r['spill_stores']} B (block_b {r['block_b']}, "
              f"{r['num_warps']} warps)" for r in defaults if r["arch"] == 90 and r["spill_stores"]]
    assert not spills, f"Triton {table['triton']}: the default face plans spill on sm_90: {spills}"


def test_triton_pinned_compiles_for_sm80_sm90(tmp_path):
    table = compile_table(tmp_path, "triton", "--table", "ci", "--jobs", "2")
    check_default_plans(table)
    # The shapes the kit and the GPU tests run, up to the launcher's limit, in every logit dtype.
    wide = importlib.import_module("fbn_fast.kernels.objective").MAX_DIM
    shapes = {(r["c"], r["k"], r["dtype"], r["kernel"], r["arch"]) for r in table["rows"] if r["role"] == "test-shape"}
    assert shapes >= {(c, k, d, kern, a) for c, k in ((1, 1), (3, 5), (5, 9), (wide, wide)) for d in DTYPES
                      for kern in ("stats", "main") for a in (80, 90)}


def test_triton_36_compiles_for_sm80_sm90(tmp_path):
    assert (TRITON_36 / "triton" / "__init__.py").is_file(), (
        f"Triton 3.6 is not at {TRITON_36}: install it with "
        f"`python -m pip install --target {TRITON_36} --no-deps triton==3.6.0` (the README's test command does)")
    table = compile_table(tmp_path, "triton", "--table", "defaults", "--jobs", "2", "--triton-path", str(TRITON_36))
    assert table["triton"].startswith("3.6.")
    check_default_plans(table)


def test_nvrtc_compiles_every_instance(tmp_path):
    table = compile_table(tmp_path, "nvrtc")
    rows = table["rows"]
    assert not [r for r in rows if "error" in r]
    # The built extension's instances (face shape and generic) and the tests' specialised shapes, every dtype.
    got = {(r["dtype"], r["c"], r["k"], r["arch"]) for r in rows}
    assert got == {(d, c, k, a) for d in DTYPES for c, k in ((7, 17), (0, 0), (1, 1), (3, 5), (5, 9))
                   for a in (80, 90)}
    assert all(0 < r["regs"] <= 255 and r["cubin_bytes"] > 0 for r in rows)
    # The run-time path's own options (header folders aside), then what cupy adds.
    runtime = [o for o in importlib.import_module("fbn_fast.losses.cuda").nvrtc_options() if not o.startswith("-I")]
    assert table["options"][:len(runtime)] == runtime and "--device-c" in table["options"]


def test_gpu_check_budget_and_dry_run(tmp_path):
    out = tmp_path / "gpu_out"
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "PYTHON")}
    proc = subprocess.run(["bash", str(ROOT / "profiling" / "gpu_check.sh"), "--dry-run", str(out)], env=env,
                          capture_output=True, text=True, timeout=2400)
    summary = (out / "summary.txt").read_text() if (out / "summary.txt").is_file() else ""
    assert proc.returncode == 0, f"gpu_check.sh --dry-run failed:\n{proc.stdout[-4000:]}\n{summary[-4000:]}"
    result = json.loads((out / "gpu_check.json").read_text())
    steps = {s["name"]: s for s in result["steps"]}
    # The GPU run's plan: the limits fit the budget (8 minutes), correctness first, the sweep last.
    assert sum(s["limit_s"] for s in result["steps"]) <= result["budget_s"] <= 480
    names = list(steps)
    assert names[:3] == ["env", "test_face", "test_barrier"] and names[-1] == "bench_loss_sweep"
    # The barrier mode's verdict is a field of its own, and a dry run (no card) never verifies it.
    assert result["grid_barrier_step"] == "ok" and result["grid_barrier_verified"] is False
    assert max(names.index(n) for n in names if n.startswith("test_")) < min(
        names.index(n) for n in names if n.startswith("bench_"))
    assert steps["build_native"]["status"].startswith("skipped")
    assert all(s["status"] == "ok" for n, s in steps.items() if n != "build_native"), steps
    for name in ("bench_loss-cpu", "bench_train-cpu", "bench_loader-cpu", "bench_loss_sweep-cpu"):
        assert json.loads((out / f"{name}.json").read_text()), name


def test_gpu_check_finds_python3_without_python(tmp_path):
    shims = tmp_path / "bin"
    shims.mkdir()
    shim = shims / "python3"
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    env["PATH"] = str(shims)  # python3 and nothing else: no `python` anywhere
    proc = subprocess.run(["/bin/bash", str(ROOT / "profiling" / "gpu_check.sh"), "--which-python"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "python3", proc.stderr
    env["PATH"] = str(tmp_path / "empty")
    proc = subprocess.run(["/bin/bash", str(ROOT / "profiling" / "gpu_check.sh"), "--which-python"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and not proc.stdout.strip()


def test_committed_full_table_backs_the_limits():
    """The full table (candidate face plans, C = K = 64, use_dot) that default_tile and MAX_DIM were chosen from."""
    table = json.loads((ROOT / "profiling" / "results" / "compile_triton-3.7.1-full.json").read_text())
    assert table["triton"] == "3.7.1" and table["table"] == "full" and table["date"] and table["machine"]
    rows = table["rows"]
    assert not [r for r in rows if "error" in r]
    kobj = importlib.import_module("fbn_fast.kernels.objective")
    plans = {(r["dtype"], r["block_b"], r["num_warps"], r["arch"]) for r in rows if r["role"] == "candidate"}
    assert plans == {(d, b, w, a) for d in DTYPES for b, w in ((8, 1), (8, 2), (16, 1)) for a in (80, 90)}
    # Beyond MAX_DIM the plans the launcher had for C = K = 64 spill kilobytes per thread.
    wide = [r for r in rows if r["role"] == "beyond-max-dim"]
    assert wide and all(r["c"] > kobj.MAX_DIM for r in wide)
    assert max(r["spill_stores"] for r in wide if (r["block_b"], r["num_warps"]) in ((4, 1), (2, 1))) > 4096
    assert {r["c"] for r in rows if r["use_dot"]} == {7, kobj.DOT_MAX_DIM}


@pytest.mark.parametrize("version", ["3.7.1", "3.6.0"])
def test_committed_table_covers_the_default_plans(version):
    """The committed tables were made with the current ``default_tile``: re-run the script when it changes."""
    table = json.loads((ROOT / "profiling" / "results" / f"compile_triton-{version}.json").read_text())
    assert table["triton"] == version
    check_default_plans(table)
    default_tile = importlib.import_module("fbn_fast.kernels.objective").default_tile
    for r in table["rows"]:
        if r["role"] == "default":
            assert (r["block_b"], r["num_warps"], r["num_stages"]) == default_tile(7, 17, getattr(torch, r["dtype"]))
