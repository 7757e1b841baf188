"""What the demo's process handling shares (the demo itself and its alert chain): the user's
error, a free loopback port, a log's last lines."""

from __future__ import annotations

import os
import random
import socket


class DemoError(Exception):
    """A clear message for the user; the CLI prints it and exits non-zero."""


def free_port() -> int:
    return free_ports(1)[0]


#: ``lo-hi``: take free ports from this range only. The test suite gives each of its parallel
#: workers a range of its own below the kernel's ephemeral range, so two workers never pick the
#: same port between choosing it and their server binding it
PORT_RANGE_ENV = "TELEMETRY_FREE_PORTS"
_cursor = [-1]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports: all bound at once, so the kernel cannot hand the same
    one out twice (a port closed and asked for again can come back)."""
    span = os.environ.get(PORT_RANGE_ENV, "")
    socks: list[socket.socket] = []
    try:
        if not span:
            for _ in range(n):
                socks.append(socket.socket())
                socks[-1].bind(("127.0.0.1", 0))
        else:
            lo, hi = (int(p) for p in span.split("-"))
            if _cursor[0] < 0:  # a process of its own (the demo's) starts elsewhere in the range
                _cursor[0] = random.randrange(hi - lo)
            for _ in range(hi - lo):
                if len(socks) == n:
                    break
                _cursor[0] = (_cursor[0] + 1) % (hi - lo)
                sock = socket.socket()
                try:
                    sock.bind(("127.0.0.1", lo + _cursor[0]))
                except OSError:
                    sock.close()
                    continue
                socks.append(sock)
            if len(socks) < n:
                raise OSError(f"no {n} free ports in {PORT_RANGE_ENV}={span}")
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def tail(path: str, n: int = 15) -> str:
    try:
        with open(path, errors="replace") as fh:
            return "".join(fh.readlines()[-n:])
    except OSError:
        return ""
