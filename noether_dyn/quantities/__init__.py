"""Quantities computed from a step: reductions, the Lagrangian, charges and their predictions."""
