"""Fallback for any optimizer without a known metric: G = I, beta = 0, recorded as a fallback."""

from __future__ import annotations

from noether_dyn.optimizers.base import OptimizerAdapter


class EuclideanFallback(OptimizerAdapter):
    """G = I and no momentum. The run's metadata says ``metric_fallback: true`` so that a reader
    knows the kinetic energy of this run is Euclidean by assumption, not by theory."""

    name = "euclidean-fallback"
    metric_name = "G = I (fallback: no known metric for this optimizer)"
    fallback = True
