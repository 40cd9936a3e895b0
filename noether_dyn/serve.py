"""A live view of a run that is still training: a local HTTP server (127.0.0.1 only) that reads
the store and renders the run's HTML report again on every request.

The page reloads itself every ``refresh`` seconds (an HTML ``meta`` refresh; no script and no
network asset), so a browser left open follows the run flush by flush.
"""

from __future__ import annotations

import html
import sys
import tempfile
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

HOST = "127.0.0.1"


def render_page(run_path: str | Path, refresh: int) -> tuple[int, str]:
    """The HTTP status and the HTML page for ``run_path``: its report as stored right now (200),
    or a short page naming the problem (503) while the store cannot be read yet."""
    from noether_dyn.report import report
    from noether_dyn.report.data import MissingData
    from noether_dyn.store import StoreError

    reload_tag = f'<meta http-equiv="refresh" content="{refresh}">' if refresh > 0 else ""
    try:
        with tempfile.TemporaryDirectory(prefix="noether-serve-") as tmp:
            page = report(run_path, Path(tmp) / "report.html").read_text(encoding="utf-8")
    except (StoreError, MissingData, ValueError, OSError) as exc:
        message = html.escape(" ".join(str(exc).split()))
        return 503, (
            f"<!DOCTYPE html><html><head><meta charset='utf-8'>{reload_tag}"
            f"<title>noether-dyn: waiting</title></head><body><p>The run cannot be read yet: "
            f"{message}</p></body></html>"
        )
    if reload_tag:
        head = page.find("<head>")
        page = page[: head + 6] + reload_tag + page[head + 6 :] if head >= 0 else reload_tag + page
    return 200, page


def make_server(run_path: str | Path, port: int = 8765, refresh: int = 30) -> HTTPServer:
    """An HTTP server on 127.0.0.1:``port`` (0: any free port; read ``server.server_port``) whose
    ``/`` is the live report of ``run_path``. Call ``serve_forever()`` on it; ``shutdown()`` from
    another thread stops it. Requests are served one at a time."""
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an integer in 0..65535, got {port!r}")
    if not isinstance(refresh, int) or refresh < 0:
        raise ValueError(f"refresh must be a non-negative integer (seconds), got {refresh!r}")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path.split("?")[0] not in ("/", "/report.html"):
                self.send_error(404, "only / is served")
                return
            status, page = render_page(run_path, refresh)
            body = page.encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:
            sys.stderr.write(f"{self.address_string()} {format % args}\n")

    return HTTPServer((HOST, port), Handler)
