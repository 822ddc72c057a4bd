"""The control channel: a UNIX socket beside the queue that only the
gateway's own user can use (mode 0600), for C{gatewayctl status} and
C{gatewayctl reload}.

Why not TCP: a control port is one more thing to firewall; a socket file
is protected by the file system, like Postfix's public/ and private/.
One request per connection: a command word on one line, answered with one
JSON object on one line.

See also: gateway/ctl.py (the client side); postqueue(1) and postfix(1).
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

SOCKET_NAME = "control.sock"
COMMANDS = ("status", "reload")


def socket_path(queue_path: str) -> str:
    """Where the control socket of the gateway with this spool lives."""
    return os.path.join(queue_path, SOCKET_NAME)


class ControlProtocol(LineOnlyReceiver):
    """Reads one command, answers one JSON line, closes."""

    delimiter = b"\n"
    MAX_LENGTH = 1024

    def lineReceived(self, line: bytes) -> None:
        command = line.strip().decode("ascii", "replace")
        handler = self.factory.handlers.get(command)
        if handler is None:
            self._answer({"ok": False, "error": f"unknown command {command!r}; try: {', '.join(COMMANDS)}"})
            return
        d = defer.maybeDeferred(handler)
        d.addCallbacks(self._answer, lambda f: self._answer({"ok": False, "error": str(f.value)}))

    def _answer(self, result: Any) -> None:
        self.transport.write(json.dumps(result, sort_keys=True).encode() + b"\n")
        self.transport.loseConnection()


class ControlFactory(protocol.ServerFactory):
    """@param handlers: command word -> callable returning a JSON-ready
    dict (or a Deferred of one)."""

    protocol = ControlProtocol
    noisy = False
    log = Logger()

    def __init__(self, handlers: dict[str, Any]) -> None:
        self.handlers = handlers


def listen(reactor: Any, path: str, handlers: dict[str, Any]) -> Any:
    """Listen on C{path} (mode 0600), replacing a stale socket file."""
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # nobody answers: left by a crash
        else:
            probe.close()
            raise OSError(f"another gateway answers on {path}")
        finally:
            probe.close()
    return reactor.listenUNIX(path, ControlFactory(handlers), mode=0o600, wantPID=False)


def request(path: str, command: str, timeout: float = 30.0) -> dict[str, Any]:
    """Send one command to a running gateway (blocking; for gatewayctl).

    @raise ConnectionError: when no gateway answers on C{path}.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ConnectionError(f"no gateway is running with control socket {path}") from exc
        sock.sendall(command.encode("ascii") + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    return json.loads(data.decode("utf-8"))
