"""Every recipe of docs/dropin.md runs as written: each ```python block after the setup block, as a script
of its own (setup + recipe), the DDP recipe under torchrun with 2 gloo processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from torchrun import NO_GLOO, run_ranks

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "dropin.md"
TORCHRUN = "# torchrun --nproc_per_node 2"


def _recipes() -> tuple[str, list[tuple[str, str]]]:
    """The setup block and ``(section title, code)`` of every other python block, in the doc's order."""
    setup, recipes, title = None, [], None
    for m in re.finditer(r"^## ([^\n]+)$|^```python\n(.*?)^```", DOC.read_text(), flags=re.M | re.S):
        if m.group(1) is not None:
            title = m.group(1).strip()
        elif m.group(2).startswith("# setup\n"):
            setup = m.group(2)
        else:
            recipes.append((title, m.group(2)))
    assert setup is not None, f"{DOC} has no '# setup' block"
    return setup, recipes


SETUP, RECIPES = _recipes()


def test_the_doc_has_every_recipe():
    titles = " | ".join(t for t, _ in RECIPES)
    for needle in ("Fixed weights", "DWA", "Uncertainty", "PCGrad", "GradNorm", "Lightning", "DDP",
                   "own label space"):
        assert needle in titles, f"docs/dropin.md lacks the {needle} recipe (has: {titles})"


@pytest.mark.parametrize("title, code", RECIPES, ids=[t.split(".")[0] for t, _ in RECIPES])
def test_recipe_runs(title, code, tmp_path):
    script = tmp_path / "recipe.py"
    script.write_text(SETUP + "\n" + code)
    if code.startswith(TORCHRUN):
        if NO_GLOO:
            pytest.skip(NO_GLOO)
        run_ranks(script, cwd=tmp_path)
        return
    cmd = [sys.executable, str(script)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"recipe {title!r} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
