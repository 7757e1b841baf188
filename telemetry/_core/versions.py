"""The versions of the instrumented libraries this release is tested on, checked at run time.

The package never depends on what it instruments (the app's SQLAlchemy, FastAPI, Celery stay
the app's); like OpenTelemetry's ``_instruments``, it declares the range here, finds each library
at run time and says so when the installed one lies outside: ``telemetry_untested_version``,
logged once per library. It still instruments: an app outside the range loses nothing by trying,
and the event says what to report if something is off.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

from .log import emit

#: distribution -> (oldest tested, first version not yet tested or None)
INSTRUMENTS: dict[str, tuple[str, str | None]] = {
    "sqlalchemy": ("2.0.25", "2.2"),
    "fastapi": ("0.110", "1.0"),
    "starlette": ("0.36", "2.0"),
    "celery": ("5.3", "6.0"),
    "kombu": ("5.3", "6.0"),
    "redis": ("5.0", "9.0"),
    "psycopg_pool": ("3.2.0", "3.4"),
    "asyncpg": ("0.29", "0.33"),
}

_reported: set[str] = set()


def parse(version: str) -> tuple[int, ...]:
    """Leading numeric release components: ``"2.1.0b1"`` -> ``(2, 1, 0)``."""
    parts = []
    for piece in version.split("."):
        match = re.match(r"\d+", piece)
        if match is None:
            break
        parts.append(int(match.group()))
        if match.end() != len(piece):
            break
    return tuple(parts)


def installed(distribution: str) -> str | None:
    """The version of ``distribution``: its module's ``__version__`` when it is imported already
    (a dictionary lookup), else the installed metadata (reading it costs about 2 ms a package)."""
    module = sys.modules.get(distribution.replace("-", "_"))
    version = getattr(module, "__version__", None)
    if isinstance(version, str) and version:
        return version
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def supported(distribution: str, version: str) -> bool:
    low, high = INSTRUMENTS[distribution]
    found = parse(version)
    return parse(low) <= found and (high is None or found < parse(high))


def check(distribution: str) -> bool:
    """True when ``distribution`` is installed in a tested version; logs once otherwise."""
    version = installed(distribution)
    if version is None:
        return False
    if supported(distribution, version):
        return True
    if distribution not in _reported:
        _reported.add(distribution)
        low, high = INSTRUMENTS[distribution]
        emit(
            "warning", "telemetry_untested_version",
            library=distribution, version=version,
            tested=f">={low}" + (f",<{high}" if high else ""),
            message=f"{distribution} {version} is outside the range this release is tested on; "
            "it is instrumented anyway",
        )  # fmt: skip
    return True
