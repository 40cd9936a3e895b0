"""The ``noether-dyn`` command: ``demo``, ``report``, ``compare``, ``plot``, ``inspect``,
``export`` and ``serve``.

Conventions (each one checked in ``tests/test_cli.py``):

- Exit status 0 on success, 1 for bad input (a missing or corrupted run, an unknown symmetry, an
  output path that cannot be written), 2 for bad usage (an unknown command, flag or choice, a
  missing argument), 130 when interrupted, 141 (quietly) when stdout is closed early (``| head``).
  No arguments at all prints the help on stdout and exits with 2 (nothing was done).
- Every error is one line on stderr, ``noether-dyn: error: ...``, never a traceback (set
  ``NOETHER_DYN_DEBUG=1`` to get one for an unexpected error). An unknown choice names the
  closest valid ones ("did you mean ...").
- Outputs go into the run directory unless ``-o`` says otherwise: ``report`` writes
  ``RUN/report.html``, ``plot`` ``RUN/<kind>.png``, ``compare A B`` ``A/compare-<B>.html``,
  ``export`` ``RUN/export/``. A default output that is a symbolic link is refused.
- Text read from a store (names, notes, the recorded command) is printed with its control
  characters made visible (``\\x1b``), so a crafted store cannot drive the terminal.
- The module imports only the standard library at start-up; plotting and pandas are imported by
  the command that needs them, so ``noether-dyn --help`` is fast.
"""

from __future__ import annotations

import argparse
import difflib
import io
import json
import math
import os
import re
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

PROG = "noether-dyn"
PLOT_KINDS = ("charges", "ksb", "lagrangian", "normalization", "depth")
EXPORT_FORMATS = ("csv", "parquet", "tensorboard")
STORE_FILENAME = "run.sqlite"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class UsageError(Exception):
    """Bad command-line usage (exit status 2)."""


def inert(text: object) -> str:
    """``text`` with every control character (C0, DEL, C1: terminal escape sequences, carriage
    returns, newlines) replaced by its visible escape, e.g. ``\\x1b``."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors, and "did you mean" suggestions for unknown choices."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        choices = action.choices
        if choices is None or value in choices:
            return
        names = [str(c) for c in choices]
        close = difflib.get_close_matches(str(value), names, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise argparse.ArgumentError(
            action, f"invalid choice: {inert(value)!r} (choose from {', '.join(names)}){hint}"
        )


def _port(text: str) -> int:
    """argparse type of ``--port``: an integer in 0..65535."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected an integer in 0..65535, got {inert(text)!r}")
    return port


def _seconds(text: str) -> int:
    """argparse type of ``--refresh``: a non-negative integer."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {inert(text)!r}")
    return int(text)


def _version() -> str:
    from noether_dyn.records import VERSION as __version__

    return f"{PROG} {__version__}"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``noether-dyn`` command."""
    parser = _Parser(
        prog=PROG,
        description="Read a PyTorch training run as a mechanical system: reports, plots, "
        "exports and a live view from saved runs (see docs/guide.md).",
        epilog="Outputs go into the run directory unless -o says otherwise. Exit status: 0 ok, "
        "1 bad input, 2 bad usage (also: no arguments).",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

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
        help="output file (default: RUN/report.html, or RUN/report.md with --format md)",
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
        "beside what the store holds for the other run (docs/theory.md §4).",
    )
    p.add_argument("run_a", metavar="RUN_A", help="first run (its directory holds the output)")
    p.add_argument("run_b", metavar="RUN_B", help="second run")
    p.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="output file (default: RUN_A/compare-<name of RUN_B>.html; .md for Markdown)",
    )
    p.add_argument("--format", choices=("html", "md"), help="html or md (default: from suffix)")

    p = sub.add_parser(
        "plot",
        help="draw one figure of a run to a PNG file",
        description="Draw one figure of a run: " + ", ".join(PLOT_KINDS) + ". The depth figure "
        "needs a profile recorded during training with Monitor.log_depth_profile(...).",
    )
    p.add_argument("run", metavar="RUN")
    p.add_argument(
        "--kind",
        default="charges",
        choices=PLOT_KINDS,
        metavar="K",
        help=f"figure: {', '.join(PLOT_KINDS)} (default: charges)",
    )
    p.add_argument(
        "--symmetry",
        metavar="S",
        help="for charges and ksb: a symmetry name (see 'inspect') or a symmetry kind the run "
        "holds (scale, rescale, translation, or a registered plug-in kind)",
    )
    p.add_argument(
        "-o", "--output", metavar="FIG.png", help="output image (default: RUN/<kind>.png)"
    )

    p = sub.add_parser(
        "inspect",
        help="print a summary of a run, or list the runs inside a folder",
        description="Print a run's summary, its symmetries and its findings. Given a folder "
        "that is not itself a run, list the runs found under it.",
    )
    p.add_argument("run", metavar="RUN_OR_DIR")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")

    p = sub.add_parser(
        "export",
        help="write a run's tables as CSV or Parquet files (long format), or TensorBoard events",
        description="Write every table of a run (steps, groups, charges, tensors, symmetries, "
        "dropped, events, depth_profile) as one long-format file each, plus meta.json. Schema: "
        "docs/guide.md, 'Export'. --format tensorboard replays the step scalars and charges "
        "into an event file instead (tags: docs/guide.md, 'Sinks').",
    )
    p.add_argument("run", metavar="RUN")
    p.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        default="csv",
        help="csv, parquet or tensorboard (default: csv)",
    )
    p.add_argument("-o", "--output", metavar="DIR", help="output directory (default: RUN/export)")

    p = sub.add_parser(
        "serve",
        help="live view: serve a run's report on 127.0.0.1, rendered again on each request",
        description="Serve the report of a run (for example one that is still training) at "
        "http://127.0.0.1:PORT/. Every request reads the store again; the page reloads itself "
        "every --refresh seconds. Local only, no network assets. Stop with Ctrl-C.",
    )
    p.add_argument("run", metavar="RUN")
    p.add_argument(
        "--port", type=_port, default=8765, metavar="N", help="port (default: 8765; 0: any free)"
    )
    p.add_argument(
        "--refresh",
        type=_seconds,
        default=30,
        metavar="S",
        help="seconds between automatic reloads (default: 30; 0: never)",
    )
    return parser


