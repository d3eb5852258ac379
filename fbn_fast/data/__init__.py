"""Data: the manifest of heterogeneous corpora, corpus importers, SynthFace and the input pipeline."""

from .manifest import SPLITS, Manifest, load_manifest

__all__ = ["SPLITS", "Manifest", "load_manifest"]
