"""Continuous symmetries of the loss: the record, detection and verification."""

from noether_dyn.symmetries.detect import find_symmetries
from noether_dyn.symmetries.engine import Detection, Dropped, detect
from noether_dyn.symmetries.step_check import gradient_defects, judge_defects
from noether_dyn.symmetries.symmetry import KINDS, Symmetry
from noether_dyn.symmetries.verify import verify

__all__ = [
    "KINDS",
    "Detection",
    "Dropped",
    "Symmetry",
    "detect",
    "find_symmetries",
    "gradient_defects",
    "judge_defects",
    "verify",
]