def _run_dir(path: str) -> Path:
    p = Path(path)
    return p.parent if p.suffix == ".sqlite" else p


def _default_output(run: str, name: str) -> Path:
    """``name`` inside the run directory of ``run``, refused when it is a symbolic link (a run
    directory received from elsewhere must not redirect the write)."""
    out = _run_dir(run) / name
    if out.is_symlink():
        raise ValueError(
            f"default output '{out}' is a symbolic link (to '{os.readlink(out)}'); refusing to "
            "write through it: remove the link or pass -o"
        )
    return out


def _report(args: argparse.Namespace) -> int:
    from noether_dyn.report import report

    fmt = args.format or ("md" if args.output and args.output.endswith(".md") else "html")
    out = args.output or _default_output(args.run, f"report.{fmt}")
    print(report(args.run, out, format=fmt))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from noether_dyn.report import compare

    out = args.output
    if out is None:
        fmt = args.format or "html"
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", _run_dir(args.run_b).resolve().name) or "b"
        out = _default_output(args.run_a, f"compare-{stem}.{fmt}")
    print(compare(args.run_a, args.run_b, out, format=args.format))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from noether_dyn.report import figures
    from noether_dyn.report.data import as_run
    from noether_dyn.report.normalization import scale_table
    from noether_dyn.report.render import check_writable

    if args.symmetry is not None and args.kind not in ("charges", "ksb"):
        raise UsageError(f"--symmetry applies to --kind charges or ksb, not {args.kind!r}")
    run = as_run(args.run)
    if args.kind == "depth" and run.depth_profile.empty:
        raise ValueError(
            f"run '{args.run}' holds no depth profile: record one during training with "
            "monitor.log_depth_profile(noether_dyn.depth.profile(model, x))"
        )
    symmetry = kind = None
    kinds_held = set(run.symmetries["kind"])  # any registered kind, plug-ins included
    if args.symmetry in kinds_held and args.symmetry not in set(run.symmetries["symmetry"]):
        kind = args.symmetry
    else:
        symmetry = args.symmetry
    stem = args.kind + (
        f"-{re.sub(r'[^A-Za-z0-9_.-]+', '_', args.symmetry)}" if args.symmetry else ""
    )
    out = check_writable(args.output or _default_output(args.run, f"{stem}.png"))
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


