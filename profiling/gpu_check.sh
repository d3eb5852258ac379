#!/usr/bin/env bash
# GPU check: one command for a machine with a CUDA GPU (no internet needed). Correctness first (the GPU
# tests), then the benchmarks, the launch-plan sweep last; each step under its own time limit, and the limits
# add up to at most the overall budget (480 s: about 8 minutes on an H100), so every step gets its turn. A
# failing or timed-out step is recorded and the next step still runs. Logs, JUnit XML and benchmark JSON go
# to the output folder; summary.txt lists every step with its status and gpu_check.json holds the same.
#
#   bash profiling/gpu_check.sh [--dry-run] [OUT_DIR]      # OUT_DIR: default $OUT, else ./gpu_out
#   PYTHON=/opt/venv/bin/python3 bash profiling/gpu_check.sh
#
# --dry-run runs the same steps on a CPU machine (CI does, so the script cannot break unnoticed): Triton's
# interpreter, tiny sizes, the CUDA-only steps (native build) recorded as skipped, the pytest steps collecting
# their GPU tests (which skip without a device). The interpreter is the first of `python3`, `python` that
# imports torch (PYTHON overrides; --which-python prints it and exits).
#
# The limits are sized for a first run with an empty Triton cache on an H100 machine with 16 cores and Triton
# 3.6 (a few seconds per face kernel, profiling/results/compile_triton-3.6.0.json): the face shape in every
# dtype first, then the opt-in grid-barrier mode (its verdict is `grid_barrier_verified` in gpu_check.json),
# the native build and tests, the wide and slow cases, the benchmarks. To add a check, add one
# `step NAME LIMIT_S command...` line below and take its seconds from another step: the limits must add up to
# at most BUDGET (tests/test_compile_targets.py checks it).

set -u

# find_python: print the interpreter to use: $PYTHON, else the first of python3, python that imports torch.
find_python() {
    if [ -n "${PYTHON:-}" ]; then
        echo "$PYTHON"
        return 0
    fi
    local cand
    for cand in python3 python; do
        if command -v "$cand" > /dev/null 2>&1 && "$cand" -c "import torch" > /dev/null 2>&1; then
            echo "$cand"
            return 0
        fi
    done
    return 1
}

DRY=0
OUT_ARG=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        --which-python) find_python; exit $? ;;
        -h | --help) sed -n '2,24p' "$0"; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $arg" >&2; exit 2 ;;
        *) OUT_ARG="$arg" ;;
    esac
done
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
OUT="${OUT_ARG:-${OUT:-./gpu_out}}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
BUDGET=480
# The dry run's CPU is slower at everything (imports, the interpreter) than the GPU machine: every limit and
# the budget stretch by the same factor, so the steps keep their shares.
SCALE=1
[ "$DRY" = 1 ] && SCALE=4
DEADLINE=$((SECONDS + BUDGET * SCALE))
SUMMARY="$OUT/summary.txt"
STEPS_TSV="$OUT/.steps.tsv"
FAILED=0
: > "$SUMMARY"
: > "$STEPS_TSV"

if ! PY="$(find_python)"; then
    echo "gpu_check.sh: neither python3 nor python imports torch (set PYTHON)" | tee -a "$SUMMARY" >&2
    exit 1
fi

# step NAME LIMIT_S COMMAND...: run COMMAND with its output in $OUT/NAME.log, killed after LIMIT_S seconds
# (or when the overall budget runs out), and record the outcome in the summary.
step() {
    local name="$1" limit=$(($2 * SCALE)) declared="$2"
    shift 2
    local left=$((DEADLINE - SECONDS)) t0=$SECONDS rc status
    if [ "$left" -lt 15 ]; then
        status="SKIPPED (overall budget of $((BUDGET * SCALE))s spent)"
        FAILED=1
    elif [ "$DRY" = 1 ] && [ "$1" = "--cuda" ]; then
        status="skipped (dry run: needs CUDA)"
    else
        [ "$1" = "--cuda" ] && shift
        [ "$limit" -gt "$left" ] && limit=$left
        echo "== $name (limit ${limit}s): $*" | tee -a "$SUMMARY"
        timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
        rc=$?
        case $rc in
            0) status="ok" ;;
            124 | 137) status="TIMEOUT"; FAILED=1 ;;
            *) status="FAILED (exit $rc)"; FAILED=1 ;;
        esac
    fi
    printf '%s\t%s\t%s\t%s\n' "$name" "$declared" "$status" "$((SECONDS - t0))" >> "$STEPS_TSV"
    echo "   $name: $status after $((SECONDS - t0))s" | tee -a "$SUMMARY"
    [ -f "$OUT/$name.log" ] && tail -n 4 "$OUT/$name.log" | sed 's/^/   | /' >> "$SUMMARY"
}

