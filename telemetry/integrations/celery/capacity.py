"""Celery capacity: queue backlog measured at the broker, and worker slots in the prefork parent.

**Backlog.** Every process that publishes to a queue or consumes one (a worker parent) knows the
queue and its broker. One process per host per queue polls the broker every
``celery_backlog_interval_seconds`` (leadership: a record lock per broker and queue in the
multiprocess directory, as for the shared view), in a thread of its own, through a client
outside every instrumented pool:

* Redis: ``LLEN`` of the queue's list and of the priority lists kombu creates
  (``<queue><sep><step>`` for the transport's ``priority_steps``); the oldest message is the
  tail of each list (``LINDEX -1``), aged by the ``telemetry_published_at`` header the package
  stamps at publish;
* kombu's SQLAlchemy transport: visible rows of ``kombu_message`` per queue, the oldest row's
  publish stamp from its payload.

Figures are host-wide gauges (``celery_queue_length``, ``celery_queue_oldest_message_seconds``);
failures are counted by reason and the last values marked stale.

**Slots.** In a worker's parent (``worker_ready``): the pool size (concurrency), the requests
executing (busy children) and reserved (received, prefetched, not started) by queue, from
``celery.worker.state``, and children replaced (``max_tasks_per_child``, crashes), from the pool's
creation of processes (billiard's ``_create_worker_process``, wrapped on the worker's own pool
object), read by the housekeeper tick.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
import weakref
from typing import Any

from telemetry._core import urls as _urls
from telemetry._core.leader import Leader
from telemetry._core.log import emit, hook_error
from telemetry._core.settings import mask_url
from telemetry._core.stats import REGISTRY, LabeledStats

#: the header a published task carries its publish time in (the queue-wait histogram reads it)
HEADER = "telemetry_published_at"

#: at most this many queues are polled per process (queues come from code, not from input)
MAX_QUEUES = 100


class _Backlog:
    """Host-wide backlog figures (replaced at each poll) and the poll's own counters."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._lock = threading.Lock()
        self.values: dict[tuple[str, str], tuple[int, float | None]] = {}  # (broker, queue) -> (n, age)
        self.errors: dict[str, int] = {}
        self.up: int | None = None

    def samples(self) -> Any:
        with self._lock:
            values, errors, up = dict(self.values), dict(self.errors), self.up
        for (broker, queue), (n, age) in values.items():
            lb = (("broker", broker), ("queue", queue))
            yield "celery_queue_length", lb, n
            if age is not None:
                yield "celery_queue_oldest_message_seconds", lb, age
        if up is not None:
            yield "celery_backlog_view_up", (), up
        for reason, n in errors.items():
            yield "celery_backlog_errors_total", (("reason", reason),), n


BACKLOG = _Backlog()
REGISTRY.add(BACKLOG)
SLOTS = LabeledStats()
REGISTRY.add(SLOTS)


def broker_name(url: str) -> str:
    """``redis://:pw@host:6379/0`` -> ``redis://host:6379/0``: no user, no password (whatever
    characters it holds), no query."""
    try:
        u = _urls.parse(url)
    except ValueError:
        return mask_url(url)
    return f"{u.scheme}://{u.netloc()}{u.path}"


def _close(client: Any) -> None:
    """A broker client and every socket it holds: an engine is disposed; a redis-py client over a
    pool of our own closes nothing of the pool (``auto_close_connection_pool`` is off when a pool
    is given), so the pool is disconnected too."""
    if client is None:
        return
    with contextlib.suppress(Exception):
        if hasattr(client, "dispose"):
            client.dispose()
            return
        client.close()
        client.connection_pool.disconnect()


class _Queue:
    __slots__ = ("broker_url", "transport", "queue", "options", "leader")

    def __init__(self, broker_url: str, transport: str, queue: str, options: dict[str, Any],
                 directory: str | None) -> None:  # fmt: skip
        self.broker_url, self.transport, self.queue, self.options = broker_url, transport, queue, options
        digest = hashlib.sha1(f"{broker_name(broker_url)} {queue}".encode()).hexdigest()[:16]
        self.leader = Leader(directory, f"telemetry-celery-backlog-{digest}.lock")


