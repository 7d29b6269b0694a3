#!/usr/bin/env bash
# Set everything up, then run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${WIOLA_VENV:-.venv}/bin/python" -m pytest tests -p no:cacheprovider "$@"  # (pyproject.toml adds -q)
