"""Label spaces of the three face tasks and remapping from the orders real corpora use (docs/method.md §1).

The canonical orders here are the contract for every table, manifest and model output in the project.
Corpora that use other orders are remapped on import; a class with no place in the canonical space
(AffectNet's Contempt, its non-face codes) maps to ``MISSING`` and is masked out.
"""

from __future__ import annotations

import numpy as np

#: Basic expressions, in the order of docs/method.md §1.
EXPRESSIONS: tuple[str, ...] = (
    "Neutral",
    "Anger",
    "Disgust",
    "Fear",
    "Happiness",
    "Sadness",
    "Surprise",
)

#: Action units (FACS numbers), in the order of docs/method.md §1.
AU_NUMBERS: tuple[int, ...] = (1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 17, 20, 23, 24, 25, 26)
AUS: tuple[str, ...] = tuple(f"AU{n}" for n in AU_NUMBERS)

#: Compound expressions of Du, Tao & Martinez (PNAS 2014); RAF-DB's compound set is the first eleven.
COMPOUNDS: tuple[str, ...] = (
    "Happily surprised",
    "Happily disgusted",
    "Sadly fearful",
    "Sadly angry",
    "Sadly surprised",
    "Sadly disgusted",
    "Fearfully angry",
    "Fearfully surprised",
    "Angrily surprised",
    "Angrily disgusted",
    "Disgustedly surprised",
    "Fearfully disgusted",
    "Appalled",
    "Hatred",
    "Awed",
)

#: RAF-DB's compound classes (the paper's zero-shot protocol: UAR over these eleven).
RAFDB_COMPOUNDS: tuple[str, ...] = COMPOUNDS[:11]

#: The two basic expressions each compound names (docs/method.md §4, the optional β term). The last three
#: compounds of Du et al. are named after no pair; we use the pair their AUs resemble most (our choice).
COMPOUND_PARENTS: tuple[tuple[str, str], ...] = (
    ("Happiness", "Surprise"),
    ("Happiness", "Disgust"),
    ("Sadness", "Fear"),
    ("Sadness", "Anger"),
    ("Sadness", "Surprise"),
    ("Sadness", "Disgust"),
    ("Fear", "Anger"),
    ("Fear", "Surprise"),
    ("Anger", "Surprise"),
    ("Anger", "Disgust"),
    ("Disgust", "Surprise"),
    ("Fear", "Disgust"),
    ("Disgust", "Anger"),
    ("Anger", "Disgust"),
    ("Fear", "Surprise"),
)

NUM_EXPRESSIONS = len(EXPRESSIONS)
NUM_AUS = len(AUS)
NUM_VA = 2
#: Integer marker of a missing expression label in manifests and remapping tables.
MISSING = -1

# RAF-DB basic list files: 1 Surprise, 2 Fear, 3 Disgust, 4 Happiness, 5 Sadness, 6 Anger, 7 Neutral.
RAFDB_ORDER: tuple[str, ...] = ("Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral")
# AffectNet expression codes 0..7 (8 None, 9 Uncertain, 10 No-Face are not expressions).
AFFECTNET_ORDER: tuple[str, ...] = (
    "Neutral",
    "Happiness",
    "Sadness",
    "Surprise",
    "Fear",
    "Disgust",
    "Anger",
    "Contempt",
)
# Aff-Wild2 (ABAW) expression codes 0..6; code 7 ("Other", from ABAW3 on) has no place; -1 is invalid.
AFFWILD2_ORDER: tuple[str, ...] = ("Neutral", "Anger", "Disgust", "Fear", "Happiness", "Sadness", "Surprise")


def remap_table(source_order: tuple[str, ...] | list[str], offset: int = 0) -> np.ndarray:
    """Lookup table from a corpus's integer codes to canonical expression ids.

    ``source_order[i]`` names the class of code ``i + offset``; a name outside :data:`EXPRESSIONS`
    maps to :data:`MISSING`. Index the result with ``code - offset``.
    """
    index = {name: i for i, name in enumerate(EXPRESSIONS)}
    return np.array([index.get(name, MISSING) for name in source_order], dtype=np.int64)


def remap_expressions(codes: np.ndarray, source_order: tuple[str, ...] | list[str], offset: int = 0) -> np.ndarray:
    """Map integer expression codes of a corpus to canonical ids; unknown or out-of-range codes give MISSING."""
    table = remap_table(source_order)
    codes = np.asarray(codes, dtype=np.int64) - offset
    valid = (codes >= 0) & (codes < len(table))
    out = np.full(codes.shape, MISSING, dtype=np.int64)
    out[valid] = table[codes[valid]]
    return out


def from_rafdb(labels: np.ndarray) -> np.ndarray:
    """RAF-DB basic labels (1..7, RAF order) to canonical ids."""
    return remap_expressions(labels, RAFDB_ORDER, offset=1)


def from_affectnet(labels: np.ndarray) -> np.ndarray:
    """AffectNet codes (0..7; 8-10 are non-expressions) to canonical ids; Contempt and codes ≥ 8 are MISSING."""
    return remap_expressions(labels, AFFECTNET_ORDER, offset=0)


def from_affwild2(labels: np.ndarray) -> np.ndarray:
    """Aff-Wild2 expression codes (0..6; -1 invalid, 7 Other) to canonical ids."""
    return remap_expressions(labels, AFFWILD2_ORDER, offset=0)


def label_names(n: int, known: tuple[str, ...] | list[str], prefix: str) -> list[str]:
    """Names of ``n`` outputs: ``known`` when there are that many, else ``<prefix>0`` … (a model of another size)."""
    return list(known) if n == len(known) else [f"{prefix}{i}" for i in range(n)]


def au_index(au: int | str) -> int:
    """Position of an AU (``12``, ``"12"`` or ``"AU12"``) in the canonical AU order."""
    number = int(str(au).upper().removeprefix("AU"))
    try:
        return AU_NUMBERS.index(number)
    except ValueError:
        raise ValueError(f"AU {au!r} is not among the {NUM_AUS} AUs of the label space {AUS}") from None


def au_columns(aus: list[int] | tuple[int, ...]) -> np.ndarray:
    """Canonical positions of a corpus's AU subset (AUs outside the label space raise)."""
    return np.array([au_index(a) for a in aus], dtype=np.int64)
