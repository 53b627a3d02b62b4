#!/usr/bin/env bash
# Create .venv (if needed) and install geco-core (with its optional integrations: Ray, MLflow, the docs
# tools), its plugins and the test tools into it, editable.
# Pins the CPU build of torch through constraints.txt. Skips pip when nothing it installs has changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PLUGINS=(plugins/geco_re plugins/geco_pncc plugins/geco_cla plugins/geco_fre plugins/geco_ssim plugins/geco_lightning)
stamp=.venv/.geco-installed
want=$(cat constraints.txt pyproject.toml "${PLUGINS[@]/%//pyproject.toml}" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setting up .venv (torch CPU build, geco-core, plugins, test tools) ..." >&2
  args=(-e ".[train,test,ray,mlflow,docs]")
  for p in "${PLUGINS[@]}"; do args+=(-e "$p"); done
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt "${args[@]}"
  echo "$want" > "$stamp"
fi
