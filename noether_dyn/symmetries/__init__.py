"""Continuous symmetries of the loss: the record, detection and verification."""

from noether_dyn.symmetries.detect import find_symmetries
from noether_dyn.symmetries.symmetry import KINDS, Symmetry
from noether_dyn.symmetries.verify import verify

__all__ = ["KINDS", "Symmetry", "find_symmetries", "verify"]
