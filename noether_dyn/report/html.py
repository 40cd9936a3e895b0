"""One self-contained HTML file: inline CSS, figures as base64 PNG, no script, no network."""

from __future__ import annotations

import base64
import html
import re
import struct

from noether_dyn.report.document import (
    Block,
    Code,
    Document,
    FindingList,
    Formula,
    Note,
    Paragraph,
    Plot,
    Table,
    format_frame,
    printable,
)
from noether_dyn.report.mathml import Node, to_mathml

CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328;
       max-width: 1120px; margin: 2em auto; padding: 0 1.2em; background: #fff; }
h1 { font-size: 1.7em; margin-bottom: 0.1em; }
h2 { font-size: 1.3em; margin-top: 2em; border-bottom: 1px solid #d0d7de; padding-bottom: .2em; }
.subtitle { color: #57606a; margin-top: 0; }
nav ol { columns: 2; color: #57606a; }
a { color: #0969da; text-decoration: none; }
table { border-collapse: collapse; margin: .8em 0; font-size: 13px; display: block;
        overflow-x: auto; max-width: 100%; }
th, td { border: 1px solid #d0d7de; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
tr:nth-child(even) td { background: #fbfcfd; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.warn { background: #fff1e5 !important; color: #9a3412; font-weight: 600; }
caption { caption-side: bottom; text-align: left; color: #57606a; font-size: 12px; padding: 4px; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eaeef2; }
figcaption { color: #57606a; font-size: 13px; }
.note { background: #f6f8fa; border-left: 4px solid #8c959f; padding: .5em .9em; color: #424a53; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12.5px; }
pre { background: #f6f8fa; padding: .8em; overflow-x: auto; }
footer { margin-top: 3em; color: #8c959f; font-size: 12px; }
math { font-size: 1.08em; }
math[display="block"] { margin: .6em 0 .2em; }
.gloss { color: #57606a; font-size: 13px; margin-top: 0; }
ol.findings { padding-left: 1.6em; }
ol.findings li { margin: .55em 0; }
.badge { display: inline-block; font-size: 11px; font-weight: 700; text-transform: uppercase;
         border-radius: 4px; padding: 0 6px; margin-right: .4em; color: #fff; }
.badge.problem { background: #b42318; }
.badge.check { background: #b54708; }
.badge.info { background: #57606a; }
.why, .todo { display: block; color: #424a53; }
.todo { color: #1a7f37; font-weight: 600; }
.verdict { font-size: 1.08em; background: #f0f6ff; border-left: 4px solid #0969da;
           padding: .6em 1em; }
"""

_NUMERIC = re.compile(r"^-?(\d[\d,]*\.?\d*(e[-+]?\d+)?|n/a|inf|-inf)$")


def _inline(text: str) -> str:
    """Escape ``text``; spans in backticks become <code>."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _parts(parts: list) -> str:
    return "".join(to_mathml(p) if isinstance(p, Node) else _inline(p) for p in parts)


def _findings(block: FindingList) -> str:
    items = []
    for f in block.items:
        link = (
            f' <a href="#{_anchor(f.figure)}">{html.escape(link_text(f.figure))} &rarr;</a>'
            if f.figure
            else ""
        )
        todo = f'<span class="todo">What to do: {_inline(f.action)}</span>' if f.action else ""
        where = f"<b>{_inline(f.where)}</b>: " if f.where else ""
        items.append(
            f'<li class="{_anchor(f.severity)}"><span class="badge {_anchor(f.severity)}">'
            f"{html.escape(f.severity)}</span>{where}{_inline(f.what)}"
            f'<span class="why">Why: {_inline(f.why)}</span>{todo}{link}</li>'
        )
    return '<ol class="findings">' + "".join(items) + "</ol>"


def link_text(anchor: str) -> str:
    """Link text of a finding: ``fig-charges`` -> ``see the charges figure``."""
    if anchor.startswith("fig-"):
        return f"see the {anchor[4:]} figure"
    return f"see the {anchor} section"


def _anchor(key: str) -> str:
    """An id/href fragment: letters, digits, ``-`` and ``_`` only."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", key)


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    width, height = struct.unpack(">II", png[16:24])
    return width, height


def _table(block: Table) -> str:
    frame = block.frame
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    warn_col = list(frame.columns).index("warning") if "warning" in frame.columns else -1
    body = []
    for row in format_frame(frame):
        cells = []
        for i, cell in enumerate(row):
            cls = ""
            if i == warn_col and cell:
                cls = ' class="warn"'
            elif _NUMERIC.match(cell):
                cls = ' class="num"'
            cells.append(f"<td{cls}>{_inline(cell)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    caption = f"<caption>{_inline(block.caption)}</caption>" if block.caption else ""
    return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _block(block: Block) -> str:
    if isinstance(block, Paragraph):
        return f"<p>{_parts(block.parts())}</p>"
    if isinstance(block, Formula):
        gloss = f'<p class="gloss">{_inline(block.gloss)}</p>' if block.gloss else ""
        return to_mathml(block.node, display=True) + gloss
    if isinstance(block, FindingList):
        return _findings(block)
    if isinstance(block, Note):
        return f'<p class="note">{_inline(block.text)}</p>'
    if isinstance(block, Table):
        return _table(block)
    if isinstance(block, Code):
        return (
            f"<details><summary>{html.escape(block.summary)}</summary>"
            f"<pre>{html.escape(block.text)}</pre></details>"
        )
    if isinstance(block, Plot):
        width, height = png_size(block.png)
        data = base64.b64encode(block.png).decode("ascii")
        alt = html.escape(block.alt or block.caption or block.name, quote=True)
        return (
            f'<figure id="fig-{_anchor(block.name)}"><img src="data:image/png;base64,{data}" '
            f'width="{width}" height="{height}" alt="{alt}">'
            f"<figcaption>{_inline(block.caption)}</figcaption></figure>"
        )
    raise TypeError(f"unknown block {type(block).__name__}")


def render_html(doc: Document) -> str:
    """The whole report as one HTML string."""
    toc = "".join(
        f'<li><a href="#{_anchor(s.key)}">{html.escape(s.title)}</a></li>' for s in doc.sections
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(doc.title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(doc.title)}</h1>",
        f'<p class="subtitle">{_inline(doc.subtitle)}</p>',
        f"<nav><ol>{toc}</ol></nav>",
    ]
    for section in doc.sections:
        parts.append(f'<section id="{_anchor(section.key)}">')
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        parts.extend(_block(b) for b in section.blocks)
        parts.append("</section>")
    parts.append(
        "<footer>Generated by noether-dyn from the saved run store alone. Sources: Tanaka &amp; "
        "Kunin 2021 (NLD), Kunin et al. 2021 (NM), Wan et al. 2021 (SMD), Kosson et al. 2024 "
        "(RE).</footer></body></html>"
    )
    return printable("\n".join(parts))
