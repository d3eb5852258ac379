"""One option vocabulary: the inference tools and the benchmarks take train's options (names, values, help),
generated from TrainConfig's field metadata; the old spellings still work for one release, with a warning."""

from __future__ import annotations

import argparse
import importlib.util
import sys
import warnings
from pathlib import Path

import pytest

from fbn_fast import evaluate, fewshot, predict
from fbn_fast.config import TrainConfig, add_config_options, build_parser, check_options, renamed_keywords

PROFILING = Path(__file__).resolve().parents[1] / "profiling"
TOOLS = {"evaluate": evaluate, "predict": predict, "fewshot": fewshot}
OLD_NAMES = ("--root", "--workers", "--dtype", "--backend")


def _bench(name: str):
    sys.path.insert(0, str(PROFILING))  # bench scripts import each other by file name
    try:
        spec = importlib.util.spec_from_file_location(name, PROFILING / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(PROFILING))


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Visible options by their first spelling."""
    return {a.option_strings[0]: a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS}


TRAIN = _actions(build_parser())


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_shared_options_have_trains_names_values_and_types(tool):
    mod = TOOLS[tool]
    options = _actions(mod.build_parser())
    for name in mod.SHARED_OPTIONS:
        flag = TrainConfig.option(name)
        assert flag in options, f"{tool} has no {flag}"
        mine, train = options[flag], TRAIN[flag]
        assert mine.dest == train.dest == name
        assert mine.choices == train.choices and mine.type == train.type and mine.nargs == train.nargs, flag
    # the old spellings are no option of their own any more (only hidden aliases)
    assert not set(OLD_NAMES) & set(options)
    assert mod.build_parser().parse_args(["ckpt", "x", "--shots", "1"] if tool == "fewshot" else ["ckpt", "x"]
                                         ).amp_dtype == "auto"


@pytest.mark.parametrize("tool", ["evaluate", "fewshot"])
def test_old_spellings_warn_and_mean_the_same(tool):
    parser = TOOLS[tool].build_parser()
    head = ["ckpt", "m.npz"] + (["--shots", "1"] if tool == "fewshot" else [])
    new = parser.parse_args(head + ["--data-root", "imgs", "--num-workers", "0", "--amp-dtype", "bf16",
                                    "--loader-backend", "cpu"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        old = parser.parse_args(head + ["--root", "imgs", "--workers", "0", "--dtype", "bfloat16", "--backend", "cpu"])
        again = parser.parse_args(head + ["--root", "imgs"])
    assert vars(old) == vars(new) and again.data_root == "imgs"
    messages = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    for alias, flag in (("--root", "--data-root"), ("--workers", "--num-workers"), ("--dtype", "--amp-dtype"),
                        ("--backend", "--loader-backend")):
        # each old spelling is named once (not on every use) with its new name
        assert sum(m.startswith(f"{alias} is deprecated") and m.endswith(f"use {flag}") for m in messages) == 1
    for value, amp in (("float32", "none"), ("float16", "fp16"), ("bf16", "bf16")):
        with pytest.warns(FutureWarning):
            assert parser.parse_args(head + ["--dtype", value]).amp_dtype == amp


def test_predict_old_dtype_and_bad_values(capsys):
    parser = predict.build_parser()
    with pytest.warns(FutureWarning, match="--dtype"):
        assert parser.parse_args(["ckpt", "a.jpg", "--dtype", "float16"]).amp_dtype == "fp16"
    with pytest.raises(SystemExit):
        parser.parse_args(["ckpt", "a.jpg", "--amp-dtype", "float16"])  # the new option takes train's values only
    assert "invalid choice: 'float16'" in capsys.readouterr().err


def test_values_are_checked_by_trains_rules():
    with pytest.raises(ValueError, match="--batch-size: must be >= 1, got 0"):
        check_options({"batch_size": 0})
    with pytest.raises(ValueError, match="--num-workers: must be finite and >= 0"):
        check_options({"num_workers": -1})
    check_options({"batch_size": 3, "image_size": None})  # None: the tool's own default, not checked


def test_add_config_options_overrides_and_bool_aliases():
    p = argparse.ArgumentParser()
    add_config_options(p, ["batch_size", "torchcompile"], defaults={"batch_size": 7},
                       aliases={"torchcompile": "--compile"})
    assert vars(p.parse_args([])) == {"batch_size": 7, "torchcompile": False}
    assert "(default: 7)" in _actions(p)["--batch-size"].help
    with pytest.warns(FutureWarning, match="--compile is deprecated.*--torchcompile"):
        assert p.parse_args(["--compile"]).torchcompile is True
    with pytest.raises(KeyError, match="nope"):
        add_config_options(p, ["nope"])


def test_renamed_keywords_still_work():
    @renamed_keywords(dtype="amp_dtype")
    def f(*, amp_dtype: str = "auto") -> str:
        return amp_dtype

    with pytest.warns(FutureWarning, match=r"f\(dtype=...\) is deprecated.*amp_dtype="):
        assert f(dtype="bf16") == "bf16"
    with pytest.raises(TypeError, match="both dtype= and its new name amp_dtype="):
        f(dtype="bf16", amp_dtype="fp16")


@pytest.mark.parametrize("bench", ["bench_loader", "bench_train", "torch_profile", "bench_synthface"])
def test_benchmarks_take_trains_options(bench):
    mod = _bench(bench)
    options = _actions(mod.build_parser())
    names = getattr(mod, "TRAIN_OPTIONS", ("num_workers",))
    for name in names:
        flag = TrainConfig.option(name)
        assert options[flag].dest == name and options[flag].choices == TRAIN[flag].choices, flag
    for old in getattr(mod, "OLD_SPELLINGS", {}).values():
        assert old not in options  # hidden aliases only
    assert not set(OLD_NAMES) & set(options)


def test_benchmark_old_spellings_map_to_the_new_options():
    args_new = _bench("bench_train").build_parser().parse_args(["--amp-dtype", "none", "bf16", "--torchcompile"])
    with pytest.warns(FutureWarning):
        args_old = _bench("bench_train").build_parser().parse_args(["--amp", "none", "bf16", "--compile"])
    assert vars(args_old) == vars(args_new)
    with pytest.warns(FutureWarning):
        old = _bench("bench_loader").build_parser().parse_args(["--batch", "8", "--workers", "0", "--dtype", "float32"])
    assert (old.batch_size, old.num_workers, old.amp_dtype) == (8, 0, "none")
    profile = _bench("torch_profile").build_parser()
    assert profile.parse_args(["--no-channels-last"]).channels_last is False  # its old switch is train's now
