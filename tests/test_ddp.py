"""DDP through torchrun with 2 gloo processes on CPU: trains, keeps identical parameters on both ranks, resumes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from fbn_fast.checkpoint import latest_checkpoint, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
SYNTH_SIZE, SYNTH_PX = 600, 32

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

# Each rank trains through the public API, then writes its own parameters so the test can compare ranks.
DRIVER = textwrap.dedent("""
    import sys, torch
    from fbn_fast import distributed as fdist
    from fbn_fast.config import parse_args
    from fbn_fast.train import Trainer, resolve_resume

    out, argv = sys.argv[1], sys.argv[2:]
    cfg = parse_args(argv)
    env = fdist.init_distributed("cpu")
    ckpt, run_dir, state, _ = resolve_resume(cfg)
    trainer = Trainer(cfg, env, resume_from=ckpt, run_dir=run_dir, checkpoint=state)
    try:
        status = trainer.run()
        params = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
        torch.save({"status": status, "step": trainer.step, "backend": env.backend, "params": params},
                   f"{out}/rank{env.rank}.pt")
    finally:
        trainer.close()
        fdist.cleanup()
    fdist.exit_process(0)
""")


@pytest.fixture(scope="session")
def synth(tmp_path_factory) -> Path:
    from fbn_fast.data.synthface import ensure_synthface

    out = tmp_path_factory.getbasetemp() / f"synthface-{SYNTH_SIZE}-{SYNTH_PX}px"
    ensure_synthface(out, size=SYNTH_SIZE, seed=0, image_size=SYNTH_PX, workers=2)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path: Path, synth: Path, name: str, out: Path, *extra: str) -> list[dict]:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out.mkdir(parents=True, exist_ok=True)
    args = ["--synth-dir", str(synth), "--synth-size", str(SYNTH_SIZE), "--synth-image-size", str(SYNTH_PX),
            "--image-size", str(SYNTH_PX), "--out-dir", str(tmp_path / "runs"), "--name", name, "--batch-size", "8",
            "--trunk-kwargs", '{"width": 8}', "--num-workers", "0", "--steps", "8", "--log-every", "1",
            "--ckpt-every", "100", "--warmup-steps", "2", "--lr", "0.01", "--no-progress", "--no-plots",
            "--loss-backend", "torch", "--device", "cpu", *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(driver), str(out), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_ddp_two_gloo_processes_train_identically_and_resume(synth, tmp_path):
    full = _torchrun(tmp_path, synth, "full", tmp_path / "full", "--evaluate")
    assert [r["status"] for r in full] == ["done", "done"] and full[0]["backend"] == "gloo"
    for k, v in full[0]["params"].items():  # DDP keeps the replicas bit-identical
        torch.testing.assert_close(full[1]["params"][k], v, rtol=0, atol=0)
    run = tmp_path / "runs" / "full"
    ckpt = load_checkpoint(latest_checkpoint(run))
    assert ckpt["world_size"] == 2 and len(ckpt["loader"]) == 2 and len(ckpt["rng"]) == 2
    assert ckpt["loader"][0]["batch"] == ckpt["loader"][1]["batch"] == 8
    for k, v in full[0]["params"].items():
        torch.testing.assert_close(ckpt["model"][k], v, rtol=0, atol=0)
    info = json.loads((run / "run.json").read_text())
    assert info["world_size"] == 2
    ev = json.loads((run / "eval.json").read_text())  # every test row counted once across the two ranks
    test_rows = json.loads((synth / "synthface.json").read_text())["datasets"]["synth_expr"]["splits"]["test"]
    assert ev["datasets"]["synth_expr"]["expression"]["n"] == test_rows
    # the logged images/s counts both ranks' images
    assert all(r["images_per_s"] > 0 for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
               if r["kind"] == "train")

    # stop after 4 steps, resume to 8: the same parameters as the uninterrupted run. Exact: the same world size,
    # batch, backend and thread count (OMP_NUM_THREADS=1) replay the same arithmetic (the promise of --resume).
    first = _torchrun(tmp_path, synth, "split", tmp_path / "split1", "--max-steps-per-run", "4", "--no-evaluate")
    assert [r["status"] for r in first] == ["paused", "paused"] and first[0]["step"] == 4
    second = _torchrun(tmp_path, synth, "split", tmp_path / "split2", "--resume", "auto", "--no-evaluate")
    assert [r["step"] for r in second] == [8, 8]
    for k, v in full[0]["params"].items():
        torch.testing.assert_close(second[0]["params"][k], v, rtol=0, atol=0)
        torch.testing.assert_close(second[1]["params"][k], second[0]["params"][k], rtol=0, atol=0)
    full_losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                   if r["kind"] == "train"]
    split_losses = [r["loss"] for r in map(json.loads, (tmp_path / "runs" / "split" / "metrics.jsonl")
                                           .read_text().splitlines()) if r["kind"] == "train"]
    assert len(split_losses) == 8 and split_losses == full_losses


@pytest.mark.parametrize("backend", [None, "gloo"])
def test_exit_process_flushes_and_keeps_the_status(backend):
    # After a gloo run the process leaves through os._exit: what was printed or logged must still come out.
    code = textwrap.dedent(f"""
        import logging, sys
        from fbn_fast import distributed as fdist
        fdist._LAST_BACKEND = {backend!r}
        logging.basicConfig(stream=sys.stderr, level=logging.INFO)
        print("printed", end="")  # no newline: stays in the buffer until a flush
        logging.getLogger("x").info("logged")
        fdist.exit_process(3)
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 3 and res.stdout == "printed" and "logged" in res.stderr, res
