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
    Note,
    Paragraph,
    Plot,
    Table,
    format_frame,
)

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
"""

_NUMERIC = re.compile(r"^-?(\d[\d,]*\.?\d*(e[-+]?\d+)?|n/a|inf|-inf)$")


def _inline(text: str) -> str:
    """Escape ``text``; spans in backticks become <code>."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


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
        return f"<p>{_inline(block.text)}</p>"
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
        alt = html.escape(block.caption or block.name, quote=True)
        return (
            f'<figure id="fig-{html.escape(block.name)}"><img src="data:image/png;base64,{data}" '
            f'width="{width}" height="{height}" alt="{alt}">'
            f"<figcaption>{_inline(block.caption)}</figcaption></figure>"
        )
    raise TypeError(f"unknown block {type(block).__name__}")


def render_html(doc: Document) -> str:
    """The whole report as one HTML string."""
    toc = "".join(
        f'<li><a href="#{html.escape(s.key)}">{html.escape(s.title)}</a></li>' for s in doc.sections
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
        parts.append(f'<section id="{html.escape(section.key)}">')
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        parts.extend(_block(b) for b in section.blocks)
        parts.append("</section>")
    parts.append(
        "<footer>Generated by noether-dyn from the saved run store alone. Sources: Tanaka &amp; "
        "Kunin 2021 (NLD), Kunin et al. 2021 (NM), Wan et al. 2021 (SMD), Kosson et al. 2024 "
        "(RE).</footer></body></html>"
    )
    return "\n".join(parts)
