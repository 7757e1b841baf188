"""What the demo's process handling shares (the demo itself and its alert chain): the user's
error, a free loopback port, a log's last lines."""

from __future__ import annotations

import socket


class DemoError(Exception):
    """A clear message for the user; the CLI prints it and exits non-zero."""


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports: all bound at once, so the kernel cannot hand the same
    one out twice (a port closed and asked for again can come back)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
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
