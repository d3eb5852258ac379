#!/usr/bin/env bash
# GPU check: one command for a machine with a CUDA GPU (no internet needed). It runs the GPU tests and the
# benchmarks as separate steps, each under its own time limit and all under one overall budget; a failing
# or timed-out step is recorded and the next step still runs. Logs, JUnit XML and benchmark JSON go to
# $OUT (default ./gpu_out); $OUT/summary.txt lists every step with its status.
#
#   bash profiling/gpu_check.sh                  # OUT=./gpu_out, budget 540 s
#   OUT=/tmp/out GPU_CHECK_BUDGET=420 bash profiling/gpu_check.sh
#
# To add a check, add one `step NAME LIMIT_S command...` line below (keep the sum of limits inside the
# budget; the budget caps every step anyway).

set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python}"
BUDGET="${GPU_CHECK_BUDGET:-540}"
DEADLINE=$((SECONDS + BUDGET))
SUMMARY="$OUT/summary.txt"
FAILED=0
: > "$SUMMARY"

# step NAME LIMIT_S COMMAND...: run COMMAND with its output in $OUT/NAME.log, killed after LIMIT_S seconds
# (or when the overall budget runs out), and record the outcome in the summary.
step() {
    local name="$1" limit="$2"
    shift 2
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 15 ]; then
        echo "== $name: SKIPPED (overall budget of ${BUDGET}s spent)" | tee -a "$SUMMARY"
        FAILED=1
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit}s): $*" | tee -a "$SUMMARY"
    local t0=$SECONDS rc status
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status="ok" ;;
        124 | 137) status="TIMEOUT"; FAILED=1 ;;
        *) status="FAILED (exit $rc)"; FAILED=1 ;;
    esac
    echo "   $status after $((SECONDS - t0))s; log: $OUT/$name.log" | tee -a "$SUMMARY"
    tail -n 4 "$OUT/$name.log" | sed 's/^/   | /' >> "$SUMMARY"
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

# ---------------------------------------------------------------------------------------------- steps
step env 20 bash -c "nvidia-smi; $PY -c 'import torch, triton; print(torch.__version__, torch.version.cuda, \
triton.__version__, torch.cuda.get_device_name(0)); from fbn_fast.losses import available_backends; \
print(available_backends(\"cuda\"))'"

# Native objective: build the CPU and CUDA extension in place (sm_90 only, to keep the build short).
step build_native 240 env FBN_FAST_CUDA=1 FBN_FAST_CUDA_ARCH=90 FBN_FAST_REQUIRE_EXT=1 "$PY" setup.py build_ext --inplace

# Fused Triton objective: correctness, one launch, determinism, CUDA graphs, torch.compile, autocast.
step test_triton 150 "$PY" -m pytest -m gpu tests/test_triton_objective.py -q -rA \
    --junitxml="$OUT/test_triton.xml"

# Native CUDA objective, built and NVRTC paths, against the reference.
step test_native 120 "$PY" -m pytest -m gpu tests/test_native_objective.py -q -rA --junitxml="$OUT/test_native.xml"

# Loss benchmark: eager reference, torch.compile (default, reduce-overhead) and every fused backend at
# B = 4096, 1,048,576, 256, 65,536 (JSON rewritten after each measurement), with kernel counts, peak memory
# and the byte floor.
step bench_loss 180 "$PY" profiling/bench_loss.py --device cuda --iters 30 --out "$OUT/bench_loss-cuda.json"

# Every other GPU test of the suite.
step test_gpu_rest 60 "$PY" -m pytest -m gpu tests -q -rA --ignore=tests/test_triton_objective.py \
    --ignore=tests/test_native_objective.py --junitxml="$OUT/test_gpu_rest.xml"

# Input pipeline (nvJPEG through torchvision where it imports) and training throughput (ResNet-50, 112 px,
# bf16, channels-last: trunk-only against end to end).
step bench_loader 90 "$PY" profiling/bench_loader.py --device cuda --sizes 112 224 --out "$OUT/bench_loader-cuda.json"
step bench_train 150 "$PY" profiling/bench_train.py --device cuda --trunk resnet50 --image-size 112 --batch-size 256 \
    --amp bf16 --channels-last on --synth-size tiny --synth-image-size 128 --num-workers 8 \
    --out "$OUT/bench_train-cuda.json"

# Triton launch plans (rows per block, warps, stages, fused or split) at B = 4096 and 1,048,576.
step bench_loss_sweep 60 "$PY" profiling/bench_loss.py --device cuda --skip-compile --batch 4096 1048576 \
    --iters 10 --triton-sweep --out "$OUT/bench_loss_sweep-cuda.json"

# Only a few files come back from a lent machine: pack the logs and XML, keep the JSON and the summary beside.
tar czf "$OUT/logs.tar.gz" -C "$OUT" --exclude=logs.tar.gz --exclude='*.json' --exclude=summary.txt \
    --exclude=.pyshim . 2>/dev/null && find "$OUT" -maxdepth 1 \( -name '*.log' -o -name '*.xml' \) -delete

echo "done in ${SECONDS}s; summary: $SUMMARY"
exit $FAILED
