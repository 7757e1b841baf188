#!/usr/bin/env bash
# Debian packages the test suite and `telemetry demo --stack real` run for real: PostgreSQL, Redis, Prometheus (promtool),
# Alertmanager (amtool), pgbouncer. Their package scripts try to start services; that is refused on our
# machines and nothing is left running: the tests start their own throwaway instances.
set -euo pipefail
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v pgbouncer >/dev/null || [ -x /usr/sbin/pgbouncer ] || need+=(pgbouncer)
command -v promtool >/dev/null || need+=(prometheus)
command -v amtool >/dev/null || need+=(prometheus-alertmanager)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
echo "system deps: postgresql $(ls /usr/lib/postgresql/) redis $(redis-server --version | awk '{print $3}') $(/usr/sbin/pgbouncer --version 2>&1 | head -1) $(promtool --version 2>&1 | head -1) $(amtool --version 2>&1 | head -1)"
