#!/usr/bin/env bash
# Build the wheels of geco-core and the five constraint plugins into dist/ (one command; needs pip
# and hatchling, which `bash scripts/setup.sh` installs into .venv):
#   bash scripts/build-wheels.sh && pip install -c constraints.txt dist/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
"$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir dist \
  . plugins/geco_re plugins/geco_fre plugins/geco_cla plugins/geco_pncc plugins/geco_ssim
ls dist/*.whl
