#!/usr/bin/env bash
# The main job: set up, then train GECO + RE on the embedded shapes data (no files needed) and print
# the summary (target kappa vs reached RMSE, KL, final lambda) with the paths of the plots.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh quick
exec .venv/bin/geco train configs/quickstart.toml "$@"
