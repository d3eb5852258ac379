"""The fault catalogue of docs/reliability.md, one test per promise, on the tiny SynthFace of test_train."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import test_train
import torch
from test_train import REPO, SYNTH_PX, _argv, _records

from fbn_fast import checkpoint as checkpoint_module
from fbn_fast import faults
from fbn_fast.checkpoint import find_checkpoints, latest_checkpoint, load_checkpoint
from fbn_fast.runlock import RunLock
from fbn_fast.train import main

synth = test_train.synth  # the session's tiny SynthFace, shared with test_train
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and flock")

# One intra-op thread everywhere: the runs in subprocesses and in this process then do the same arithmetic.
FAST = {"num_threads": 1}


def _start(argv: list[str], log: Path) -> subprocess.Popen:
    """``python -m fbn_fast.train`` in its own process group (as a batch system starts a job step); its output
    goes to ``log`` (a file, not a pipe: nobody reads a pipe while the test polls, and a full one would block)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "fbn_fast.train", *argv], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _last_step(run: Path) -> int:
    try:
        return max((r["step"] for r in _records(run)), default=0)
    except (OSError, json.JSONDecodeError):  # not written yet, or a line being written
        return 0


def _signal_group_at(proc: subprocess.Popen, log: Path, run: Path, step: int, sig: int) -> str:
    """Send ``sig`` to the whole process group (the trainer and its loader workers) once ``step`` is logged;
    returns what the run printed."""
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and _last_step(run) < step:
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before step {step}: {log.read_text()}"
        os.killpg(proc.pid, sig)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return log.read_text()


def _state_equal(a: dict, b: dict) -> None:
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=0, msg=k)
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k, v in pa.items():
            torch.testing.assert_close(pb[k], v, rtol=0, atol=0)


def _ckpt_is_finite(path: Path) -> bool:
    state = load_checkpoint(path)
    tensors = list(state["model"].values()) + [t for s in state["optimizer"]["state"].values() for t in s.values()]
    return all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


# ------------------------------------------------------------------------------------------------- preemption
def test_process_group_signals_at_random_steps_leave_checkpoints_and_an_exact_resume(synth, tmp_path):
    # Loader workers and dropout make the saved loader position and RNG states matter.
    opts = dict(FAST, steps=70, num_workers=2, head_dropout=0.3, ckpt_every=1000, keep_checkpoints=2)
    assert main(_argv(synth, tmp_path, "straight", **opts)) == 0
    run = tmp_path / "chain"
    argv = _argv(synth, tmp_path, "chain", resume="auto", **opts)
    rng = random.Random(12)
    stops = []
    # Ten SIGTERMs to the process group, a SIGINT (Ctrl-C reaches the terminal's whole group), then the batch
    # system's SIGUSR1; each process continues the last.
    for i, sig in enumerate([signal.SIGTERM] * 10 + [signal.SIGINT, signal.SIGUSR1]):
        start = _last_step(run) if run.exists() else 0
        log = tmp_path / f"stop{i}.log"
        proc = _start(argv, log)
        err = _signal_group_at(proc, log, run, start + rng.randint(1, 3), sig)
        assert proc.returncode == faults.signal_exit_status(sig), err
        assert "Traceback" not in err and "killed by signal" not in err, err
        saved = load_checkpoint(latest_checkpoint(run))["step"]
        assert saved == _records(run)[-1]["step"] > start, err  # the last completed step, nothing lost
        stops.append(saved)
    assert faults.signal_exit_status(signal.SIGUSR1) == faults.EXIT_REQUEUE == 75
    assert faults.signal_exit_status(signal.SIGTERM) == 143 and faults.signal_exit_status(signal.SIGINT) == 130
    assert len(set(stops)) == 12
    assert main(argv) == 0  # the requeued job: --resume auto to the end

    straight, chained = _records(tmp_path / "straight"), _records(run)
    assert [r["step"] for r in chained] == list(range(1, 71))
    for ra, rb in zip(straight, chained):
        assert ra["loss"] == rb["loss"] and ra["lr"] == rb["lr"], ra["step"]
    _state_equal(load_checkpoint(latest_checkpoint(tmp_path / "straight")), load_checkpoint(latest_checkpoint(run)))


