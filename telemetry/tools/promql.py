"""PromQL text, the little the generators need: add a label selector to every metric of the
package in an expression, as monitoring mixins scope their rules and dashboards
(``job="api"``, ``namespace="prod"``)."""

from __future__ import annotations

import functools
import re

from telemetry._core.catalogue import CATALOGUE, HISTOGRAM

_SELECTOR = re.compile(r'^\s*[a-zA-Z_][a-zA-Z0-9_]*\s*(=|!=|=~|!~)\s*"(?:[^"\\]|\\.)*"\s*$')


def check_selector(selector: str) -> str:
    """``job="api", namespace=~"prod|staging"`` -> the same, trimmed; ValueError otherwise."""
    parts = [p for p in _split(selector) if p.strip()]
    for part in parts:
        if not _SELECTOR.match(part):
            raise ValueError(f"selector {selector!r}: expected label matchers such as job=\"api\", "
                             "namespace=~\"prod|staging\" (comma-separated)")
    return ", ".join(p.strip() for p in parts)


def _split(selector: str) -> list[str]:
    """Split on commas outside quotes."""
    out, current, quoted, escaped = [], "", False, False
    for ch in selector:
        if escaped:
            current, escaped = current + ch, False
            continue
        if ch == "\\":
            current, escaped = current + ch, True
            continue
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            out.append(current)
            current = ""
            continue
        current += ch
    out.append(current)
    return out


@functools.cache
def _names() -> re.Pattern[str]:
    names: set[str] = set()
    for spec in CATALOGUE.values():
        names.add(spec.name)
        if spec.kind == HISTOGRAM:
            names.update(f"{spec.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
    alternatives = "|".join(sorted((re.escape(n) for n in names), key=len, reverse=True))
    # a metric name: not part of a longer name or of a recording rule's name (colons), not a
    # label value (inside quotes: label values here never contain a metric name's shape alone)
    return re.compile(rf'(?<![\w:"])({alternatives})(?![\w:"])(\s*\{{)?')


def with_selector(expr: str, selector: str) -> str:
    """``expr`` with ``selector`` added to each of the package's metrics it names."""
    if not selector:
        return expr

    def add(match: re.Match[str]) -> str:
        name, brace = match.group(1), match.group(2)
        return f"{name}{{{selector}, " if brace else f"{name}{{{selector}}}"

    return _names().sub(add, expr)
