#!/usr/bin/env bash
# The test command (README and .ci/run): install what is missing, lint, type-check, run the whole
# suite on the newest versions (.venv), then the non-slow suite on the oldest versions the
# package claims (.venv-oldest, scripts/matrix.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
.venv/bin/ruff check . || exit 1
.venv/bin/mypy telemetry || exit 1
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing on purpose" >&2
  exit 1
fi
[ "$rc" -eq 0 ] || exit "$rc"
bash scripts/matrix.sh "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "matrix: pytest collected no tests: failing on purpose" >&2
  exit 1
fi
exit "$rc"