def test_loader_workers_ignore_stop_signals():
    # As the DataLoader calls it in a fresh worker; undone afterwards for this process.
    old = {s: signal.getsignal(s) for s in faults.STOP_SIGNALS}
    try:
        faults.ignore_stop_signals(0)
        assert all(signal.getsignal(s) == signal.SIG_IGN for s in faults.STOP_SIGNALS)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ------------------------------------------------------------------------------------------------- non-finite
def test_blow_up_leaves_finite_weights_that_a_lower_lr_resumes(synth, tmp_path, capsys):
    run = tmp_path / "blow"
    assert main(_argv(synth, tmp_path, "blow", steps=4, ckpt_every=4, **FAST)) == 0
    good = latest_checkpoint(run)
    # --lr 1e6 on resume: AdamW's decoupled weight decay multiplies the weights by (1 - lr * wd) per step, and the
    # BN statistics overflow after steps whose loss was still finite; then the losses turn NaN.
    capsys.readouterr()
    code = main(_argv(synth, tmp_path, "blow", steps=40, ckpt_every=1000, lr=1e6, max_nonfinite=3,
                      resume=str(run), **FAST))
    err = capsys.readouterr().err
    assert code == faults.EXIT_DIVERGED, err
    assert "--lr 1e+06 replaces the checkpoint's 0.01" in err
    assert "no checkpoint:" in err and "not finite" in err  # the blown-up state at the stop was not written
    errors = [ln for ln in err.splitlines() if ln.startswith("[ERROR]")]
    assert len(errors) == 1 and f"the last finite weights are in {good};" in errors[0], err
    assert [p for _, p in find_checkpoints(run)] == [good] and _ckpt_is_finite(good) and "Traceback" not in err

    # resuming from it with a lower --lr trains on to the end (its own --max-nonfinite 3 would stop it otherwise)
    assert main(_argv(synth, tmp_path, "blow", steps=12, lr=1e-3, resume=str(good), **FAST)) == 0
    recs = _records(run)
    assert [r["step"] for r in recs] == list(range(1, 13))
    assert all(r["loss"] is not None and r["loss"]["total"] < 100 for r in recs)
    assert _ckpt_is_finite(latest_checkpoint(run)) and load_checkpoint(latest_checkpoint(run))["step"] == 12


def test_resume_after_a_nonfinite_stop_does_not_inherit_the_consecutive_count(synth, tmp_path):
    from test_train import _Poisoned, _trainer

    from fbn_fast import distributed as fdist
    from fbn_fast.config import parse_args
    from fbn_fast.train import Trainer

    tr = _trainer(synth, tmp_path, "count", steps=20, max_nonfinite=3, **FAST)
    tr.stepper.loss_fn = _Poisoned(tr.stepper.loss_fn, tr, None)
    try:
        with pytest.raises(faults.NonFiniteLossError, match="the last finite weights are in .*step_00000003.pt"):
            tr.train()
    finally:
        tr.close()
    ckpt = latest_checkpoint(tmp_path / "count")
    assert load_checkpoint(ckpt)["counters"]["nonfinite_consecutive"] == 3
    # one more non-finite step after the resume would stop it again if the count carried over
    cfg = parse_args(_argv(synth, tmp_path, "count", steps=5, max_nonfinite=3, **FAST))
    tr = Trainer(cfg, fdist.init_distributed("cpu"), resume_from=ckpt)
    try:
        tr.setup()
        tr.stepper.loss_fn = _Poisoned(tr.stepper.loss_fn, tr, {4})
        assert tr.counters.nonfinite_consecutive == 0
        assert tr.train() == "done" and tr.counters.nonfinite_total == 4
    finally:
        tr.close()


