#!/usr/bin/env bash
# Everything the project needs on a fresh Debian 12 machine with Python 3.11:
# the Debian packages, then a virtualenv in .venv with every extra and the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-system-deps.sh
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -m pip install -q -e '.[test]' 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c "import telemetry, sqlalchemy, asyncpg, celery, fastapi, grafanalib; print('python deps: ok')"
