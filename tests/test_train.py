"""The training engine end to end on a tiny SynthFace: run folder, exact resume, SIGTERM, non-finite steps, CLI."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_corpus import option_argv

from fbn_fast import coupling, relatedness
from fbn_fast import train as train_module
from fbn_fast.checkpoint import find_checkpoints, latest_checkpoint, load_checkpoint, load_model
from fbn_fast.config import SECTIONS, TrainConfig, dump_toml, load_recipe, parse_args
from fbn_fast.data import load_manifest
from fbn_fast.labels import AUS, EXPRESSIONS
from fbn_fast.losses import TERMS, LossOutput
from fbn_fast.optim import WarmupCosine, build_optimizer
from fbn_fast.progress import RunningWindow, configure_console_logging, progress_bar
from fbn_fast.train import EXIT_DIVERGED, NonFiniteLossError, Trainer, main

REPO = Path(__file__).resolve().parents[1]
SYNTH_SIZE, SYNTH_PX = 600, 32


@pytest.fixture(scope="session")
def synth(tmp_path_factory) -> Path:
    """A 600-image SynthFace at 32 px (a few seconds), shared by every test of the session."""
    from fbn_fast.data.synthface import ensure_synthface

    out = tmp_path_factory.getbasetemp() / f"synthface-{SYNTH_SIZE}-{SYNTH_PX}px"
    ensure_synthface(out, size=SYNTH_SIZE, seed=0, image_size=SYNTH_PX, workers=2)
    return out


def _argv(synth: Path, out: Path, name: str, **opts) -> list[str]:
    base = {"synth_dir": synth, "synth_size": SYNTH_SIZE, "synth_image_size": SYNTH_PX, "image_size": SYNTH_PX,
            "out_dir": out, "name": name, "batch_size": 16, "trunk_kwargs": '{"width": 8}', "num_workers": 0,
            "steps": 12, "log_every": 1, "ckpt_every": 5, "warmup_steps": 2, "lr": 0.01, "progress": False,
            "evaluate": False, "plots": False, "loss_backend": "torch"}
    return option_argv({**base, **opts})


def _records(run: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


# ------------------------------------------------------------------------------------------------- end to end
def test_train_evaluate_run_folder(synth, tmp_path):
    argv = _argv(synth, tmp_path, "e2e", steps=24, evaluate=True, plots=True, relatedness="data",
                 lambda_ca=0.5, lambda_dm=0.25, lambda_ev=0.0, num_workers=1, ckpt_every=10, eval_every=12)
    assert main(argv) == 0
    run = tmp_path / "e2e"
    for name in ("config.toml", "relatedness.json", "metrics.jsonl", "eval.json", "train.log", "run.json"):
        assert (run / name).is_file(), name

    # the resolved config reruns the same job
    cfg = TrainConfig.from_dict(load_recipe(run / "config.toml"))
    assert cfg.steps == 24 and cfg.lambda_ca == 0.5 and cfg.relatedness == "data"

    # data-driven relatedness: estimated on the training split and saved with the run
    m = load_manifest(synth / "manifest.npz")
    rows = m.split_rows("train")
    expected = relatedness.estimate(m.expr[rows], m.au[rows], m.au_mask[rows], m.va[rows], m.va_mask[rows],
                                    alpha=cfg.relatedness_alpha)
    saved = relatedness.load(run / "relatedness.json")
    assert saved.source == "data"
    np.testing.assert_allclose(saved.matrix, expected.matrix)
    np.testing.assert_allclose(saved.va_means, expected.va_means)

    # the weights applied: λ scaled by label scarcity (the default --coupling-scarcity-au/-expr), in run.json
    w = json.loads((run / "run.json").read_text())["loss_weights"]
    counts = coupling.label_counts(m.expr[rows], m.expr_mask[rows], m.au_mask[rows], len(EXPRESSIONS))
    scale = coupling.scarcity_scales(*counts, au=cfg.coupling_scarcity_au, expr=cfg.coupling_scarcity_expr)
    assert 0 < scale["au"] < 1 and 0 < scale["expression"] < 1
    want = {"expr": 1, "au": 1, "va": 1, "ca_ea": 0.5 * scale["au"], "ca_ae": 0.5 * scale["expression"],
            "dm_ea": 0.25 * scale["au"], "dm_ae": 0.25 * scale["expression"], "dm_ev": 0.0}
    assert w == pytest.approx(want)

    # one record per step with every term; the total is the weighted sum of the terms
    recs = _records(run)
    assert [r["step"] for r in recs] == list(range(1, 25))
    for r in recs:
        t = r["loss"]
        assert r["images_per_s"] > 0 and r["lr"] > 0 and r["nonfinite_total"] == 0
        weighted = sum(want[k] * t[k] for k in TERMS)
        assert math.isclose(t["total"], weighted, rel_tol=1e-4, abs_tol=1e-5)
    first = np.mean([r["loss"]["total"] for r in recs[:4]])
    last = np.mean([r["loss"]["total"] for r in recs[-4:]])
    assert last < first  # it learns

    # evaluation: each dataset on the tasks it labels, zero-shot compounds, and the complete-label view
    ev = json.loads((run / "eval.json").read_text())
    ds = ev["datasets"]
    assert set(ds["synth_expr"]) == {"expression"}
    assert set(ds["synth_au_a"]) == {"au"} and ds["synth_au_a"]["au"]["num_annotated_aus"] == 12
    assert set(ds["synth_expr_va"]) == {"expression", "va"}
    assert set(ds["synth_compound"]) == {"compound"}
    assert 0.0 <= ds["synth_compound"]["compound"]["uar"] <= 1.0
    assert {"expression", "au", "va"} <= set(ev["truth"]["synth_expr"])
    assert [r["step"] for r in _records(run, "eval")] == [12, 24]

    for name in ("loss.png", "au_f1.png", "confusion.png"):
        with Image.open(run / "plots" / name) as im:
            assert im.size[0] > 100 and im.size[1] > 100

    # checkpoints: periodic ones pruned to --keep-checkpoints, the final one loads for inference
    assert [s for s, _ in find_checkpoints(run)] == [20, 24]
    model, cfg2, rel = load_model(latest_checkpoint(run))
    assert cfg2 == cfg and np.allclose(rel.matrix, saved.matrix)
    x = torch.zeros(2, 3, SYNTH_PX, SYNTH_PX)
    with torch.no_grad():
        out = model(x)
    assert out.expr.shape == (2, 7) and out.au.shape == (2, 17) and out.va.shape == (2, 2)

    # the checkpoint says what the model was trained on
    seen = load_checkpoint(latest_checkpoint(run))["trained_on"]
    assert seen["synthface_only"] is True and seen["image_size"] == SYNTH_PX and seen["trunk"] == "small"
    assert set(seen["datasets"]) == {"synth_expr_va", "synth_expr", "synth_au_a", "synth_au_b", "synth_all"}
    assert seen["expressions"] == list(EXPRESSIONS) and seen["aus"] == list(AUS)
    assert seen["data_root"] == str(synth.resolve())

    # TensorBoard events carry the same records as metrics.jsonl: every term, lr, throughput, validation scores
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/total", *(f"loss/{t}" for t in TERMS), "train/lr", "train/images_per_s",
            "train/data_wait_fraction", "val/datasets/synth_expr/expression/accuracy",
            "val/datasets/synth_au_a/au/mean_f1", "val/datasets/synth_compound/compound/uar"} <= tags
    assert [(e.step, e.value) for e in acc.Scalars("loss/total")] == [
        (r["step"], pytest.approx(r["loss"]["total"], rel=1e-6)) for r in recs]  # float32 in the event file
    assert [e.step for e in acc.Scalars("val/datasets/synth_expr/expression/accuracy")] == [12, 24]
    assert "steps = 24" in acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()


# ------------------------------------------------------------------------------------------------- resume
def test_resume_is_exact(synth, tmp_path):
    # dropout and a loader worker make the RNG bookkeeping matter
    opts = {"steps": 14, "head_dropout": 0.3, "num_workers": 1, "ckpt_every": 4}
    assert main(_argv(synth, tmp_path, "straight", **opts)) == 0
    assert main(_argv(synth, tmp_path, "split", max_steps_per_run=6, **opts)) == 0
    assert latest_checkpoint(tmp_path / "split").name == "step_00000006.pt"
    # resume by name; the stop-after option of the first invocation is not inherited
    assert main(_argv(synth, tmp_path, "split", resume="auto", **opts)) == 0

    # Exact: the same backend, batch size and thread count replay the same arithmetic, so a resumed run is
    # bit-identical to an uninterrupted one (the promise of --resume).
    a, b = _records(tmp_path / "straight"), _records(tmp_path / "split")
    assert [r["step"] for r in b] == list(range(1, 15))
    for ra, rb in zip(a, b):
        assert ra["loss"] == rb["loss"] and ra["lr"] == rb["lr"], ra["step"]
    sa = load_checkpoint(latest_checkpoint(tmp_path / "straight"))
    sb = load_checkpoint(latest_checkpoint(tmp_path / "split"))
    assert sa["step"] == sb["step"] == 14
    for k, v in sa["model"].items():
        torch.testing.assert_close(sb["model"][k], v, rtol=0, atol=0)
    assert sa["loader"][0]["batch"] == sb["loader"][0]["batch"]


def test_resume_after_a_crash_drops_newer_log_lines(synth, tmp_path, monkeypatch):
    assert main(_argv(synth, tmp_path, "crash", steps=8, ckpt_every=5, max_steps_per_run=7)) == 0
    run = tmp_path / "crash"
    (run / "checkpoints" / "step_00000007.pt").unlink()  # as if killed after step 7 but before its checkpoint
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 8, "loss"')  # a line cut short by the kill
    reads = []

    def counted_load(path, *args, **kwargs):
        reads.append(Path(path).name)
        return load_checkpoint(path, *args, **kwargs)

    monkeypatch.setattr(train_module, "load_checkpoint", counted_load)
    assert main(_argv(synth, tmp_path, "crash", steps=8, ckpt_every=5, resume=str(run))) == 0
    assert [r["step"] for r in _records(run)] == list(range(1, 9))
    assert reads == ["step_00000005.pt"]  # the resumed checkpoint is read once: for its settings and its state


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_saves_a_checkpoint_then_resume_continues(synth, tmp_path):
    argv = _argv(synth, tmp_path, "sig", steps=100_000, ckpt_every=10_000, num_workers=1)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "fbn_fast.train", *argv], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "sig"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if (run / "metrics.jsonl").is_file() and len(_records(run)) >= 3:
                break
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM" in err and "Traceback" not in err
    ckpt = latest_checkpoint(run)
    stopped = load_checkpoint(ckpt)["step"]
    assert stopped >= 3 and stopped == _records(run)[-1]["step"]

    # continue from the folder for two more steps
    assert main(_argv(synth, tmp_path, "sig", steps=stopped + 2, resume=str(run))) == 0
    assert [r["step"] for r in _records(run)] == list(range(1, stopped + 3))


# ------------------------------------------------------------------------------------------------- the trainer
def test_trainer_state_is_declared_before_setup_and_run_sets_up(synth, tmp_path):
    from fbn_fast import distributed as fdist

    cfg = parse_args(_argv(synth, tmp_path, "state", steps=2, ckpt_every=100))
    tr = Trainer(cfg, fdist.init_distributed("cpu"))
    declared = set(vars(tr))
    assert not tr.is_set_up and tr.model is None and tr.loader is None and tr.stepper is None
    try:
        assert tr.run() == "done"  # sets up by itself
        assert tr.is_set_up and tr.step == 2 and tr.total_steps == 2
        assert set(vars(tr)) == declared  # nothing is first set outside __init__
        assert all(getattr(tr, name) is not None for name in ("model", "net", "optimizer", "scheduler", "scaler",
                                                              "loader", "relatedness", "stepper", "manifest"))
        model = tr.model
        tr.setup()  # a second set-up is a no-op: it would otherwise rebuild the model and reset the step
        assert tr.model is model and tr.step == 2
    finally:
        tr.close()
    assert [r["step"] for r in _records(tmp_path / "state")] == [1, 2]


def test_running_window_means_over_finite_steps_and_resets():
    w = RunningWindow(3)
    w.add(torch.tensor([1.0, 2.0, 3.0]), images=4, data_seconds=0.25)
    w.add(None, images=4, data_seconds=0.25)  # a skipped step: counted, not averaged
    w.add(torch.tensor([3.0, 4.0, 5.0]), images=8)
    time.sleep(0.01)
    s = w.take()
    assert s.means == [2.0, 3.0, 4.0]  # small integers: exact in float64
    assert (s.steps, s.finite_steps, s.images, s.data_seconds) == (3, 2, 16, 0.5)
    assert s.seconds >= 0.01 and s.images_per_s == pytest.approx(16 / s.seconds)
    assert s.data_wait_fraction == pytest.approx(0.5 / s.seconds)
    # take() started a new window
    assert (w.steps, w.finite_steps, w.images, w.data_seconds) == (0, 0, 0, 0.0) and not w.sums.any()
    w.add(None, images=2)
    s = w.take()
    assert s.means is None and s.steps == 1 and s.images == 2
    # the reduction (across ranks in training) applies to the sums before the means
    w.add(torch.tensor([1.0, 1.0, 1.0]), images=1)
    w.add(torch.tensor([3.0, 3.0, 3.0]), images=1)
    assert w.take(reduce=lambda t: t.mul_(10)).means == [20.0, 20.0, 20.0]


def test_progress_bar_shows_elapsed_and_eta_and_log_lines_keep_their_own_line(capsys):
    configure_console_logging(0)
    log = logging.getLogger("fbn_fast.train")
    with progress_bar(total=10, initial=2, enabled=True) as bar:
        bar.update(3)
        bar.set_postfix_str("loss=1.000")
        log.warning("a line of the log")
        bar.update(5)
    with progress_bar(total=10, enabled=False) as off:
        off.update(10)
    err = capsys.readouterr().err
    pieces = [p.strip() for p in err.replace("\r", "\n").split("\n")]
    assert "[WARNING] a line of the log" in pieces  # alone on its line, not appended to the bar
    final = [p for p in pieces if p.startswith("100%")]
    assert final and "10/10" in final[-1] and "<00:00" in final[-1], err  # elapsed<remaining
    assert sum("10/10" in p for p in pieces) == 1  # the disabled bar printed nothing


# ------------------------------------------------------------------------------------------------- non-finite
class _Poisoned(torch.nn.Module):
    """Wraps the run's objective so that chosen steps return a NaN total (test instrumentation)."""

    def __init__(self, inner, trainer, steps):
        super().__init__()
        self.inner, self.trainer, self.steps = inner, trainer, steps

    def forward(self, *args):
        out = self.inner(*args)
        if self.steps is None or self.trainer.step + 1 in self.steps:
            return LossOutput(out.total * float("nan"), out.terms)
        return out


