#!/usr/bin/env bash
# Test noether-dyn against the lowest torch it claims (pyproject: torch>=2.13), in a separate
# virtual environment, on CPU. Usage:
#   scripts/test_min_torch.sh [pytest args...]     # default: the whole suite
#   TORCH_VERSION=2.4.1 scripts/test_min_torch.sh tests/test_charges.py
# Environment:
#   TORCH_VERSION    the torch to test (default 2.13.0)
#   VENV             the environment (default: a new one under a temporary directory). If it
#                    already holds torch==$TORCH_VERSION, torch is not installed again.
#   TORCH_INDEX_URL  where torch comes from (default: the CPU wheels, ~180 MB, of
#                    https://download.pytorch.org/whl/cpu). Set it empty to take torch from the
#                    default index (PyPI: the CUDA build, ~780 MB plus ~2 GB of nvidia packages,
#                    which runs on a CPU-only machine too).
#   TORCH_WHEEL      a wheel file to install instead of either.
#   NUMPY            the numpy requirement (default: "numpy<2" for torch 2.3, which was built
#                    against numpy 1.x, to test below the floor; "numpy>=2" otherwise, which
#                    pyarrow needs)
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TORCH_INDEX_URL="${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}"
VENV="${VENV:-$(mktemp -d)/venv-torch-${TORCH_VERSION}}"
if [[ "$TORCH_VERSION" == 2.3.* ]]; then NUMPY="${NUMPY:-numpy<2}"; else NUMPY="${NUMPY:-numpy>=2}"; fi

[[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
have="$(python -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)"
if [[ "$have" != "$TORCH_VERSION" ]]; then
    python -m pip install -q --upgrade pip
    if [[ -n "${TORCH_WHEEL:-}" ]]; then
        python -m pip install -q "$TORCH_WHEEL"
    elif [[ -n "$TORCH_INDEX_URL" ]]; then
        python -m pip install -q --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"
    else
        python -m pip install -q "torch==${TORCH_VERSION}"
    fi
fi
# torch pinned again so that no dependency's resolution replaces it
python -m pip install -q "torch==${TORCH_VERSION}" "$NUMPY" -e ".[dev]"
python -c "import torch, numpy; print('torch', torch.__version__, 'numpy', numpy.__version__)"
noether-dyn demo --out "$(mktemp -d)/noether-demo" --steps 50
python -m pytest -q "$@"
