"""Bad settings fail at start-up with a message naming the setting and what it accepts."""

from __future__ import annotations

import pytest

import telemetry
from telemetry import Settings


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TELEMETRY_DB_HOLD_THRESHOLD_SECONDS": "-1"}, r"TELEMETRY_DB_HOLD_THRESHOLD_SECONDS='-1': expected a finite number > 0"),
        ({"TELEMETRY_DB_HOLD_THRESHOLD_SECONDS": "abc"}, r"TELEMETRY_DB_HOLD_THRESHOLD_SECONDS='abc'"),
        ({"TELEMETRY_DB_CRITICAL_USAGE_RATIO": "1.5"}, r"TELEMETRY_DB_CRITICAL_USAGE_RATIO='1.5': expected a number in \(0, 1\)"),
        # the event fires above the ratio: at 1 it could never fire
        ({"TELEMETRY_DB_CRITICAL_USAGE_RATIO": "1"}, r"TELEMETRY_DB_CRITICAL_USAGE_RATIO='1': expected a number in \(0, 1\)"),
        ({"TELEMETRY_DB_HOLD_THRESHOLD_SECONDS": "1e400"}, r"TELEMETRY_DB_HOLD_THRESHOLD_SECONDS='1e400': expected a finite number > 0"),
        ({"TELEMETRY_METRICS_ADDR": "0.0.0.0:9464"}, r"TELEMETRY_METRICS_ADDR='0.0.0.0:9464': expected an IP address or host name without a port"),
        ({"TELEMETRY_METRICS_ADDR": "http://host"}, r"TELEMETRY_METRICS_ADDR='http://host'"),
        ({"TELEMETRY_DB_CRITICAL_USAGE_RATIO": "nan"}, r"TELEMETRY_DB_CRITICAL_USAGE_RATIO"),
        ({"TELEMETRY_SQLALCHEMY": "maybe"}, r"TELEMETRY_SQLALCHEMY='maybe': expected one of true/false"),
        ({"TELEMETRY_MAX_OWNERS": "0"}, r"TELEMETRY_MAX_OWNERS='0': expected a whole number >= 1"),
        ({"TELEMETRY_FLUSH_INTERVAL_SECONDS": "0"}, r"TELEMETRY_FLUSH_INTERVAL_SECONDS='0': expected a number in \[0.01, 60\]"),
        ({"OTEL_SERVICE_NAME": 'a"b'}, r"OTEL_SERVICE_NAME='a\"b'"),
        ({"TELEMETRY_STATEMENT_TAG_OWNER": "owner"}, r"TELEMETRY_STATEMENT_TAG_OWNER=.owner.: expected one of auto, text, token"),
    ],
)
def test_bad_environment_names_the_variable(env, message):
    with pytest.raises(telemetry.ConfigError, match=message):
        Settings.load(environ=env)


def test_bad_argument_names_the_argument():
    with pytest.raises(telemetry.ConfigError, match=r"argument hold_threshold_seconds=0: expected a finite number > 0"):
        telemetry.instrument(service="api", hold_threshold_seconds=0)
    assert not telemetry.is_instrumented()
    with pytest.raises(telemetry.ConfigError, match=r"unknown setting\(s\) pool_size; accepted: "):
        telemetry.instrument(service="api", pool_size=3)


def test_precedence_argument_then_telemetry_then_otel():
    env = {"OTEL_SERVICE_NAME": "otel", "TELEMETRY_DB_HOLD_THRESHOLD_SECONDS": "2.5"}
    assert Settings.load(environ=env).service == "otel"
    assert Settings.load(environ={**env, "TELEMETRY_SERVICE_NAME": "ours"}).service == "ours"
    loaded = Settings.load(environ=env, service="arg")
    assert loaded.service == "arg" and loaded.hold_threshold_seconds == 2.5
    defaults = Settings.load(environ={})
    assert defaults.hold_threshold_seconds == 5.0 and defaults.critical_usage_ratio == 0.9
    assert defaults.multiproc_dir is None


def test_stock_prometheus_dir_is_honoured():
    assert Settings.load(environ={"PROMETHEUS_MULTIPROC_DIR": "/x"}).multiproc_dir == "/x"
    both = {"PROMETHEUS_MULTIPROC_DIR": "/x", "TELEMETRY_MULTIPROC_DIR": "/y"}
    assert Settings.load(environ=both).multiproc_dir == "/y"


def test_huge_integer_threshold_is_a_config_error_not_an_overflow():
    with pytest.raises(telemetry.ConfigError, match=r"argument hold_threshold_seconds=.*characters\): expected a finite number > 0"):
        Settings.load(hold_threshold_seconds=10**400)


@pytest.mark.parametrize("addr", ["127.0.0.1", "0.0.0.0", "::1", "[::1]", "localhost", "metrics-1.internal"])
def test_good_addresses_are_accepted(addr):
    assert Settings.load(metrics_addr=addr).metrics_addr == addr.strip("[]")
