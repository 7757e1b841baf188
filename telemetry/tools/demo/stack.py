"""Throwaway local services on free loopback ports, started from the installed Debian binaries:
PostgreSQL (``initdb`` and ``pg_ctl`` run as the ``postgres`` user when we are root), pgbouncer in
transaction mode in front of it, Redis. ``telemetry demo --stack real`` and the test suite use them;
nothing here runs in a user's process.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import select
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from telemetry.tools._proc import free_port


class Missing(Exception):
    """A service binary is not installed; the message names it and its Debian package."""

    def __str__(self) -> str:
        return f"{self.args[0]} is not installed: run scripts/install-system-deps.sh"


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


@dataclass
class Postgres:
    port: int
    datadir: str
    max_connections: int
    user: str = "postgres"

    def url(self, driver: str = "psycopg", password: str | None = None) -> str:
        auth = self.user if password is None else f"{self.user}:{password}"
        return f"postgresql+{driver}://{auth}@127.0.0.1:{self.port}/postgres"

    def psql(self, sql: str) -> str:
        out = subprocess.run(
            ["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, "-d", "postgres",
             "-At", "-c", sql],
            check=True, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        return out.stdout.strip()


def _postgres_user() -> tuple[int | None, int | None, dict[str, str] | None]:
    """(uid, gid, environment) that run a child itself as the postgres user when we are root."""
    if os.geteuid() != 0:
        return None, None, None
    pw = pwd.getpwnam("postgres")
    return (
        pw.pw_uid,
        pw.pw_gid,
        dict(os.environ, HOME=pw.pw_dir, USER="postgres", LOGNAME="postgres"),
    )


def as_postgres(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


@contextlib.contextmanager
def start_postgres(max_connections: int = 40) -> Iterator[Postgres]:
    initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
    if not initdb or not pg_ctl or not shutil.which("psql"):
        raise Missing("PostgreSQL (initdb, pg_ctl, psql; Debian package postgresql)")
    datadir = tempfile.mkdtemp(prefix="telemetry-pg-")
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(datadir, pw.pw_uid, pw.pw_gid)
    port = free_port()
    subprocess.run(
        as_postgres([initdb, "-D", datadir, "-A", "trust", "-U", "postgres", "--no-sync"]),
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    with open(
        f"{datadir}/pg_hba.conf", "a"
    ) as fh:  # clients from all of 127.0.0.0/8 ("other hosts")
        fh.write("host all all 127.0.0.0/8 trust\n")
    opts = (
        f"-p {port} -k {datadir} -c listen_addresses=127.0.0.1 "
        f"-c max_connections={max_connections} -c fsync=off -c shared_buffers=16MB"
    )
    subprocess.run(
        as_postgres([pg_ctl, "-D", datadir, "-o", opts, "-l", f"{datadir}/log", "-w", "start"]),
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    try:
        yield Postgres(port=port, datadir=datadir, max_connections=max_connections)
    finally:
        subprocess.run(
            as_postgres([pg_ctl, "-D", datadir, "-m", "immediate", "-w", "stop"]),
            capture_output=True, timeout=60,
        )  # fmt: skip
        shutil.rmtree(datadir, ignore_errors=True)


@dataclass
class Pgbouncer:
    """pgbouncer in transaction mode in front of a throwaway PostgreSQL."""

    port: int
    pool_size: int
    process: subprocess.Popen[bytes]

    def url(self, driver: str = "psycopg", user: str = "postgres") -> str:
        return f"postgresql+{driver}://{user}@127.0.0.1:{self.port}/postgres"

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/pgbouncer"


@contextlib.contextmanager
def start_pgbouncer(pg: Postgres, pool_size: int = 4, pool_mode: str = "transaction") -> Iterator[Pgbouncer]:
    """pgbouncer (Debian package, run as the postgres user) on a free port, transaction mode
    unless told, ``default_pool_size=pool_size``, admin console database ``pgbouncer``."""
    path = shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None
    )
    if not path:
        raise Missing("pgbouncer (Debian package pgbouncer)")
    workdir = tempfile.mkdtemp(prefix="telemetry-pgbouncer-")
    port = free_port()
    with open(f"{workdir}/userlist.txt", "w") as fh:
        fh.write('"postgres" ""\n"monitor" ""\n')
    with open(f"{workdir}/pgbouncer.ini", "w") as fh:
        fh.write(
            f"[databases]\npostgres = host=127.0.0.1 port={pg.port} dbname=postgres\n"
            f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {workdir}/userlist.txt\npool_mode = {pool_mode}\n"
            f"default_pool_size = {pool_size}\nmax_client_conn = 500\nadmin_users = postgres\n"
            f"stats_users = monitor\nlogfile = {workdir}/pgbouncer.log\n"
            "ignore_startup_parameters = extra_float_digits,statement_timeout\n"
        )
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        for name in ("", "/userlist.txt", "/pgbouncer.ini"):
            os.chown(workdir + name, pw.pw_uid, pw.pw_gid)
    # pgbouncer itself is our child (not a runuser wrapper that would leave it orphaned when
    # stopped): its pid is the one to signal and wait for
    uid, gid, env = _postgres_user()
    proc = subprocess.Popen([path, f"{workdir}/pgbouncer.ini"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, user=uid, group=gid,
                            extra_groups=[] if uid is not None else None, env=env)  # fmt: skip
    try:
        wait_port(port)
        yield Pgbouncer(port=port, pool_size=pool_size, process=proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)


@dataclass
class Redis:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@contextlib.contextmanager
def start_redis(port: int | None = None) -> Iterator[Redis]:
    """A throwaway Redis on a free port (or ``port``: a restart on the same address)."""
    binary = shutil.which("redis-server")
    if not binary:
        raise Missing("redis-server (Debian package redis-server)")
    port = port or free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_port(port)
        yield Redis(port=port, process=proc)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# --------------------------------------------------------------------------- a renaming pooler

SSL_REQUEST, GSS_REQUEST, PROTOCOL_3 = 80877103, 80877104, 196608


def _read_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("client went away during start-up")
        data += chunk
    return data


def rewrite_startup(body: bytes, name: str) -> bytes:
    """A startup message's body (after its length) with ``application_name`` set to ``name``."""
    protocol = struct.unpack("!i", body[:4])[0]
    if protocol != PROTOCOL_3:
        return body
    fields = body[4:].split(b"\x00")
    pairs = dict(zip(fields[0:-2:2], fields[1:-2:2], strict=True))
    pairs[b"application_name"] = name.encode()
    out = (
        struct.pack("!i", PROTOCOL_3)
        + b"".join(k + b"\x00" + v + b"\x00" for k, v in pairs.items())
        + b"\x00"
    )
    return out