def _trainer(synth, tmp_path, name, **opts) -> Trainer:
    from fbn_fast import distributed as fdist

    cfg = parse_args(_argv(synth, tmp_path, name, **opts))
    trainer = Trainer(cfg, fdist.init_distributed("cpu"))
    trainer.setup()
    return trainer


def test_nonfinite_steps_are_skipped_and_counted(synth, tmp_path):
    tr = _trainer(synth, tmp_path, "nan", steps=6)
    tr.stepper.loss_fn = _Poisoned(tr.stepper.loss_fn, tr, {2, 5})
    try:
        assert tr.train() == "done"
    finally:
        tr.close()
    recs = _records(tmp_path / "nan")
    assert [r["nonfinite_total"] for r in recs] == [0, 1, 1, 1, 2, 2]
    assert recs[1]["loss"] is None and recs[1]["finite_steps"] == 0
    assert all(math.isfinite(r["loss"]["total"]) for r in recs if r["loss"])
    # the optimizer took exactly the four finite steps
    state = next(iter(tr.optimizer.state.values()))
    assert int(state["step"]) == 4
    assert tr.counters.nonfinite_total == 2 and tr.counters.nonfinite_consecutive == 0


def test_persistent_nonfinite_loss_stops_with_a_checkpoint(synth, tmp_path):
    tr = _trainer(synth, tmp_path, "diverge", steps=50, max_nonfinite=3)
    before = {k: v.clone() for k, v in tr.model.state_dict().items() if "running" not in k and "num_batches" not in k}
    tr.stepper.loss_fn = _Poisoned(tr.stepper.loss_fn, tr, None)
    try:
        with pytest.raises(NonFiniteLossError, match="3 consecutive.*--max-nonfinite"):
            tr.train()
    finally:
        tr.close()
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "diverge"))
    assert ckpt["step"] == 3 and ckpt["counters"]["nonfinite_consecutive"] == 3
    for k, v in before.items():  # no update was applied
        torch.testing.assert_close(ckpt["model"][k], v, rtol=0, atol=0)
    assert EXIT_DIVERGED == 3


