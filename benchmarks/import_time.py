"""Import time of the package and of the command, against ``import torch`` (issue 18, target 3:
``import noether_dyn`` and ``noether-dyn --help`` within ``import torch`` + 0.5 s).

Each case runs in a fresh interpreter, ``--repeats`` times, the cases interleaved so that drift on
a shared machine hits all of them alike; the table gives each case's median wall time of the
whole process, its difference from ``import torch``'s and their ratio. ``--profile CASE`` prints
the slowest modules of one case as ``python -X importtime`` measures them (cumulative ms).

Run: ``python benchmarks/import_time.py [--repeats 7] [--profile watch] [--write-docs]``;
``--write-docs`` rewrites this command's table in docs/performance.md (``benchmarks/_docs.py``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._docs import add_write_docs_argument, docs_command, write_docs  # noqa: E402

DOCS_PAGE = "docs/performance.md"
CASES = {
    "python": "pass",
    "torch": "import torch",
    "noether_dyn": "import noether_dyn",
    "watch": "import noether_dyn; noether_dyn.watch",  # what a training script pays
    "load_run": "import noether_dyn; noether_dyn.load_run",
    "report": "import noether_dyn; noether_dyn.report",
    "--help": "import sys; from noether_dyn.cli import main; sys.exit(main(['--help']))",
}
TARGET_S = 0.5


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def wall_time(statement: str) -> float:
    """Seconds of a fresh ``python -c statement``, start to exit."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], env=_env(), check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    return time.perf_counter() - t0


def profile(statement: str, top: int = 15) -> list[tuple[int, str]]:
    """The ``top`` modules with the largest cumulative import time (microseconds)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", statement], env=_env(),
                          capture_output=True, text=True, check=False)  # fmt: skip
    rows = []
    for line in proc.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((int(parts[1]), parts[2].rstrip()))
    return sorted(rows, reverse=True)[:top]


def main(argv: list[str] | None = None) -> str:
    """Time every case, print the table (and the profile), and return the printed markdown."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--profile", choices=sorted(CASES), help="print one case's slowest imports")
    add_write_docs_argument(parser, DOCS_PAGE)
    args = parser.parse_args(argv)
    command = docs_command(DOCS_PAGE, __file__, argv) if args.write_docs else None
    times: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.repeats):
        for name, statement in CASES.items():
            times[name].append(wall_time(statement))
    torch_s = statistics.median(times["torch"])
    lines = [
        f"python {sys.version.split()[0]}, {args.repeats} runs per case, cases interleaved",
        "",
        "| case | statement | median s | - import torch (s) | / import torch | within +0.5 s |",
        "|---|---|---|---|---|---|",
    ]
    for name, statement in CASES.items():
        med = statistics.median(times[name])
        ok = "yes" if med - torch_s <= TARGET_S else "NO"
        lines.append(f"| {name} | `{statement}` | {med:.2f} | {med - torch_s:+.2f} | "
                     f"{med / torch_s:.2f} | {ok} |")  # fmt: skip
    if args.profile:
        lines += [
            "",
            f"Slowest imports of `{args.profile}` (cumulative ms, `python -X importtime`):",
            "",
            "```",
            *(f"{us / 1000:9.1f}  {module}" for us, module in profile(CASES[args.profile])),
            "```",
        ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if command is not None:
        write_docs(DOCS_PAGE, command, text)
    return text


if __name__ == "__main__":
    main()
