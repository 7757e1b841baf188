"""Label values that come from outside the process, each bounded.

Anyone who can reach the API chooses a request's method and path; any client of the database
chooses its ``application_name``; any producer chooses the task and queue names in its messages.
Each such label keeps at most a documented number of distinct values (docs/reliability.md); a
value past the cap is folded into a catch-all and counted in
``telemetry_label_values_folded_total{label}``, so memory, every scrape and the Prometheus behind
it stay bounded whatever arrives. The first values seen keep their names: a label's series do not
churn once the cap is reached.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from .log import INTERNAL
from .stats import REGISTRY, Sample

#: RFC 9110's methods plus PATCH (RFC 5789); anything else is ``_OTHER``, as OpenTelemetry's HTTP
#: conventions record it (the span keeps the original in ``http.request.method_original``)
KNOWN_METHODS = frozenset({"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"})
OTHER_METHOD = "_OTHER"
OTHER = "other"


def http_method(method: str) -> str:
    return method if method in KNOWN_METHODS else OTHER_METHOD


def http_status(status: int) -> str:
    """A response status as a label: 100-599, anything else ``other`` (at most 501 values)."""
    return str(status) if 100 <= status <= 599 else OTHER


class Capped:
    """At most ``cap`` distinct values of one label; later new values read ``fold``. The check
    is a set lookup for a value already seen; the slow path takes a lock."""

    __slots__ = ("label", "cap", "fold", "seen", "_lock")

    def __init__(self, label: str, cap: int, fold: str = OTHER) -> None:
        self.label, self.cap, self.fold = label, cap, fold
        self.seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self.seen:
            return value
        if value == self.fold:
            return value
        with self._lock:
            if value in self.seen:
                return value
            if len(self.seen) < self.cap:
                self.seen.add(value)
                return value
        FOLDED.count(self.label)
        return self.fold

    def reset(self) -> None:
        self._lock = threading.Lock()
        self.seen = set()


class _Folded:
    """``telemetry_label_values_folded_total``: values folded per label, in this process."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def count(self, label: str) -> None:
        with self._lock:
            self.counts[label] = self.counts.get(label, 0) + 1

    def samples(self) -> Iterable[Sample]:
        service = ("service", INTERNAL.service)
        for label, n in list(self.counts.items()):
            yield "telemetry_label_values_folded_total", (service, ("label", label)), n

    def reset(self) -> None:
        self._lock = threading.Lock()
        self.counts = {}


FOLDED = _Folded()
REGISTRY.add(FOLDED)

#: the caps (docs/reliability.md lists them with what happens past each)
ROUTES = Capped("route", 1000)
TASKS = Capped("task", 500)
QUEUES = Capped("queue", 100)
#: server and pooler clients: ``service/pid@host`` names are ours (their service part), any other
#: name is a foreign application; a client that rotates its name churns neither
SERVICES = Capped("application", 100)
FOREIGN = Capped("application", 20)
#: statement texts (literals removed) the server view names as running now, per deployment
STATEMENTS = Capped("statement", 50)
#: the calls (CLIENT span names) a transaction awaited
CALLS = Capped("call", 50)
ALL = (ROUTES, TASKS, QUEUES, SERVICES, FOREIGN, STATEMENTS, CALLS)


class ServerOwners:
    """The owners the server view names (read from statement tags and the processes' owner
    rows): at most ``cap`` per service, as a pool's owner label is (``TELEMETRY_MAX_OWNERS``),
    later new ones read ``other``, counted as folds of the label ``owner``."""

    def __init__(self, cap: int = 100) -> None:
        self.cap = cap
        self.by_service: dict[str, Capped] = {}
        self._lock = threading.Lock()

    def __call__(self, service: str, owner: str) -> str:
        if not owner:
            return owner
        capped = self.by_service.get(service)
        if capped is None:
            with self._lock:  # services are capped themselves (SERVICES): a bounded dict
                capped = self.by_service.setdefault(service, Capped("owner", self.cap))
        return capped(owner)

    def reset(self) -> None:
        self._lock = threading.Lock()
        self.by_service = {}


SERVER_OWNERS = ServerOwners()


def reset() -> None:
    """Forget what was seen (uninstrument, and a forked child starts clean)."""
    for cap in ALL:
        cap.reset()
    SERVER_OWNERS.reset()
    FOLDED.reset()
