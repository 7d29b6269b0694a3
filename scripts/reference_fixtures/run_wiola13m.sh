#!/usr/bin/env bash
# Regenerate tests/fixtures/wiola13m/ from the reference package wiola13m==1.0.1.
# Not run by CI. Creates a throwaway venv OUTSIDE the repo (default /tmp/ref13m),
# because wiola13m only runs on transformers >=4.40,<4.46.
# torch==2.13.0 is pinned on purpose (a CPU wheel is enough; a bare `torch` pulls GBs).
set -euo pipefail
VENV="${WIOLA13M_VENV:-/tmp/ref13m}"
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet torch==2.13.0 "transformers>=4.40,<4.46" wiola13m==1.0.1
fi
cd "$REPO"
"$VENV/bin/python" scripts/reference_fixtures/make_wiola13m.py --out tests/fixtures/wiola13m "$@"
