"""The ``noether-dyn`` command: ``demo``, ``report``, ``compare``, ``plot`` and ``inspect``.

Every command reads saved runs only. Bad input (a missing or corrupted run, an unknown symmetry
or kind, an output path that cannot be written) ends with one line on stderr,
``noether-dyn: error: ...``, and a non-zero exit status: 1 for such errors, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import matplotlib

PROG = "noether-dyn"
PLOT_KINDS = ("charges", "ksb", "lagrangian", "normalization", "depth")
SYMMETRY_KINDS = ("scale", "rescale", "translation")


class UsageError(Exception):
    """Bad command-line usage (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``noether-dyn`` command."""
    parser = _Parser(
        prog=PROG,
        description="Read a PyTorch training run as a mechanical system: reports, plots and "
        "comparisons from saved runs (see README).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser(
        "demo",
        help="train a normalized MLP (SGD) and its un-normalized twin (RMSprop), then compare",
        description="Train a BatchNorm MLP with SGD + momentum + weight decay and the same MLP "
        "without BatchNorm with RMSprop on data generated locally, then write both runs and "
        "their comparison report (HTML and Markdown) under DIR.",
    )
    p.add_argument(
        "--out",
        default="noether-demo",
        metavar="DIR",
        help="output directory (default: ./noether-demo; its runs are replaced)",
    )
    p.add_argument(
        "--steps", type=int, default=1000, metavar="N", help="steps per run (default: 1000)"
    )

    p = sub.add_parser(
        "report",
        help="write the diagnostic report of a run",
        description="Write one run's diagnostic report: a self-contained HTML "
        "file, or Markdown with its figures as PNG files beside it.",
    )
    p.add_argument("run", metavar="RUN", help="run directory (or its run.sqlite)")
    p.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="output file (default: RUN/report.html or RUN/report.md)",
    )
    p.add_argument(
        "--format",
        choices=("html", "md"),
        help="html or md (default: from FILE's suffix, else html)",
    )

    p = sub.add_parser(
        "compare",
        help="compare two runs (normalization vs RMSprop/Adam)",
        description="Write the comparison report of two runs: per layer, a "
        "normalized network's effective learning rate and implied RMSprop state "
        "beside what the store holds for the other run (THEORY §4).",
    )
    p.add_argument("run_a", metavar="RUN_A")
    p.add_argument("run_b", metavar="RUN_B")
    p.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        default="compare.html",
        help="output file (default: ./compare.html; .md for Markdown)",
    )
    p.add_argument("--format", choices=("html", "md"), help="html or md (default: from suffix)")

    p = sub.add_parser(
        "plot",
        help="draw one figure of a run to a PNG file",
        description="Draw one figure of a run: " + ", ".join(PLOT_KINDS) + ".",
    )
    p.add_argument("run", metavar="RUN")
    p.add_argument(
        "--kind",
        default="charges",
        metavar="K",
        help=f"figure: {', '.join(PLOT_KINDS)} (default: charges)",
    )
    p.add_argument(
        "--symmetry",
        metavar="S",
        help="for charges and ksb: a symmetry name (see 'inspect') or a kind "
        f"({', '.join(SYMMETRY_KINDS)})",
    )
    p.add_argument(
        "-o", "--output", metavar="FIG.png", help="output image (default: RUN/<kind>.png)"
    )

    p = sub.add_parser(
        "inspect",
        help="print a summary of a run in the terminal",
        description="Print a run's summary, its symmetries and its findings.",
    )
    p.add_argument("run", metavar="RUN")
    return parser


def _run_dir(path: str) -> Path:
    p = Path(path)
    return p.parent if p.suffix == ".sqlite" else p


def _report(args: argparse.Namespace) -> int:
    from noether_dyn.report import report

    fmt = args.format or ("md" if args.output and args.output.endswith(".md") else "html")
    out = args.output or _run_dir(args.run) / f"report.{fmt}"
    print(report(args.run, out, format=fmt))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from noether_dyn.report import compare

    print(compare(args.run_a, args.run_b, args.output, format=args.format))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from noether_dyn.report import figures
    from noether_dyn.report.data import as_run
    from noether_dyn.report.normalization import scale_table
    from noether_dyn.report.render import check_writable

    if args.kind not in PLOT_KINDS:
        raise ValueError(f"unknown plot kind {args.kind!r}; use one of {', '.join(PLOT_KINDS)}")
    if args.symmetry is not None and args.kind not in ("charges", "ksb"):
        raise ValueError(f"--symmetry applies to --kind charges or ksb, not {args.kind!r}")
    run = as_run(args.run)
    symmetry = kind = None
    if args.symmetry in SYMMETRY_KINDS and args.symmetry not in set(run.symmetries["symmetry"]):
        kind = args.symmetry
    else:
        symmetry = args.symmetry
    stem = args.kind + (
        f"-{re.sub(r'[^A-Za-z0-9_.-]+', '_', args.symmetry)}" if args.symmetry else ""
    )
    out = check_writable(args.output or _run_dir(args.run) / f"{stem}.png")
    regime = (run.meta.get("optimizer") or {}).get("prediction", "")
    if args.kind in ("charges", "ksb"):
        names, _ = figures.select_symmetries(run, symmetry, kind)
        draw = figures.charges_figure if args.kind == "charges" else figures.ksb_figure
        fig = draw(run, names, regime) if args.kind == "charges" else draw(run, names)
    elif args.kind == "lagrangian":
        fig = figures.lagrangian_figure(run)
    elif args.kind == "normalization":
        fig = figures.normalization_figure(run, scale_table(run))
    else:
        fig = figures.depth_figure(run)
    fig.savefig(out, dpi=110)
    print(out)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from noether_dyn.report.data import as_run
    from noether_dyn.report.document import format_frame
    from noether_dyn.report.findings import findings
    from noether_dyn.report.sections import run_facts, symmetry_section

    run = as_run(args.run)
    facts = run_facts(run)
    width = max(len(i) for i in facts["item"])
    for item, value in zip(facts["item"], facts["value"]):
        print(f"{item:<{width}}  {value}")
    tables = [b for b in symmetry_section(run).blocks if hasattr(b, "frame")]
    print()
    if tables:
        frame = tables[0].frame
        cells = [list(map(str, frame.columns)), *format_frame(frame)]
        widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
        for k, row in enumerate(cells):
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
            if k == 0:
                print("  ".join("-" * w for w in widths))
    else:
        print("no symmetry tracked")
    print("\nfindings:")
    for r in findings(run).itertuples(index=False):
        where = " ".join(x for x in (r.layer, r.symmetry) if x)
        head = f"  [{'WARNING' if r.warning else 'info'}] {where}: "
        text = r.finding + (f" -> {r.warning}" if r.warning else "")
        print(textwrap.fill(text, 100, initial_indent=head, subsequent_indent=" " * 6))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from noether_dyn.demo import run_demo

    if args.steps < 1:
        raise UsageError(f"--steps must be a positive integer, got {args.steps}")
    paths = run_demo(args.out, args.steps)
    print(f"runs:   {paths['normalized']}  {paths['rmsprop']}")
    print(f"report: {paths['html']}  (Markdown: {paths['md']})")
    print(f"next:   {PROG} report {paths['normalized']}   |   {PROG} inspect {paths['rmsprop']}")
    return 0


COMMANDS = {
    "demo": _demo,
    "report": _report,
    "compare": _compare,
    "plot": _plot,
    "inspect": _inspect,
}


def _one_line(exc: BaseException) -> str:
    msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(str(msg).split()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``noether-dyn`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit
    status (0 success, 1 bad input, 2 bad usage) after printing any error as one line."""
    matplotlib.use("Agg")
    from noether_dyn.report.data import MissingData
    from noether_dyn.store import StoreError

    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except (StoreError, MissingData, KeyError, ValueError, OSError) as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
