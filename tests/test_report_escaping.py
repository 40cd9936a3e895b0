"""Escaping and output paths (issue 14 item 8): names from a run (module, class, argv) never
reach a Markdown report as HTML, and a report never writes through a symlink."""

from __future__ import annotations

import re
import sys
import warnings
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from torch import nn

import noether_dyn as nd
from noether_dyn.cli import main
from noether_dyn.report import compare, report
from noether_dyn.report.markdown import code_span, escape, inline
from tests.conftest import batch

SCRIPT = "<script>alert(1)</script>"
IMG = "<img src=x onerror=alert(2)>"


class _Tags(HTMLParser):
    """Every start tag of an HTML text, with its attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def hostile_run(run_dir: Path, monkeypatch) -> Path:
    """A run whose model class, a module name and the command line carry HTML."""
    cls = type(SCRIPT, (nn.Sequential,), {})
    model = cls()
    model.add_module(IMG, nn.Linear(6, 8))
    model.add_module("act", nn.ReLU())
    model.add_module("head", nn.Linear(8, 4))
    model = model.double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monkeypatch.setattr(sys, "argv", ["train.py", "--tag", SCRIPT, IMG])
    x, y = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with nd.watch(model, opt, run_dir, inputs=x) as mon:
            for _ in range(4):
                loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                mon.log_loss(loss)
                opt.step()
    meta = nd.load_run(run_dir).meta
    assert meta["model"]["class"] == SCRIPT and SCRIPT in meta["command"]  # guards the setup
    return run_dir


def _outside_code(md: str) -> str:
    """The Markdown text with fenced code blocks and code spans removed (those are never
    read as HTML by a Markdown renderer)."""
    md = re.sub(r"(?ms)^(`{3,})\n.*?\n\1$", "", md)
    return re.sub(r"(`+)(?:(?!\1).)+?\1", "", md)


def test_markdown_escapes_html_from_names(tmp_path, monkeypatch):
    run_dir = hostile_run(tmp_path / "run", monkeypatch)
    md = report(run_dir, tmp_path / "r.md").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in md  # shown, as text
    outside = _outside_code(md)
    tags = re.findall(r"<[^>]*>", outside)
    assert tags and all(re.fullmatch(r'<a id="[A-Za-z0-9_-]+">|</a>', t) for t in tags), tags
    # rendered by a CommonMark renderer with raw HTML enabled, only our own elements remain
    markdown_it = pytest.importorskip("markdown_it")
    parser = _Tags()
    parser.feed(markdown_it.MarkdownIt("commonmark").render(md))
    assert not [t for t, _ in parser.tags if t == "script"]
    images = [a for t, a in parser.tags if t == "img"]
    assert images and all(a["src"].startswith("r_files/") for a in images)
    assert not any(k.startswith("on") for _, a in parser.tags for k in a)


def test_html_and_compare_escape_names(tmp_path, monkeypatch):
    run_dir = hostile_run(tmp_path / "run", monkeypatch)
    html = report(run_dir, tmp_path / "r.html").read_text()
    assert SCRIPT not in html and IMG not in html and "<script" not in html
    md = compare(run_dir, run_dir, tmp_path / "c.md").read_text()
    assert SCRIPT not in _outside_code(md) and IMG not in _outside_code(md)


def test_markdown_escape_helpers():
    assert escape("<b>&</b>") == "&lt;b&gt;&&lt;/b&gt;"  # a bare & is text in Markdown
    assert escape("&lt;x&gt; &#60;") == "&amp;lt;x&amp;gt; &amp;\\#60;"  # entities stay text
    assert escape("[x](javascript:alert(1))") == "\\[x\\](javascript:alert(1))"
    assert escape("a_b*c|d") == "a\\_b\\*c\\|d"
    assert code_span("a`b") == "``a`b``"
    assert inline("use `<x>` here") == "use `<x>` here"  # code spans are never HTML
    assert inline("odd ` tick <y>") == "odd \\` tick &lt;y&gt;"


def test_report_replaces_a_symlink_instead_of_writing_through_it(tmp_path, monkeypatch):
    run_dir = hostile_run(tmp_path / "run", monkeypatch)
    victim = tmp_path / "elsewhere.txt"
    victim.write_text("precious")
    link = run_dir / "report.html"
    link.symlink_to(victim)
    assert main(["report", str(run_dir)]) == 1  # the CLI refuses its default output path...
    assert victim.read_text() == "precious" and link.is_symlink()
    report(run_dir, link)  # ...and the API replaces the link, never writing through it
    assert victim.read_text() == "precious"
    assert not link.is_symlink() and link.read_text().startswith("<!DOCTYPE html>")


def test_markdown_figure_folder_symlink_is_not_followed(tmp_path, monkeypatch):
    run_dir = hostile_run(tmp_path / "run", monkeypatch)
    target = tmp_path / "target_dir"
    target.mkdir()
    (run_dir / "report_files").symlink_to(target, target_is_directory=True)
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"keep")
    (run_dir / "report.md").symlink_to(victim)
    assert main(["report", str(run_dir), "--format", "md"]) == 1  # the CLI refuses the link
    report(run_dir, run_dir / "report.md")  # the API replaces both links
    assert list(target.iterdir()) == [] and victim.read_bytes() == b"keep"
    assert (run_dir / "report_files").is_dir() and not (run_dir / "report_files").is_symlink()
    assert any((run_dir / "report_files").iterdir())


def test_dangling_symlink_target_is_not_created(tmp_path, monkeypatch):
    run_dir = hostile_run(tmp_path / "run", monkeypatch)
    ghost = tmp_path / "ghost.html"
    (run_dir / "report.html").symlink_to(ghost)
    report(run_dir, run_dir / "report.html")
    assert not ghost.exists()


def test_inspect_prints_no_terminal_escape_sequences(tmp_path, monkeypatch, capsys):
    evil = "\x1b[2J\x1b[31mEvil"
    cls = type(evil, (nn.Sequential,), {})
    model = cls(nn.Linear(6, 4)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monkeypatch.setattr(sys, "argv", ["train.py", "\x1b]0;title\x07"])
    x, y = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with nd.watch(model, opt, tmp_path / "run", inputs=x) as mon:
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            mon.log_loss(loss)
            opt.step()
    assert nd.load_run(tmp_path / "run").meta["model"]["class"] == evil  # guards the setup
    assert main(["inspect", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b[31mEvil" in out  # shown, harmlessly
    html = report(tmp_path / "run", tmp_path / "r.html").read_text()
    assert "\x1b" not in html
