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


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist and the wheel, built from this checkout as a release would be."""
    out = tmp_path_factory.mktemp("dist")
    # not from the checkout's directory: a leftover build/ there would shadow the build package
    build = subprocess.run([sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(out), str(ROOT)],
                           capture_output=True, text=True, timeout=900, cwd=str(out))  # fmt: skip
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return out


def test_the_built_distributions_pass_twine_and_carry_what_the_commands_read(dist: Path) -> None:
    import zipfile

    check = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *map(str, dist.iterdir())],
                           capture_output=True, text=True, timeout=300, cwd=str(dist))  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.count("PASSED") == 2
    wheel = next(dist.glob("poolsight-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("telemetry/tools/deploy/grafana/pools.dashboard.py", "telemetry/tools/deploy/templates/telemetry.tmpl",
                   "telemetry/tools/demo/pipeline/api.py", "telemetry/tools/demo/pipeline/worker.py"):  # fmt: skip
        assert needed in names, needed
    assert not [n for n in names if n.startswith(("tests/", "examples/", "docs/"))]


def test_from_the_wheel_a_user_writes_rules_routes_dashboards_and_runs_the_demo(dist: Path, tmp_path: Path) -> None:
    """A fresh virtualenv, the wheel with its demo extra, a working directory that is not a
    checkout: the three deployment commands write files that promtool and amtool accept, with
    the deployment's selector, thresholds and links; the embedded demo runs and reports."""
    from . import services

    promtool = services.binary("promtool", "prometheus")
    amtool = services.binary("amtool", "prometheus-alertmanager")
    python = _venv(tmp_path / "venv")
    wheel = next(dist.glob("poolsight-*.whl"))
    _pip(python, f"{wheel}[demo]")
    telemetry = str(python.parent / "telemetry")
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TELEMETRY_", "OTEL_", "PYTHONPATH"))}

    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        out = subprocess.run([telemetry, *args], capture_output=True, text=True, cwd=work, env=env, timeout=timeout)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return out

    # nothing comes from the checkout: the package is the installed one
    where = subprocess.run([str(python), "-c", "import telemetry; print(telemetry.__file__)"], capture_output=True,
                           text=True, cwd=work, env=env, check=True).stdout  # fmt: skip
    assert str(ROOT) not in where and "site-packages" in where
    run("rules", "--selector", 'job="api", namespace="prod"', "--usage-warning", "0.7",
        "--runbook-url", "https://runbooks.example.org/telemetry", "--out", "rules.yml")  # fmt: skip
    rules = (work / "rules.yml").read_text()
    assert 'db_pool_connections_in_use{job="api", namespace="prod"}' in rules
    assert "service_pool:db_pool_usage:max > 0.7" in rules
    assert "https://runbooks.example.org/telemetry/DbPoolUsageCritical.md" in rules
    check = subprocess.run([promtool, "check", "rules", str(work / "rules.yml")], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    run("alertmanager", "--out", "am", "--slack-channel", "#ops-db", "--pagerduty-key-file", "/run/secrets/pd")
    config = (work / "am" / "alertmanager.yml").read_text()
    assert "channel: '#ops-db'" in config and "routing_key_file: /run/secrets/pd" in config
    assert (work / "am" / "templates" / "telemetry.tmpl").read_text().count("define") >= 3
    check = subprocess.run([amtool, "check-config", str(work / "am" / "alertmanager.yml")], capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    run("dashboards", "--out", "grafana", "--selector", 'job="api"')
    boards = sorted(p.name for p in (work / "grafana").iterdir())
    assert boards == ["api.json", "celery.json", "overview.json", "pools.json", "server.json"]
    pools = json.loads((work / "grafana" / "pools.json").read_text())
    exprs = [t["expr"] for panel in pools["panels"] for t in panel.get("targets", [])]
    assert exprs and all('job="api"' in e for e in exprs)
    demo = run("demo", "--scenario", "seed", "--duration", "4", "--generations", "4", "--concepts", "4", "--rate", "8",
               "--llm-seconds", "0.1", "--save-seconds", "0.1", "--pool-timeout", "2", "--out", "demo-out",
               timeout=900)  # fmt: skip
    report = json.loads((work / "demo-out" / "report.json").read_text())
    assert [r["scenario"] for r in report["results"]] == ["seed"]
    assert report["results"][0]["tasks_succeeded"] == 4, demo.stdout[-2000:]
