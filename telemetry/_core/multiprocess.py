"""Host-wide metrics for uvicorn workers and Celery prefork children.

Why not prometheus-client's stock multiprocess mode: it writes an mmap value on every observation
(about 4 us each, several per checkout) and leaves every dead process's files behind, so scrapes
slow down as workers recycle. Here each process keeps plain in-memory counts and a background
flush (default every second, and at exit) replaces one file per process atomically:
``telemetry-<pid>-<start>.json``. A scrape, under an exclusive lock (see ``_locked``):

* reads the live processes' files. The serving process uses its own fresh snapshot and writes it
  to its file first, inside the lock: whatever a scrape shows of a process is on disk before the
  answer leaves, so a later scrape answered by another worker (or after this one is killed) reads
  at least as much, and no counter goes backwards between scrapes. A process's writes are
  serialized, so an older snapshot never replaces a newer one;
* folds each dead process's counters and histograms into ``telemetry-archive.json`` and deletes
  its file, so the sum over dead and live processes is preserved, counters never go backwards and
  the scrape reads (live processes + 1) files however many processes ever lived;
* drops a dead process's gauges (they described a process that no longer exists).

A process is identified by pid *and* kernel start time, so a reused pid is a new process. A merge
records the file names it consumed, so a crash between writing the archive and deleting the file
never counts twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

from . import snapshot as _snapshot
from .snapshot import Snap
from .stats import owner_rows, snapshot

PREFIX = "telemetry-"
ARCHIVE = "telemetry-archive.json"
LOCK = "telemetry.lock"



def _proc_start(pid: int) -> str | None:
    """Kernel start time of ``pid`` (clock ticks since boot), or None when it is not running."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read().decode("ascii", "replace")
    except FileNotFoundError:
        return None
    except OSError:  # pragma: no cover - no procfs: fall back to signal 0
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "?"
    fields = data[data.rfind(")") + 2 :].split()
    if fields and fields[0] == "Z":  # a zombie has exited; its counts are final
        return None
    return fields[19] if len(fields) > 19 else "?"


def _identity() -> tuple[int, str]:
    pid = os.getpid()
    return pid, _proc_start(pid) or f"t{time.time_ns()}"


def file_name(pid: int, start: str) -> str:
    return f"{PREFIX}{pid}-{start}.json"


TMP_PREFIX = ".tmp-"
#: the shared view's reported episodes, kept by the host's leader for the next one (the server
#: view's events read and write it; emptied with the rest at a deployment's start)
EPISODES = f"{PREFIX}shared-view-episodes"
#: a temporary file older than this was left by a process killed while writing it
TMP_MAX_AGE_SECONDS = 60.0


def _write_atomic(path: str, payload: Any) -> None:
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", dir=directory)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, separators=(",", ":"))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_dir(path: str) -> None:
    """Fail at start-up, naming the setting, when the directory cannot be used."""
    from .settings import ConfigError

    setting = "TELEMETRY_MULTIPROC_DIR (or PROMETHEUS_MULTIPROC_DIR)"
    if not os.path.isdir(path):
        raise ConfigError(
            f"invalid {setting}={path!r}: expected an existing directory; create it (empty) "
            "before the first worker starts"
        )
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"invalid {setting}={path!r}: expected a directory this process can write")


