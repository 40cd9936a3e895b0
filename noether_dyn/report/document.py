"""The report's document model: sections made of paragraphs, tables, figures and notes, which
the HTML and Markdown writers render. Builders never touch a file; writers never compute."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from noether_dyn.report.data import MissingData
from noether_dyn.report.figures import to_png
from noether_dyn.report.mathml import Node

Inline = str | Node
"""A piece of running text: plain text (writers escape it; backticks mark code) or a formula."""


@dataclass
class Paragraph:
    """Running text: a string, or a sequence of strings and inline formulas."""

    text: str | Sequence[Inline]

    def parts(self) -> list[Inline]:
        return [self.text] if isinstance(self.text, str) else list(self.text)


@dataclass
class Formula:
    """A formula on its own line, with an optional plain-text gloss after it."""

    node: Node
    gloss: str = ""


SEVERITIES = ("problem", "check", "info")
"""Finding severities, most important first: ``problem`` needs a change to the training,
``check`` deserves a look, ``info`` is a measurement with nothing to do."""


@dataclass
class Finding:
    """One finding: what happened, why (with the number), what to do, and where to look.

    ``figure`` is the anchor of the figure or section that shows it (``fig-charges``, ``summary``)
    or empty.
    """

    severity: str
    where: str
    what: str
    why: str
    action: str = ""
    figure: str = ""


@dataclass
class FindingList:
    """Findings in the order given (rank them before)."""

    items: list[Finding]


@dataclass
class Table:
    """A DataFrame shown as a table; a column named ``warning`` is highlighted when non-empty."""

    frame: pd.DataFrame
    caption: str = ""


@dataclass
class Plot:
    """A rendered figure: PNG bytes, a file-safe ``name`` (its anchor is ``fig-<name>``), a
    caption saying what it shows, and ``alt``, a text description for readers without images
    (defaults to the caption)."""

    png: bytes
    name: str
    caption: str = ""
    alt: str = ""


@dataclass
class Note:
    """A remark set apart, e.g. why a figure was skipped."""

    text: str


@dataclass
class Code:
    """Preformatted text, folded under ``summary``."""

    text: str
    summary: str


Block = Paragraph | Formula | Table | Plot | Note | Code | FindingList


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


def plot_or_note(name: str, caption: str, draw: Callable[[], Figure], alt: str = "") -> Block:
    """``Plot`` of ``draw()``, or a ``Note`` saying which data is missing when it raises
    :class:`MissingData`.

    Any other error while drawing becomes a note naming it (and a ``RuntimeWarning``), so one
    figure that cannot be drawn never loses the rest of the report.
    """
    try:
        return Plot(to_png(draw()), name, caption, alt)
    except MissingData as exc:
        return Note(f"Figure '{name}' skipped: {exc}.")
    except Exception as exc:  # noqa: BLE001 - the report must survive any bad data
        warnings.warn(f"report figure '{name}' failed: {exc!r}", RuntimeWarning, stacklevel=2)
        return Note(f"Figure '{name}' could not be drawn ({type(exc).__name__}: {exc}).")


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` with control characters (terminal escape sequences among them) shown as
    ``\\xNN`` instead of acting on a terminal; tabs and newlines are kept."""
    return _CONTROL.sub(lambda c: f"\\x{ord(c.group()):02x}", text)


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
        return printable(", ".join(str(v) for v in value))
    return printable(str(value))


def format_frame(frame: pd.DataFrame) -> list[list[str]]:
    """The cells of ``frame`` as strings (rows of :func:`format_value`)."""
    return [[format_value(v) for v in row] for row in frame.itertuples(index=False, name=None)]
