#!/usr/bin/env bash
# Test noether-dyn against the lowest torch it claims (pyproject: torch>=2.3), in a throwaway
# virtual environment, on CPU. Needs network access to download.pytorch.org (the CPU wheel,
# ~180 MB) or a wheel file given as $TORCH_WHEEL. Usage:
#   scripts/test_min_torch.sh [pytest args...]     # default: the whole suite
#   TORCH_VERSION=2.4.1 scripts/test_min_torch.sh tests/test_charges.py
# torch 2.3 was built against numpy 1.x, so numpy is held below 2 here.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${TORCH_VERSION:-2.3.1}"
VENV="${VENV:-$(mktemp -d)/venv-torch-${TORCH_VERSION}}"

python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
if [[ -n "${TORCH_WHEEL:-}" ]]; then
    python -m pip install -q "$TORCH_WHEEL"
else
    python -m pip install -q --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"
fi
python -m pip install -q "numpy<2" -e ".[dev]"
python -c "import torch, numpy; print('torch', torch.__version__, 'numpy', numpy.__version__)"
noether-dyn demo --out "$(mktemp -d)/noether-demo" --steps 50
python -m pytest -q "$@"