# ------------------------------------------------------------------------------------------------- integrity
def test_corrupt_or_truncated_newest_checkpoint_falls_back_and_stale_files_go(synth, tmp_path, capsys):
    run = tmp_path / "rot"
    assert main(_argv(synth, tmp_path, "rot", steps=8, ckpt_every=4, **FAST)) == 0
    newest = run / "checkpoints" / "step_00000008.pt"
    assert (run / "checkpoints" / "step_00000008.pt.sha256").read_text().split()[1] == newest.name
    with open(newest, "r+b") as f:  # 4 KB overwritten inside: still a readable zip, wrong numbers
        f.seek(newest.stat().st_size // 2)
        f.write(os.urandom(4096))
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(newest)
    stale = [run / "checkpoints" / ".step_00000009.pt.abc123.tmp", run / "checkpoints" / "step_00000007.pt.sha256"]
    for p in stale:  # what a SIGKILL during a write leaves
        p.write_bytes(b"x" * 1000)
    capsys.readouterr()
    assert main(_argv(synth, tmp_path, "rot", steps=10, ckpt_every=4, resume="auto", **FAST)) == 0
    err = capsys.readouterr().err
    assert "step_00000008.pt" in err and "step_00000004.pt" in err and "corrupt" in err, err
    assert "removed 2 temporary file" in err and not any(p.exists() for p in stale)
    assert [r["step"] for r in _records(run)] == list(range(1, 11))

    # a truncated newest checkpoint (the step 8 rewritten by the resumed run is intact again)
    newest = latest_checkpoint(run)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 3])
    capsys.readouterr()
    assert main(_argv(synth, tmp_path, "rot", steps=11, ckpt_every=4, resume="auto", **FAST)) == 0
    err = capsys.readouterr().err
    assert f"instead of {newest.name}" in err and "resuming from" in err and "step_00000008.pt" in err, err
    # an explicitly named damaged checkpoint is refused, not silently replaced
    (run / "checkpoints" / "step_00000004.pt").write_bytes(b"garbage")
    with pytest.raises(SystemExit) as exc:
        main(_argv(synth, tmp_path, "rot", resume=str(run / "checkpoints" / "step_00000004.pt"), **FAST))
    assert exc.value.code == faults.EXIT_USAGE


# ------------------------------------------------------------------------------------------------- one owner
def test_run_folder_has_one_owner(synth, tmp_path, capsys):
    run = tmp_path / "owned"
    lock = RunLock(run).acquire()  # another training run holds the folder
    try:
        assert main(_argv(synth, tmp_path, "owned", steps=2, **FAST)) == faults.EXIT_USAGE
        err = capsys.readouterr().err
        assert "is in use by another training run" in err and f"pid {os.getpid()}" in err, err
        assert not (run / "train.log").exists()  # nothing of the refused run was written
    finally:
        lock.release()

    # the lock of a process killed with SIGKILL is gone with it
    code = ("import sys, time; from fbn_fast.runlock import RunLock; lock = RunLock(sys.argv[1]).acquire(); "
            "print(1, flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "1"
        with pytest.raises(ValueError, match="in use"):
            RunLock(run).acquire()
    finally:
        holder.kill()
        holder.wait()
    assert main(_argv(synth, tmp_path, "owned", steps=2, **FAST)) == 0

    # a new run under the name of an existing one is refused, with the two ways out
    capsys.readouterr()
    assert main(_argv(synth, tmp_path, "owned", steps=2, **FAST)) == faults.EXIT_USAGE
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume auto --name owned" in err and "another --name" in err
    assert len(find_checkpoints(run)) == 1  # the old run's checkpoints are untouched

    # --resume auto with nothing to resume says so, then starts the run
    assert main(_argv(synth, tmp_path, "fresh", steps=2, resume="auto", **FAST)) == 0
    err = capsys.readouterr().err
    assert "has no checkpoint to resume; starting a new run" in err
    assert [r["step"] for r in _records(tmp_path / "fresh")] == [1, 2]


# ------------------------------------------------------------------------------------------------- fatal errors
def _mount_tmpfs(path: Path, size_kb: int) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
                          capture_output=True)
    return done.returncode == 0


