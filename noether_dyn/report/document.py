"""The report's document model: sections made of paragraphs, tables, figures and notes, which
the HTML and Markdown writers render. Builders never touch a file; writers never compute."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from noether_dyn.report.data import MissingData
from noether_dyn.report.figures import to_png


@dataclass
class Paragraph:
    """Plain text (no markup; writers escape it). Backticks mark code."""

    text: str


@dataclass
class Table:
    """A DataFrame shown as a table; a column named ``warning`` is highlighted when non-empty."""

    frame: pd.DataFrame
    caption: str = ""


@dataclass
class Plot:
    """A rendered figure: PNG bytes, a file-safe ``name`` and a caption."""

    png: bytes
    name: str
    caption: str = ""


@dataclass
class Note:
    """A remark set apart, e.g. why a figure was skipped."""

    text: str


@dataclass
class Code:
    """Preformatted text, folded under ``summary``."""

    text: str
    summary: str


Block = Paragraph | Table | Plot | Note | Code


@dataclass
class Section:
    """One titled part of a report; ``key`` is its anchor."""

    key: str
    title: str
    blocks: list[Block] = field(default_factory=list)


@dataclass
class Document:
    """A whole report."""

    title: str
    subtitle: str
    sections: list[Section]


def plot_or_note(name: str, caption: str, draw: Callable[[], Figure]) -> Block:
    """``Plot`` of ``draw()``, or a ``Note`` saying which data is missing when it raises
    :class:`MissingData`."""
    try:
        fig = draw()
    except MissingData as exc:
        return Note(f"Figure '{name}' skipped: {exc}.")
    return Plot(to_png(fig), name, caption)


def format_value(value: object) -> str:
    """A table cell: 4 significant digits for floats, ``n/a`` for NaN, ``-`` for None."""
    if value is None:
        return "-"
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, float | np.floating):
        v = float(value)
        if np.isnan(v):
            return "n/a"
        if np.isinf(v):
            return "inf" if v > 0 else "-inf"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.4g}"
    if isinstance(value, tuple | list):
        return ", ".join(str(v) for v in value)
    return str(value)


def format_frame(frame: pd.DataFrame) -> list[list[str]]:
    """The cells of ``frame`` as strings (rows of :func:`format_value`)."""
    return [[format_value(v) for v in row] for row in frame.itertuples(index=False, name=None)]
