"""Writing a :class:`Document` to disk as HTML or Markdown.

Output files never follow a symlink: each file is written to a temporary file in the target
directory and renamed over the output path, so a link there (``report.html -> elsewhere``, as a
received run directory may hold) is replaced by the report while its target stays untouched. A
Markdown figure folder that is a symlink is replaced by a real folder the same way.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from noether_dyn.report.document import Document
from noether_dyn.report.html import render_html
from noether_dyn.report.markdown import render_markdown

FORMATS = ("html", "md")


def output_format(path: str | Path, format: str | None) -> str:
    """``format`` when given (``html`` or ``md``), else ``md`` for a ``.md`` path, else ``html``."""
    if format is None:
        return "md" if Path(path).suffix.lower() in (".md", ".markdown") else "html"
    if format not in FORMATS:
        raise ValueError(f"unknown report format {format!r}; use one of {', '.join(FORMATS)}")
    return format


def check_writable(path: str | Path) -> Path:
    """Create ``path``'s directory and make sure a file can be written there, before any work is
    spent on rendering; raises OSError naming the path otherwise.

    A symlink at ``path`` is removed (the link only, never its target), so that whoever writes
    ``path`` next creates a regular file instead of writing through the link.
    """
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        raise IsADirectoryError(f"output path '{path}' is a directory; name a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
        if path.is_symlink():
            path.unlink()
    except OSError as exc:
        raise OSError(f"cannot write '{path}': {exc.strerror or exc}") from None
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file renamed into place: never writes
    through a symlink at ``path`` (the link is replaced) and never leaves a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _real_dir(path: Path) -> Path:
    """``path`` as a real directory: a symlink there is removed (not followed) first."""
    if path.is_symlink():
        path.unlink()
    path.mkdir(exist_ok=True)
    return path


def write_document(doc: Document, path: str | Path, format: str | None = None) -> Path:
    """Write ``doc`` to ``path``; Markdown figures go to ``<stem>_files/`` beside it."""
    path = Path(path)
    fmt = output_format(path, format)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "html":
        return write_bytes(path, render_html(doc).encode("utf-8"))
    figure_dir = f"{path.stem}_files"
    text, files = render_markdown(doc, figure_dir)
    if files:
        _real_dir(path.parent / figure_dir)
    for rel, png in files.items():
        write_bytes(path.parent / rel, png)
    return write_bytes(path, text.encode("utf-8"))