def test_disk_full_keeps_earlier_checkpoints_and_says_how_much_is_needed(synth, tmp_path, capsys, monkeypatch):
    out = tmp_path / "small_disk"
    # A 2.6 MB file system holds the run's files and two checkpoints (~0.95 MB each), not a third.
    mounted = _mount_tmpfs(out, 2600)
    if not mounted:  # no tmpfs here: the writer fails as a full disk makes it fail
        calls = {"n": 0}
        real_save = torch.save

        def full_disk_save(obj, f, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] >= 3:
                f.write(b"\0" * 1000)
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_save(obj, f, *args, **kwargs)

        monkeypatch.setattr(checkpoint_module.torch, "save", full_disk_save)
    try:
        code = main(_argv(synth, out, "full", steps=12, ckpt_every=2, keep_checkpoints=3, **FAST))
        err = capsys.readouterr().err
        assert code == faults.EXIT_IO, err
        errors = [ln for ln in err.splitlines() if ln.startswith("[ERROR]")]
        assert len(errors) == 1 and "no space left" in errors[0] and "it needs about 0.9 MB" in errors[0], err
        assert "earlier checkpoints are intact" in errors[0] and "Traceback" not in err
        log = (out / "full" / "train.log").read_text()
        assert errors[0][len("[ERROR] "):] in log and "Traceback" in log  # the log file has the traceback
        found = find_checkpoints(out / "full")
        assert [s for s, _ in found] == [2, 4]
        for _, p in found:
            load_checkpoint(p)  # intact: checksums match
        assert not [p for p in (out / "full" / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    finally:
        if mounted:
            subprocess.run(["umount", str(out)], check=False)


def _bad_image_root(synth: Path, root: Path, rows: np.ndarray | None) -> Path:
    """A copy of SynthFace's images with the files of ``rows`` (all when None) replaced by bytes that are no JPEG."""
    from fbn_fast.data import load_manifest

    shutil.copytree(synth / "images", root / "images")
    m = load_manifest(synth / "manifest.npz")
    for r in range(len(m)) if rows is None else rows:
        (root / m.path(int(r))).write_bytes(b"not a jpeg at all")
    return root


def test_all_bad_images_name_the_dataset_and_files_on_one_line(synth, tmp_path, capsys):
    root = _bad_image_root(synth, tmp_path / "bad", None)
    argv = _argv(synth, tmp_path, "bad", steps=3, num_workers=1, manifest=synth / "manifest.npz", data_root=root,
                 **FAST)
    assert main(argv) == faults.EXIT_DATA
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("[ERROR]")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert "dataset synth_" in errors[0] and "images in a row are bad" in errors[0] and ".jpg" in errors[0]
    assert "Traceback" in (tmp_path / "bad" / "train.log").read_text()
    # --debug also prints the traceback
    assert main([*argv, "--name", "bad-debug", "--debug"]) == faults.EXIT_DATA
    assert "Traceback" in capsys.readouterr().err


def test_evaluation_counts_bad_images_and_scores_only_good_ones(synth, tmp_path):
    from fbn_fast.data import load_manifest
    from fbn_fast.evaluate import evaluate
    from fbn_fast.model import build_model

    m = load_manifest(synth / "manifest.npz")
    test_rows = np.flatnonzero(m.split_rows("test"))
    bad = test_rows[[0, 5, 9]]
    root = _bad_image_root(synth, tmp_path, bad)
    torch.manual_seed(0)
    model = build_model("small", trunk_kwargs={"width": 8})
    res = evaluate(model, synth / "manifest.npz", root, split="test", image_size=SYNTH_PX, device="cpu",
                   amp_dtype="none", loader_backend="cpu", num_workers=0, batch_size=32)
    assert sum(res["bad_images"].values()) == 3
    assert sorted(f["path"] for f in res["bad_image_files"]) == sorted(str(root / m.path(int(r))) for r in bad)
    assert res["rows"] == len(test_rows) - 3  # stand-ins are not scored
    scored = {name: t["expression"]["n"] for name, t in res["datasets"].items() if "expression" in t}
    labelled = {name: int(((m.dataset[test_rows] == m.dataset_index(name)) & (m.expr[test_rows] >= 0)).sum())
                - int(((m.dataset[bad] == m.dataset_index(name)) & (m.expr[bad] >= 0)).sum()) for name in scored}
    assert scored == labelled


def test_options_beyond_memory_are_refused_up_front(synth, tmp_path, capsys):
    assert main(_argv(synth, tmp_path, "huge", image_size=100_000, **FAST)) == faults.EXIT_USAGE
    err = capsys.readouterr().err
    assert "--image-size 100000" in err and "GiB" in err and "Traceback" not in err, err


def test_exit_status_per_class():
    assert faults.exit_status(ValueError("--lr")) == faults.EXIT_USAGE == 2
    assert faults.exit_status(faults.NonFiniteLossError("x")) == faults.EXIT_DIVERGED == 3
    assert faults.exit_status(faults.DataError("x")) == faults.EXIT_DATA == 4
    assert faults.exit_status(OSError(errno.EACCES, "denied")) == faults.EXIT_IO == 5
    assert faults.exit_status(KeyError("bug")) == faults.EXIT_BUG == 1
    # an error raised in a loader worker keeps its class and its own message, on one line
    wrapped = faults.DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                               "call last):\n  File \"x.py\", line 1\nfbn_fast.faults.DataError: dataset a: bad")
    assert faults.exit_status(wrapped) == faults.EXIT_DATA and faults.one_line(wrapped) == "dataset a: bad"
