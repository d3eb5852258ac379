#!/usr/bin/env bash
# Multi-GPU training with torchrun and DDP: one process per GPU (NCCL), each reading its own shard of every
# batch. On a machine without GPUs the same command runs CPU processes that talk over gloo.
#
#   training/launch_ddp.sh                                   # every GPU of this node, training/paper.toml
#   NPROC=4 training/launch_ddp.sh --name paper-r50          # 4 processes; extra args go to fbn_fast.train
#   CONFIG=training/default.toml NPROC=2 training/launch_ddp.sh --device cpu   # 2 gloo processes on CPU
#
# Several nodes: run this on every node with NNODES, NODE_RANK, MASTER_ADDR (node 0's address) and
# MASTER_PORT set alike, e.g. NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 training/launch_ddp.sh.
# --batch-size is per process: the global batch is NPROC * NNODES * batch_size.
# SIGTERM to torchrun reaches every process; each saves a checkpoint and stops. Resume with --resume auto --name X.
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=${CONFIG:-training/paper.toml}
if [[ -z "${NPROC:-}" ]]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        NPROC=$(nvidia-smi -L | wc -l)
    else
        NPROC=1
    fi
fi
NNODES=${NNODES:-1}

if [[ "$NNODES" -gt 1 ]]; then
    RDZV=(--nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK}" \
          --master_addr "${MASTER_ADDR:?set MASTER_ADDR}" --master_port "${MASTER_PORT:-29500}")
else
    RDZV=(--standalone --nnodes 1)
fi

# One CPU thread pool per process would oversubscribe the cores; torchrun sets OMP_NUM_THREADS=1 unless told.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}

exec torchrun "${RDZV[@]}" --nproc_per_node "$NPROC" -m fbn_fast.train --config "$CONFIG" "$@"
