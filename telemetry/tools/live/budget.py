"""Connection budget: processes x (pool_size + max_overflow) against the server's limit.

The incident report did this by hand twice (84, then 160, against ~50 real connections). Under load
every process grows to its maximum, so the worst case is what must fit.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from telemetry._core.settings import ConfigError


@dataclasses.dataclass(frozen=True)
class Service:
    name: str
    processes: int
    pool_size: int
    max_overflow: int

    @property
    def per_process(self) -> int:
        return self.pool_size + self.max_overflow

    @property
    def worst_case(self) -> int:
        return self.processes * self.per_process


@dataclasses.dataclass(frozen=True)
class Budget:
    limit: int
    services: tuple[Service, ...]
    reserved: int = 0

    @property
    def total(self) -> int:
        return sum(s.worst_case for s in self.services)

    @property
    def available(self) -> int:
        return self.limit - self.reserved

    @property
    def fits(self) -> bool:
        return self.total <= self.available


def _int(where: str, value: Any, low: int, meaning: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"invalid {where}={value!r}: expected a whole number >= {low} ({meaning})")
    return value


def from_mapping(data: Any, source: str = "budget") -> Budget:
    if not isinstance(data, dict):
        raise ConfigError(f"invalid {source}: expected a mapping with 'limit' and 'services'")
    unknown = sorted(set(data) - {"limit", "reserved", "services"})
    if unknown:
        raise ConfigError(f"invalid {source}: unknown key(s) {unknown}; accepted: limit, reserved, services")
    limit = _int(f"{source}: limit", data.get("limit"), 1, "connections the server or pooler allows")
    reserved = _int(f"{source}: reserved", data.get("reserved", 0), 0, "connections kept for admins")
    raw = data.get("services")
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"invalid {source}: services: expected a non-empty mapping name -> "
                          "{processes, pool_size, max_overflow}")  # fmt: skip
    services = []
    for name, spec in raw.items():
        where = f"{source}: services.{name}"
        if not isinstance(spec, dict):
            raise ConfigError(f"invalid {where}: expected {{processes, pool_size, max_overflow}}")
        extra = sorted(set(spec) - {"processes", "pool_size", "max_overflow"})
        if extra:
            raise ConfigError(f"invalid {where}: unknown key(s) {extra}; accepted: processes, pool_size, max_overflow")
        overflow = spec.get("max_overflow", 10)
        if overflow == -1:
            raise ConfigError(f"invalid {where}.max_overflow=-1: unbounded overflow has no worst case; "
                              "expected a whole number >= 0")  # fmt: skip
        services.append(Service(
            str(name),
            _int(f"{where}.processes", spec.get("processes"), 1, "processes that open a pool"),
            _int(f"{where}.pool_size", spec.get("pool_size", 5), 0, "SQLAlchemy pool_size"),
            _int(f"{where}.max_overflow", overflow, 0, "SQLAlchemy max_overflow"),
        ))  # fmt: skip
    return Budget(limit=limit, services=tuple(services), reserved=reserved)


_FLAG = re.compile(r"^(?P<name>[^=]+)=(?P<p>\d+)x(?P<size>\d+)\+(?P<over>\d+)$")


def from_flags(limit: int, services: list[str], reserved: int = 0) -> Budget:
    parsed: dict[str, Any] = {}
    for text in services:
        m = _FLAG.match(text.strip())
        if not m:
            raise ConfigError(f"invalid --service {text!r}: expected NAME=PROCESSESxPOOL_SIZE+MAX_OVERFLOW, "
                              "for example api=4x2+2")  # fmt: skip
        if m["name"] in parsed:  # kept silently, the last would hide the first's connections
            raise ConfigError(f"invalid --service {text!r}: the service {m['name']!r} is given twice; give each "
                              "service once, with all its processes (NAME=PROCESSESxPOOL_SIZE+MAX_OVERFLOW)")  # fmt: skip
        parsed[m["name"]] = {"processes": int(m["p"]), "pool_size": int(m["size"]),
                             "max_overflow": int(m["over"])}  # fmt: skip
    return from_mapping({"limit": limit, "reserved": reserved, "services": parsed}, "flags")


def render(budget: Budget) -> str:
    head = f"{'service':<28}{'processes':>10}{'pool_size':>11}{'max_overflow':>14}{'per process':>13}{'worst case':>12}"
    lines = [head, "-" * len(head)]
    for s in budget.services:
        lines.append(f"{s.name:<28}{s.processes:>10}{s.pool_size:>11}{s.max_overflow:>14}"
                     f"{s.per_process:>13}{s.worst_case:>12}")  # fmt: skip
    lines.append("-" * len(head))
    processes = sum(s.processes for s in budget.services)
    lines.append(f"{'total':<28}{processes:>10}{'':>11}{'':>14}{'':>13}{budget.total:>12}")
    limit = f"{budget.limit}" + (f" - {budget.reserved} reserved" if budget.reserved else "")
    lines.append(f"{'server/pooler limit':<28}{limit:>60}")
    if budget.fits:
        lines.append(f"fits: {budget.total} <= {budget.available} ({budget.available - budget.total} spare)")
    else:
        lines.append(f"does NOT fit: worst case {budget.total} > {budget.available} "
                     f"({budget.total - budget.available} over): under load, connects will fail or wait")  # fmt: skip
    return "\n".join(lines)


def load_yaml(text: str, source: str) -> Any:
    """The budget file, refusing a key given twice in one mapping (YAML keeps the last one
    silently: a service named twice would lose the first's connections)."""
    import yaml

    class Strict(yaml.SafeLoader):
        pass

    def mapping(loader: Any, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _value in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"invalid {source}: {key!r} is given twice (line {key_node.start_mark.line + 1}); "
                                  "give each service once, with all its processes")  # fmt: skip
            seen.add(key)
        return loader.construct_mapping(node, deep=deep)

    Strict.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return yaml.load(text, Loader=Strict)  # noqa: S506 - a SafeLoader subclass
