"""Formulas for the report, written once and rendered twice: as MathML for HTML (read natively by
browsers, no script, no network) and as plain Unicode text for Markdown and terminals.

A formula is a tree of small nodes built with :func:`m` (a row of tokens and nodes), :func:`frac`,
:func:`sup`, :func:`sub`, :func:`sqrt` and :func:`paren`. Plain strings inside :func:`m` are split
into tokens: numbers become ``<mn>``, letters (Greek included) ``<mi>``, anything else ``<mo>``;
a word of several letters (``eff``, ``loss``) stays one upright identifier.

Example: ``m("η", sub("", "eff"), " = ", frac("η", m("(1 − β) ", sup("r", "2"))))``.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass

_TOKEN = re.compile(r"\d+(?:\.\d+)?|[^\W\d_]+[′″*]*|\S")
_SUP = str.maketrans("0123456789+-−()nT", "⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻⁻⁽⁾ⁿᵀ")
_SUB = str.maketrans("0123456789+-−()", "₀₁₂₃₄₅₆₇₈₉₊₋₋₍₎")
_SUP_OK = set("0123456789+-−()nT")
_SUB_OK = set("0123456789+-−()")


class Node:
    """A formula node: renders to MathML (:meth:`mathml`) and Unicode text (:meth:`text`)."""

    def mathml(self) -> str:
        raise NotImplementedError

    def text(self) -> str:
        raise NotImplementedError

    def atomic(self) -> bool:
        """Whether the text form needs no parentheses as an operand."""
        return True


@dataclass(frozen=True)
class Token(Node):
    """One number, identifier or operator."""

    value: str

    def kind(self) -> str:
        if self.value[0].isdigit():
            return "mn"
        if self.value[0].isalpha():
            return "mi"
        return "mo"

    def mathml(self) -> str:
        return f"<{self.kind()}>{html.escape(self.value)}</{self.kind()}>"

    def text(self) -> str:
        return self.value


@dataclass(frozen=True)
class Text(Node):
    """Words set upright as text (``<mtext>``), spaces kept."""

    value: str

    def mathml(self) -> str:
        return f"<mtext>{html.escape(self.value)}</mtext>"

    def text(self) -> str:
        return self.value


@dataclass(frozen=True)
class Space(Node):
    """A visible space in the text form (MathML spaces operators itself)."""

    def mathml(self) -> str:
        return ""

    def text(self) -> str:
        return " "


@dataclass(frozen=True)
class Row(Node):
    """A sequence of nodes."""

    items: tuple[Node, ...]

    def mathml(self) -> str:
        return "<mrow>" + "".join(i.mathml() for i in self.items) + "</mrow>"

    def text(self) -> str:
        return "".join(i.text() for i in self.items)

    def atomic(self) -> bool:
        visible = [i for i in self.items if not isinstance(i, Space)]
        return len(visible) <= 1 and all(i.atomic() for i in visible)


@dataclass(frozen=True)
class Frac(Node):
    num: Node
    den: Node

    def mathml(self) -> str:
        return f"<mfrac>{self.num.mathml()}{self.den.mathml()}</mfrac>"

    def text(self) -> str:
        return f"{_operand(self.num)}/{_operand(self.den)}"

    def atomic(self) -> bool:
        return False


@dataclass(frozen=True)
class Script(Node):
    """``base`` with a superscript (``tag="msup"``) or a subscript (``tag="msub"``)."""

    base: Node
    script: Node
    tag: str

    def mathml(self) -> str:
        return f"<{self.tag}>{self.base.mathml()}{self.script.mathml()}</{self.tag}>"

    def text(self) -> str:
        s = self.script.text()
        table, ok, mark = (_SUP, _SUP_OK, "^") if self.tag == "msup" else (_SUB, _SUB_OK, "_")
        base = _operand(self.base)
        if s and set(s) <= ok:
            return base + s.translate(table)
        return f"{base}{mark}{s}" if len(s) == 1 or self.script.atomic() else f"{base}{mark}({s})"


@dataclass(frozen=True)
class Sqrt(Node):
    arg: Node

    def mathml(self) -> str:
        return f"<msqrt>{self.arg.mathml()}</msqrt>"

    def text(self) -> str:
        return "√" + _operand(self.arg)


def _operand(node: Node) -> str:
    t = node.text()
    return t if node.atomic() or _wrapped(t) else f"({t})"


def _wrapped(text: str) -> bool:
    """Whether ``text`` is one bracketed group: ``(...)``, ``|...|`` or ``f(...)``."""
    if len(text) > 1 and text[0] == "|" and text[-1] == "|" and text.count("|") == 2:
        return True
    start = re.match(r"^[^\W\d_]*\(", text)
    if not start or text[-1] != ")":
        return False
    depth = 0
    for i, c in enumerate(text[start.end() - 1 :], start.end() - 1):
        depth += {"(": 1, ")": -1}.get(c, 0)
        if depth == 0 and i < len(text) - 1:
            return False
    return True


Part = Node | str


def _node(part: Part) -> Node:
    if isinstance(part, Node):
        return part
    items: list[Node] = []
    for chunk in re.split(r"(\s+)", part):
        if not chunk:
            continue
        if chunk.isspace():
            items.append(Space())
        else:
            items.extend(Token(t) for t in _TOKEN.findall(chunk))
    return items[0] if len(items) == 1 else Row(tuple(items))


def m(*parts: Part) -> Node:
    """A row of ``parts``: strings are tokenized (numbers, identifiers, operators), nodes kept."""
    nodes = [_node(p) for p in parts if p != ""]
    return nodes[0] if len(nodes) == 1 else Row(tuple(nodes))


def words(text: str) -> Node:
    """Plain words inside a formula (``relative residual``), set as text."""
    return Text(text)


def frac(num: Part, den: Part) -> Node:
    """num over den (text: ``num/den``, parenthesized where needed)."""
    return Frac(m(num), m(den))


def sup(base: Part, exp: Part) -> Node:
    """base to the power exp (text: Unicode superscripts where they exist, else ``^``)."""
    return Script(m(base) if base != "" else Row(()), m(exp), "msup")


def sub(base: Part, index: Part) -> Node:
    """base with subscript index (text: Unicode subscripts for digits, else ``_``)."""
    return Script(m(base) if base != "" else Row(()), m(index), "msub")


def sqrt(arg: Part) -> Node:
    """Square root (text: ``√(arg)``)."""
    return Sqrt(m(arg))


def paren(*parts: Part) -> Node:
    """``(parts)``."""
    return m("(", *parts, ")")


def to_mathml(node: Node, display: bool = False) -> str:
    """``<math>`` element of ``node`` (``display="block"`` for a formula on its own line)."""
    mode = ' display="block"' if display else ""
    return f'<math xmlns="http://www.w3.org/1998/Math/MathML"{mode}>{node.mathml()}</math>'


def to_text(node: Node) -> str:
    """Plain Unicode text of ``node``, e.g. ``η_eff = η/((1 − β) r²)``."""
    return node.text()
