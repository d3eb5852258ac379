"""fbn_fast: a high-performance training engine for heterogeneous multi-task face behaviour analysis.

Public API: label spaces (:mod:`fbn_fast.labels`), relatedness tables (:mod:`fbn_fast.relatedness`),
the co-training objective (:class:`FaceBehaviorLoss`, :func:`face_behavior_loss`), label validation and
streaming metrics.
"""

from . import labels, relatedness
from .losses import (
    TERMS,
    FaceBehaviorLoss,
    LossOutput,
    LossWeights,
    available_backends,
    face_behavior_loss,
)
from .validation import validate_labels, validate_relatedness

__version__ = "0.1.0"

__all__ = [
    "TERMS",
    "FaceBehaviorLoss",
    "LossOutput",
    "LossWeights",
    "available_backends",
    "face_behavior_loss",
    "labels",
    "relatedness",
    "validate_labels",
    "validate_relatedness",
]
