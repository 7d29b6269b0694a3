#!/usr/bin/env bash
# Regenerate tests/fixtures/wiola/ from the reference package wiola==0.1.1
# (paper: SRPE + GCLA + ATM + DSFF + WiolaRMSNorm). Not run by CI.
# Creates a throwaway venv OUTSIDE the repo (default /tmp/refwiola), because
# wiola 0.1.1 only runs on transformers 4.46.x.
# torch==2.13.0 is pinned on purpose (a CPU wheel is enough; a bare `torch` pulls GBs).
set -euo pipefail
VENV="${WIOLA_REF_VENV:-/tmp/refwiola}"
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet torch==2.13.0 "transformers==4.46.*" wiola==0.1.1
fi
cd "$REPO"
"$VENV/bin/python" scripts/reference_fixtures/make_wiola.py --out tests/fixtures/wiola "$@"