# The package maps fbn_fast.kernels to kernels/ when installed (setup.py's package_dir). From a plain source
# tree, a sitecustomize on PYTHONPATH does the same mapping, without installing anything.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import fbn_fast.kernels" > /dev/null 2>&1; then
    SHIM="$OUT/.pyshim"
    mkdir -p "$SHIM"
    cat > "$SHIM/sitecustomize.py" << 'EOF'
# Written by profiling/gpu_check.sh: import fbn_fast.kernels from <source tree>/kernels (no install needed).
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

_KERNELS = os.path.join(os.environ["FBN_FAST_SOURCE"], "kernels")


class _KernelsFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "fbn_fast.kernels":
            return None
        return importlib.util.spec_from_file_location(
            name, os.path.join(_KERNELS, "__init__.py"), submodule_search_locations=[_KERNELS])


sys.meta_path.append(_KernelsFinder())

# Run the sitecustomize this one shadows, if the environment has one.
_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in sys.path if os.path.abspath(p or ".") != _here])
if _spec is not None and _spec.loader is not None:
    _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
EOF
    export FBN_FAST_SOURCE="$ROOT"
    export PYTHONPATH="$SHIM:$PYTHONPATH"
    echo "fbn_fast is not installed here: using the source tree ($ROOT) with a kernels import shim" \
        | tee -a "$SUMMARY"
fi

# Sizes: the GPU run's, or tiny ones on the CPU through Triton's interpreter for --dry-run.
if [ "$DRY" = 1 ]; then
    export TRITON_INTERPRET=1
    DEV=cpu
    LOSS_ARGS=(--batch 64 --iters 2 --warmup 1 --skip-compile)
    SWEEP_ARGS=(--batch 16 --iters 1 --warmup 1)
    LOADER_ARGS=(--device cpu --sizes 32 --batch-size 4 --batches 1 --n 12 --src 48 --paths cpu)
    TRAIN_ARGS=(--device cpu --trunk small --image-size 32 --batch-size 4 --amp none --steps 1 --warmup 1
        --synth-size tiny --synth-image-size 32 --num-workers 0 --channels-last off)
    ENV_CMD="$PY -c 'import torch, triton; print(torch.__version__, triton.__version__); \
from fbn_fast.losses import available_backends; print(available_backends(\"cpu\"))'"
else
    DEV=cuda
    LOSS_ARGS=(--batch 4096 1048576 --iters 20)
    SWEEP_ARGS=(--skip-compile --batch 1048576 --iters 5)
    LOADER_ARGS=(--device cuda --sizes 112 224)
    TRAIN_ARGS=(--device cuda --trunk resnet50 --image-size 112 --batch-size 256 --amp bf16 --channels-last on
        --synth-size tiny --synth-image-size 128 --num-workers 8)
    ENV_CMD="nvidia-smi; $PY -c 'import torch, triton; print(torch.__version__, torch.version.cuda, \
triton.__version__, torch.cuda.get_device_name(0)); from fbn_fast.losses import available_backends; \
print(available_backends(\"cuda\"))'"
fi
echo "python: $(command -v "$PY"); dry run: $DRY; budget $((BUDGET * SCALE))s; output: $OUT" | tee -a "$SUMMARY"

# ---------------------------------------------------------------------------------------------- steps
# Correctness first: the face shape in every logit dtype through both fused backends (the op's kit against the
# float64 oracle, and labels that must change nothing).
step env 15 bash -c "$ENV_CMD"
step test_face 95 "$PY" -m pytest -m gpu tests/test_objective_backends.py -k "face or unannotated" -q -rA \
    --junitxml="$OUT/test_face.xml"

# The opt-in single launch with the grid barrier (FBN_FAST_GRID_BARRIER=1): the face kit in every dtype, the
# launch counts, determinism and CUDA graphs, then a check that the fused launch really ran. Its outcome is
# the `grid_barrier_verified` field of gpu_check.json.
cat > "$OUT/.barrier_check.py" << 'EOF'
import sys

import torch

sys.path.insert(0, "tests")
from objective_cases import CASES, assert_matches, run  # noqa: E402

import fbn_fast.kernels.objective as kobj  # noqa: E402

