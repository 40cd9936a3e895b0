"""Writing a :class:`Document` to disk as HTML or Markdown."""

from __future__ import annotations

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
    """Create ``path``'s directory and make sure the file can be written, before any work is
    spent on rendering; raises OSError naming the path otherwise."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"output path '{path}' is a directory; name a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        existed = path.exists()
        with open(path, "ab"):
            pass
        if not existed:
            path.unlink()
    except OSError as exc:
        raise OSError(f"cannot write '{path}': {exc.strerror or exc}") from None
    return path


def write_document(doc: Document, path: str | Path, format: str | None = None) -> Path:
    """Write ``doc`` to ``path``; Markdown figures go to ``<stem>_files/`` beside it."""
    path = Path(path)
    fmt = output_format(path, format)
    if fmt == "html":
        path.write_text(render_html(doc), encoding="utf-8")
        return path
    figure_dir = f"{path.stem}_files"
    text, files = render_markdown(doc, figure_dir)
    if files:
        (path.parent / figure_dir).mkdir(exist_ok=True)
    for rel, png in files.items():
        (path.parent / rel).write_bytes(png)
    path.write_text(text, encoding="utf-8")
    return path