def prepare_dir(path: str) -> int:
    """Empty the directory at the start of a deployment, before any worker starts. Returns how
    many files were removed (ours and prometheus-client's ``*.db``)."""
    os.makedirs(path, exist_ok=True)
    removed = 0
    for pattern in (f"{PREFIX}*.json", "*.db", ".tmp-*", LOCK, EPISODES):
        for name in glob.glob(os.path.join(path, pattern)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
                removed += 1
    return removed


class ProcessFile:
    """This process's file in the directory; identity renewed after fork."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.renew()

    def renew(self) -> None:
        self.pid, self.start = _identity()
        self.path = os.path.join(self.directory, file_name(self.pid, self.start))
        self._lock = threading.Lock()  # new after fork: a parent thread may have held the old one

    def flush(self) -> Snap:
        """Write this process's snapshot now and return it."""
        with self._lock:
            snap = snapshot()
            payload = {"pid": self.pid, "start": self.start, "snap": snap}
            owners = owner_rows()
            if owners:
                payload["owners"] = owners
            _write_atomic(self.path, payload)
        return snap

    def remove(self) -> None:
        """Final flush for a clean exit: the scrape will archive it as a dead process."""
        self.flush()


@contextlib.contextmanager
def _locked(directory: str) -> Iterator[None]:
    """Exclusive across processes (a POSIX record lock) and across this process's threads.

    Not ``flock``: an flock belongs to the open file, so a worker forked while a scrape holds it
    (a Celery prefork parent replacing a child during a scrape) would keep it locked for its whole
    life and stall every later scrape. A record lock belongs to the process and is not inherited.
    """
    with _thread_lock:
        fd = os.open(os.path.join(directory, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the record lock


_thread_lock = threading.Lock()


def after_fork_in_child() -> None:
    """A lock a parent thread held at fork time would never be released in the child."""
    global _thread_lock
    _thread_lock = threading.Lock()


def _load(path: str) -> Any:
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None
    except ValueError:  # a torn file cannot happen (atomic replace); a foreign one is skipped
        return None


def read_host(directory: str, own: ProcessFile | None = None,
              written: dict[int, float] | None = None) -> tuple[Snap, list[tuple[int, Snap]]]:
    """The archive of dead processes and the snapshot of each live one (archiving the dead);
    ``written`` gets each live file's write time (a live process whose file stopped is frozen)."""
    live: list[tuple[int, Snap]] = []
    dead_pids: list[int] = []
    with _locked(directory):
        archive_path = os.path.join(directory, ARCHIVE)
        archive = _load(archive_path) or {"snap": _snapshot.empty(), "merged": []}
        merged = set(archive.get("merged", []))
        total = _snapshot.Total()
        total.add(archive["snap"])
        changed = False
        names = sorted(glob.glob(os.path.join(directory, f"{PREFIX}*-*.json")))
        present = set()
        for path in names:
            base = os.path.basename(path)
            if base == ARCHIVE:
                continue
            present.add(base)
            try:
                pid_text, start = base[len(PREFIX) : -len(".json")].split("-", 1)
                pid = int(pid_text)
            except ValueError:
                continue
            if own is not None and pid == own.pid and start == own.start:
                live.append((pid, own.flush()))
                if written is not None:
                    written[pid] = time.time()
                continue
            if _proc_start(pid) == start:
                data = _load(path)
                if data is not None:
                    live.append((pid, data["snap"]))
                    if written is not None:
                        with contextlib.suppress(OSError):
                            written[pid] = os.stat(path).st_mtime
                continue
            if base not in merged:
                data = _load(path)
                if data is not None:
                    total.add(data["snap"], dead=True)
                merged.add(base)
                changed = True
                dead_pids.append(pid)
        if changed:
            _write_atomic(archive_path, {"snap": total.snap(), "merged": sorted(merged)})
        if merged:
            for base in merged & present:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(directory, base))
            # the files are gone: nothing left to protect from a second merge
            _write_atomic(archive_path, {"snap": total.snap(), "merged": []})
        _remove_abandoned_tmp(directory)
    _mark_stock_dead(directory, dead_pids)
    return total.snap(), live


def _remove_abandoned_tmp(directory: str) -> None:
    """Temporary files of processes that died while writing (kill -9 between create and rename)."""
    now = time.time()
    for path in glob.glob(os.path.join(directory, f"{TMP_PREFIX}*")):
        try:
            pid_text = os.path.basename(path)[len(TMP_PREFIX) :].split("-", 1)[0]
            alive = pid_text.isdigit() and _proc_start(int(pid_text)) is not None
            if not alive or now - os.stat(path).st_mtime > TMP_MAX_AGE_SECONDS:
                os.unlink(path)
        except FileNotFoundError:
            continue


def _mark_stock_dead(directory: str, pids: list[int]) -> None:
    """Let prometheus-client's own multiprocess gauges (the user's metrics) forget dead pids."""
    if not pids or not glob.glob(os.path.join(directory, "*.db")):
        return
    try:
        from prometheus_client import multiprocess

        for pid in pids:
            multiprocess.mark_process_dead(pid, directory)
    except Exception:  # pragma: no cover - user metrics only; never break a scrape
        pass


def proc_start(pid: int) -> str | None:
    """Kernel start time of ``pid`` (public name for the shared view's liveness check)."""
    return _proc_start(pid)
