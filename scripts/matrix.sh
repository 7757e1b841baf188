#!/usr/bin/env bash
# The version matrix: the non-slow suite on the OLDEST versions the package claims, in a venv of
# its own (.venv-oldest). scripts/test.sh runs the whole suite on the newest (.venv). The oldest
# pins below are the lower bounds in telemetry/_versions.py and pyproject.toml: change them
# together.
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
  "asyncpg==0.29.0" "psycopg[binary]==3.1.18" "psycopg2-binary==2.9.9" "aiosqlite==0.20.0"
)
TOOLS=("grafanalib>=0.7" "pyyaml>=6" "rich>=13" "matplotlib>=3.7" "pytest>=8" "pytest-asyncio>=0.23")
[ -x .venv-oldest/bin/python ] || "$PY" -m venv .venv-oldest
.venv-oldest/bin/python -m pip install -q --disable-pip-version-check "${OLDEST[@]}" "${TOOLS[@]}" 2>&1 | grep -v '^WARNING: Location' || true
.venv-oldest/bin/python -m pip install -q --disable-pip-version-check --no-deps -e . 2>&1 | grep -v '^WARNING: Location' || true
.venv-oldest/bin/python - <<'PY' || exit 1
import importlib.metadata as m
names = ["sqlalchemy", "fastapi", "starlette", "celery", "kombu", "redis", "prometheus-client", "opentelemetry-sdk", "structlog"]
print("oldest versions: " + ", ".join(f"{n} {m.version(n)}" for n in names))
PY
echo "matrix: oldest versions, non-slow suite"
.venv-oldest/bin/python -m pytest -p no:cacheprovider -m "not slow and not packaging"
rc=$?
[ "$rc" -eq 0 ] || exit "$rc"

# Python 3.13 (users are on it): the newest versions, the non-slow suite, in .venv-313. The
# machines carry 3.13 under pyenv; CI fails rather than skips when it is missing.
PY313=${PYTHON313:-$(ls -d "$(pyenv root 2>/dev/null || echo /root/.pyenv)"/versions/3.13*/bin/python3.13 2>/dev/null | tail -1)}
if [ -z "$PY313" ] || [ ! -x "$PY313" ]; then
  echo "matrix: python3.13 not found (pyenv root versions/3.13*)" >&2
  exit 1
fi
[ -x .venv-313/bin/python ] || "$PY313" -m venv .venv-313
.venv-313/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v '^WARNING: Location' || true
echo "matrix: $(.venv-313/bin/python --version), newest versions, non-slow suite"
.venv-313/bin/python -m pytest -p no:cacheprovider -m "not slow and not packaging"
