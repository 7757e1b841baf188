"""Side-by-side measurement in one process: batches alternate between uninstrumented and
instrumented (``uninstrument()`` / ``instrument()`` patch and restore at class level between
batches). On a noisy 2-core machine the spread between processes is larger than the ~1 us
measured; inside one process it is not. Used by ``pool_ab.py`` and ``redis_pool.py``."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def per_call_us(fn: Callable[[], Any], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def compare(fn: Callable[[], Any], batches: int, n: int, **settings: Any) -> tuple[list[float], list[float]]:
    """Microseconds per call of ``fn``, bare and instrumented with ``settings``, per batch."""
    import telemetry

    bare, instrumented = [], []
    for _ in range(batches):
        telemetry.uninstrument()
        per_call_us(fn, 1000)
        bare.append(per_call_us(fn, n))
        telemetry.instrument(service="bench", tracing=False, **settings)
        per_call_us(fn, 1000)
        instrumented.append(per_call_us(fn, n))
    telemetry.uninstrument()
    return bare, instrumented


def report(title: str, bare: list[float], instrumented: list[float]) -> None:
    deltas = [i - b for b, i in zip(bare, instrumented, strict=True)]
    print(title)
    print(f"  bare          best {min(bare):6.2f} us   median {statistics.median(bare):6.2f} us")
    print(f"  instrumented  best {min(instrumented):6.2f} us   median {statistics.median(instrumented):6.2f} us")
    print(f"  overhead      best-vs-best +{min(instrumented) - min(bare):.2f} us   "
          f"median of paired deltas +{statistics.median(deltas):.2f} us")  # fmt: skip
