"""The ``noether-dyn`` command: success paths, and one-line errors (no traceback) with a
non-zero exit status for each kind of bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from noether_dyn.cli import PLOT_KINDS, main
from tests.test_report import embedded_pngs, train_small

COMMANDS = ("demo", "report", "compare", "plot", "inspect")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return train_small(tmp_path_factory.mktemp("cli") / "run", steps=25)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("noether-dyn: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_on_every_command(capsys, command):
    argv = ["--help"] if command is None else [command, "--help"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    assert "usage: noether-dyn" in capsys.readouterr().out


def test_report_inspect_compare_plot(capsys, run_dir, tmp_path):
    code, out, err = run_cli(capsys, "report", str(run_dir))
    assert code == 0 and err == ""
    assert Path(out.strip()) == run_dir / "report.html"
    assert len(embedded_pngs((run_dir / "report.html").read_text())) == 4

    code, out, _ = run_cli(capsys, "inspect", str(run_dir))
    assert code == 0
    assert "scale:0" in out and "findings:" in out and "logged steps" in out

    code, out, _ = run_cli(
        capsys, "compare", str(run_dir / "run.sqlite"), str(run_dir), "-o", str(tmp_path / "c.md")
    )
    assert code == 0 and Path(out.strip()) == tmp_path / "c.md"
    assert len(list((tmp_path / "c_files").glob("*.png"))) >= 3

    for kind in PLOT_KINDS[:-1]:  # depth: no profile in this run (an error case below)
        out_png = tmp_path / f"{kind}.png"
        code, _, err = run_cli(capsys, "plot", str(run_dir), "--kind", kind, "-o", str(out_png))
        assert code == 0, err
        assert mpimg.imread(out_png).shape[0] > 100
    code, out, _ = run_cli(capsys, "plot", str(run_dir), "--symmetry", "scale")
    assert code == 0 and Path(out.strip()).name == "charges-scale.png"


def test_missing_run(capsys, tmp_path):
    code, _, err = run_cli(capsys, "report", str(tmp_path / "nope"))
    assert_one_line_error(code, err, "does not exist")


def test_garbage_store(capsys, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "run.sqlite").write_bytes(b"this is not a database" * 100)
    for argv in (["report", str(bad)], ["inspect", str(bad)], ["plot", str(bad)]):
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, str(bad))


def test_unknown_symmetry_and_kind(capsys, run_dir):
    code, _, err = run_cli(capsys, "plot", str(run_dir), "--symmetry", "scale:nope")
    assert_one_line_error(code, err, "scale:nope", "known:")
    code, _, err = run_cli(capsys, "plot", str(run_dir), "--kind", "spectrum")
    assert_one_line_error(code, err, "unknown plot kind 'spectrum'")
    code, _, err = run_cli(
        capsys, "plot", str(run_dir), "--kind", "lagrangian", "--symmetry", "scale:0"
    )
    assert_one_line_error(code, err, "--symmetry applies to")
    code, _, err = run_cli(capsys, "plot", str(run_dir), "--kind", "depth")
    assert_one_line_error(code, err, "no depth profile")
    code, _, err = run_cli(capsys, "report", str(run_dir), "--format", "pdf")
    assert code == 2 and "invalid choice" in err and "Traceback" not in err


def test_unwritable_output(capsys, run_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for argv in (
        ["report", str(run_dir), "-o", str(blocker / "r.html")],
        ["compare", str(run_dir), str(run_dir), "-o", str(blocker / "c.html")],
        ["plot", str(run_dir), "-o", str(blocker / "p.png")],
        ["report", str(run_dir), "-o", str(tmp_path)],
    ):
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, "cannot write" if "a-file" in argv[-1] else "directory")


def test_usage_errors(capsys):
    code, _, err = run_cli(capsys)
    assert_one_line_error(code, err, "COMMAND")
    assert code == 2
    code, _, err = run_cli(capsys, "demo", "--steps", "0")
    assert_one_line_error(code, err, "--steps")


def test_demo_writes_runs_and_comparison(capsys, tmp_path):
    code, out, err = run_cli(capsys, "demo", "--out", str(tmp_path / "demo"), "--steps", "12")
    assert code == 0, err
    demo = tmp_path / "demo"
    for sub in ("normalized/run.sqlite", "rmsprop/run.sqlite", "report.html", "report.md"):
        assert (demo / sub).exists()
    html = (demo / "report.html").read_text()
    assert "Normalization vs adaptive optimization" in html and len(embedded_pngs(html)) == 4
    assert "12/12" in err  # the progress bar reached the end


def test_entry_point_in_a_subprocess(tmp_path):
    """The module runs as a program; a bad run gives one line on stderr and exit status 1."""
    proc = subprocess.run(
        [sys.executable, "-m", "noether_dyn.cli", "inspect", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert_one_line_error(proc.returncode, proc.stderr, "does not exist")
