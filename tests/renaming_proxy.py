"""What a hosted transaction pooler does to names, for the tests: a loopback TCP proxy in front of
pgbouncer (or PostgreSQL) that rewrites the ``application_name`` of every client's startup
message, as Supabase's Supavisor does ("Supavisor" on every server connection), and answers an
SSL or GSS encryption request with ``N`` as pgbouncer does without TLS. Nothing else changes:
the server and pgbouncer see one more hop, with the proxy's address."""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading

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
    out = struct.pack("!i", PROTOCOL_3) + b"".join(k + b"\x00" + v + b"\x00" for k, v in pairs.items()) + b"\x00"
    return out


class RenamingProxy:
    def __init__(self, target_port: int, name: str = "Supavisor") -> None:
        self.target_port, self.name = target_port, name
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.listener.settimeout(0.1)
        self.port = int(self.listener.getsockname()[1])
        self.stop = threading.Event()
        self.sockets: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, name="test-renaming-proxy", daemon=True)]
        self.threads[0].start()

    def url(self, driver: str = "psycopg", user: str = "postgres") -> str:
        return f"postgresql+{driver}://{user}@127.0.0.1:{self.port}/postgres"

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                client, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            t = threading.Thread(target=self._serve, args=(client,), name="test-renaming-proxy-conn", daemon=True)
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
            body = rewrite_startup(body, self.name)
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
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