class BacklogPoller:
    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.queues: dict[tuple[str, str], _Queue] = {}
        self.ignored: set[tuple[str, str]] = set()
        self._urls: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        self.clients: dict[str, Any] = {}
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None
        self.logged: set[str] = set()
        self._lock = threading.Lock()

    def watch(self, app: Any, queue: str) -> None:
        """Poll ``queue`` of ``app``'s broker from now on (idempotent, cheap when known)."""
        if not queue:
            return
        try:
            url = self._urls[app]
        except (KeyError, TypeError):
            conf = app.conf  # Celery's settings lookups cost microseconds: once per app
            url = str(conf.broker_url or conf.broker_read_url or "")
            with contextlib.suppress(TypeError):
                self._urls[app] = url
        key = (url, queue)
        if key in self.queues or key in self.ignored:
            return
        conf = app.conf
        scheme = url.split("://", 1)[0].lower()
        transport = "redis" if scheme in ("redis", "rediss") else "sqlalchemy" if scheme.startswith(("sqla", "sqlalchemy")) else ""
        if not transport or len(self.queues) >= MAX_QUEUES:
            # AMQP and others (RabbitMQ reports its queues itself, see docs), or too many queues
            if len(self.ignored) < 10 * MAX_QUEUES:
                self.ignored.add(key)
            return
        options = dict(conf.broker_transport_options or {})
        with self._lock:
            self.queues.setdefault(key, _Queue(url, transport, queue, options, self.settings.multiproc_dir))
            if self.thread is None or not self.thread.is_alive():
                self.stop_event = threading.Event()
                self.thread = threading.Thread(target=self._run, name="telemetry-celery-backlog", daemon=True)
                self.thread.start()

    def _run(self) -> None:
        interval = self.settings.celery_backlog_interval_seconds
        stop = self.stop_event
        try:
            while not stop.is_set():
                t0 = time.monotonic()
                for q in list(self.queues.values()):
                    try:
                        if q.leader.acquire():
                            self._poll(q)
                    except Exception as exc:
                        hook_error("celery.backlog", exc)
                stop.wait(max(0.05, interval - (time.monotonic() - t0)))
        finally:
            self.close()

    def _poll(self, q: _Queue) -> None:
        try:
            if q.transport == "redis":
                n, age = self._redis(q)
            else:
                n, age = self._sqlalchemy(q)
        except Exception as exc:
            reason = _reason(exc)
            with BACKLOG._lock:
                BACKLOG.errors[reason] = BACKLOG.errors.get(reason, 0) + 1
                BACKLOG.up = 0
            _close(self.clients.pop(q.broker_url, None))  # its sockets too, not left to the collector
            if q.broker_url not in self.logged:
                self.logged.add(q.broker_url)
                emit("warning", "telemetry_celery_backlog_failed", broker=broker_name(q.broker_url),
                     queue=q.queue, reason=reason, error=str(exc).splitlines()[0][:200] if str(exc) else "",
                     message="celery_queue_length keeps its last values (celery_backlog_view_up 0)")  # fmt: skip
            return
        self.logged.discard(q.broker_url)
        with BACKLOG._lock:
            BACKLOG.values[(broker_name(q.broker_url), q.queue)] = (n, age)
            BACKLOG.up = 1

    # ---------------------------------------------------------------- brokers

    def _redis(self, q: _Queue) -> tuple[int, float | None]:
        client = self.clients.get(q.broker_url)
        if client is None:
            import redis

            timeout = self.settings.shared_view_timeout_seconds
            pool = redis.ConnectionPool.from_url(q.broker_url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                                 max_connections=2)  # fmt: skip
            with contextlib.suppress(Exception):
                from telemetry.integrations import redis as _redis

                _redis.exclude(pool)
            client = self.clients[q.broker_url] = redis.Redis(connection_pool=pool)
        sep = str(q.options.get("sep", "\x06\x16"))
        steps = list(q.options.get("priority_steps", [0, 3, 6, 9]))
        keys = [q.queue] + [f"{q.queue}{sep}{step}" for step in steps if step]
        with client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.llen(key)
                pipe.lindex(key, -1)
            replies = pipe.execute()
        total, oldest = 0, None
        now = time.time()
        for n, tail in zip(replies[0::2], replies[1::2], strict=True):
            total += int(n or 0)
            published = _published_at(tail)
            if published is not None:
                oldest = published if oldest is None else min(oldest, published)
        if total == 0:
            return 0, 0.0  # nothing waits: the oldest message is 0 s old (absent would mean unknown)
        return total, (round(max(0.0, now - oldest), 3) if oldest is not None else None)

    def _sqlalchemy(self, q: _Queue) -> tuple[int, float | None]:
        from sqlalchemy import create_engine, text
        from sqlalchemy.pool import NullPool

        engine = self.clients.get(q.broker_url)
        if engine is None:
            url = q.broker_url.split("+", 1)[1] if "+" in q.broker_url.split("://", 1)[0] else q.broker_url
            engine = self.clients[q.broker_url] = create_engine(url, poolclass=NullPool,
                                                                pool_logging_name="telemetry-internal")  # fmt: skip
        messages = str(q.options.get("message_tablename", "kombu_message"))
        queues = str(q.options.get("queue_tablename", "kombu_queue"))
        where = f"from {messages} m join {queues} q on m.queue_id = q.id where q.name = :name and m.visible"
        with engine.connect() as conn:
            n = conn.execute(text(f"select count(*) {where}"), {"name": q.queue}).scalar()
            # the oldest row's payload carries the publish stamp (kombu sets its timestamp column
            # only when a consumer touches the row)
            payload = conn.execute(text(f"select m.payload {where} order by m.id limit 1"), {"name": q.queue}).scalar()
        if not n:
            return 0, 0.0
        published = _published_at(payload)
        return int(n), (round(max(0.0, time.time() - published), 3) if published is not None else None)

    def close(self) -> None:
        for client in list(self.clients.values()):
            _close(client)
        self.clients.clear()

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread is not None and self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=self.settings.shared_view_timeout_seconds + 5)
        for q in self.queues.values():
            q.leader.release()

    def after_fork(self) -> None:
        """The parent's thread, clients and locks are not the child's: start over, empty."""
        for q in self.queues.values():
            q.leader.release()  # record locks are not inherited: close the copied fd
        self.queues.clear()
        self.ignored.clear()
        self.clients.clear()
        self.thread = None
        self._lock = threading.Lock()