case = CASES["face 7x17"]
got = run("triton", case, torch.float32, sys.argv[1])
assert kobj.last_plan["fused"], f"the grid-barrier launch did not run: {kobj.last_plan}"
assert_matches(got, case, torch.float32, what="grid barrier")
print("grid barrier verified:", kobj.last_plan)
EOF
step test_barrier 65 env FBN_FAST_GRID_BARRIER=1 bash -c '"$1" -m pytest -m gpu tests/test_objective_backends.py \
    tests/test_triton_objective.py -k "(face and triton) or one_launch or two_launches" -q -rA \
    --junitxml="$2/test_barrier.xml" && "$1" "$2/.barrier_check.py" "$3"' _ "$PY" "$OUT" "$DEV"

# Native objective: build the CPU and CUDA extension in place (sm_90 only, to keep the build short), then its
# built and NVRTC paths against the reference.
step build_native 75 --cuda env FBN_FAST_CUDA=1 FBN_FAST_CUDA_ARCH=90 FBN_FAST_REQUIRE_EXT=1 "$PY" setup.py \
    build_ext --inplace
step test_native 45 "$PY" -m pytest -m gpu tests/test_native_objective.py -q -rA --junitxml="$OUT/test_native.xml"

# Then the slow and wide cases: the rest of the kit (C = K = 32, small shapes, no VA means), large batches,
# launch plans, torch.compile, and every other GPU test of the suite (the split-plan default included).
step test_gpu_rest 90 "$PY" -m pytest -m gpu tests -q -rA --ignore=tests/test_native_objective.py \
    -k "not (face or unannotated)" --junitxml="$OUT/test_gpu_rest.xml"

# Benchmarks. Loss: eager reference, torch.compile and every fused backend, with kernel counts, peak memory
# and the byte floor (the JSON is rewritten after each measurement, so a cut-short run keeps what it measured).
step bench_loss 45 "$PY" profiling/bench_loss.py --device "$DEV" "${LOSS_ARGS[@]}" --out "$OUT/bench_loss-$DEV.json"

# Training throughput (ResNet-50, 112 px, bf16, channels-last: trunk-only against end to end), then the input
# pipeline (nvJPEG through torchvision where it imports).
step bench_train 20 "$PY" profiling/bench_train.py "${TRAIN_ARGS[@]}" --out "$OUT/bench_train-$DEV.json"
step bench_loader 10 "$PY" profiling/bench_loader.py "${LOADER_ARGS[@]}" --out "$OUT/bench_loader-$DEV.json"

# Last: the Triton launch plans (rows per block, warps, stages, fused or split).
step bench_loss_sweep 20 "$PY" profiling/bench_loss.py --device "$DEV" "${SWEEP_ARGS[@]}" --triton-sweep \
    --out "$OUT/bench_loss_sweep-$DEV.json"

# The summary as JSON too, then only a few files come back from a lent machine: pack the logs and XML.
"$PY" - "$STEPS_TSV" "$OUT/gpu_check.json" "$BUDGET" "$DRY" "$SECONDS" << 'EOF'
import json
import sys

tsv, out, budget, dry, seconds = sys.argv[1:]
steps = [dict(zip(("name", "limit_s", "status", "seconds"), line.rstrip("\n").split("\t")))
         for line in open(tsv) if line.strip()]
for s in steps:
    s["limit_s"], s["seconds"] = int(s["limit_s"]), int(s["seconds"])
barrier = next((s["status"] for s in steps if s["name"] == "test_barrier"), "not run")
result = {"budget_s": int(budget), "dry_run": dry == "1", "limits_scaled_by": 4 if dry == "1" else 1,
          "seconds": int(seconds),
          # The single-launch grid-barrier mode passed its tests and really ran fused on this card (never
          # from a dry run, which has no card); record it in profiling/results/ before making it the default.
          "grid_barrier_verified": dry != "1" and barrier == "ok", "grid_barrier_step": barrier,
          "steps": steps}
json.dump(result, open(out, "w"), indent=1)
EOF
rm -f "$STEPS_TSV" "$OUT/.barrier_check.py"
tar czf "$OUT/logs.tar.gz" -C "$OUT" --exclude=logs.tar.gz --exclude='*.json' --exclude=summary.txt \
    --exclude=.pyshim . 2>/dev/null && find "$OUT" -maxdepth 1 \( -name '*.log' -o -name '*.xml' \) -delete

echo "done in ${SECONDS}s; summary: $SUMMARY"
exit $FAILED
