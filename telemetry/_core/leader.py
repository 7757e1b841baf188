"""Host-wide leadership for one job (the shared view's poller, a Celery queue's backlog poller):
a POSIX record lock in the multiprocess directory."""

from __future__ import annotations

import contextlib
import fcntl
import os

#: the shared view's lock file (a Celery backlog poller names its own)
LOCK_FILE = "telemetry-shared-view.lock"


class Leader:
    """Host-wide leadership for one job: a POSIX record lock on ``<directory>/<name>``, held for
    the process's life (released when it dies, never inherited by fork). Without a directory
    the process leads alone."""

    def __init__(self, directory: str | None, name: str = LOCK_FILE) -> None:
        self.directory = directory
        self.name = name
        self.fd: int | None = None

    def acquire(self) -> bool:
        if self.directory is None or self.fd is not None:
            return True
        fd = os.open(os.path.join(self.directory, self.name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None
