"""The bottom layer of the live tools' findings: one finding (kind, sentence, service), the
samples of one metric, host-wide gauges merged across hosts (max) or summed across hosts (owners
each host names for itself), and the owners the server view joined to their connections."""

from __future__ import annotations

import dataclasses

from .samples import Samples

#: the label that says which host a sample came from (``--metrics-url``: one URL per host)
HOST_LABEL = "__telemetry_host"


def rows(samples: Samples, name: str) -> list[tuple[dict[str, str], float]]:
    return [(lb, v) for n, lb, v in samples if n == name]


def merged(samples: Samples, name: str, keys: tuple[str, ...]) -> dict[tuple[str, ...], float]:
    """Host-wide gauge, deduplicated across hosts (max)."""
    out: dict[tuple[str, ...], float] = {}
    for lb, v in rows(samples, name):
        key = tuple(lb.get(k, "") for k in keys)
        out[key] = max(out.get(key, v), v)
    return out


def host_of(labels: dict[str, str]) -> str:
    """Which host a sample describes: its ``--metrics-url``, or Prometheus' ``instance`` without
    the port (one host may serve several scraped endpoints of the same aggregate)."""
    if HOST_LABEL in labels:
        return labels[HOST_LABEL]
    instance = labels.get("instance", "")
    return instance.rsplit(":", 1)[0] if instance.count(":") == 1 else instance


def across_hosts(samples: Samples, name: str, keys: tuple[str, ...]) -> dict[tuple[str, ...], float]:
    """A host-wide gauge that each host knows only for itself (owners: a host's poller names
    only its own processes' connections): max within a host, summed across hosts."""
    per_host: dict[tuple[str, tuple[str, ...]], float] = {}
    for lb, v in rows(samples, name):
        where = (host_of(lb), tuple(lb.get(k, "") for k in keys))
        per_host[where] = max(per_host.get(where, v), v)
    out: dict[tuple[str, ...], float] = {}
    for (_h, labels), v in per_host.items():
        out[labels] = out.get(labels, 0.0) + v
    return out


@dataclasses.dataclass(frozen=True)
class Finding:
    """One finding: its kind (what a reader such as the demo's report selects on, never the
    text), the sentence, the service it is about when it is about one, and whether it is a
    failure (a Redis pool that only ran full, with no checkout failing, is not)."""

    kind: str
    text: str
    service: str = ""
    severe: bool = True

    @property
    def body(self) -> str:
        """The sentence without its leading label (``"pgbouncer: "``)."""
        return self.text.split(": ", 1)[1] if ": " in self.text else self.text


def owners(samples: Samples, state: str | None = None) -> dict[tuple[str, str], float]:
    by_owner = across_hosts(samples, "db_server_connections_by_owner", ("service", "owner", "state"))
    out: dict[tuple[str, str], float] = {}
    for (service, owner, st), n in by_owner.items():
        if state is None or st == state:
            out[(service, owner)] = out.get((service, owner), 0) + n
    return out


def fmt_owners(by_owner: dict[tuple[str, str], float], limit: int = 5) -> str:
    top = sorted(by_owner.items(), key=lambda kv: -kv[1])[:limit]
    return ", ".join(f"{service} {owner!r} ({n:.0f})" for (service, owner), n in top)
