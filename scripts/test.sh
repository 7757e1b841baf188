#!/usr/bin/env bash
# The test command (README and .ci/run), in stages, each timed (docs/testing.md):
#   setup   Debian packages and .venv (scripts/setup.sh); the matrix's .venv-oldest and .venv-313
#           are built alongside, in the background, and waited for before their stage
#   lint    ruff
#   types   mypy on the package
#   suite   every test, on the newest versions (.venv), in parallel workers (pytest-xdist)
#   oldest  the tests marked matrix, on the oldest versions the package claims (scripts/matrix.sh)
#   py313   the tests marked matrix, on Python 3.13 with the newest versions
# One stage alone: TELEMETRY_TEST_STAGES="suite" bash scripts/test.sh (setup always runs).
# Arguments go to every pytest run (e.g. -k pool, or -m "not slow" while iterating).
set -uo pipefail
cd "$(dirname "$0")/.."
STAGES=${TELEMETRY_TEST_STAGES:-"lint types suite oldest py313"}
#: parallel workers: the suite waits on real servers far more than it computes (measured in
#: docs/testing.md). --dist loadfile: a file's tests run on one worker, so the demos (one file,
#: CPU-heavy and judging rates) never run two at a time (tests/conftest.py starts them first)
WORKERS=${TELEMETRY_TEST_WORKERS:-3}
LOGS=${TMPDIR:-/tmp}/telemetry-test-logs.$$
mkdir -p "$LOGS"
T0=$(date +%s)
declare -a SUMMARY=()

stage() {  # stage NAME COMMAND...: run, time, record
  local name=$1 start rc
  shift
  start=$(date +%s)
  echo "=== stage $name"
  "$@"
  rc=$?
  SUMMARY+=("$(printf '%-7s %5d s  exit %d' "$name" $(( $(date +%s) - start )) "$rc")")
  echo "=== stage $name: $(( $(date +%s) - start )) s, exit $rc"
  return "$rc"
}

finish() {
  local rc=$1
  echo "=== stages (wall clock $(( $(date +%s) - T0 )) s in all)"
  printf '  %s\n' "${SUMMARY[@]}"
  exit "$rc"
}

wants() { [[ " $STAGES " == *" $1 "* ]]; }

pytest_rc() {  # pytest's "no tests collected" (5) is a failure here: CI must run tests
  local rc=$1
  if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: failing on purpose" >&2
    return 1
  fi
  return "$rc"
}


matrix_stage() {  # wait for the environment's setup, then run its tests
  local env=$1 pid=$2
  shift 2
  if ! wait "$pid"; then
    echo "setup of $env failed:" >&2
    tail -40 "$LOGS/setup-$env.log" >&2
    return 1
  fi
  cat "$LOGS/setup-$env.log"
  bash scripts/matrix.sh run "$env" -n "$WORKERS" --dist loadfile --durations=25 "$@"
  pytest_rc $?
}

suite() {
  .venv/bin/python -m pytest -n "$WORKERS" --dist loadfile --durations=25 "$@"
  pytest_rc $?
}

stage setup bash scripts/setup.sh || finish 1
# the matrix's environments, built while lint, types and the suite run
if wants oldest; then bash scripts/matrix.sh setup oldest >"$LOGS/setup-oldest.log" 2>&1 & OLDEST_PID=$!; fi
if wants py313; then bash scripts/matrix.sh setup py313 >"$LOGS/setup-py313.log" 2>&1 & PY313_PID=$!; fi
if wants lint; then stage lint .venv/bin/ruff check . || finish 1; fi
if wants types; then stage types .venv/bin/mypy telemetry || finish 1; fi
if wants suite; then stage suite suite "$@" || finish 1; fi
if wants oldest; then stage oldest matrix_stage oldest "$OLDEST_PID" "$@" || finish 1; fi
if wants py313; then stage py313 matrix_stage py313 "$PY313_PID" "$@" || finish 1; fi
finish 0