def _published_at(raw: Any) -> float | None:
    if not raw:
        return None
    try:
        message = json.loads(raw)
        value = (message.get("headers") or {}).get(HEADER)
        return float(value) if value is not None else None
    except (ValueError, TypeError, AttributeError):
        return None


def _reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__} {exc}".lower()
    if "timeout" in text or "timed out" in text:
        return "timeout"
    if "refused" in text or "connection" in text:
        return "refused"
    if "auth" in text or "password" in text:
        return "auth"
    return "error"


# --------------------------------------------------------------------------- worker slots


class Slots:
    """The worker parent's pool: size, busy and reserved by queue, children replaced."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.consumer: Any = None
        self.worker = ""
        self.pids: set[int] = set()
        self.replaced = 0
        self.exact = False  # counting at the pool's own process creation
        self.seen_queues: set[str] = set()

    def attach(self, consumer: Any, queues: list[str]) -> None:
        self.consumer = consumer
        self.worker = str(getattr(consumer, "hostname", "") or "worker")
        self.pids = set(self._pool_pids())
        self.seen_queues = set(queues[:MAX_QUEUES])  # each consumed queue reads 0 from the start
        # every child the pool starts from now on replaces one (billiard's _create_worker_process,
        # called in this parent): exact even for children that live a few milliseconds, which
        # sampling the pids would miss
        pool = getattr(getattr(consumer, "pool", None), "_pool", None)
        create = getattr(pool, "_create_worker_process", None)
        if create is not None and not getattr(create, "_telemetry", False):

            def counted(*args: Any, **kwargs: Any) -> Any:
                self.replaced += 1
                return create(*args, **kwargs)

            counted._telemetry = True  # type: ignore[attr-defined]
            pool._create_worker_process = counted  # type: ignore[union-attr]
            self.exact = True

    def _pool_pids(self) -> list[int]:
        pool = getattr(getattr(self.consumer, "pool", None), "_pool", None)
        processes = getattr(pool, "_pool", None) or []
        return [p.pid for p in list(processes) if getattr(p, "pid", None)]

    def tick(self) -> None:
        if self.consumer is None:
            return
        from celery.worker import state

        size = getattr(getattr(self.consumer, "pool", None), "num_processes", None)
        if size is None:
            size = getattr(getattr(self.consumer, "controller", None), "concurrency", None)
        busy = _by_queue(state.active_requests)
        # Celery's reserved_requests holds every request received and not finished, the
        # executing ones too: reserved here is what waits for a slot
        received = _by_queue(state.reserved_requests)
        reserved = {q: max(0, n - busy.get(q, 0)) for q, n in received.items()}
        if not self.exact:  # another pool: new pids seen at each tick (misses very short lives)
            for pid in self._pool_pids():
                if pid not in self.pids:
                    self.pids.add(pid)
                    self.replaced += 1
            if len(self.pids) > 10_000:  # a long-lived worker recycling children: keep the newest
                self.pids = set(self._pool_pids())
        lb = SLOTS.labels
        if size is not None:
            SLOTS.set("celery_worker_pool_size", lb("celery_worker_pool_size", self.service, self.worker), int(size))
        self.seen_queues |= set(busy) | set(reserved)
        for queue in self.seen_queues:
            SLOTS.set("celery_worker_busy", lb("celery_worker_busy", self.service, self.worker, queue), busy.get(queue, 0))
            SLOTS.set("celery_worker_reserved", lb("celery_worker_reserved", self.service, self.worker, queue),
                      reserved.get(queue, 0))  # fmt: skip
        cell = SLOTS.counter_cell("celery_worker_children_replaced_total",
                                  lb("celery_worker_children_replaced_total", self.service, self.worker))  # fmt: skip
        cell[0] = self.replaced


def _by_queue(requests: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for _ in range(3):  # the worker's thread mutates the set: retry a torn iteration
        try:
            items = list(requests)
            break
        except RuntimeError:
            continue
    else:
        return out
    for request in items:
        info = getattr(request, "delivery_info", None) or {}
        queue = str(info.get("routing_key") or info.get("exchange") or "default")
        out[queue] = out.get(queue, 0) + 1
    return out


__all__ = ["BACKLOG", "SLOTS", "BacklogPoller", "Slots", "broker_name"]
