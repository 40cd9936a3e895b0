"""The ``noether-dyn`` command: success paths, and one-line errors (no traceback) with a
non-zero exit status for each kind of bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import noether_dyn as nd
from noether_dyn import cli
from noether_dyn.cli import PLOT_KINDS, main
from noether_dyn.serve import make_server
from tests.test_report import embedded_pngs, train_small

COMMANDS = ("demo", "report", "compare", "plot", "inspect", "export", "serve")
EVIL = "\x1b]0;owned\x07\x1b[2J\x1b[31m"  # set the window title, clear the screen, turn red


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
    assert_one_line_error(code, err, "invalid choice: 'spectrum'", "choose from charges")
    assert code == 2
    code, _, err = run_cli(
        capsys, "plot", str(run_dir), "--kind", "lagrangian", "--symmetry", "scale:0"
    )
    assert_one_line_error(code, err, "--symmetry applies to")
    code, _, err = run_cli(capsys, "plot", str(run_dir), "--kind", "depth")
    assert_one_line_error(code, err, "no depth profile", "log_depth_profile(")
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


# The conventions checklist (docs/guide.md, "Command line"), one test per convention.


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"noether-dyn {nd.__version__}"


def test_no_arguments_prints_help_and_exits_2(capsys):
    code, out, err = run_cli(capsys)
    assert code == 2 and err == ""
    assert out.startswith("usage: noether-dyn")
    for command in COMMANDS:
        assert command in out


@pytest.mark.parametrize(
    ("argv", "suggestion"),
    [
        (["reprot", "x"], "did you mean 'report'"),
        (["plot", "x", "--kind", "chargs"], "did you mean 'charges'"),
        (["export", "x", "--format", "parqet"], "did you mean 'parquet'"),
        (["report", "x", "--format", "htm"], "did you mean 'html'"),
    ],
)
def test_bad_choice_suggests_and_exits_like_a_bad_flag(capsys, argv, suggestion):
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, "invalid choice", suggestion)
    command = "report" if argv[0] == "reprot" else argv[0]
    flag_code, _, flag_err = run_cli(capsys, command, "x", "--nope")
    assert_one_line_error(flag_code, flag_err, "--nope")
    assert code == flag_code == 2


def test_bad_numbers_are_usage_errors(capsys, run_dir):
    for argv in (
        ["serve", str(run_dir), "--port", "70000"],
        ["serve", str(run_dir), "--port", "http"],
        ["serve", str(run_dir), "--refresh", "-1"],
        ["demo", "--steps", "ten"],
    ):
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err)
        assert code == 2


def test_inspect_json(capsys, run_dir):
    code, out, err = run_cli(capsys, "inspect", str(run_dir), "--json")
    assert code == 0 and err == ""
    data = json.loads(out)
    assert data["path"] == str(run_dir / "run.sqlite")
    assert data["facts"]["logged steps"].startswith("25 ")
    run = nd.load_run(run_dir)
    assert [s["symmetry"] for s in data["symmetries"]] == list(run.symmetries["symmetry"])
    assert all({"layer", "symmetry", "finding", "warning"} <= set(f) for f in data["findings"])
    assert len(data["findings"]) > 0


def _runs_folder(run_dir: Path, root: Path) -> Path:
    for sub in ("a", "b/c"):
        (root / sub).mkdir(parents=True)
        shutil.copy(run_dir / "run.sqlite", root / sub / "run.sqlite")
    (root / "broken").mkdir()
    (root / "broken" / "run.sqlite").write_bytes(b"not a database" * 200)
    return root


def test_inspect_folder_lists_its_runs(capsys, run_dir, tmp_path):
    folder = _runs_folder(run_dir, tmp_path / "runs")
    code, out, err = run_cli(capsys, "inspect", str(folder))
    assert code == 0 and err == ""
    lines = out.strip().splitlines()
    assert lines[0].split() == [
        "run",
        "model",
        "optimizer",
        "steps",
        "last_step",
        "symmetries",
        "started",
    ]
    body = {line.split()[0]: line for line in lines[2:]}
    assert set(body) == {"a", "b/c", "broken"}
    assert body["a"].split()[3] == "25" and "unreadable:" in body["broken"]

    code, out, _ = run_cli(capsys, "inspect", str(folder), "--json")
    data = json.loads(out)
    runs = {r["run"]: r for r in data["runs"]}
    assert runs["b/c"]["steps"] == 25 and runs["b/c"]["last_step"] == 24
    assert "error" in runs["broken"] and "steps" not in runs["broken"]

    code, _, err = run_cli(capsys, "inspect", str(tmp_path / "runs" / "broken" / ".."))
    assert code == 0  # a folder of runs, not a run itself
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "inspect", str(tmp_path / "empty"))
    assert_one_line_error(code, err, "neither a run nor a folder holding runs")
    assert code == 1


def test_default_outputs_go_into_the_run(capsys, run_dir, tmp_path):
    other = tmp_path / "other run"
    other.mkdir()
    shutil.copy(run_dir / "run.sqlite", other / "run.sqlite")
    code, out, err = run_cli(capsys, "compare", str(run_dir), str(other))
    assert code == 0, err
    assert Path(out.strip()) == run_dir / "compare-other_run.html"
    assert (run_dir / "compare-other_run.html").stat().st_size > 1000
    code, out, _ = run_cli(capsys, "compare", str(run_dir), str(other), "--format", "md")
    assert code == 0 and Path(out.strip()) == run_dir / "compare-other_run.md"
    code, out, _ = run_cli(capsys, "plot", str(other), "--kind", "lagrangian")
    assert code == 0 and Path(out.strip()) == other / "lagrangian.png"
    code, out, _ = run_cli(capsys, "export", str(other))
    assert code == 0 and Path(out.splitlines()[0]).parent == other / "export"


def test_default_output_that_is_a_symlink_is_refused(capsys, run_dir, tmp_path):
    received = tmp_path / "received"
    received.mkdir()
    shutil.copy(run_dir / "run.sqlite", received / "run.sqlite")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    for name, argv in (
        ("report.html", ["report", str(received)]),
        ("charges.png", ["plot", str(received)]),
        ("export", ["export", str(received)]),
    ):
        (received / name).symlink_to(victim)
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, "symbolic link", "-o")
        assert code == 1 and victim.read_text() == "keep me"
        (received / name).unlink()


def test_export_csv_and_parquet_round_trip(capsys, run_dir, tmp_path):
    run = nd.load_run(run_dir)
    for fmt in ("csv", "parquet"):
        out = tmp_path / fmt
        code, printed, err = run_cli(
            capsys, "export", str(run_dir), "--format", fmt, "-o", str(out)
        )
        assert code == 0, err
        names = {Path(p).name for p in printed.split()}
        tables = (
            "steps", "groups", "charges", "tensors", "symmetries", "dropped", "events",
            "depth_profile",
        )  # fmt: skip
        assert names == {f"{t}.{fmt}" for t in tables} | {"meta.json"}

        def read(table, out=out, fmt=fmt):
            if fmt == "csv":  # to_csv writes repr(float): read back exactly
                return pd.read_csv(out / f"{table}.csv")
            return pd.read_parquet(out / f"{table}.parquet")

        for table in ("steps", "groups", "charges", "tensors"):
            got, want = read(table), getattr(run, table).reset_index(drop=True)
            assert list(got.columns) == list(want.columns)
            assert len(got) == len(want) > 0
            for col in want.columns:
                if want[col].dtype.kind == "f":  # exact: CSV via repr, Parquet binary
                    np.testing.assert_array_equal(got[col].to_numpy(), want[col].to_numpy())
                else:
                    assert list(got[col].astype(str)) == list(want[col].astype(str)), col
        charges = read("charges")
        assert len(charges) == len(run.steps) * len(run.symmetries)  # long: step x symmetry
        sym = read("symmetries")
        assert [tuple(json.loads(p)) for p in sym["params"]] == list(run.symmetries["params"])
        assert json.loads((out / "meta.json").read_text()) == run.meta


def test_export_refuses_unknown_format_from_python(tmp_path, run_dir):
    from noether_dyn.export import export_run

    with pytest.raises(ValueError, match="format must be one of csv, parquet"):
        export_run(run_dir, tmp_path, "xlsx")


@pytest.fixture(scope="module")
def evil_run(tmp_path_factory) -> Path:
    """A run whose model class name and symmetry name carry terminal escape sequences."""
    torch.manual_seed(0)
    evil_class = type(f"Net{EVIL}", (nn.Sequential,), {})
    model = evil_class(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run_dir = tmp_path_factory.mktemp("evil") / "run"
    sym = nd.Symmetry(f"rescale:{EVIL}", "rescale", ("0.weight", "0.bias", "2.weight"), (1, 1, -1))
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    with nd.watch(model, opt, run_dir, symmetries=[sym]) as monitor:
        for _ in range(4):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            monitor.log_loss(loss)
            opt.step()
    return run_dir


def test_inspect_output_is_inert(capsys, evil_run):
    for argv in (["inspect", str(evil_run)], ["inspect", str(evil_run.parent)]):
        code, out, err = run_cli(capsys, *argv)
        assert code == 0, err
        assert not any(c in out for c in "\x1b\x07"), repr(out)
        assert "\\x1b]0;owned\\x07" in out  # shown, made visible
    code, out, _ = run_cli(capsys, "inspect", str(evil_run), "--json")
    assert "\x1b" not in out  # JSON escapes control characters itself (\u001b)
    assert json.loads(out)["symmetries"][0]["symmetry"] == f"rescale:{EVIL}"  # JSON keeps data
    code, _, err = run_cli(capsys, "plot", str(evil_run), "--symmetry", f"x{EVIL}")
    assert_one_line_error(code, err)
    assert "\x1b" not in err


def test_unexpected_error_is_one_line(capsys, monkeypatch, run_dir):
    def broken(args):
        raise TypeError("boom\nsecond line")

    monkeypatch.setitem(cli.COMMANDS, "inspect", broken)
    code, _, err = run_cli(capsys, "inspect", str(run_dir))
    assert_one_line_error(code, err, "unexpected TypeError: boom second line", "NOETHER_DYN_DEBUG")
    assert code == 1
    monkeypatch.setenv("NOETHER_DYN_DEBUG", "1")
    with pytest.raises(TypeError, match="boom"):
        main(["inspect", str(run_dir)])


def test_cli_and_package_import_no_plotting_pandas_or_compiler():
    """The import-time convention, checked by which modules load (timing: benchmarks/
    import_time.py): ``--help`` and ``import noether_dyn`` load none of the heavy packages."""
    code = (
        "import sys\n"
        "import noether_dyn\n"
        "from noether_dyn.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = ('pandas', 'matplotlib', 'seaborn', 'torch', 'torch._inductor', 'torch._dynamo')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=120) as resp:
            return resp.status, resp.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8")


def test_serve_renders_the_store_again_on_each_request(run_dir, tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    server = make_server(live, port=0, refresh=5)
    assert server.server_address[0] == "127.0.0.1"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/"
        status, page = _get(url)  # no store yet: a waiting page, reloading itself
        assert status == 503 and "cannot be read yet" in page and 'content="5"' in page
        shutil.copy(run_dir / "run.sqlite", live / "run.sqlite")  # the run's first flush
        status, page = _get(url)
        assert status == 200
        assert '<meta http-equiv="refresh" content="5">' in page
        mathml_namespace = 'xmlns="http://www.w3.org/1998/Math/MathML"'  # a name, not a fetch
        rest = page.replace(url, "").replace(mathml_namespace, "")
        assert len(embedded_pngs(page)) >= 3 and "http://" not in rest
        assert _get(url + "elsewhere")[0] == 404
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=30)
    assert not thread.is_alive()


def test_serve_refuses_a_missing_run_before_listening(capsys, tmp_path):
    code, out, err = run_cli(capsys, "serve", str(tmp_path / "nope"), "--port", "0")
    assert_one_line_error(code, err, "does not exist")
    assert code == 1 and out == ""


def test_closed_stdout_stops_quietly(capsys, monkeypatch, run_dir):
    def head_closed(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setitem(cli.COMMANDS, "inspect", head_closed)
    code, _, err = run_cli(capsys, "inspect", str(run_dir))
    assert code == 141 and err == ""


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE meta SET value = '{not json' WHERE key = 'optimizer'",
        "UPDATE symmetries SET params = '5'",  # tuple(5): a TypeError inside the reader
        "UPDATE charge_blocks SET data = x'0000'",  # a charge block cut short
    ],
)
def test_crafted_store_never_gives_a_traceback(capsys, run_dir, tmp_path, sql):
    import sqlite3

    crafted = tmp_path / "crafted"
    crafted.mkdir()
    shutil.copy(run_dir / "run.sqlite", crafted / "run.sqlite")
    con = sqlite3.connect(crafted / "run.sqlite")
    con.execute(sql)
    con.commit()
    con.close()
    for argv in (["inspect", str(crafted)], ["report", str(crafted)], ["export", str(crafted)]):
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err)
        assert code == 1
