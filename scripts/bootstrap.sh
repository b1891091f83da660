#!/usr/bin/env bash
# Create or refresh the project's virtual environment: `make` calls this, nobody needs to by hand.
# - a torch that is already installed system-wide (e.g. a CUDA build) is kept: the venv then sees system packages;
# - where no torch is present, the CPU build is installed instead of several GB of CUDA packages.
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
here=$(cd "$(dirname "$0")/.." && pwd)

if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    echo "bootstrap: torch found in $($PYTHON -c 'import sys; print(sys.executable)'); the venv will reuse it"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade pip >/dev/null

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "bootstrap: no torch found; installing the CPU build of torch 2.13.0"
  $PIP install "torch==2.13.0+cpu" 2>/dev/null \
    || $PIP install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
fi
echo "bootstrap: installing swarm and its dependencies"
$PIP install -e "$here[dev]"