# ------------------------------------------------------------------------------------------------- options
def _bad_recipe(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("argv, needle", [
    (["--lr", "-1"], "--lr"),
    (["--no-such-option"], "--no-such-option"),
    (["--amp-dtype", "fp8"], "--amp-dtype"),
    (["--trunk", "nope"], "--trunk"),
    (["--ratios", "1"], "--ratios"),
    (["--datasets", "a", "b", "--ratios", "1"], "--ratios"),
    (["--cuda-profile-steps", "5"], "--cuda-profile-steps"),
    (["--trunk-kwargs", "{not json"], "--trunk-kwargs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--steps", "ten"], "--steps"),
    (["--device", "tpu"], "--device"),
    (["--loss-backend", "gpu"], "--loss-backend"),
    (["--resume", "/nonexistent/run/ckpt.pt"], "--resume"),
    (["--config", "/nonexistent/recipe.toml"], "--config"),
    (["--relatedness-background", "often"], "--relatedness-background"),
    (["--relatedness-background", "1.5"], "--relatedness-background"),
    (["--lambda-dm-ea", "-1"], "--lambda-dm-ea"),
    (["--coupling-scarcity-au", "-5"], "--coupling-scarcity-au"),
    (["--coupling-scarcity-expr", "nan"], "--coupling-scarcity-expr"),
    (["--refresh-confidence", "0"], "--refresh-confidence"),
    (["--refresh-strength", "0"], "--refresh-strength"),
    (["--steps", "10", "--relatedness-refresh", "11"], "--relatedness-refresh"),
])
def test_bad_options_name_the_option(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("opts, needle", [
    ({"opt": "lamb"}, "--opt lamb"),
    ({"relatedness": "/nonexistent/table.json"}, "--relatedness"),
    ({"datasets": "nope"}, "--datasets"),
    ({"manifest": "/nonexistent/manifest.npz"}, "--manifest"),
    ({"loader_backend": "nvjpeg"}, "--loader-backend"),
])
def test_setup_errors_name_the_option(synth, tmp_path, capsys, opts, needle):
    if opts.get("opt") == "lamb" and torch.cuda.is_available():
        pytest.skip("apex's FusedLAMB may run here")
    assert main(_argv(synth, tmp_path, "bad", **opts)) == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("text, needles", [
    ("[optim]\nlrr = 0.1\n", ["bad.toml", "'lrr'"]),
    ("[model]\nlr = 0.1\n", ["bad.toml", "'lr'", "[optim]"]),
    ("[optim]\nlr = 'fast'\n", ["bad.toml", "lr must be a number"]),
    ("[nonsense]\nx = 1\n", ["bad.toml", "[nonsense]"]),
    ("[optim\n", ["bad.toml", "not valid TOML"]),
])
def test_bad_recipes_name_file_and_key(tmp_path, capsys, text, needles):
    with pytest.raises(SystemExit) as exc:
        main(["--config", _bad_recipe(tmp_path, text)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for n in needles:
        assert n in err


def test_recipes_in_training_folder(tmp_path):
    assert TrainConfig.from_dict(load_recipe(REPO / "training" / "default.toml")) == TrainConfig()
    paper = TrainConfig.from_dict(load_recipe(REPO / "training" / "paper.toml"))
    assert paper.trunk in ("vgg16", "vgg16_bn", "resnet50", "timm:resnet50") and paper.image_size == 224
    # command-line options override the recipe; the dump reads back to the same configuration
    cfg = parse_args(["--config", str(REPO / "training" / "paper.toml"), "--lr", "0.5", "--no-channels-last"])
    assert cfg.lr == 0.5 and not cfg.channels_last and cfg.trunk == paper.trunk
    path = tmp_path / "again.toml"
    path.write_text(dump_toml(cfg))
    assert TrainConfig.from_dict(load_recipe(path)) == cfg
    assert set(SECTIONS) == {f.metadata["section"] for f in TrainConfig.fields().values()}


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in TrainConfig.fields():
        assert TrainConfig.option(name) in out


def test_optimizer_choice_and_schedule():
    from fbn_fast.model import build_model

    model = build_model("small", trunk_kwargs={"width": 4})
    opt, impl = build_optimizer(TrainConfig(opt="adamw"), model, torch.device("cpu"))
    assert impl in ("fused", "foreach")
    decay = {id(p) for p in opt.param_groups[0]["params"]}
    assert all((p.ndim >= 2) == (id(p) in decay) for p in model.parameters())
    assert opt.param_groups[1]["weight_decay"] == 0.0
    try:
        import apex  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="apex"):
            build_optimizer(TrainConfig(opt="lamb"), model, torch.device("cpu"))

    s = WarmupCosine(total_steps=100, warmup_steps=10, min_ratio=0.1)
    assert s(0) == pytest.approx(1 / 11) and s(9) == pytest.approx(10 / 11)
    assert s(10) == pytest.approx(1.0)
    assert s(55) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s(100) == pytest.approx(0.1) and s(1000) == pytest.approx(0.1)
