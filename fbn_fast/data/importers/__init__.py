"""Importers of the real face corpora, one module per corpus, each reading the corpus's published layout.

``IMPORTERS`` maps a command name to its :class:`Importer`; ``import_corpus(name, root, **options)`` runs
one and returns a :class:`~fbn_fast.data.manifest.Manifest`. From the shell::

    python -m fbn_fast.data import affectnet ROOT --out affectnet.npz

Every importer counts what it leaves out (rows it drops, labels it masks) by reason, in
``manifest.meta["imports"]`` and in its log lines.
"""

from __future__ import annotations

from pathlib import Path

from ..manifest import Manifest
from . import affectnet, affwild2, bp4d, disfa, emotionet, rafdb
from ._common import Importer

IMPORTERS: dict[str, Importer] = {
    imp.name: imp
    for imp in (affectnet.IMPORTER, *rafdb.IMPORTERS, affwild2.IMPORTER, disfa.IMPORTER, bp4d.IMPORTER,
                emotionet.IMPORTER)
}

import_affectnet = affectnet.import_affectnet
import_rafdb = rafdb.import_rafdb
import_rafdb_compound = rafdb.import_rafdb_compound
import_affwild2 = affwild2.import_affwild2
import_disfa = disfa.import_disfa
import_bp4d = bp4d.import_bp4d
import_emotionet = emotionet.import_emotionet


def import_corpus(name: str, root: str | Path, **options) -> Manifest:
    """Run the importer called ``name`` on ``root`` with its keyword ``options``."""
    try:
        importer = IMPORTERS[name]
    except KeyError:
        raise ValueError(f"no importer {name!r}; there are {sorted(IMPORTERS)}") from None
    return importer.run(root, **options)


__all__ = ["IMPORTERS", "Importer", "import_affectnet", "import_affwild2", "import_bp4d", "import_corpus",
           "import_disfa", "import_emotionet", "import_rafdb", "import_rafdb_compound"]
