"""Diagnostic reports, charge plots and run comparisons, drawn from a saved run alone.

Public: :func:`report` (one run, HTML or Markdown), :func:`plot_charges` (a matplotlib Figure)
and :func:`compare` (two runs, e.g. a normalized network under SGD against its un-normalized
twin under RMSprop: docs/theory.md §4).
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np

from noether_dyn.report.arguments import check_output_args
from noether_dyn.report.compare import compare
from noether_dyn.report.data import MissingData, RunLike, as_run
from noether_dyn.report.figures import plot_charges
from noether_dyn.report.findings import findings
from noether_dyn.report.render import check_writable, output_format, write_document
from noether_dyn.report.sections import run_document


def report(run: RunLike, path: str | Path, format: str | None = None) -> Path:
    """Write the diagnostic report of ``run`` to ``path``.

    Args:
        run: a :class:`~noether_dyn.store.Run` or the path of a run directory.
        path: the output file. HTML (default) is one self-contained file, figures embedded as
            base64 PNG; Markdown (``.md`` or ``format="md"``) puts the figures in
            ``<stem>_files/`` beside it.
        format: ``"html"`` or ``"md"`` to override the suffix.

    Returns:
        The written path. Raises ``StoreError`` for a missing or bad run and ``OSError`` for an
        output path that cannot be written (checked before rendering).
    """
    check_output_args("report", {"run": run}, path, format)
    fmt = output_format(path, format)
    run = as_run(run)
    check_writable(path)
    # non-finite data is shown as such (shaded spans, "n/a"); numpy's warnings add nothing
    with np.errstate(all="ignore"):
        doc = run_document(run)
    return write_document(doc, path, fmt)


__all__ = ["MissingData", "compare", "findings", "plot_charges", "report"]


class _CallableModule(types.ModuleType):
    """``noether_dyn.report`` is both this package and the public function ``nd.report``: the
    package top binds the name lazily, and Python rebinds a package attribute to the submodule
    whenever the submodule is first imported, so the module itself calls :func:`report`."""

    def __call__(self, run: RunLike, path: str | Path, format: str | None = None) -> Path:
        return report(run, path, format)


sys.modules[__name__].__class__ = _CallableModule
