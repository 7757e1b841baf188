"""A loopback TCP forwarder for the tests: clients connect to ``127.0.0.1:<port>``, and each is
carried to the target from a chosen source address and port, as a client on another host would
reach the server (``127.0.0.2`` is another address on the loopback interface). The renaming
proxy of ``telemetry.tools.demo.stack`` without the renaming."""

from __future__ import annotations

from telemetry.tools.demo.stack import RenamingProxy


class Forwarder(RenamingProxy):
    def __init__(self, target_port: int, source: tuple[str, int] = ("127.0.0.2", 0)) -> None:
        super().__init__(target_port, name=None, source=source)
