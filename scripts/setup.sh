#!/usr/bin/env bash
# Create .venv (if needed) and install geco into it, editable:
#   bash scripts/setup.sh quick   what the quickstart runs: geco-core with its `train` extra and the RE plugin
#   bash scripts/setup.sh         everything: the `train` extra, every plugin, the test tools, and the optional
#                                 integrations the tests exercise (Ray, MLflow, Lightning, the docs tools)
# torch and torchvision are pinned by constraints.txt; pip takes torch 2.13.0 from wherever it finds it
# (on Linux, PyPI's is the CUDA build: set GECO_TORCH_INDEX=https://download.pytorch.org/whl/cpu for the
# CPU one). Skips pip when what it would install is there already.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-full}
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if [ "$MODE" = quick ]; then
  PLUGINS=(plugins/geco_re)
  EXTRAS=train
else
  PLUGINS=(plugins/geco_re plugins/geco_pncc plugins/geco_cla plugins/geco_fre plugins/geco_ssim plugins/geco_lightning)
  EXTRAS=train,test,ray,mlflow,docs
fi
stamp=.venv/.geco-installed
want=$(cat constraints.txt pyproject.toml plugins/*/pyproject.toml | sha256sum | cut -d' ' -f1)
have=$(cat "$stamp" 2>/dev/null || true)
if [ "$have" != "full $want" ] && [ "$have" != "$MODE $want" ]; then
  echo "setting up .venv ($MODE: torch, geco-core[$EXTRAS], ${#PLUGINS[@]} plugin(s)) ..." >&2
  args=(-e ".[$EXTRAS]")
  for p in "${PLUGINS[@]}"; do args+=(-e "$p"); done
  index=()
  [ -n "${GECO_TORCH_INDEX:-}" ] && index=(--extra-index-url "$GECO_TORCH_INDEX")
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "${index[@]}" -c constraints.txt "${args[@]}"
  echo "$MODE $want" > "$stamp"
fi
