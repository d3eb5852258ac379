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
    shapes = {(r["c"], r["k"], r["dtype"]) for r in table["rows"] if r["role"] == "test-shape"}
    assert shapes == {(c, k, d) for c, k in ((1, 1), (3, 5)) for d in ("float32", "float64")}


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
    assert got == {(d, c, k, a) for d in DTYPES for c, k in ((7, 17), (0, 0), (1, 1), (3, 5)) for a in (80, 90)}
    assert all(0 < r["regs"] <= 255 and r["cubin_bytes"] > 0 for r in rows)
    assert "--device-c" in table["options"] and "-std=c++17" in table["options"]


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
    assert names[:2] == ["env", "test_triton"] and names[-1] == "bench_loss_sweep"
    assert max(names.index(n) for n in names if n.startswith("test_")) < min(
        names.index(n) for n in names if n.startswith("bench_"))
    assert steps["build_native"]["status"].startswith("skipped")
    assert all(s["status"] == "ok" for n, s in steps.items() if n != "build_native"), steps
    for name in ("bench_loss-cpu", "bench_train-cpu", "bench_loader-cpu", "bench_loss_sweep-cpu"):
        assert json.loads((out / f"{name}.json").read_text()), name


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
