#!/usr/bin/env bash
# The version matrix's two environments, and the tests they run (docs/testing.md):
#   oldest  the OLDEST versions the package claims, Python 3.11 (.venv-oldest)
#   py313   the newest versions on Python 3.13 (.venv-313; pyenv's 3.13 on our machines)
# Each runs the tests marked `matrix`: those whose subject depends on the version of an
# instrumented library, a driver, the OpenTelemetry SDK or Python (tests/test_matrix.py keeps
# one per integration). The oldest pins below are the lower bounds in telemetry/_core/versions.py and
# pyproject.toml: change them together.
#
#   bash scripts/matrix.sh setup oldest|py313        create or complete the virtualenv
#   bash scripts/matrix.sh run oldest|py313 [ARGS]   run its tests (ARGS go to pytest)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OLDEST=(
  "sqlalchemy[asyncio]==2.0.25"
  "fastapi==0.110.0" "starlette==0.36.3" "uvicorn==0.29.0" "httpx==0.27.0"
  "celery[redis]==5.3.6" "kombu==5.3.7" "redis==5.0.0"
  "prometheus-client==0.20.0" "structlog==24.1.0"
  "opentelemetry-api==1.25.0" "opentelemetry-sdk==1.25.0"
  "opentelemetry-exporter-otlp-proto-http==1.25.0"
  "opentelemetry-instrumentation==0.46b0" "opentelemetry-instrumentation-asgi==0.46b0"
  "opentelemetry-instrumentation-sqlalchemy==0.46b0"
  "asyncpg==0.29.0" "psycopg[binary]==3.1.18" "psycopg2-binary==2.9.9" "psycopg-pool==3.2.0" "aiosqlite==0.20.0"
)
TOOLS=("grafanalib>=0.7" "pyyaml>=6" "rich>=13" "matplotlib>=3.7" "pytest>=8" "pytest-asyncio>=0.23" "pytest-xdist>=3.5")
quiet() { grep -v '^WARNING: Location' || true; }
# an editable install writes poolsight.egg-info into the tree: two at once (the two
# environments are built side by side) must take turns
LOCK=${TMPDIR:-/tmp}/poolsight-editable.lock
editable() { flock "$LOCK" "$@"; }

py313() {
  local found=${PYTHON313:-$(ls -d "$(pyenv root 2>/dev/null || echo /root/.pyenv)"/versions/3.13*/bin/python3.13 2>/dev/null | tail -1)}
  if [ -z "$found" ] || [ ! -x "$found" ]; then
    echo "matrix: python3.13 not found (pyenv root versions/3.13*)" >&2
    return 1
  fi
  echo "$found"
}

setup() {
  case "$1" in
    oldest)
      [ -x .venv-oldest/bin/python ] || "$PY" -m venv .venv-oldest || return 1
      .venv-oldest/bin/python -m pip install -q --disable-pip-version-check "${OLDEST[@]}" "${TOOLS[@]}" 2>&1 | quiet
      editable .venv-oldest/bin/python -m pip install -q --disable-pip-version-check --no-deps -e . 2>&1 | quiet
      .venv-oldest/bin/python - <<'PY' || return 1
import importlib.metadata as m
names = ["sqlalchemy", "fastapi", "starlette", "celery", "kombu", "redis", "prometheus-client", "opentelemetry-sdk", "structlog"]
print("oldest versions: " + ", ".join(f"{n} {m.version(n)}" for n in names))
PY
      ;;
    py313)
      local python
      python=$(py313) || return 1
      [ -x .venv-313/bin/python ] || "$python" -m venv .venv-313 || return 1
      editable .venv-313/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | quiet
      .venv-313/bin/python -c "import sys, telemetry, sqlalchemy, fastapi, celery; print('py313:', sys.version.split()[0])" || return 1
      ;;
    *) echo "matrix: unknown environment '$1' (oldest or py313)" >&2; return 2 ;;
  esac
}

run() {
  local env=$1
  shift
  local venv
  case "$env" in
    oldest) venv=.venv-oldest ;;
    py313) venv=.venv-313 ;;
    *) echo "matrix: unknown environment '$env' (oldest or py313)" >&2; return 2 ;;
  esac
  echo "matrix: $env ($($venv/bin/python --version)), the tests marked matrix"
  $venv/bin/python -m pytest -p no:cacheprovider -m "matrix and not slow and not packaging" "$@"
}

case "${1:-}" in
  setup) shift; setup "$@" ;;
  run) shift; run "$@" ;;
  *) echo "usage: scripts/matrix.sh setup|run oldest|py313 [pytest args]" >&2; exit 2 ;;
esac
