"""What a user installs: the distribution is ``poolsight`` (the import name stays ``telemetry``);
it never installs or upgrades what it instruments; with only its core dependencies (and the
app's SQLAlchemy) ``instrument()`` works and exports pool metrics. Each test builds a fresh
virtualenv from the package registry, as a user's machine would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.integration, pytest.mark.packaging]


def _venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=120)
    return path / "bin" / "python"


def _pip(python: Path, *args: str) -> None:
    out = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]


def _versions(python: Path) -> dict[str, str]:
    out = subprocess.run([str(python), "-m", "pip", "list", "--format", "json", "--disable-pip-version-check"],
                         capture_output=True, text=True, check=True, timeout=120)  # fmt: skip
    return {row["name"].lower(): row["version"] for row in json.loads(out.stdout)}


def test_installing_into_an_app_changes_none_of_its_versions(tmp_path):
    """An app pinned to an older FastAPI and httpx (the pins that made the old extras upgrade
    FastAPI or refuse to install): installing the package, with tracing, upgrades nothing."""
    python = _venv(tmp_path / "app")
    _pip(python, "fastapi==0.110.0", "httpx==0.26.0", "uvicorn==0.29.0", "sqlalchemy==2.0.25")
    before = _versions(python)
    _pip(python, f"{ROOT}[tracing]")
    after = _versions(python)
    changed = {name: (version, after.get(name)) for name, version in before.items() if after.get(name) != version}
    assert changed == {}
    assert after["poolsight"]
    assert "telemetry" not in after  # the unrelated package of that name is never pulled in


def test_core_dependencies_only(tmp_path):
    """prometheus-client and structlog, plus the app's SQLAlchemy; no OpenTelemetry, no FastAPI,
    no Celery: instrument() works and /metrics shows the pool."""
    python = _venv(tmp_path / "core")
    _pip(python, str(ROOT), "sqlalchemy>=2.0")
    installed = _versions(python)
    assert not [n for n in installed if n.startswith("opentelemetry") or n in ("fastapi", "celery", "starlette")]
    script = (
        "import telemetry, prometheus_client\n"
        "from sqlalchemy import create_engine, text\n"
        "telemetry.instrument(service='core')\n"
        "engine = create_engine('sqlite://', pool_logging_name='core')\n"
        "with engine.connect() as c: c.execute(text('select 1'))\n"
        "print(prometheus_client.generate_latest().decode())\n"
    )
    out = subprocess.run([str(python), "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=str(tmp_path), env={k: v for k, v in os.environ.items() if not k.startswith(("TELEMETRY_", "OTEL_"))})  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert 'db_pool_checkouts_total{pool="core",result="ok",service="core"} 1.0' in out.stdout
    assert 'db_pool_connections_in_use{pid="' in out.stdout


def test_instrument_sqlalchemy_alone_exports(tmp_path):
    """instrument_sqlalchemy(engine) without instrument(): what it counts is on /metrics."""
    script = (
        "import telemetry, prometheus_client\n"
        "from sqlalchemy import create_engine, text\n"
        "engine = create_engine('sqlite://')\n"
        "telemetry.instrument_sqlalchemy(engine, name='only')\n"
        "with engine.connect() as c: c.execute(text('select 1'))\n"
        "print(prometheus_client.generate_latest().decode())\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    assert out.returncode == 0, out.stderr
    assert 'db_pool_checkouts_total{pool="only",result="ok"' in out.stdout
