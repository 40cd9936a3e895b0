#!/usr/bin/env bash
# Regenerate docs/images/report.png, the README's screenshot: the demo's normalized run, its
# report rendered by headless Chromium (Debian: apt-get install -y chromium), top of the page.
# Usage: scripts/report_screenshot.sh [DEMO_DIR]   (default: a fresh demo in a temporary folder)
set -euo pipefail
cd "$(dirname "$0")/.."
demo="${1:-}"
if [[ -z "$demo" ]]; then
    demo="$(mktemp -d)/noether-demo"
    python -m noether_dyn.cli demo --out "$demo"
fi
python -m noether_dyn.cli report "$demo/normalized"
shot="$(mktemp -d)/page.png"
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1200,1150 \
    --screenshot="$shot" "file://$(realpath "$demo/normalized/report.html")" >/dev/null 2>&1
mkdir -p docs/images
cp "$shot" docs/images/report.png
echo docs/images/report.png
