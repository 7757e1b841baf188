"""The stack, checked statically (no Docker engine runs here): the compose file parses, pins its
images, mounts only committed files read-only, health-checks and orders its services, ships no
admin password; the collector config is checked against the documented schema of the components
it uses; Prometheus and Alertmanager configs pass promtool and amtool with the compose mounts
resolved to the repository's files."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import yaml

from tests import ROOT

from ... import services


def _yaml(rel: str) -> dict:
    with open(os.path.join(ROOT, rel)) as fh:
        return yaml.safe_load(fh)


COMPOSE = _yaml("docker-compose.observability.yml")
COLLECTOR = _yaml("collector/otel-collector.yaml")


def _source(spec: str) -> tuple[str, str, str]:
    src, _, rest = spec.partition(":")
    dest, _, mode = rest.partition(":")
    src = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", src)  # ${VAR:-default} -> default
    return src, dest, mode


def _mounts() -> dict[str, str]:
    """container path -> repository path, for every bind mount of a repository file."""
    out = {}
    for svc in COMPOSE["services"].values():
        for spec in svc.get("volumes", []):
            src, dest, _ = _source(spec)
            if src.startswith("./"):
                out[dest] = os.path.join(ROOT, src[2:])
    return out


def test_compose_services_images_and_health():
    services_ = COMPOSE["services"]
    assert set(services_) == {"otel-collector", "prometheus", "alertmanager", "grafana", "loki", "tempo"}
    for name, svc in services_.items():
        image = svc["image"]
        assert re.search(r":v?\d+\.\d+\.\d+$", image), f"{name}: image not pinned: {image}"
        assert svc.get("mem_limit"), f"{name}: no memory limit"
        if name != "otel-collector":  # the contrib image has no shell or wget (documented)
            assert svc["healthcheck"]["test"][0] == "CMD", name
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert cond == {"condition": "service_healthy"}, (name, dep)
            assert "healthcheck" in services_[dep], (name, dep)


def test_compose_mounts_committed_files_read_only():
    for name, svc in COMPOSE["services"].items():
        for spec in svc.get("volumes", []):
            src, dest, mode = _source(spec)
            if not src.startswith("./"):
                continue  # named data volumes
            assert mode == "ro", f"{name}: {spec} must be read-only"
            assert os.path.exists(os.path.join(ROOT, src[2:])), f"{name}: {src} does not exist"
    assert os.path.exists(os.path.join(ROOT, "secrets", "README.md"))


def test_no_default_admin_password():
    env = COMPOSE["services"]["grafana"]["environment"]
    assert "GF_SECURITY_ADMIN_PASSWORD" not in env
    assert env["GF_SECURITY_ADMIN_PASSWORD__FILE"] == "/run/secrets/grafana_admin_password"
    assert COMPOSE["secrets"]["grafana_admin_password"]["file"].startswith("./secrets/")
    with open(os.path.join(ROOT, ".gitignore")) as fh:
        assert "/secrets/*" in fh.read()


# The documented configuration keys of the collector components used here (contrib 0.115).
SCHEMA = {
    "receivers": {
        "otlp": {"protocols": {"grpc": {"endpoint"}, "http": {"endpoint"}}},
        "filelog": {"include", "exclude", "start_at", "operators", "include_file_path", "poll_interval"},
    },
    "processors": {
        "memory_limiter": {"check_interval", "limit_mib", "spike_limit_mib", "limit_percentage", "spike_limit_percentage"},
        "batch": {"timeout", "send_batch_size", "send_batch_max_size"},
    },
    "exporters": {
        "otlp": {"endpoint", "tls", "sending_queue", "retry_on_failure", "timeout", "compression", "headers"},
        "otlphttp": {"endpoint", "logs_endpoint", "traces_endpoint", "tls", "sending_queue", "retry_on_failure",
                     "timeout", "compression", "headers"},
    },
    "extensions": {"health_check": {"endpoint", "path"}},
}  # fmt: skip
OPERATORS = {"json_parser", "trace_parser", "copy", "move", "regex_parser", "severity_parser", "time_parser"}


def _check_keys(kind: str, name: str, body: dict, allowed: object) -> None:
    if isinstance(allowed, dict):
        assert set(body) <= set(allowed), f"{kind}/{name}: unknown keys {set(body) - set(allowed)}"
        for key, sub in body.items():
            if isinstance(sub, dict):
                _check_keys(kind, f"{name}.{key}", sub, allowed[key])
    else:
        assert set(body) <= set(allowed), f"{kind}/{name}: unknown keys {set(body) - set(allowed)}"  # type: ignore[call-overload]


def test_collector_config_against_the_component_schema():
    for kind in ("receivers", "processors", "exporters", "extensions"):
        for full, body in COLLECTOR[kind].items():
            ctype = full.split("/")[0]
            assert ctype in SCHEMA[kind], f"{kind}: {ctype} is not a component this check knows"
            _check_keys(kind, full, body or {}, SCHEMA[kind][ctype])
    for op in COLLECTOR["receivers"]["filelog"]["operators"]:
        assert op["type"] in OPERATORS
    service = COLLECTOR["service"]
    assert service["extensions"] == ["health_check"]
    assert set(service["pipelines"]) == {"traces", "logs"}
    for name, pipeline in service["pipelines"].items():
        assert pipeline["processors"][0] == "memory_limiter", name  # first, as documented
        assert "batch" in pipeline["processors"], name
        for kind in ("receivers", "processors", "exporters"):
            for comp in pipeline[kind]:
                assert comp in COLLECTOR[kind], f"{name}: {comp} not defined"
    for name, body in COLLECTOR["exporters"].items():
        assert re.fullmatch(r"\$\{env:[A-Z_]+\}", body["endpoint"]), f"{name}: endpoint must come from the environment"
        var = body["endpoint"][6:-1]
        assert var in COMPOSE["services"]["otel-collector"]["environment"], var


def test_logs_keep_what_the_log_queries_need():
    """trace_id/span_id become the record's trace context, service becomes the Loki stream label
    the shipped LogQL selects on."""
    ops = {op["type"]: op for op in COLLECTOR["receivers"]["filelog"]["operators"]}
    assert ops["trace_parser"]["trace_id"]["parse_from"] == "attributes.trace_id"
    assert ops["trace_parser"]["span_id"]["parse_from"] == "attributes.span_id"
    assert ops["copy"]["to"] == "resource.service"
    loki = _yaml("collector/loki.yaml")
    labels = loki["limits_config"]["otlp_config"]["resource_attributes"]["attributes_config"][0]
    assert labels["action"] == "index_label" and "service" in labels["attributes"]
    assert loki["limits_config"]["allow_structured_metadata"] is True
    for name in os.listdir(os.path.join(ROOT, "alerts", "logql")):
        with open(os.path.join(ROOT, "alerts", "logql", name)) as fh:
            query = [line for line in fh if not line.startswith("#")][0]
        # per-service events select the alert's service; the shared view's come from whichever
        # process polls the server, so they select every service stream
        selector = '{service=~".+"}' if name.startswith(("db_lock_wait", "db_idle_in", "db_pooler")) else '{service="$service"}'
        assert query.startswith(selector + " | json | event="), name


@pytest.mark.integration
def test_prometheus_config_passes_promtool_with_mounts_resolved(tmp_path):
    promtool = services.binary("promtool", "prometheus")
    config = _yaml("collector/prometheus.yml")
    mounts = _mounts()
    config["rule_files"] = [mounts[p] for p in config["rule_files"]]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    out = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


@pytest.mark.integration
def test_alertmanager_config_passes_amtool_with_mounts_resolved(tmp_path):
    amtool = services.binary("amtool", "prometheus-alertmanager")
    mounts = _mounts()
    with open(mounts["/etc/alertmanager/alertmanager.yml"]) as fh:
        text = fh.read()
    text = text.replace("/etc/alertmanager/templates", mounts["/etc/alertmanager/templates"])
    path = tmp_path / "alertmanager.yml"
    path.write_text(text)
    out = subprocess.run([amtool, "check-config", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 templates" in out.stdout and "SUCCESS" in out.stdout
