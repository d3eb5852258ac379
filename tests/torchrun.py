"""Launching a script on 2 local gloo processes through ``torch.distributed.run``, for the tests that need ranks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch.distributed as dist

#: Why a test cannot run ranks here (``None`` when it can): for ``pytest.mark.skipif``.
NO_GLOO = None if dist.is_available() and dist.is_gloo_available() else "needs torch.distributed with gloo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(script: Path, *args: str, cwd: Path, nproc: int = 2, timeout: float = 300) -> None:
    """Run ``script args`` as ``nproc`` ranks on this machine; fail the test with their stderr unless all exit 0."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script.name} on {nproc} ranks:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
