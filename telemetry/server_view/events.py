"""The shared view's events (``db_lock_wait``, ``db_idle_in_transaction``, ``db_pooler_waiting``):
when a poll's rows start one, each reported once per episode (a lock wait, an idle transaction
keyed on its backend and ``xact_start``, a pooler queue re-reported every
``POOLER_EVENT_REPEAT_SECONDS``). A mixin of the poller, which keeps the episodes' state."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from typing import Any

from telemetry._core.log import emit, hook_error
from telemetry._core.multiprocess import EPISODES

from .model import Columns, Owners, app_label, chain_root, statement, wait_seconds
from .published import PUBLISHED

#: a pooler-queue episode is re-reported this often while it lasts
POOLER_EVENT_REPEAT_SECONDS = 30.0


#: where a leader tells the other hosts which episodes it reported (``LISTEN``/``NOTIFY`` on
#: the server: nothing to create): a host that takes over never reports them again
EVENT_CHANNEL = "telemetry_shared_view_events"
#: episodes heard of while following, at most (the oldest go first)
HEARD_MAX = 10_000
#: the host's reported episodes, in its multiprocess directory: a process that becomes the host's
#: leader when the last one exits reads them (the last one told the other hosts before it listened)
EPISODES_FILE = EPISODES
EPISODES_FILE_MAX_BYTES = 512 * 1024
EPISODES_KEPT = 1_000


class EventDetector:
    settings: Any
    locks_reported: Any
    idle_reported: Any
    pooler_episodes: Any
    told: list[str]  # the episodes this round reported, to be told to the other hosts
    pending: list[tuple[str, dict[str, Any]]]  # their events, emitted once told
    wait_for_token: Callable[[Any, list[tuple[dict[str, Any] | None, str]]], bool]  # tokens.TokenTable

    def heard(self, payload: str) -> None:
        """Another host's leader reported this episode: never report it again here."""
        try:
            kind, pid, started = payload.split("|")
            key = (int(pid), float(started))
        except ValueError:
            return  # not one of ours
        table = self.idle_reported if kind == "idle" else self.locks_reported if kind == "lock" else None
        if table is None:
            return
        table[key] = time.monotonic()
        if len(table) > HEARD_MAX:  # following for long: episodes that ended are never pruned
            for old in sorted(table, key=table.__getitem__)[: len(table) - HEARD_MAX]:
                del table[old]

    def _episodes_file(self) -> str | None:
        directory = getattr(self.settings, "multiproc_dir", None)
        return os.path.join(directory, EPISODES_FILE) if directory else None

    def recall(self) -> None:
        """Becoming this host's leader (the last one exited: a recycled worker): the episodes an
        earlier leader of the host reported are never reported again here. It told the other
        hosts through the server, before this process was listening."""
        path = self._episodes_file()
        if path is None:
            return
        try:
            with open(path) as fh:
                lines = fh.read().splitlines()[-HEARD_MAX:]
        except FileNotFoundError:
            return
        except OSError as exc:
            hook_error("shared_view.recall", exc)
            return
        for line in lines:
            self.heard(line)

    def _remember(self, told: list[str]) -> None:
        """This host's reported episodes, for the next leader of the host (bounded: rewritten
        with its last ``EPISODES_KEPT`` lines past ``EPISODES_FILE_MAX_BYTES``)."""
        path = self._episodes_file()
        if path is None:
            return
        try:
            with open(path, "a") as fh:
                fh.write("".join(f"{t}\n" for t in told))
                big = fh.tell() > EPISODES_FILE_MAX_BYTES
            if big:
                with open(path) as fh:
                    kept = fh.read().splitlines()[-EPISODES_KEPT:]
                with open(path + ".tmp", "w") as fh:
                    fh.write("".join(f"{t}\n" for t in kept))
                os.replace(path + ".tmp", path)
        except OSError as exc:
            hook_error("shared_view.remember", exc)

    def tell_sql(self) -> str | None:
        """One statement telling this round's reported episodes to the other hosts (and, through
        the multiprocess directory, to the next leader of this host)."""
        told, self.told = self.told, []
        if not told:
            return None
        self._remember(told)
        # payloads are ours: digits, dots and bars only
        values = ", ".join(f"'{t}'" for t in told if re.fullmatch(r"(idle|lock)\|\d+\|[0-9.e+-]+", t))
        return f"select pg_notify('{EVENT_CHANNEL}', v) from unnest(array[{values}]) v" if values else None

    def emit_pending(self) -> None:
        """The round's episode events, once the other hosts were told of them (a leader that
        dies between the two leaves an episode unreported, never reported twice)."""
        pending, self.pending = self.pending, []
        for event, fields in pending:
            self._count_event(event)
            emit("warning", event, **fields)

    def _count_event(self, event: str) -> None:
        with PUBLISHED._lock:
            PUBLISHED.events[event] = PUBLISHED.events.get(event, 0) + 1

    def _lock_events(self, locks: list[dict[str, Any]], rows: dict[int, dict[str, Any]],
                     owner_of: Callable[[dict[str, Any]], tuple[str, str, str, str]]) -> None:
        threshold = self.settings.lock_wait_event_seconds
        chain = {lk["pid"]: list(lk["blockers"] or []) for lk in locks}
        seen = set()
        for lk in locks:
            # one episode per blocked statement: waitstart reads null for a moment after the wait
            # began (the statement's start stands in), so keyed on it an episode changed key
            # between two polls and was reported twice (a loaded CI run)
            key = (lk["pid"], round(lk.get("statement_started") or lk["wait_started"] or 0.0, 3))
            seen.add(key)
            if key in self.locks_reported or (lk["waited"] or 0.0) < threshold:
                continue
            waiting = rows.get(lk["pid"])
            blockers = list(lk["blockers"] or [])
            blocker = rows.get(chain_root(blockers, chain)) if blockers else None
            if waiting is None:
                continue
            w_service, w_owner, w_host, w_trace = owner_of(waiting)
            fields: dict[str, Any] = {
                "blocked_service": w_service, "blocked_owner": w_owner or "unknown",
                "blocked_pid": lk["pid"], "blocked_host": w_host,
                "blocked_wait_seconds": round(lk["waited"] or 0.0, 3),
                "blocked_statement": statement(waiting["query"]),
                "relation": lk["relation"] or "", "lock_type": lk["locktype"], "mode": lk["mode"],
                "blocker_pids": blockers, "lock_key": f"{key[0]}:{key[1]}",
            }  # fmt: skip
            b_service, b_owner, b_host, b_trace = owner_of(blocker) if blocker is not None else ("", "", "", "")
            if self.wait_for_token(("lock", key), [(waiting, w_owner), (blocker, b_owner)]):
                continue
            if blocker is not None:
                fields.update(
                    blocker_service=b_service, blocker_owner=b_owner or "unknown",
                    blocker_pid=blocker["pid"], blocker_host=b_host,
                    blocker_state=blocker["state"],
                    blocker_xact_seconds=round(blocker["xact_age"] or 0.0, 3),
                    blocker_statement=statement(blocker["query"]),
                )  # fmt: skip
                if b_trace:
                    fields["blocker_trace_id"] = b_trace
            if w_trace:
                fields["trace_id"] = w_trace
            self.locks_reported[key] = time.monotonic()
            self.told.append(f"lock|{key[0]}|{key[1]!r}")
            self.pending.append(("db_lock_wait", fields))
        for key in [k for k in self.locks_reported if k not in seen]:
            del self.locks_reported[key]

    def _idle_events(self, activity: list[dict[str, Any]],
                     owner_of: Callable[[dict[str, Any]], tuple[str, str, str, str]]) -> None:
        threshold = self.settings.idle_in_transaction_event_seconds
        seen = set()
        for row in activity:
            if not row["state"].startswith("idle in transaction") or row["xact_age"] is None:
                continue
            # the server's own xact_start: one key per transaction, whatever this process's
            # clock or load (a key from our clock minus xact_age drifted and re-reported)
            key = (row["pid"], round(row.get("xact_start") or 0.0, 6))
            seen.add(key)
            if key in self.idle_reported or (row["state_age"] or 0.0) < threshold:
                continue
            service, owner, host, trace = owner_of(row)
            if self.wait_for_token(("idle", key), [(row, owner)]):
                continue
            fields: dict[str, Any] = {
                "idle_service": service, "idle_owner": owner or "unknown", "pid": row["pid"],
                "host": host, "state": row["state"],
                "idle_seconds": round(row["state_age"] or 0.0, 3),
                "xact_seconds": round(row["xact_age"] or 0.0, 3),
                "last_statement": statement(row["query"]),
            }  # fmt: skip
            if trace:
                fields["trace_id"] = trace
            self.idle_reported[key] = time.monotonic()
            self.told.append(f"idle|{key[0]}|{key[1]!r}")
            self.pending.append(("db_idle_in_transaction", fields))
        for key in [k for k in self.idle_reported if k not in seen]:
            del self.idle_reported[key]

    def _pooler_events(self, pooler: dict[str, Any], owners: Owners) -> None:
        now = time.monotonic()
        cols: Columns = pooler["cols"]
        for p in pooler["pools"]:
            database = str(p.get("database"))
            if database == "pgbouncer":
                continue
            if (cols.num("POOLS", p, "cl_waiting") or 0) <= 0:
                self.pooler_episodes.pop(database, None)
                continue
            maxwait = wait_seconds(cols, "POOLS", p, "maxwait", "maxwait_us") or 0.0
            if maxwait < self.settings.pooler_wait_event_seconds:
                continue
            last = self.pooler_episodes.get(database)
            if last is not None and now - last < POOLER_EVENT_REPEAT_SECONDS:
                continue
            self.pooler_episodes[database] = now
            holders: dict[tuple[str, str], int] = {}
            for sv in pooler["servers"]:
                client = pooler["by_ptr"].get(sv.get("link")) if sv.get("link") else None
                if client is None or str(sv.get("database")) != database:
                    continue
                service = app_label(client.get("application_name") or "")
                known = owners.peer(client.get("addr"), client.get("port"))
                owner = str(known.owner) if known else ""
                holders[(service, owner)] = holders.get((service, owner), 0) + 1
            waiting: dict[str, int] = {}
            for c in pooler["clients"]:
                if str(c.get("database")) == database and c.get("state") == "waiting":
                    app = app_label(c.get("application_name") or "")
                    waiting[app] = waiting.get(app, 0) + 1
            self._count_event("db_pooler_waiting")
            emit(
                "warning", "db_pooler_waiting", database=database, user=str(p.get("user")),
                clients_waiting=int(cols.num("POOLS", p, "cl_waiting") or 0),
                longest_wait_seconds=round(maxwait, 3),
                server_connections_active=int(cols.num("POOLS", p, "sv_active") or 0),
                holders=[{"service": sv, "owner": ow or "unknown", "server_connections": n}
                         for (sv, ow), n in sorted(holders.items(), key=lambda kv: -kv[1])],
                waiting_applications=waiting,
            )  # fmt: skip
