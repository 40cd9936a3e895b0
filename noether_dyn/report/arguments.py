"""Checks of the public report functions' arguments: each error names the argument and the fix."""

from __future__ import annotations

import os
from typing import Any

from noether_dyn.store import Run

SUFFIXES = {".html": "html", ".htm": "html", ".md": "md", ".markdown": "md"}
"""Output suffixes and the format each one means."""


def check_output_args(function: str, runs: dict[str, Any], path: Any, format: Any) -> None:
    """Raise when a run argument (name -> value) is not a :class:`Run` or a non-empty path, when
    ``path`` is not a non-empty path, when ``format`` is not None/``"html"``/``"md"``, or when
    ``path`` has a suffix that names neither format and no ``format`` is given (``x.pdf`` would
    otherwise receive HTML)."""
    for name, run in runs.items():
        if not isinstance(run, Run):
            _check_path(function, name, run, "a Run (noether_dyn.load_run) or a run directory")
    _check_path(function, "path", path, "the output file")
    if format is not None and format not in SUFFIXES.values():
        raise (ValueError if isinstance(format, str) else TypeError)(
            f"{function}: format must be None, 'html' or 'md', got {format!r}."
        )
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if format is None and suffix and suffix not in SUFFIXES:
        raise ValueError(
            f"{function}: path {os.fspath(path)!r} ends in {suffix!r}, but reports are HTML or "
            "Markdown. Name the file .html or .md, or pass format='html' or format='md'."
        )


def _check_path(function: str, name: str, value: Any, what: str) -> None:
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise (ValueError if isinstance(value, str) else TypeError)(
            f"{function}: {name} must be {what} (a non-empty str or pathlib.Path), got {value!r}."
        )
