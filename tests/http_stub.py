"""A loopback HTTP server for the tests that read what a host or a pooler serves: ``answer(path,
headers) -> (status, body)`` decides each GET (a 3xx status: the body is the ``Location``)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Answer = Callable[[str, Any], tuple[int, str]]


@contextlib.contextmanager
def serving(answer: Answer) -> Iterator[int]:
    """Serve ``answer`` on a free loopback port (yielded) until the block ends."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            status, text = answer(self.path, self.headers)
            body = text.encode() if not 300 <= status < 400 else b""
            self.send_response(status)
            if 300 <= status < 400:  # a redirect: the answer's text is where to
                self.send_header("Location", text)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextlib.contextmanager
def switchable(answer: Answer) -> Iterator[tuple[int, dict[str, Any]]]:
    """Like :func:`serving`, with a switch: while ``state["drip"]`` is true each answer sends its
    headers, then one byte of its body every ``state["every"]`` seconds (0.5 by default): each
    read returns well within any socket timeout, and the whole never ends in time."""
    state: dict[str, Any] = {"drip": False, "every": 0.5, "stop": threading.Event()}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            status, text = answer(self.path, self.headers)
            body = text.encode() or b"#" * 100
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not state["drip"]:
                self.wfile.write(body)
                return
            for byte in body:
                if state["stop"].wait(state["every"]):
                    return
                try:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                except OSError:
                    return

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1]), state
    finally:
        state["stop"].set()
        server.shutdown()
        server.server_close()
        thread.join()
