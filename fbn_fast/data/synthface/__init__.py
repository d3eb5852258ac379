"""SynthFace: a procedural face renderer and a labelled benchmark that exercises the whole method offline.

Generate it with ``python -m fbn_fast.data synth --out DIR [--size small|medium|large|N] [--seed S]
[--image-size 112] [--workers W] [--contact-sheet PNG]`` (or ``python -m fbn_fast.data.synthface ...``), or
from Python with :func:`ensure_synthface`, which generates only when ``DIR`` does not already hold the same
benchmark and returns the path of its manifest.

Faces
    Drawn with PIL primitives on a 2–4× canvas, box-filtered to the target size, lit by a linear gradient and
    given Gaussian noise (:mod:`.renderer`). Identity (face shape, eye spacing and size, brows, nose, mouth, lips,
    hair, skin tone), pose (yaw up to ±0.3 rad through feature depth, roll up to ±0.14 rad, offset, scale),
    lighting, background (smooth, blocky or striped) and noise vary per image. Each of the 17 AUs is a local
    deformation with an intensity in [0, 1]: AU1/AU2 lift the inner/outer brows (AU1 adds central forehead
    lines), AU4 lowers and gathers the brows with vertical furrows, AU5 lifts the upper lids, AU6 raises the
    cheeks with crow's feet, AU7 raises and darkens the lower lids, AU9 wrinkles the nose bridge and lifts the
    wings, AU10 raises the upper lip (teeth, deeper folds beside the nose), AU12 pulls the corners up and out,
    AU14 adds dimples, AU15 pulls the corners down, AU17 pushes the chin boss and lower lip up (dimpled chin),
    AU20 stretches the mouth sideways, AU23 narrows and darkens the lips, AU24 presses them flat with bulges
    above and below, AU25 parts the lips, AU26 drops the jaw. :func:`au_regions` gives each AU's region.

Labels (:mod:`.sampling`)
    Expression uniform over the 7 (``--expr-probs`` to change); AU k active ~ Bernoulli(R[c, k]) of the
    prior table, or spontaneously with probability 0.05; active intensities in [0.5, 1] follow a per-face
    strength, inactive AUs are 0 or a faint trace below 0.2; **an AU is active (label 1) when its intensity
    is ≥ 0.5**. VA from a mean per expression, scaled by the strength, plus N(0, 0.12²) noise, clipped.
    Compound faces draw AUs from the compound table and have no basic expression.

Datasets (names are a contract; shares of the total; splits train 85% / val 5% / test 10%)
    ========================  =====  =====================  ============================================
    name                      share  like                   labels in ``manifest.npz``
    ========================  =====  =====================  ============================================
    ``synth_expr_va``         30%    AffectNet              expression, VA
    ``synth_expr``            20%    RAF-DB                 expression
    ``synth_au_a``            17.5%  DISFA                  AUs 1 2 4 5 6 9 12 15 17 20 25 26
    ``synth_au_b``            17.5%  BP4D                   AUs 1 2 4 6 7 10 12 14 15 17 23 24
    ``synth_all``             10%    Aff-Wild2              expression, VA and all 17 AUs (so every AU has
                                                            expression-co-annotated samples for the
                                                            data-driven relatedness)
    ``synth_compound``        5%     RAF-DB compound        compound id; test split only
    ========================  =====  =====================  ============================================

    Presets: ``tiny`` 2,000, ``small`` 25,000 (default), ``medium`` 250,000, ``large`` 1,500,000 images.

Files in ``DIR``
    ``images/<dataset>/<split>/<shard>/<index>.jpg`` (at most 10,000 files per shard folder);
    ``manifest.npz`` — what each dataset publishes (the labels above only; paths relative to ``DIR``);
    ``manifest_full.npz`` — the same rows in the same order with the complete hidden truth (expression, all
    17 AUs annotated, VA, compound) so an evaluation can score tasks a dataset does not label;
    ``truth.npz`` — arrays aligned to the manifest rows: ``au_intensity`` (N×17 float), ``au`` (N×17 0/1),
    ``expr``, ``compound`` (-1 missing), ``va`` (N×2), ``strength``, ``index`` (the image's generation index);
    ``synthface.json`` — parameters, version, counts per dataset and split, label model, generation rate.

Determinism
    Labels of a (dataset, split) block come from one stream seeded by (seed, dataset, split); the look of
    image ``i`` from a stream seeded by (seed, i). The bytes of every file are therefore a function of the
    parameters alone, whatever the number of workers.

Cache
    :func:`default_synth_dir` is where the trainer and the benchmarks keep a generated SynthFace.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .dataset import (
    DATASETS,
    SIZES,
    DatasetSpec,
    cli,
    ensure_synthface,
    generate,
    parse_size,
    plan,
    render_image,
)
from .renderer import AU_DESCRIPTIONS, VERSION, Look, au_regions, region_mask, render, sample_look
from .sampling import (
    AU_THRESHOLD,
    SPONTANEOUS,
    VA_MEANS,
    Labels,
    active_probability,
    sample_compounds,
    sample_expressions,
)
from .sheet import contact_sheet

if TYPE_CHECKING:
    from ...config import TrainConfig

__all__ = [
    "AU_DESCRIPTIONS",
    "AU_THRESHOLD",
    "DATASETS",
    "SIZES",
    "SPONTANEOUS",
    "VA_MEANS",
    "VERSION",
    "DatasetSpec",
    "Labels",
    "Look",
    "active_probability",
    "au_regions",
    "cli",
    "contact_sheet",
    "default_synth_dir",
    "ensure_synthface",
    "generate",
    "parse_size",
    "plan",
    "region_mask",
    "render",
    "render_image",
    "sample_compounds",
    "sample_expressions",
    "sample_look",
]


def default_synth_dir(cfg: TrainConfig) -> Path:
    """Where a run's SynthFace is cached: ``--synth-dir`` if given, else ``$FBN_FAST_DATA`` if set, else
    ``$XDG_CACHE_HOME/fbn_fast`` (or ``~/.cache/fbn_fast``), in a folder named after size, image size and seed."""
    if cfg.synth_dir:
        return Path(cfg.synth_dir)
    base = os.environ.get("FBN_FAST_DATA")
    if base:
        root = Path(base)
    else:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = Path(cache) / "fbn_fast"
    return root / f"synthface-{cfg.synth_size}-{cfg.synth_image_size}px-seed{cfg.synth_seed}"
