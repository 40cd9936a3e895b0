"""The HTML report in a real browser: headless Chromium (Debian's ``chromium`` package).

Method, chosen to be robust without a browser-driver dependency:

1. Every embedded figure is decoded in Python (``matplotlib.image.imread`` on the base64 PNG)
   and its pixel size must equal the ``width``/``height`` the ``<img>`` tag declares.
2. Chromium renders the report as it ships (no script) to a screenshot, kept as the CI artifact
   ``artifacts/report_screenshot.png``; with ``--enable-logging=stderr --v=0`` Chromium echoes
   every page console message as an ``INFO:CONSOLE`` line on stderr, and there must be none.
3. Chromium loads a copy of the report with a small checker script appended, plus one
   deliberately broken control image, and ``--dump-dom`` prints the DOM after the load event:
   the script writes how many images are ``complete`` with ``naturalWidth`` equal to their
   declared width. Every report image must pass and the control must fail, which shows the
   check can fail.

4. A measuring script reports, from the rendered page: its height, each section's height, each
   figure's alt text and caption, each MathML formula's rendered size, and the findings' text.
   The test asserts every figure has both, every formula takes space (MathML is rendered), no
   finding shows "nan", and the page height is sane.
5. One screenshot per section (the page with every other section hidden), kept as CI artifacts
   in ``artifacts/report/<nn>-<section>.png`` for a person to look at.

Skipped, with a message, when no Chromium is installed (CI installs it with
``apt-get install -y chromium``).
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from noether_dyn.report import report
from tests.test_report import train_small

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
IMG_RE = re.compile(
    r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" width="(\d+)" height="(\d+)"'
)

CHECKER = """
<img id="control" src="data:image/png;base64,iVBORw0KGgoAAAAN" width="10" height="10" alt="">
<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = function (i) {
    return i.complete && i.naturalWidth > 0 && i.naturalWidth == i.getAttribute("width");
  };
  var report = imgs.filter(function (i) { return i.id !== "control"; });
  var control = document.getElementById("control");
  var out = document.createElement("pre");
  out.id = "img-check";
  out.textContent = "report " + report.filter(ok).length + "/" + report.length +
    " control " + (ok(control) ? "loaded" : "broken");
  document.body.appendChild(out);
});
</script>
"""


MEASURE = """
<script>
window.addEventListener("load", function () {
  var box = function (e) { var r = e.getBoundingClientRect(); return [r.width, r.height]; };
  var out = {
    page: document.documentElement.scrollHeight,
    sections: Array.prototype.map.call(document.querySelectorAll("section"), function (s) {
      return {id: s.id, height: box(s)[1]};
    }),
    figures: Array.prototype.map.call(document.querySelectorAll("figure"), function (f) {
      var img = f.querySelector("img"), cap = f.querySelector("figcaption");
      return {id: f.id, alt: img ? img.getAttribute("alt") : "",
              caption: cap ? cap.textContent : ""};
    }),
    math: Array.prototype.map.call(document.getElementsByTagName("math"), box),
    findings: Array.prototype.map.call(document.querySelectorAll("ol.findings li"),
                                       function (li) { return li.textContent; })
  };
  var pre = document.createElement("pre");
  pre.id = "measure";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def run_chromium(binary: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
    ]
    return subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=120)


def console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


@pytest.fixture(scope="module")
def report_path(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("browser")
    run_dir = train_small(root / "run", steps=30)
    return report(run_dir, root / "report.html")


def test_report_renders_in_headless_chromium(report_path, tmp_path):
    binary = chromium()
    if binary is None:
        pytest.skip(
            "chromium is not installed (apt-get install -y chromium); browser check skipped"
        )
    html = report_path.read_text()

    figures = IMG_RE.findall(html)
    assert len(figures) == 4
    for data, width, height in figures:
        pixels = mpimg.imread(io.BytesIO(base64.b64decode(data)), format="png")
        assert pixels.shape[:2] == (int(height), int(width))

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report_screenshot.png"
    shot.unlink(missing_ok=True)
    proc = run_chromium(
        binary, tmp_path, f"--screenshot={shot}", "--window-size=1280,4000", report_path.as_uri()
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert console_lines(proc.stderr) == []
    image = mpimg.imread(shot)
    assert image.shape[:2] == (4000, 1280)
    assert np.std(image[..., :3]) > 0.05  # not a blank page

    checked = tmp_path / "checked.html"
    checked.write_text(html.replace("</body>", CHECKER + "</body>"))
    proc = run_chromium(
        binary, tmp_path, "--virtual-time-budget=10000", "--dump-dom", checked.as_uri()
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = re.search(r'<pre id="img-check">([^<]*)</pre>', proc.stdout)
    assert result is not None, "the checker script did not run"
    assert result.group(1) == f"report {len(figures)}/{len(figures)} control broken"
    assert console_lines(proc.stderr) == []


def test_report_sections_measured_and_screenshotted(report_path, tmp_path):
    """Measure the rendered page and keep one screenshot per section in artifacts/report/."""
    binary = chromium()
    if binary is None:
        pytest.skip(
            "chromium is not installed (apt-get install -y chromium); browser check skipped"
        )
    html = report_path.read_text()
    measured = tmp_path / "measured.html"
    measured.write_text(html.replace("</body>", MEASURE + "</body>"))
    proc = run_chromium(
        binary,
        tmp_path,
        "--virtual-time-budget=10000",
        "--window-size=1280,2000",
        "--dump-dom",
        measured.as_uri(),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.search(r'<pre id="measure">([^<]*)</pre>', proc.stdout)
    assert found is not None, "the measuring script did not run"
    m = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))

    assert 2000 < m["page"] < 40000  # one long page, not a blank or a runaway layout
    assert len(m["figures"]) == 4
    for fig in m["figures"]:
        assert fig["id"].startswith("fig-") and len(fig["alt"]) > 20 and len(fig["caption"]) > 40
    assert len(m["math"]) >= 8
    assert all(w > 5 and h > 5 for w, h in m["math"])  # MathML is laid out, not dropped
    assert m["findings"]
    for text in m["findings"]:
        assert not re.search(r"\bnan\b", text, flags=re.I), text
        assert "Why:" in text
    heights = {s["id"]: s["height"] for s in m["sections"]}
    assert all(h > 40 for h in heights.values()), heights

    out = ARTIFACTS / "report"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    for i, section in enumerate(m["sections"], 1):
        key = section["id"]
        only = tmp_path / f"only-{key}.html"
        hide = (
            f"<style>body > h1, .subtitle, nav, footer, section:not(#{key}) "
            "{ display: none !important; }</style>"
        )
        only.write_text(html.replace("</head>", hide + "</head>"))
        shot = out / f"{i:02d}-{key}.png"
        height = int(min(max(section["height"] + 120, 300), 8000))
        proc = run_chromium(
            binary,
            tmp_path,
            "--hide-scrollbars",
            f"--screenshot={shot}",
            f"--window-size=1280,{height}",
            only.as_uri(),
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        image = mpimg.imread(shot)
        assert image.shape[:2] == (height, 1280)
        assert np.std(image[..., :3]) > 0.02, f"section {key} rendered blank"