class RenamingProxy:
    """What a hosted transaction pooler does to names (Supabase's Supavisor: \"Supavisor\" on every
    server connection, the client's ``application_name`` dropped): a loopback TCP proxy that
    rewrites each client's startup ``application_name`` and answers an SSL or GSS request with
    ``N``, in front of pgbouncer. ``telemetry demo --stack real --pooler supavisor`` and the tests.

    ``name=None`` leaves the name alone, and ``source`` connects upstream from another loopback
    address and port: a client on another host, as the server sees it (the tests' forwarder)."""

    def __init__(self, target_port: int, name: str | None = "Supavisor",
                 source: tuple[str, int] | None = None) -> None:  # fmt: skip
        self.target_port, self.name, self.source = target_port, name, source
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.listener.settimeout(0.1)
        self.port = int(self.listener.getsockname()[1])
        self.stop = threading.Event()
        self.sockets: list[socket.socket] = []
        self.threads = [
            threading.Thread(target=self._accept, name="test-renaming-proxy", daemon=True)
        ]
        self.threads[0].start()

    def url(self, driver: str = "psycopg", user: str = "postgres") -> str:
        return f"postgresql+{driver}://{user}@127.0.0.1:{self.port}/postgres"

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                client, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            t = threading.Thread(
                target=self._serve, args=(client,), name="test-renaming-proxy-conn", daemon=True
            )
            self.threads.append(t)
            t.start()

    def _serve(self, client: socket.socket) -> None:
        self.sockets.append(client)
        try:
            client.settimeout(10)
            while True:
                length = struct.unpack("!i", _read_exact(client, 4))[0]
                body = _read_exact(client, length - 4)
                code = struct.unpack("!i", body[:4])[0]
                if code in (SSL_REQUEST, GSS_REQUEST):
                    client.sendall(b"N")  # no encryption: the client goes on in clear
                    continue
                break
            client.settimeout(None)
            if self.name is not None:
                body = rewrite_startup(body, self.name)
            upstream = socket.socket()
            if self.source is not None:
                upstream.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                upstream.bind(self.source)
            upstream.connect(("127.0.0.1", self.target_port))
            self.sockets.append(upstream)
            upstream.sendall(struct.pack("!i", len(body) + 4) + body)
        except (OSError, ConnectionError, struct.error):
            with contextlib.suppress(OSError):
                client.close()
            return
        other = threading.Thread(target=self._pump, args=(upstream, client), daemon=True)
        self.threads.append(other)
        other.start()
        self._pump(client, upstream)

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while not self.stop.is_set():
                ready, _, _ = select.select([a], [], [], 0.1)
                if not ready:
                    continue
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except (OSError, ValueError):
            pass
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.stop.set()
        for t in list(self.threads):
            if t is not threading.current_thread():
                t.join(timeout=5)
        for s in [self.listener, *self.sockets]:
            with contextlib.suppress(OSError):
                s.close()

    def __enter__(self) -> RenamingProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