def _jsonable(value: Any) -> Any:
    """Plain JSON values for numpy/pandas scalars and tuples; NaN and Inf become null."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _run_summary(run: Any) -> dict:
    from noether_dyn.report.findings import findings
    from noether_dyn.report.sections import run_facts

    facts = run_facts(run)
    return {
        "path": str(run.path),
        "facts": dict(zip(facts["item"], facts["value"])),
        "symmetries": _jsonable(run.symmetries.to_dict(orient="records")),
        "findings": _jsonable(findings(run).to_dict(orient="records")),
    }


def _list_runs(folder: Path, as_json: bool) -> int:
    from noether_dyn.store import StoreError, load_run

    stores = sorted(folder.rglob(STORE_FILENAME))
    if not stores:
        raise ValueError(
            f"'{folder}' is neither a run nor a folder holding runs (no {STORE_FILENAME} inside)"
        )
    rows = []
    for store in stores:
        row: dict[str, Any] = {"run": str(store.parent.relative_to(folder)) or "."}
        try:
            run = load_run(store)
        except StoreError as exc:
            row["error"] = " ".join(str(exc).split())
        else:
            opt, model, steps = (
                run.meta.get("optimizer") or {},
                run.meta.get("model") or {},
                run.steps,
            )
            row.update(
                model=str(model.get("class", "?")),
                optimizer=str(opt.get("class", "?")),
                steps=len(steps),
                last_step=int(steps["step"].max()) if len(steps) else None,
                symmetries=len(run.symmetries),
                started=str(run.meta.get("started", "?")),
            )
        rows.append(row)
    if as_json:
        print(json.dumps({"folder": str(folder), "runs": _jsonable(rows)}, indent=1))
        return 0
    header = ("run", "model", "optimizer", "steps", "last_step", "symmetries", "started")
    cells = [list(header)] + [
        [inert(r.get(h, "")) if "error" not in r or h == "run" else "" for h in header]
        + ([f"unreadable: {inert(r['error'])}"] if "error" in r else [])
        for r in rows
    ]
    widths = [max(len(row[i]) for row in cells if i < len(row)) for i in range(len(header))]
    for k, row in enumerate(cells):
        line = "  ".join(c.ljust(w) for c, w in zip(row, widths))
        print((line + ("  " + row[-1] if len(row) > len(header) else "")).rstrip())
        if k == 0:
            print("  ".join("-" * w for w in widths))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from noether_dyn.report.data import as_run

    target = Path(args.run)
    if target.is_dir() and not (target / STORE_FILENAME).exists():
        return _list_runs(target, args.json)
    run = as_run(args.run)
    if args.json:
        print(json.dumps(_run_summary(run), indent=1))
        return 0
    from noether_dyn.report.document import format_frame
    from noether_dyn.report.findings import findings
    from noether_dyn.report.sections import run_facts, symmetry_section

    facts = run_facts(run)
    width = max(len(i) for i in facts["item"])
    for item, value in zip(facts["item"], facts["value"]):
        print(f"{item:<{width}}  {inert(value)}")
    tables = [b for b in symmetry_section(run).blocks if hasattr(b, "frame")]
    print()
    if tables:
        frame = tables[0].frame
        cells = [[inert(c) for c in row] for row in [list(frame.columns), *format_frame(frame)]]
        widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
        for k, row in enumerate(cells):
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
            if k == 0:
                print("  ".join("-" * w for w in widths))
    else:
        print("no symmetry tracked")
    print("\nfindings:")
    for r in findings(run).itertuples(index=False):
        where = inert(" ".join(x for x in (r.layer, r.symmetry) if x))
        head = f"  [{'WARNING' if r.warning else 'info'}] {where}: "
        text = inert(r.finding + (f" -> {r.warning}" if r.warning else ""))
        print(textwrap.fill(text, 100, initial_indent=head, subsequent_indent=" " * 6))
    return 0


def _export(args: argparse.Namespace) -> int:
    from noether_dyn.export import export_run

    out = args.output or _default_output(args.run, "export")
    for path in export_run(args.run, out, args.format):
        print(path)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from noether_dyn.report.data import as_run
    from noether_dyn.serve import make_server

    as_run(args.run)  # a bad path fails here, with one line, before the server starts
    server = make_server(args.run, args.port, args.refresh)
    print(
        f"serving the live report of {args.run} at http://127.0.0.1:{server.server_port}/ "
        "(Ctrl-C stops)",
        flush=True,
    )
    try:
        server.serve_forever()
    finally:
        server.server_close()
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
    "export": _export,
    "serve": _serve,
}


def _one_line(exc: BaseException) -> str:
    msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return inert(" ".join(str(msg).split()) or type(exc).__name__)


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    from noether_dyn.report.data import MissingData
    from noether_dyn.store import StoreError

    return (StoreError, MissingData, KeyError, ValueError, OSError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``noether-dyn`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit
    status (0 success, 1 bad input, 2 bad usage or no arguments) after printing any error as one
    line. ``--help`` and ``--version`` exit through ``SystemExit(0)`` as argparse does."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 2
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            raise UsageError(f"no COMMAND given (see '{PROG} --help')")
    except UsageError as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    try:
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (`| head`): stop quietly, as shell tools do
        try:  # the interpreter flushes stdout again at exit: point it at /dev/null first
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
            pass
        return 141
    except Exception as exc:
        if isinstance(exc, _bad_input_errors()):
            print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
            return 1
        if os.environ.get("NOETHER_DYN_DEBUG"):
            raise
        print(
            f"{PROG}: error: unexpected {type(exc).__name__}: {_one_line(exc)} (a bug or a "
            "malformed store; rerun with NOETHER_DYN_DEBUG=1 for the traceback and report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
