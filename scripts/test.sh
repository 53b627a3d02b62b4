#!/usr/bin/env bash
# Set up, then run the test suite (pass pytest arguments through, e.g. -m slow for the long tier).
# Real MNIST comes from $GECO_DATA, by default ../shared/data when it exists.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -z "${GECO_DATA:-}" ] && [ -d ../shared/data ]; then
  GECO_DATA=$(cd ../shared/data && pwd)
  export GECO_DATA
fi
exec .venv/bin/python -m pytest "$@"
