"""Settings from arguments or ``TELEMETRY_*`` / ``OTEL_*`` environment variables.

Every value is validated at start-up; a bad one raises :class:`ConfigError` naming the setting
(argument and environment variable) and what it accepts. Arguments win over the environment.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from telemetry import thresholds

from . import urls as _urls


class ConfigError(ValueError):
    """A setting has a value the package cannot use; the message names it and what is accepted."""


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError("one of true/false, 1/0, yes/no, on/off")


def _number(
    low: float, high: float | None, *, low_open: bool, high_open: bool = False
) -> Callable[[Any], float]:
    if high is None:
        accepted = f"a finite number {'>' if low_open else '>='} {low:g}"
    else:
        accepted = (
            f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        )

    def parse(raw: Any) -> float:
        if isinstance(raw, bool):
            raise ValueError(accepted)
        try:
            value = float(raw)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(accepted) from None
        if not math.isfinite(value) or (value <= low if low_open else value < low):
            raise ValueError(accepted)
        if high is not None and (value >= high if high_open else value > high):
            raise ValueError(accepted)
        return value

    return parse


def _whole(low: int, high: int | None, accepted: str) -> Callable[[Any], int]:
    def parse(raw: Any) -> int:
        if isinstance(raw, bool):
            raise ValueError(accepted)
        try:
            value = int(str(raw).strip())
        except ValueError:
            raise ValueError(accepted) from None
        if value < low or (high is not None and value > high):
            raise ValueError(accepted)
        return value

    return parse


_positive_int = _whole(1, None, "a whole number >= 1")
_port = _whole(1, 65535, "a TCP port number in [1, 65535]")


def _name(raw: Any) -> str:
    text = str(raw).strip()
    if not text or len(text) > 100 or any(c in text for c in "\n\r\"\\"):
        raise ValueError("a non-empty name of at most 100 characters without quotes or newlines")
    return text


def _address(raw: Any) -> str:
    """An address to bind: an IPv4/IPv6 address or a host name, without a port."""
    text = str(raw).strip()
    accepted = (
        "an IP address or host name without a port (e.g. 127.0.0.1, 0.0.0.0, ::1, localhost); "
        "the port is TELEMETRY_METRICS_PORT"
    )
    try:
        ipaddress.ip_address(text.strip("[]"))
        return text.strip("[]")
    except ValueError:
        pass
    labels = text.rstrip(".").split(".")
    if not text or len(text) > 253 or not all(
        label and len(label) <= 63 and label.replace("-", "").isalnum()
        and not label.startswith("-") for label in labels
    ):  # fmt: skip
        raise ValueError(accepted)
    return text


def _choice(*accepted: str) -> Callable[[Any], str]:
    def parse(raw: Any) -> str:
        text = str(raw).strip().lower()
        if text not in accepted:
            raise ValueError("one of " + ", ".join(accepted))
        return text

    return parse


def _optional_path(raw: Any) -> str | None:
    text = str(raw).strip() if raw is not None else ""
    return text or None


def _dsn(raw: Any) -> str | None:
    """A PostgreSQL URL (``postgresql://user:pass@host:port/db``; ``postgres://`` and SQLAlchemy's
    ``postgresql+driver://`` are accepted and normalised) or empty for off."""
    text = str(raw).strip() if raw is not None else ""
    if not text:
        return None
    scheme, sep, rest = text.partition("://")
    base = scheme.split("+", 1)[0].lower()
    if not sep or base not in ("postgresql", "postgres") or not rest:
        raise ValueError("a URL postgresql://user[:password]@host[:port]/database (or empty: off)")
    try:
        _urls.parse(text)
    except ValueError as exc:
        raise ValueError(f"a URL postgresql://user[:password]@host[:port]/database (or empty: off): {exc}") from None
    return "postgresql://" + rest


def _http_url(raw: Any) -> str | None:
    """An http(s) URL (credentials as ``user:password@`` allowed) or empty for off."""
    text = str(raw).strip() if raw is not None else ""
    if not text:
        return None
    if not text.startswith(("http://", "https://")) or len(text.split("://", 1)[1]) < 1:
        raise ValueError("an http:// or https:// URL of a Prometheus-format endpoint (or empty: off)")
    try:
        if not _urls.parse(text).host:
            raise ValueError("no host")
    except ValueError as exc:
        raise ValueError(f"an http:// or https:// URL of a Prometheus-format endpoint (or empty: off): {exc}") from None
    return text


def mask_url(text: str) -> str:
    """``scheme://user:secret@host`` -> ``scheme://user:***@host`` (whatever characters the
    secret holds), and ``?password=secret`` or ``password=secret`` (key/value form) ->
    ``password=***``: never log a password (``telemetry/_core/urls.py``)."""
    return _urls.mask_text(text)


def _metrics_exporter(raw: Any) -> bool:
    """``OTEL_METRICS_EXPORTER`` (a comma list of OpenTelemetry's values; only ``otlp`` turns the
    package's export on) or a boolean."""
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in _TRUE | _FALSE:
        return text in _TRUE
    kinds = {k.strip() for k in text.split(",") if k.strip()}
    # the values OpenTelemetry defines: an app's own SDK may export to the console meanwhile
    if not kinds or not kinds <= {"otlp", "prometheus", "console", "logging", "none"}:
        raise ValueError("otlp, prometheus, console, logging or none (comma-separated), or true/false")
    return "otlp" in kinds


def _default_service() -> str:
    base = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    base = base.removesuffix(".py")
    return base if base and base not in ("-c", "-m", "-") else "python"


@dataclasses.dataclass(frozen=True)
class _Field:
    env: tuple[str, ...]
    parse: Callable[[Any], Any]
    default: Callable[[], Any]
    secret: bool = False  # a URL that may carry a password: shown masked in errors




def _setting(env: tuple[str, ...], parse: Callable[[Any], Any], default: Callable[[], Any], secret: bool = False) -> Any:
    """A setting, declared once: its environment variables, parser and default travel with the
    field (read back into :data:`_FIELDS`)."""
    return dataclasses.field(metadata={"spec": _Field(env, parse, default, secret)})


@dataclasses.dataclass(frozen=True)
class Settings:
    """Validated settings. Build with :meth:`Settings.load`."""

    service: str = _setting(("TELEMETRY_SERVICE_NAME", "OTEL_SERVICE_NAME"), _name, _default_service)
    sqlalchemy: bool = _setting(("TELEMETRY_SQLALCHEMY",), _bool, lambda: True)
    hold_threshold_seconds: float = _setting(
        ("TELEMETRY_DB_HOLD_THRESHOLD_SECONDS",),
        _number(0.0, None, low_open=True),
        lambda: thresholds.HOLD_SECONDS_WARNING,
    )
    critical_usage_ratio: float = _setting(
        ("TELEMETRY_DB_CRITICAL_USAGE_RATIO",),
        _number(0.0, 1.0, low_open=True, high_open=True),  # the event fires above it: 1 never would
        lambda: thresholds.POOL_USAGE_LOG,
    )
    critical_log_interval_seconds: float = _setting(
        ("TELEMETRY_DB_CRITICAL_LOG_INTERVAL_SECONDS",),
        _number(0.0, None, low_open=False),
        lambda: 10.0,
    )
    multiproc_dir: str | None = _setting(
        ("TELEMETRY_MULTIPROC_DIR", "PROMETHEUS_MULTIPROC_DIR"), _optional_path, lambda: None
    )
    flush_interval_seconds: float = _setting(
        ("TELEMETRY_FLUSH_INTERVAL_SECONDS",), _number(0.01, 60.0, low_open=False), lambda: 1.0
    )
    max_owners: int = _setting(("TELEMETRY_MAX_OWNERS",), _positive_int, lambda: 100)
    tracing: bool = _setting(("TELEMETRY_TRACING",), _bool, lambda: True)
    otlp_metrics: bool = _setting(("TELEMETRY_OTLP_METRICS", "OTEL_METRICS_EXPORTER"), _metrics_exporter, lambda: False)
    trace_sql: bool = _setting(("TELEMETRY_TRACE_SQL",), _bool, lambda: False)
    http_spans: str = _setting(("TELEMETRY_HTTP_SPANS",), _choice("server", "opentelemetry"), lambda: "server")
    celery: bool = _setting(("TELEMETRY_CELERY",), _bool, lambda: True)
    redis: bool = _setting(("TELEMETRY_REDIS",), _bool, lambda: True)
    psycopg_pool: bool = _setting(("TELEMETRY_PSYCOPG_POOL",), _bool, lambda: True)
    asyncpg_pool: bool = _setting(("TELEMETRY_ASYNCPG_POOL",), _bool, lambda: True)
    fastapi: bool = _setting(("TELEMETRY_FASTAPI",), _bool, lambda: True)
    loop_blocked_seconds: float = _setting(
        ("TELEMETRY_LOOP_BLOCKED_SECONDS",),
        _number(0.0, None, low_open=True),
        lambda: thresholds.LOOP_BLOCKED_SECONDS,
    )
    metrics_port: int | None = _setting(("TELEMETRY_METRICS_PORT",), _port, lambda: None)
    metrics_addr: str = _setting(("TELEMETRY_METRICS_ADDR",), _address, lambda: "127.0.0.1")
    connection_limit: int | None = _setting(
        ("TELEMETRY_DB_CONNECTION_LIMIT",), _positive_int, lambda: None
    )
    application_name: bool = _setting(("TELEMETRY_APPLICATION_NAME",), _bool, lambda: True)
    statement_tag: bool = _setting(("TELEMETRY_STATEMENT_TAG",), _bool, lambda: True)
    shared_view_cluster: bool = _setting(("TELEMETRY_SHARED_VIEW_CLUSTER",), _bool, lambda: True)
    statement_tag_trace: bool = _setting(("TELEMETRY_STATEMENT_TAG_TRACE",), _bool, lambda: False)
    statement_tag_owner: str = _setting(
        ("TELEMETRY_STATEMENT_TAG_OWNER",), _choice("auto", "text", "token"), lambda: "auto"
    )
    server_view_url: str | None = _setting(("TELEMETRY_SERVER_VIEW_URL",), _dsn, lambda: None, secret=True)
    pgbouncer_url: str | None = _setting(("TELEMETRY_PGBOUNCER_URL",), _dsn, lambda: None, secret=True)
    pooler_metrics_url: str | None = _setting(("TELEMETRY_POOLER_METRICS_URL",), _http_url, lambda: None, secret=True)
    shared_view_interval_seconds: float = _setting(
        ("TELEMETRY_SHARED_VIEW_INTERVAL_SECONDS",), _number(0.2, 300.0, low_open=False), lambda: 1.0
    )
    shared_view_timeout_seconds: float = _setting(
        ("TELEMETRY_SHARED_VIEW_TIMEOUT_SECONDS",), _number(0.05, 60.0, low_open=False), lambda: 2.0
    )
    lock_wait_event_seconds: float = _setting(
        ("TELEMETRY_DB_LOCK_WAIT_EVENT_SECONDS",),
        _number(0.0, None, low_open=True),
        lambda: thresholds.LOCK_WAIT_EVENT_SECONDS,
    )
    celery_backlog_interval_seconds: float = _setting(
        ("TELEMETRY_CELERY_BACKLOG_INTERVAL_SECONDS",), _number(0.1, 3600.0, low_open=False), lambda: 5.0
    )
    pooler_wait_event_seconds: float = _setting(
        ("TELEMETRY_DB_POOLER_WAIT_EVENT_SECONDS",),
        _number(0.0, None, low_open=False),
        lambda: thresholds.POOLER_WAIT_EVENT_SECONDS,
    )
    idle_in_transaction_event_seconds: float = _setting(
        ("TELEMETRY_DB_IDLE_IN_TRANSACTION_EVENT_SECONDS",),
        _number(0.0, None, low_open=True),
        lambda: thresholds.IDLE_IN_TRANSACTION_EVENT_SECONDS,
    )

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Merge ``overrides`` (non-None arguments) over the environment over the defaults."""
        env = os.environ if environ is None else environ
        unknown = sorted(set(overrides) - set(_FIELDS))
        if unknown:
            raise ConfigError(
                f"unknown setting(s) {', '.join(unknown)}; accepted: {', '.join(sorted(_FIELDS))}"
            )
        values: dict[str, Any] = {}
        for key, field in _FIELDS.items():
            raw: Any = overrides.get(key)
            origin = f"argument {key}="
            if raw is None:
                for var in field.env:
                    if env.get(var, "").strip():
                        raw, origin = env[var], f"environment variable {var}="
                        break
            if raw is None:
                values[key] = field.default()
                continue
            try:
                values[key] = field.parse(raw)
            except ValueError as exc:
                shown = repr(mask_url(str(raw)) if field.secret else raw)
                shown = shown if len(shown) <= 60 else f"{shown[:40]}...({len(shown)} characters)"
                raise ConfigError(f"invalid {origin}{shown}: expected {exc}") from None
        return cls(**values)

    @property
    def watchdog_interval_seconds(self) -> float:
        """How often held connections are scanned: fine enough to catch the threshold promptly."""
        return max(0.01, min(0.5, self.hold_threshold_seconds / 4, self.loop_blocked_seconds / 4))


#: every setting: name -> its variables, parser and default (from the fields of :class:`Settings`)
_FIELDS: dict[str, _Field] = {f.name: f.metadata["spec"] for f in dataclasses.fields(Settings)}


def service_name(environ: Mapping[str, str] | None = None) -> str:
    """The service name ``instrument()`` would use without an argument: ``TELEMETRY_SERVICE_NAME``,
    ``OTEL_SERVICE_NAME``, else the program's name (``configure_logging`` names the process alike)."""
    env = os.environ if environ is None else environ
    field = _FIELDS["service"]
    for var in field.env:
        if env.get(var, "").strip():
            try:
                return str(field.parse(env[var]))
            except ValueError as exc:
                raise ConfigError(f"invalid environment variable {var}={env[var]!r}: expected {exc}") from None
    return str(field.default())
