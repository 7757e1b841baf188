"""The bottom layer of the tools: a ``/metrics`` page read into samples, and the arithmetic every
tool does on them (sums by label, ``histogram_quantile`` as Prometheus computes it, pool usage
per service). It imports nothing of the tools."""

from __future__ import annotations

import math
from typing import Any

Samples = list[tuple[str, dict[str, str], float]]


def parse(text: str) -> Samples:
    from prometheus_client.parser import text_string_to_metric_families

    return [
        (s.name, dict(s.labels), s.value)
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    ]


def fetch_text(url: str, timeout: float = 10.0) -> str:
    """A ``/metrics`` page (http or https only)."""
    import urllib.request

    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--metrics-url {url!r}: expected an http:// or https:// URL")
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - scheme checked
        return str(response.read().decode())


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(
        v for n, lb, v in samples if n == name and all(lb.get(k) == w for k, w in labels.items())
    )


def values(samples: Samples, name: str, key: str, **labels: str) -> set[str]:
    return {
        lb[key]
        for n, lb, _ in samples
        if n == name and key in lb and all(lb.get(k) == w for k, w in labels.items())
    }


def quantile(q: float, samples: Samples, name: str, **labels: Any) -> float | None:
    """``histogram_quantile(q, sum by (le) (name_bucket{labels}))``; None without data."""
    routes = labels.pop("route_in", None)
    buckets: dict[float, float] = {}
    for n, lb, v in samples:
        if n != f"{name}_bucket" or not all(lb.get(k) == w for k, w in labels.items()):
            continue
        if routes is not None and lb.get("route") not in routes:
            continue
        le = math.inf if lb["le"] == "+Inf" else float(lb["le"])
        buckets[le] = buckets.get(le, 0) + v
    if not buckets:
        return None
    bounds = sorted(buckets)
    count = buckets[bounds[-1]]
    if count == 0:
        return None
    rank = q * count
    prev_bound, prev_count = 0.0, 0.0
    for bound in bounds:
        c = buckets[bound]
        if c >= rank:
            if math.isinf(bound):
                return prev_bound
            if c == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (c - prev_count)
        prev_bound, prev_count = bound, c
    return prev_bound


def usage_by_service(samples: Samples) -> dict[str, float]:
    """Busiest process's in_use / max, per service (the alert's view)."""
    in_use = {
        (lb["service"], lb["pool"], lb["pid"]): v
        for n, lb, v in samples
        if n == "db_pool_connections_in_use"
    }
    out: dict[str, float] = {}
    for n, lb, v in samples:
        if n == "db_pool_connections_max" and v > 0:
            key = (lb["service"], lb["pool"], lb["pid"])
            if key in in_use:
                out[lb["service"]] = max(out.get(lb["service"], 0.0), in_use[key] / v)
    return out
