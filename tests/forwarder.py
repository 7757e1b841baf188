"""A loopback TCP forwarder for the tests: clients connect to ``127.0.0.1:<port>``, and each is
carried to the target from a chosen source address and port, as a client on another host would
reach the server (``127.0.0.2`` is another address on the loopback interface)."""

from __future__ import annotations

import contextlib
import select
import socket
import threading


class Forwarder:
    def __init__(self, target_port: int, source: tuple[str, int] = ("127.0.0.2", 0)) -> None:
        self.target_port, self.source = target_port, source
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.listener.settimeout(0.1)
        self.port = int(self.listener.getsockname()[1])
        self.stop = threading.Event()
        self.sockets: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, name="test-forwarder", daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                client, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            upstream = socket.socket()
            upstream.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            upstream.bind(self.source)
            upstream.connect(("127.0.0.1", self.target_port))
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                t = threading.Thread(target=self._pump, args=(a, b), name="test-forwarder-pump", daemon=True)
                self.threads.append(t)
                t.start()

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
        except OSError:
            pass
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=5)
        for s in [self.listener, *self.sockets]:
            with contextlib.suppress(OSError):
                s.close()

    def __enter__(self) -> Forwarder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
